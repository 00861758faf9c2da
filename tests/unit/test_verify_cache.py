"""The verification cache (common.verifycache): what a damaged or forged
record gets (never trusted, asked again), and that a good one round-trips.
Pure: files under tmp_path only."""

import os

import pytest

from common import verifycache as cache

NOW = 1_800_000_000
TTLS = cache.lifetimes(2678400, 10800)
KEY = "john@example.org"


@pytest.fixture
def store(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    store = cache.Store(fd)
    yield store
    store.close()
    os.close(fd)


def record_path(root, key=KEY):
    return os.path.join(root, cache.relative_path(key))


def test_a_record_round_trips_and_smap_reads_it(tmp_path, store):
    store.write(KEY, cache.Record(cache.REJECT, NOW, NOW + 10800,
                                  "550 5.1.1 <john@example.org>: User unknown"))
    record, damaged = cache.read(str(tmp_path), KEY, NOW + 1, TTLS)
    assert not damaged
    assert (record.kind, record.checked, record.expires) == (cache.REJECT, NOW, NOW + 10800)
    assert record.reply == "550 5.1.1 <john@example.org>: User unknown"
    assert not record.due(NOW + 5399) and record.due(NOW + 5400)
    assert cache.read(str(tmp_path), KEY, NOW + 10800, TTLS) == (None, False)   # expired
    assert oct(os.stat(record_path(tmp_path)).st_mode & 0o777) == "0o600"


def test_the_key_is_case_blind():
    assert cache.key_of("John@Example.ORG") == "john@example.org"
    assert cache.name_of("john@example.org") == cache.name_of(cache.key_of("JOHN@example.org"))


GOOD = None


def good_bytes(kind=cache.OK, checked=NOW, expires=NOW + 100, key=KEY, reply="250 2.1.5 Ok"):
    return cache.encode(key, cache.Record(kind, checked, expires, reply))


@pytest.mark.parametrize("damage", [
    lambda data: data[:-1],                                  # no final LF (truncated)
    lambda data: data[:10],
    lambda data: b"",
    lambda data: data.replace(b"\tok\t", b"\tyes\t"),        # unknown kind (CRC is off too)
    lambda data: data[:20] + bytes([data[20] ^ 1]) + data[21:],   # one flipped bit
    lambda data: data.replace(b"MWV1", b"MWV2"),
    lambda data: data + b"x" * 2000,                          # too long
    lambda data: b"\xff" + data,                              # not ASCII
    lambda data: data.replace(b"\n", b"\tmore\n"),            # a field too many
])
def test_a_damaged_record_is_never_trusted(tmp_path, store, damage):
    store.write(KEY, cache.Record(cache.OK, NOW, NOW + 100, "250 2.1.5 Ok"))
    path = record_path(tmp_path)
    with open(path, "rb") as source:
        data = source.read()
    with open(path, "wb") as target:
        target.write(damage(data))
    assert cache.read(str(tmp_path), KEY, NOW, TTLS) == (None, True)
    assert store.read(KEY, NOW, TTLS) == (None, True)


def forged(kind, checked, expires, key=KEY, reply="550 5.1.1 forged"):
    return cache.decode(cache.encode(key, cache.Record(kind, checked, expires, reply)),
                        KEY, NOW, TTLS)


def test_a_forged_record_cannot_outlive_the_configured_lifetime():
    """A record with a valid CRC, as a taken-over smap could write it: a
    negative one longer than verify-negative-ttl, a positive one longer
    than verify-positive-ttl, a check time in the future, a record copied
    from another address, an unavailable one longer than UNAVAILABLE_TTL:
    all refused."""
    assert forged(cache.REJECT, NOW, NOW + 10800) is not None
    assert forged(cache.REJECT, NOW, NOW + 10801) is None
    assert forged(cache.OK, NOW, NOW + 2678401) is None
    assert forged(cache.OK, NOW + 3600, NOW + 7200) is None
    assert forged(cache.UNAVAILABLE, NOW, NOW + cache.UNAVAILABLE_TTL + 1) is None
    assert forged(cache.OK, NOW, NOW + 100, key="other@example.org") is None
    assert forged(cache.REJECT, NOW, NOW + 100, reply="") is None
    assert forged(cache.OK, NOW, NOW) is None


def test_odd_files_at_a_record_name_are_damage_not_a_hang(tmp_path, store):
    store.write(KEY, cache.Record(cache.OK, NOW, NOW + 100))
    path = record_path(tmp_path)
    os.unlink(path)
    os.mkfifo(path)                       # a FIFO: opened without blocking
    assert cache.read(str(tmp_path), KEY, NOW, TTLS) == (None, True)
    os.unlink(path)
    os.symlink("/etc/passwd", path)       # a link: not followed
    assert cache.read(str(tmp_path), KEY, NOW, TTLS) == (None, False)
    os.unlink(path)
    os.mkdir(path)                        # a directory: damage, replaced on the next write
    assert cache.read(str(tmp_path), KEY, NOW, TTLS) == (None, True)
    store.write(KEY, cache.Record(cache.OK, NOW, NOW + 100))
    assert cache.read(str(tmp_path), KEY, NOW, TTLS)[0].kind == cache.OK


def test_a_cache_directory_that_is_a_link_is_moved_aside_and_rebuilt(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, tmp_path / cache.DIRECTORY)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        store = cache.Store(fd)
        store.write(KEY, cache.Record(cache.OK, NOW, NOW + 100))
        store.close()
    finally:
        os.close(fd)
    assert (tmp_path / cache.DIRECTORY).is_dir() and not (tmp_path / cache.DIRECTORY).is_symlink()
    assert list(elsewhere.iterdir()) == []      # nothing written through the link
    assert any(p.name.startswith("verify.damaged") for p in tmp_path.iterdir())


def test_the_writer_does_not_follow_a_link_at_its_temporary_name(tmp_path, store):
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    sub, name = cache.name_of(KEY)
    store.sub(sub)
    os.symlink(victim, tmp_path / cache.DIRECTORY / sub / (".%s.%d.tmp" % (name, os.getpid())))
    store.write(KEY, cache.Record(cache.OK, NOW, NOW + 100))
    assert victim.read_text() == "keep\n"
    assert cache.read(str(tmp_path), KEY, NOW, TTLS)[0].kind == cache.OK


def test_sweep_removes_expired_and_damaged_records_and_keeps_good_ones(tmp_path, store):
    store.write("a@example.org", cache.Record(cache.OK, NOW, NOW + 100))
    store.write("b@example.org", cache.Record(cache.REJECT, NOW - 20000, NOW - 10000, "550 x"))
    store.write("c@example.org", cache.Record(cache.OK, NOW, NOW + 100))
    with open(record_path(tmp_path, "c@example.org"), "ab") as target:
        target.write(b"junk")
    sub, name = cache.name_of("a@example.org")
    (tmp_path / cache.DIRECTORY / sub / ".stale.tmp").write_text("x")
    # a good record copied to another address's name: damage
    os.link(record_path(tmp_path, "a@example.org"),
            tmp_path / cache.DIRECTORY / sub / (sub + "0" * 62))
    kept, removed = store.sweep(NOW, TTLS)
    assert kept == 1 and removed == 4
    assert cache.read(str(tmp_path), "a@example.org", NOW, TTLS)[0].kind == cache.OK

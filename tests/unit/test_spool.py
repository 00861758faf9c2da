"""common.spool: the message file format, the crash-safe writer (tmp/ then
rename into queue/ then fsync of queue/), truncation detection, the sweep."""

import errno
import os

import pytest

from common import spool

ENVELOPE = {"id": "0123456789ABCDEF", "arrival": "1700000000.000000",
            "client-addr": "192.0.2.7", "client-name": "client.example.net",
            "helo": "client.example.net", "sender": "a@example.net",
            "rcpt": ["b@example.org", "c@example.org"]}


@pytest.fixture
def root(tmp_path):
    spool.make_dirs(str(tmp_path / "spool"))
    return str(tmp_path / "spool")


def write_message(root, message=b"Subject: x\r\n\r\nbody\r\n", envelope=ENVELOPE):
    writer = spool.MessageWriter(root, envelope["id"])
    writer.start(envelope)
    writer.write(message)
    writer.commit()
    return os.path.join(root, spool.QUEUE, envelope["id"])


def test_make_dirs_creates_the_layout(tmp_path):
    root = tmp_path / "new" / "spool"
    spool.make_dirs(str(root))
    for name in (spool.TMP, spool.QUEUE, spool.STATE, spool.BAD):
        assert (root / name).is_dir() and (root / name).stat().st_mode & 0o777 == 0o700
    assert os.path.exists(root / spool.TRIGGER)
    spool.make_dirs(str(root))        # again: no error


def test_round_trip_and_file_mode(root):
    message = b"Subject: x\r\n\r\n" + bytes(range(256)) + b"\r\nMAILWALL-END 3\n\r\n"
    path = write_message(root, message)
    assert os.stat(path).st_mode & 0o777 == 0o600
    envelope, text = spool.read_message(path)
    assert text == message
    assert envelope["rcpt"] == ENVELOPE["rcpt"] and envelope["sender"] == "a@example.net"
    assert envelope["arrival"] == 1700000000.0
    assert spool.queued(root) == [ENVELOPE["id"]]
    assert os.listdir(os.path.join(root, spool.TMP)) == []


def test_message_is_only_in_tmp_until_commit(root):
    writer = spool.MessageWriter(root, "00AA")
    writer.start(dict(ENVELOPE, id="00AA"))
    writer.write(b"x" * 300000)          # past the write buffer: reaches the disk
    assert os.listdir(os.path.join(root, spool.TMP)) == ["00AA"]
    assert spool.queued(root) == []
    writer.abort()
    assert os.listdir(os.path.join(root, spool.TMP)) == [] and spool.queued(root) == []


def test_commit_order_fsync_rename_fsync_dir(root, monkeypatch):
    calls = []
    real_fsync, real_rename, real_fsync_dir = os.fsync, os.rename, spool.fsync_dir
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(os, "rename", lambda a, b: (calls.append("rename"), real_rename(a, b)))
    monkeypatch.setattr(spool, "fsync_dir",
                        lambda path: (calls.append("fsync_dir:" + os.path.basename(path)),
                                      real_fsync_dir(path)))
    write_message(root)
    # the last fsync is the one fsync_dir does on the queue directory
    assert calls == ["fsync", "rename", "fsync_dir:queue", "fsync"]


def test_enospc_during_commit_leaves_nothing(root, monkeypatch):
    writer = spool.MessageWriter(root, "00BB")
    writer.start(dict(ENVELOPE, id="00BB"))
    writer.write(b"text\r\n")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        writer.commit()
    writer.abort()
    assert os.listdir(os.path.join(root, spool.TMP)) == [] and spool.queued(root) == []


def test_failed_directory_fsync_takes_the_file_back(root, monkeypatch):
    def broken(path):
        raise OSError(errno.EIO, "I/O error")
    monkeypatch.setattr(spool, "fsync_dir", broken)
    with pytest.raises(OSError):
        write_message(root)
    assert spool.queued(root) == []


def test_control_characters_never_enter_the_envelope(root):
    with pytest.raises(ValueError):
        spool.encode_envelope(dict(ENVELOPE, sender="a@example.net\nrcpt evil@x"))


@pytest.mark.parametrize("cut", [1, 5, 20, 60])
def test_truncated_file_is_detected(root, cut):
    path = write_message(root)
    with open(path, "rb+") as handle:
        size = os.fstat(handle.fileno()).st_size
        handle.truncate(size - cut)
    with pytest.raises(spool.SpoolError):
        spool.read_message(path)


@pytest.mark.parametrize("content", [
    b"", b"not a spool file\n", spool.MAGIC + b"id 00AA\n",
    spool.MAGIC + b"id 00AA\narrival 1\nsender a@b\n\nbody\nMAILWALL-END 5\n",
    spool.MAGIC + b"id 00AA\narrival 1\nsender a@b\nrcpt c@d\nevil x\n\n\nMAILWALL-END 0\n",
    spool.MAGIC + b"id ZZ\narrival 1\nsender a@b\nrcpt c@d\n\n\nMAILWALL-END 0\n",
    spool.MAGIC + b"id 00AA\nid 00AB\narrival 1\nsender a@b\nrcpt c@d\n\n\nMAILWALL-END 0\n",
    spool.MAGIC + b"id 00AA\narrival 1\nsender a@b\nrcpt c@d\n\nxy\nMAILWALL-END 5\n",
])
def test_malformed_files_are_refused(tmp_path, content):
    path = tmp_path / "f"
    path.write_bytes(content)
    with pytest.raises(spool.SpoolError):
        spool.read_message(str(path))


def test_ids_are_unique_and_valid():
    ids = {spool.new_id(1700000000.0) for _ in range(200)}
    assert len(ids) == 200 and all(spool.valid_id(i) for i in ids)
    assert not spool.valid_id("../etc") and not spool.valid_id(".trigger")


def test_queued_lists_only_message_names(root):
    write_message(root)
    open(os.path.join(root, spool.QUEUE, ".hidden"), "w").close()
    assert spool.queued(root) == [ENVELOPE["id"]]


def test_sweep_removes_only_stale_temporary_files(root):
    old = os.path.join(root, spool.TMP, "00CC")
    new = os.path.join(root, spool.TMP, "00DD")
    for path in (old, new):
        open(path, "w").close()
    os.utime(old, (1000, 1000))
    assert spool.sweep_tmp(root, now=1000 + spool.STALE_TMP_SECONDS + 1) == ["00CC"]
    assert os.listdir(os.path.join(root, spool.TMP)) == ["00DD"]


def test_poke_writes_to_a_reader_and_is_harmless_without_one(root):
    assert spool.poke(root) is False            # nobody reading the FIFO
    fd = os.open(os.path.join(root, spool.TRIGGER), os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert spool.poke(root) is True
        assert os.read(fd, 10) == b"!"
    finally:
        os.close(fd)


# -- issue 11, finding 4: every number read from a spool file is checked ------

def envelope_block(arrival="1700000000.5", extra=""):
    return ("id 00AA\narrival %s\nsender a@b\nrcpt c@d\n%s" % (arrival, extra)).encode()


@pytest.mark.parametrize("arrival", ["nan", "NaN", "inf", "-inf", "infinity", "-1e309",
                                     "1e309", "1e9", "-5", "+5", " 5", "5 ", "1_000",
                                     "\u0663", "0x10", "1.2.3", ".5", "5.", "",
                                     "99999999999", "1" * 30])
def test_an_arrival_that_is_not_a_time_in_range_is_refused(arrival):
    with pytest.raises(spool.SpoolError, match="arrival"):
        spool.parse_envelope(envelope_block(arrival))


@pytest.mark.parametrize("size", ["nan", "inf", "-1", "1e3", "1.5", "9" * 400,
                                  str(spool.MAX_SIZE + 1), "", "\u0663"])
def test_a_size_that_is_not_a_count_in_range_is_refused(size):
    with pytest.raises(spool.SpoolError, match="size"):
        spool.parse_envelope(envelope_block(extra="size %s\n" % size))


def test_numbers_in_range_are_read():
    envelope = spool.parse_envelope(envelope_block("0", "size 123\n"))
    assert envelope["arrival"] == 0.0 and envelope["size"] == 123
    assert spool.parse_envelope(envelope_block("1700000000.123456"))["arrival"] == \
        1700000000.123456
    assert "size" not in spool.parse_envelope(envelope_block())


def test_decimal():
    assert spool.decimal("12") == 12 and spool.decimal("1.25") == 1.25
    assert spool.decimal("1.25", fraction=False) is None
    for text in ("nan", "inf", "1e5", "-1", "1_0", "\u0663", "", ".", "1.", ".1", "1.2.3"):
        assert spool.decimal(text) is None, text


def test_an_entry_that_cannot_be_swept_does_not_keep_the_others(tmp_path):
    root = str(tmp_path)
    spool.make_dirs(root)
    tmp = tmp_path / spool.TMP
    (tmp / "0A").mkdir()
    (tmp / "0B").write_bytes(b"x")
    for name in ("0A", "0B"):
        os.utime(tmp / name, (1000, 1000))
    failures = []
    assert spool.sweep_tmp(root, now=1000 + spool.STALE_TMP_SECONDS + 1,
                           failures=failures) == ["0B"]
    assert [name for name, _ in failures] == ["0A"] and (tmp / "0A").is_dir()

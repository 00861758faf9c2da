"""The APOP user database: format, safety checks, atomic locked updates."""

import multiprocessing
import os

import pytest

from common import authdb


def make(path, users):
    authdb.update(str(path), lambda current: current.update(users))


def test_round_trip_keeps_every_field(tmp_path):
    path = tmp_path / "auth"
    odd = "p\u00e4ss word\t%x"
    make(path, {"alice": authdb.User("alice", False, odd, 2, 100, 50, "Alice A.")})
    users, _ = authdb.load(str(path))
    alice = users["alice"]
    assert (alice.enabled, alice.secret, alice.bad, alice.locked_until, alice.last_login,
            alice.fullname) == (False, odd, 2, 100, 50, "Alice A.")
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert "\t%x" not in path.read_text()          # encoded, one line per user


def test_missing_file_is_empty(tmp_path):
    assert authdb.load(str(tmp_path / "none")) == ({}, None)


def test_loose_permissions_are_refused(tmp_path):
    path = tmp_path / "auth"
    make(path, {"alice": authdb.User("alice", True, "s")})
    os.chmod(path, 0o644)
    with pytest.raises(authdb.AuthDbError, match="0600"):
        authdb.load(str(path))


@pytest.mark.parametrize("line", [
    "alice\tenabled\ts\t0\t0\t0",                     # six fields
    "al ice\tenabled\ts\t0\t0\t0\t",
    "alice\tmaybe\ts\t0\t0\t0\t",
    "alice\tenabled\ts\tx\t0\t0\t",
    "alice\tenabled\ts\t-1\t0\t0\t",
])
def test_malformed_lines_are_refused_with_line_number(tmp_path, line):
    path = tmp_path / "auth"
    path.write_text(authdb.HEADER + "\n" + line + "\n")
    os.chmod(path, 0o600)
    with pytest.raises(authdb.AuthDbError, match=":2:"):
        authdb.load(str(path))


def test_record_login_notes_a_good_login_and_clears_old_locks(tmp_path):
    """Bad logins are never written to the db (pop3gw.penalty counts them per
    source); a good one notes the time and clears what an old version left."""
    path = str(tmp_path / "auth")
    make(path, {"bob": authdb.User("bob", True, "s", bad=2, locked_until=1060)})
    user = authdb.record_login(path, "bob", now=2000)
    assert (user.bad, user.locked_until, user.last_login) == (0, 0, 2000)
    assert authdb.load(path)[0]["bob"].last_login == 2000
    assert authdb.record_login(path, "nobody-here") is None


def _bump(path, name, times):
    def count(users):
        users[name].bad += 1
    for _ in range(times):
        authdb.update(path, count)


def test_concurrent_writers_lose_nothing(tmp_path):
    path = str(tmp_path / "auth")
    make(path, {"a": authdb.User("a", True, "s"), "b": authdb.User("b", True, "s")})
    workers = [multiprocessing.get_context("fork").Process(target=_bump, args=(path, name, 40))
               for name in ("a", "b", "a", "b")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    users, _ = authdb.load(path)
    assert users["a"].bad == 80 and users["b"].bad == 80
    assert not [n for n in os.listdir(tmp_path) if ".tmp." in n]


def test_cache_notices_a_changed_file_without_a_signal(tmp_path):
    path = str(tmp_path / "auth")
    cache = authdb.Cache(path)
    cache.refresh()
    assert cache.users == {}
    make(path, {"carol": authdb.User("carol", True, "s")})
    assert cache.refresh() is True and "carol" in cache.users
    assert cache.refresh() is False
    os.chmod(path, 0o640)        # unsafe: the cache refuses it and has no users
    os.utime(path, ns=(1, 1))
    assert cache.refresh() is True and cache.users == {} and "0600" in cache.error

"""The root monitor's authority over the secrets: verification recorded in
the db file, signing only for the verified user, and the bounded line
protocol the jailed child uses to ask."""

import os
import socket
import threading

from common import apop, authdb
from pop3gw import authority

STAMP = "<7.8.beef@gw.test>"


class QuietLog:
    def __init__(self):
        self.events = []

    def _add(self, event, **fields):
        self.events.append((event, fields))

    info = notice = warning = error = _add


def keeper(tmp_path, now=1000, **users):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = str(tmp_path / "auth")
    authdb.update(path, lambda current: current.update(
        {name: authdb.User(name, True, secret) for name, secret in users.items()}))
    cache = authdb.Cache(path)
    cache.reload()
    return authority.Authority(cache, STAMP, 3, 600, QuietLog(), clock=lambda: now), path


def test_verify_records_outcomes_in_the_file_and_locks(tmp_path):
    auth, path = keeper(tmp_path, alice="s1")
    for _ in range(3):
        assert auth.verify("alice", apop.digest(STAMP, "bad")) == ("refused", "wrong secret")
    assert authdb.load(path)[0]["alice"].locked_until == 1600
    assert auth.verify("alice", apop.digest(STAMP, "s1"))[1].startswith("account locked")
    assert ("lock", {"user": "alice", "until": 1600, "reason": "3 bad logins"}) in \
        auth.log.events
    later, _ = keeper(tmp_path / "x", now=5000, bob="s2")
    assert later.verify("bob", apop.digest(STAMP, "s2")) == ("ok", "")
    assert authdb.load(str(tmp_path / "x" / "auth"))[0]["bob"].last_login == 5000


def test_a_good_login_that_changes_nothing_leaves_the_file_alone(tmp_path):
    """A clean entry whose last login is already this second: no rewrite (the
    file, its inode and mtime stay), deferred or not."""
    auth, path = keeper(tmp_path, now=5000.7, bob="s2")
    assert auth.verify("bob", apop.digest(STAMP, "s2")) == ("ok", "")   # writes last login
    assert authdb.load(path)[0]["bob"].last_login == 5000
    before = os.stat(path)
    auth.database.refresh()
    for defer in (False, True):
        again = authority.Authority(auth.database, STAMP, 3, 600, QuietLog(),
                                    clock=lambda: 5000.2)
        assert again.verify("bob", apop.digest(STAMP, "s2"), defer=defer) == ("ok", "")
        again.finish()
        assert again.sign("<1.2@upstream.test>") == apop.digest("<1.2@upstream.test>", "s2")
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == \
        (before.st_ino, before.st_mtime_ns, before.st_size)
    # a second later the last login changes: written again
    later = authority.Authority(auth.database, STAMP, 3, 600, QuietLog(), clock=lambda: 5001)
    assert later.verify("bob", apop.digest(STAMP, "s2"), defer=True) == ("ok", "")
    later.finish()
    assert authdb.load(path)[0]["bob"].last_login == 5001


def test_a_good_login_after_bad_ones_still_clears_the_count(tmp_path):
    auth, path = keeper(tmp_path, now=5000, bob="s2")
    auth.verify("bob", apop.digest(STAMP, "s2"))                  # last login: this second
    assert auth.verify("bob", apop.digest(STAMP, "wrong")) == ("refused", "wrong secret")
    assert authdb.load(path)[0]["bob"].bad == 1
    assert auth.verify("bob", apop.digest(STAMP, "s2"), defer=True) == ("ok", "")
    auth.finish()
    user = authdb.load(path)[0]["bob"]
    assert (user.bad, user.last_login) == (0, 5000)


def test_unknown_and_malformed(tmp_path):
    auth, _ = keeper(tmp_path, alice="s1")
    assert auth.verify("nosuch", apop.digest(STAMP, "s1")) == ("refused", "unknown user")
    assert auth.verify("al ice", "0" * 32) == ("refused", "malformed request")
    assert auth.verify("alice", "X" * 32) == ("refused", "malformed request")
    assert auth.verify("alice", apop.digest("<other@stamp>", "s1")) == \
        ("refused", "wrong secret")                      # only this session's timestamp


def test_sign_only_after_verify_and_only_a_valid_timestamp(tmp_path):
    auth, _ = keeper(tmp_path, alice="s1", bob="s2")
    assert auth.sign("<1@up>") is None                         # nobody verified yet
    auth.verify("alice", apop.digest(STAMP, "s1"))
    assert auth.sign("<bad stamp@up>") is None
    assert auth.sign("<1@up>") == apop.digest("<1@up>", "s1")   # alice's, never bob's
    assert auth.sign("<2@up>") == apop.digest("<2@up>", "s1")
    assert auth.sign("<3@up>") is None                          # bounded


def test_the_line_protocol_between_child_and_monitor(tmp_path):
    auth, _ = keeper(tmp_path, alice="s1")
    child, monitor = socket.socketpair()
    thread = threading.Thread(target=authority.serve, args=(
        monitor, auth, lambda words: "ok 127.0.0.1" if words == ["mail", "110"]
        else "refused no", auth.log))
    thread.start()
    link = authority.MonitorLink(child)
    assert link.verify("alice", apop.digest(STAMP, "wrong")) == ("refused", "wrong secret")
    assert link.sign("<1@up>") is None
    assert link.verify("alice", apop.digest(STAMP, "s1")) == ("ok", "")
    assert link.sign("<1@up>") == apop.digest("<1@up>", "s1")
    assert link.resolve("mail", 110) == ["127.0.0.1"]
    assert link.ask("frobnicate") == ["refused", "bad request\n"]
    child.sendall(b"x" * 600 + b"\n")                          # oversized: monitor stops
    thread.join(10)
    assert not thread.is_alive()
    assert ("monitor", {"reason": "oversized request from the session child"}) in \
        auth.log.events
    link.reader.close()
    child.close()
    monitor.close()

"""The root monitor's authority over the secrets: verification (good logins
noted in the db file, bad ones counted per source in the penalty file,
never in the user's entry), signing only for the verified user, and the
bounded line protocol the jailed child uses to ask."""

import os
import socket
import threading

from common import apop, authdb
from pop3gw import authority, penalty

STAMP = "<7.8.beef@gw.test>"


class QuietLog:
    def __init__(self):
        self.events = []

    def _add(self, event, **fields):
        self.events.append((event, fields))

    info = notice = warning = error = _add


def keeper(tmp_path, now=1000, source="192.0.2.1", **users):
    """An Authority on a real db file (maxbad 3, badsleep 600) whose penalty
    waits are recorded in .waits instead of slept."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = str(tmp_path / "auth")
    authdb.update(path, lambda current: current.update(
        {name: authdb.User(name, True, secret) for name, secret in users.items()}))
    cache = authdb.Cache(path)
    cache.reload()
    waits = []
    auth = authority.Authority(cache, STAMP, 3, 600, QuietLog(), clock=lambda: now,
                               source=source, sleep=waits.append)
    auth.waits = waits
    return auth, path


def again(auth, source, now=1000):
    """Another session's Authority on the same db, from source."""
    other = authority.Authority(auth.database, STAMP, 3, 600, QuietLog(), clock=lambda: now,
                                source=source, sleep=auth.waits.append)
    other.waits = auth.waits
    return other


def test_bad_logins_count_against_the_source_and_never_touch_the_db(tmp_path):
    auth, path = keeper(tmp_path, alice="s1")
    before = os.stat(path)
    for _ in range(3):
        assert auth.verify("alice", apop.digest(STAMP, "bad")) == ("refused", "wrong secret")
    assert auth.waits == [1, 2, 4]
    info = os.stat(path)
    assert (info.st_ino, info.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert authdb.load(path)[0]["alice"].bad == 0
    assert penalty.load(path + penalty.SUFFIX) == {"192.0.2.1": penalty.Entry(3, 1000)}
    assert ("penalty", {"addr": "192.0.2.1", "bad": 3, "until": 1600,
                        "reason": "source refused for 600s"}) in auth.log.events
    # The source is refused even with the right digest, and the refusal is
    # not counted; alice from another source logs in.
    verdict, reason = auth.verify("alice", apop.digest(STAMP, "s1"))
    assert (verdict, reason) == ("refused",
                                 "source refused until 1600: 3 bad logins from 192.0.2.1")
    assert auth.waits[-1] == 4
    assert again(auth, "192.0.2.2").verify("alice", apop.digest(STAMP, "s1")) == ("ok", "")
    assert penalty.load(path + penalty.SUFFIX) == {"192.0.2.1": penalty.Entry(3, 1000)}
    # badsleep after the last bad login the source may try again.
    assert again(auth, "192.0.2.1", now=1600).verify("alice", apop.digest(STAMP, "s1")) == \
        ("ok", "")
    assert penalty.load(path + penalty.SUFFIX) == {}
    later, _ = keeper(tmp_path / "x", now=5000, bob="s2")
    assert later.verify("bob", apop.digest(STAMP, "s2")) == ("ok", "")
    assert authdb.load(str(tmp_path / "x" / "auth"))[0]["bob"].last_login == 5000


def test_unknown_user_and_wrong_digest_do_the_same_work(tmp_path):
    """The same penalty update, the same wait, no db write: only the log
    reason differs.  Disabled and secret-less users alike."""
    auth, path = keeper(tmp_path, alice="s1", off="s3", empty="")
    authdb.update(path, lambda users: setattr(users["off"], "enabled", False))
    auth.database.refresh()
    before = os.stat(path)
    results = {}
    for number, (name, secret) in enumerate((("alice", "bad"), ("mallory", "s1"),
                                             ("off", "s3"), ("empty", "x"))):
        source = "198.51.100.%d" % number
        one = again(auth, source)
        verdict, _ = one.verify(name, apop.digest(STAMP, secret))
        entry = penalty.load(path + penalty.SUFFIX)[source]
        results[name] = (verdict, auth.waits[-1], entry.count, entry.last)
    assert set(results.values()) == {("refused", 1, 1, 1000)}, results
    info = os.stat(path)
    assert (info.st_ino, info.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_an_old_per_user_lock_no_longer_locks_the_user_out(tmp_path):
    """An entry an earlier version locked (bad count, locked-until): the
    right digest logs in, and the good login clears the old fields."""
    auth, path = keeper(tmp_path, now=1000, alice="s1")

    def lock(users):
        users["alice"].bad, users["alice"].locked_until = 2, 99999
    authdb.update(path, lock)
    auth.database.refresh()
    assert auth.verify("alice", apop.digest(STAMP, "s1"), defer=True) == ("ok", "")
    auth.finish()
    user = authdb.load(path)[0]["alice"]
    assert (user.bad, user.locked_until, user.last_login) == (0, 0, 1000)


def test_a_good_login_keeps_its_source_s_count(tmp_path):
    auth, path = keeper(tmp_path, alice="s1")
    auth.verify("alice", apop.digest(STAMP, "bad"))
    again(auth, "192.0.2.9").verify("mallory", apop.digest(STAMP, "bad"))
    assert auth.verify("alice", apop.digest(STAMP, "s1")) == ("ok", "")
    assert penalty.load(path + penalty.SUFFIX) == {"192.0.2.1": penalty.Entry(1, 1000),
                                                   "192.0.2.9": penalty.Entry(1, 1000)}


def test_unusable_penalty_state_is_logged_and_bad_logins_wait_longest(tmp_path):
    auth, path = keeper(tmp_path, alice="s1")
    with open(path + penalty.SUFFIX, "w") as handle:
        handle.write("192.0.2.1 9 1000\n")
    os.chmod(path + penalty.SUFFIX, 0o644)                 # others may read: not trusted
    assert auth.verify("alice", apop.digest(STAMP, "bad")) == ("refused", "wrong secret")
    assert auth.waits == [penalty.MAX_DELAY]
    assert [fields for event, fields in auth.log.events if event == "penalty"][0][
        "reason"].endswith("it must be 0600")
    assert auth.verify("alice", apop.digest(STAMP, "s1")) == ("ok", "")


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
        again.router = UPSTREAM_ROUTER
        assert again.route("-") == ("ok", ["192.0.2.9"])
        assert again.sign("<1.2@upstream.test>", "192.0.2.9", 110) == \
            apop.digest("<1.2@upstream.test>", "s2")
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == \
        (before.st_ino, before.st_mtime_ns, before.st_size)
    # a second later the last login changes: written again
    later = authority.Authority(auth.database, STAMP, 3, 600, QuietLog(), clock=lambda: 5001)
    assert later.verify("bob", apop.digest(STAMP, "s2"), defer=True) == ("ok", "")
    later.finish()
    assert authdb.load(path)[0]["bob"].last_login == 5001


def test_a_good_login_after_bad_ones_keeps_the_count(tmp_path):
    auth, path = keeper(tmp_path, now=5000, bob="s2")
    auth.verify("bob", apop.digest(STAMP, "s2"))                  # last login: this second
    assert auth.verify("bob", apop.digest(STAMP, "wrong")) == ("refused", "wrong secret")
    assert penalty.load(path + penalty.SUFFIX)["192.0.2.1"].count == 1
    assert auth.verify("bob", apop.digest(STAMP, "s2"), defer=True) == ("ok", "")
    auth.finish()
    assert penalty.load(path + penalty.SUFFIX)["192.0.2.1"].count == 1
    user = authdb.load(path)[0]["bob"]
    assert (user.bad, user.last_login) == (0, 5000)


def test_unknown_and_malformed(tmp_path):
    auth, _ = keeper(tmp_path, alice="s1")
    assert auth.verify("nosuch", apop.digest(STAMP, "s1")) == ("refused", "unknown user")
    assert auth.verify("al ice", "0" * 32) == ("refused", "malformed request")
    assert auth.verify("alice", "X" * 32) == ("refused", "malformed request")
    assert auth.verify("alice", apop.digest("<other@stamp>", "s1")) == \
        ("refused", "wrong secret")                      # only this session's timestamp


def UPSTREAM_ROUTER(user, word):
    """A router that sends everyone to 192.0.2.9:110 and records whom."""
    UPSTREAM_ROUTER.asked.append((user, word))
    return "ok", (110, ["192.0.2.9"])


UPSTREAM_ROUTER.asked = []


def test_sign_only_after_verify_and_route_and_only_a_valid_timestamp(tmp_path):
    auth, _ = keeper(tmp_path, alice="s1", bob="s2")
    auth.router = UPSTREAM_ROUTER
    assert auth.sign("<1@up>", "192.0.2.9", 110) is None       # nobody verified yet
    assert auth.route("-") == ("denied", "not logged in")
    auth.verify("alice", apop.digest(STAMP, "s1"))
    assert auth.sign("<1@up>", "192.0.2.9", 110) is None       # not routed yet
    assert auth.route("-") == ("ok", ["192.0.2.9"])
    assert UPSTREAM_ROUTER.asked[-1] == ("alice", "-")         # the verified user's route
    assert auth.route("-") == ("denied", "already routed")
    assert auth.sign("<bad stamp@up>", "192.0.2.9", 110) is None
    assert auth.sign("<1@up>", "192.0.2.10", 110) is None      # not the routed server
    assert auth.sign("<1@up>", "192.0.2.9", 111) is None
    assert auth.sign("<1@up>", "192.0.2.9", 110) == apop.digest("<1@up>", "s1")  # alice's
    assert auth.sign("<2@up>", "192.0.2.9", 110) == apop.digest("<2@up>", "s1")
    assert auth.sign("<3@up>", "192.0.2.9", 110) is None      # bounded


def test_a_timestamp_a_gateway_issued_is_never_signed(tmp_path):
    auth, _ = keeper(tmp_path, alice="s1")
    auth.verify("alice", apop.digest(STAMP, "s1"))
    auth.router = UPSTREAM_ROUTER
    auth.route("-")
    for stamp in (apop.make_timestamp("gw.test"), apop.make_timestamp("other.mailwall.test"),
                  "<1.2.3.POP3GW@x>"):
        assert auth.sign(stamp, "192.0.2.9", 110) is None
    assert [fields["reason"] for event, fields in auth.log.events
            if event == "sign-refused"][0].startswith("timestamp issued by a pop3-gw")
    assert auth.signatures == 0
    assert auth.sign("<1.2.pop3gwx@up>", "192.0.2.9", 110) == \
        apop.digest("<1.2.pop3gwx@up>", "s1")


def test_a_refused_route_leaves_nothing_to_sign_for(tmp_path):
    auth, _ = keeper(tmp_path, alice="s1")
    auth.verify("alice", apop.digest(STAMP, "s1"))
    auth.router = lambda user, word: ("denied", "permission denied\n")
    assert auth.route("x:1") == ("denied", "permission denied?")
    auth.router = UPSTREAM_ROUTER
    assert auth.route("x:1") == ("denied", "already routed")
    assert auth.sign("<1@up>", "192.0.2.9", 110) is None
    # a router answer that is not an address in canonical text is not passed on
    other, _ = keeper(tmp_path / "b", alice="s1")
    other.verify("alice", apop.digest(STAMP, "s1"))
    other.router = lambda user, word: ("ok", (110, ["127.1", "::FFFF:1.2.3.4"]))
    assert other.route("-") == ("denied", "no usable address")


def test_the_line_protocol_between_child_and_monitor(tmp_path):
    auth, _ = keeper(tmp_path, alice="s1")
    child, monitor = socket.socketpair()

    def router(user, word):
        return ("ok", (110, ["127.0.0.1", "::1"])) if word == "mail:110" \
            else ("denied", "no")
    thread = threading.Thread(target=authority.serve, args=(monitor, auth, router, auth.log))
    thread.start()
    link = authority.MonitorLink(child)
    # the child learns only "refused": why is logged in the monitor, never told
    assert link.ask("verify nosuch %s" % apop.digest(STAMP, "wrong")) == ["refused"]
    assert link.verify("alice", apop.digest(STAMP, "wrong")) == ("refused", None)
    assert [fields["reason"] for event, fields in auth.log.events if event == "auth-fail"] \
        == ["unknown user", "wrong secret"]
    assert link.sign("<1@up>", "127.0.0.1", 110) is None
    assert link.route("mail:110") == ("denied", "not logged in")
    assert link.verify("alice", apop.digest(STAMP, "s1")) == ("ok", "")
    assert link.route("mail:110") == ("ok", ["127.0.0.1", "::1"])
    assert link.sign("<1@up>", "::1", 110) == apop.digest("<1@up>", "s1")
    # every field of a request is checked exactly
    for request in ("sign <2@up> 127.1 110", "sign <2@up> 127.0.0.1 0",
                    "sign <2@up> 127.0.0.1 0110x", "sign <2@up> ::ffff:127.0.0.1 110",
                    "sign <2@up> 127.0.0.1", "sign  <2@up> 127.0.0.1 110",
                    "route", "route a b", "frobnicate"):
        assert link.ask(request) == ["refused", "bad request"], request
    child.sendall(b"verify \xff\xfe x\n")                    # not ASCII: refused
    assert link.reader.readline() == b"refused bad request\n"
    child.sendall(b"x" * 600 + b"\n")                          # oversized: monitor stops
    thread.join(10)
    assert not thread.is_alive()
    assert ("monitor", {"reason": "oversized request from the session child"}) in \
        auth.log.events
    link.reader.close()
    child.close()
    monitor.close()

"""pop3-gw in front of a real Dovecot (APOP, Maildirs): real clients
(Python's poplib, fetchmail) get through it exactly what they get from
Dovecot directly, a vanished client commits no deletions, the session
child runs jailed and unprivileged, and 200 concurrent sessions work."""

import base64
import os
import poplib
import random
import threading

import pytest

from tests.integration import pop3_helpers as helpers
from tests.integration import realpeers
from tests.integration.pop3_helpers import standby_pair, title_of
from tests.integration.pop3_helpers import (  # noqa: F401  (fixtures)
    close_clients, dovecot, gateway, setup, shared_dir)

pytestmark = pytest.mark.integration


def message(subject, body_lines):
    return (b"From: someone@example.org\nTo: alice@example.net\nSubject: %s\n\n"
            % subject) + b"".join(line + b"\n" for line in body_lines)


def retr_raw(client, number):
    """The whole RETR answer as bytes, read until the terminating line."""
    client.send(b"RETR %d\r\n" % number)
    data = bytearray(client.buffer)
    client.buffer = b""
    while not data.endswith(b"\r\n.\r\n"):
        chunk = client.sock.recv(1 << 20)
        if not chunk:
            raise EOFError("connection closed during RETR")
        data += chunk
    return bytes(data)


def logged_in(port, secret="alicesecret", user="alice", source="127.0.0.1"):
    client = helpers.Client(port, source=source, timeout=60)
    greeting = client.line()
    reply = client.apop(user, secret, greeting)
    assert reply.startswith(b"+OK"), reply
    return client


def test_poplib_apop_gets_the_same_bytes_as_directly_incl_20_mb(setup, gateway, dovecot):
    daemon = gateway
    rng = random.Random(4)
    tricky = [b".", b"..", b". dot", b"8-bit \xe4\xf6\xfc\xff", b"", b"From the middle"]
    dovecot.deliver("alice", message(b"small", tricky))
    big_lines = [base64.b64encode(rng.randbytes(57)) for _ in range(20 * 1024 * 1024 // 77)]
    big_lines[100:100] = tricky
    dovecot.deliver("alice", message(b"big", big_lines))
    # poplib, as a mail client would use it
    via = poplib.POP3("127.0.0.1", daemon.port, timeout=60)
    assert via.apop("alice", "alicesecret").startswith(b"+OK")
    direct = poplib.POP3("127.0.0.1", dovecot.port, timeout=60)
    direct.apop("alice", "alicesecret")
    assert via.stat() == direct.stat() and via.stat()[0] == 2
    assert via.list()[1] == direct.list()[1]
    assert via.uidl()[1] == direct.uidl()[1]
    assert via.retr(1)[1] == direct.retr(1)[1] == [b"From: someone@example.org",
                                                   b"To: alice@example.net",
                                                   b"Subject: small", b""] + tricky
    via.quit()
    direct.quit()
    # the raw octets of the 20 MB answer, through the gateway and directly
    client = logged_in(daemon.port)
    through = retr_raw(client, 2)
    client.command(b"QUIT")
    client.close()
    raw = helpers.Client(dovecot.port, timeout=60)
    assert raw.apop("alice", "alicesecret", raw.line()).startswith(b"+OK")
    straight = retr_raw(raw, 2)
    raw.close()
    assert len(through) > 20 * 1000 * 1000
    assert through == straight
    line = setup.log.wait_for(r"disconnect .*user=alice")
    assert "bytes_out=" in line and "bytes_in=" in line
    counted = [l for l in setup.log.lines() if "disconnect" in l and "user=alice" in l]
    assert any(int(l.split("bytes_out=")[1].split()[0]) > len(through) for l in counted)


def test_fetchmail_apop_through_the_gateway_matches_direct(setup, gateway, dovecot, tmp_path):
    daemon = gateway
    for number in range(3):
        dovecot.deliver("alice", message(b"msg %d" % number,
                                         [b"line %d" % number, b".", b"..x", b"end"]))
    code, through = realpeers.fetchmail_apop(tmp_path / "via", "127.0.0.1", daemon.port,
                                             "alice", "alicesecret")
    assert code == 0, (tmp_path / "via").glob("*/fetchmail.out")
    code, direct = realpeers.fetchmail_apop(tmp_path / "direct", "127.0.0.1", dovecot.port,
                                            "alice", "alicesecret")
    assert code == 0
    assert len(through) == 3 and through == direct
    assert b"Subject: msg 2" in through[2] and b"\n.\n..x\n" in through[2]
    setup.log.wait_for(r"login .*user=alice")


def test_client_vanishing_without_quit_deletes_nothing(setup, gateway, dovecot):
    daemon = gateway
    dovecot.deliver("alice", message(b"keep me", [b"body"]))
    client = logged_in(daemon.port)
    assert client.command(b"DELE 1").startswith(b"+OK")
    client.close()                                       # no QUIT
    setup.log.wait_for(r"disconnect .*user=alice")
    check = poplib.POP3("127.0.0.1", dovecot.port, timeout=30)
    check.apop("alice", "alicesecret")
    assert check.stat()[0] == 1                          # still there
    check.quit()
    # the same with QUIT does delete: the test above can fail
    client = logged_in(daemon.port)
    client.command(b"DELE 1")
    assert client.command(b"QUIT").startswith(b"+OK")
    client.close()
    check = poplib.POP3("127.0.0.1", dovecot.port, timeout=30)
    check.apop("alice", "alicesecret")
    assert check.stat()[0] == 0
    check.quit()


def test_session_child_is_jailed_and_unprivileged(setup, gateway):
    daemon = gateway
    client = helpers.Client(daemon.port)
    assert client.line().startswith(b"+OK")                 # the child is jailed by now
    # the daemon forks the next session's pair ahead (titled "standby"):
    # it is held to the same rules, but it is not this client's session
    standby = realpeers.wait_until(lambda: standby_pair(daemon.proc.pid), 10,
                                   what="the next session's standby pair")
    children = [pid for pid in helpers.session_children(daemon.proc.pid)
                if pid not in standby]
    jailed = [pid for pid in helpers.jailed_children(daemon.proc.pid) if pid not in standby]
    assert len(jailed) == 1, children
    status = helpers.status_of(jailed[0])
    assert status["Gid"].split() == ["65534"] * 4
    assert status["Groups"] == ""
    assert os.readlink("/proc/%d/root" % jailed[0]) == str(setup.chroot)
    assert os.readlink("/proc/%d/cwd" % jailed[0]) == str(setup.chroot)
    # the root monitor keeps no descriptor of the client's connection:
    # its fd 0 and 1 are /dev/null
    monitors = [pid for pid in children if pid != jailed[0]]
    assert len(monitors) == 1
    for fd in (0, 1):
        assert os.readlink("/proc/%d/fd/%d" % (monitors[0], fd)) == "/dev/null"
    assert status_uid(monitors[0]) == "0"
    # no other descriptor of it either, in the monitor or in the standby
    connection = os.readlink("/proc/%d/fd/0" % jailed[0])
    assert connection.startswith("socket:")
    for pid in monitors + standby:
        assert connection not in fd_targets(pid), pid
    assert fd_targets(jailed[0]).count(connection) == 2         # fd 0 and 1 only
    # the standby: a root monitor with no client and a child already jailed
    standby_jailed = [pid for pid in standby if status_uid(pid) == "65534"]
    assert len(standby_jailed) == 1, standby
    assert os.readlink("/proc/%d/root" % standby_jailed[0]) == str(setup.chroot)
    assert helpers.status_of(standby_jailed[0])["Uid"].split() == ["65534"] * 4
    for pid in standby:
        for fd in (0, 1):
            assert os.readlink("/proc/%d/fd/%d" % (pid, fd)) == "/dev/null"
    client.command(b"QUIT")


def fd_targets(pid):
    return [os.readlink("/proc/%d/fd/%s" % (pid, fd)) for fd in os.listdir("/proc/%d/fd" % pid)]


def status_uid(pid):
    return helpers.status_of(pid)["Uid"].split()[0]


def test_two_hundred_concurrent_sessions(setup, gateway, dovecot):
    daemon = gateway
    dovecot.deliver("alice", message(b"for everyone", [b"x" * 60] * 200))
    errors, results = [], []
    lock = threading.Lock()

    def one_session(index):
        try:
            pop = poplib.POP3("127.0.0.1", daemon.port, timeout=120)
            pop.apop("alice", "alicesecret")
            lines = pop.retr(1)[1]
            pop.quit()
            with lock:
                results.append(len(lines))
        except Exception as err:           # collected and asserted below
            with lock:
                errors.append("%d: %r" % (index, err))

    threads = [threading.Thread(target=one_session, args=(i,)) for i in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert results == [204] * 200
    assert len([l for l in setup.log.lines() if " login " in l]) == 200

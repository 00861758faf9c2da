"""Bad input and faults at both ends of pop3-gw: each gives a clear -ERR or a
clean close and a log line, and leaves other sessions alone.  The faulty
servers are small scripted sockets (no real server misbehaves on request);
the client-side cases run against the real daemon and Dovecot."""

import socket

import pytest

from common import apop
from tests.integration import pop3_helpers as helpers
from tests.integration import realpeers
from tests.integration.pop3_helpers import (  # noqa: F401
    close_clients, dovecot, gateway, setup, shared_dir)

pytestmark = pytest.mark.integration


def greeted(port, source="127.0.0.1"):
    client = helpers.Client(port, source=source)
    greeting = client.line()
    assert greeting.startswith(b"+OK")
    return client, greeting


def good_apop(client, greeting, name="alice"):
    return client.apop(name, "alicesecret", greeting)


# -- the client side ---------------------------------------------------------
def test_bad_client_input_gets_err_and_log_lines(setup, gateway):
    client, greeting = greeted(gateway.port)
    assert client.command(b"STAT") .startswith(b"-ERR unknown command")
    assert client.command(b"RETR 1").startswith(b"-ERR")
    assert client.command(b"USER alice").startswith(b"-ERR USER/PASS not allowed")
    assert client.command(b"CAPA " + b"A" * 400).startswith(b"-ERR command line too long")
    assert client.command(b"\x00\x01\xff\xfe garbage").startswith(b"-ERR command has bad")
    stamp = apop.find_timestamp(greeting)
    right = apop.digest(stamp, "alicesecret")
    assert b"32 lowercase hex" in client.command(b"APOP alice " + right.upper().encode())
    assert b"32 lowercase hex" in client.command(b"APOP alice " + right[:20].encode())
    assert client.command(b"APOP alice%ev!l.host " + right.encode()).startswith(
        b"-ERR [AUTH] bad server")
    assert client.command(b"APOP alice%host:70000 " + right.encode()).startswith(
        b"-ERR [AUTH] bad server")
    # after all that, the right login still works in the same session
    assert client.command(b"APOP alice " + right.encode()).startswith(b"+OK")
    client.command(b"QUIT")
    setup.log.wait_for(r"bad-command .*reason=\"line too long\"")
    setup.log.wait_for(r"bad-command .*reason=\"bad characters\"")
    setup.log.wait_for(r"bad-command .*reason=\"malformed APOP digest\"")
    setup.log.wait_for(r"refuse .*user=alice dest=host:70000 reason=\"bad %server: port out")


def test_binary_flood_ends_the_session(setup, gateway):
    client, _ = greeted(gateway.port)
    client.send(b"\xff\xfe\x00junk\r\n" * 20 + b"x" * 100000)
    replies = []
    while True:
        try:
            replies.append(client.line())
        except EOFError:
            break
    assert replies[-1] == b"-ERR too many errors, closing"
    setup.log.wait_for(r"refuse .*reason=\"too many errors\"")


def test_bare_newline_ends_the_session(setup, gateway):
    client, _ = greeted(gateway.port)
    client.send(b"CAPA\n")
    assert client.line() == b"-ERR lines must end with CRLF"
    assert client.closed()
    setup.log.wait_for(r"refuse .*reason=\"bare CR or LF\"")


def test_silent_client_is_cut_at_timeout_and_others_go_on(shared_dir, dovecot):
    setup = helpers.Setup(shared_dir / "gw", "localhost:%d" % dovecot.port)
    setup.lines = [l for l in setup.lines if "timeout" not in l] + ["pop3-gw: timeout 2"]
    setup.write_table()
    try:
        with helpers.Daemon(setup) as daemon:
            silent, _ = greeted(daemon.port)
            other, greeting = greeted(daemon.port)
            assert good_apop(other, greeting).startswith(b"+OK")
            assert other.command(b"STAT").startswith(b"+OK")
            other.command(b"QUIT")
            assert silent.closed()                       # EOF, not our 30 s timeout
            setup.log.wait_for(r"timeout addr=127.0.0.1 reason=\"idle client\"")
            setup.log.wait_for(r"disconnect reason=\"timeout before login\"")
            # idle after login too: the relay ends at timeout
            idle, greeting = greeted(daemon.port)
            assert good_apop(idle, greeting).startswith(b"+OK")
            assert idle.closed()
            setup.log.wait_for(r"disconnect reason=timeout .*user=alice")
    finally:
        setup.log.close()


# -- the server side ----------------------------------------------------------
def run_against(shared_dir, script, server=None):
    """(reply to a good APOP, client, setup) with the gateway's server a FakeServer."""
    fake = helpers.FakeServer(script) if script else None
    where = server or "127.0.0.1:%d" % fake.port
    setup = helpers.Setup(shared_dir / "gw", where)
    daemon = helpers.Daemon(setup)
    client, greeting = greeted(daemon.port)
    reply = good_apop(client, greeting)
    return reply, client, setup, daemon, fake


@pytest.fixture
def faulty(shared_dir):
    made = []

    def start(script, server=None):
        result = run_against(shared_dir, script, server)
        made.append(result)
        return result
    yield start
    for _, client, setup, daemon, fake in made:
        client.close()
        daemon.stop()
        setup.log.close()
        if fake:
            fake.close()


def test_upstream_down(faulty):
    port = realpeers.free_port()
    reply, client, setup, _, _ = faulty(None, "127.0.0.1:%d" % port)
    assert reply == b"-ERR [SYS/TEMP] mail server unavailable, try again later"
    assert client.closed()
    setup.log.wait_for(r"upstream-fail .*reason=\"cannot connect: 127.0.0.1:%d" % port)


def test_upstream_refuses_with_its_own_words(faulty):
    def script(conn, received):
        conn.sendall(b"-ERR [SYS/TEMP] too many connections, come back later\r\n")
    reply, _, setup, _, _ = faulty(script)
    assert reply == b"-ERR [SYS/TEMP] too many connections, come back later"
    setup.log.wait_for(r"upstream-fail .*server refused")


@pytest.mark.parametrize("greeting", [b"+OK no apop here\r\n", b"+OK <bad stamp@x>\r\n",
                                      b"+OK <a@b><c@d>\r\n"])
def test_upstream_without_a_valid_timestamp_gets_no_digest(faulty, greeting):
    def script(conn, received):
        conn.sendall(greeting)
        conn.settimeout(2)
        try:
            received.append(conn.recv(1000))
        except socket.timeout:
            received.append(b"")
    reply, _, setup, _, fake = faulty(script)
    assert reply == b"-ERR [SYS/PERM] mail server does not offer a valid APOP challenge"
    setup.log.wait_for(r"upstream-fail .*reason=")
    realpeers.wait_until(lambda: fake.received, 10)
    assert b"APOP" not in fake.received[0]


def test_upstream_in_use_code_is_passed_through(faulty):
    def script(conn, received):
        conn.sendall(b"+OK ready <1.2@fake>\r\n")
        received.append(conn.recv(1000))
        conn.sendall(b"-ERR [IN-USE] Mailbox is locked by another POP3 session\r\n")
    reply, _, setup, _, fake = faulty(script)
    assert reply == b"-ERR [IN-USE] Mailbox is locked by another POP3 session"
    assert fake.received[0] == b"APOP alice %s\r\n" % apop.digest("<1.2@fake>",
                                                                 "alicesecret").encode()
    setup.log.wait_for(r"upstream-fail .*IN-USE")


def test_upstream_rejecting_apop_is_passed_through(shared_dir, dovecot):
    setup = helpers.Setup(shared_dir / "gw", "localhost:%d" % dovecot.port,
                          users={"alice": "notdovecotssecret"})
    try:
        with helpers.Daemon(setup) as daemon:
            client, greeting = greeted(daemon.port)
            assert client.apop("alice", "notdovecotssecret", greeting) == \
                b"-ERR [AUTH] Authentication failed."          # Dovecot's own words
            setup.log.wait_for(r"upstream-fail .*server rejected APOP")
    finally:
        setup.log.close()


def test_upstream_dropping_mid_retr_closes_cleanly(faulty):
    def script(conn, received):
        conn.sendall(b"+OK ready <1.2@fake>\r\n")
        received.append(conn.recv(1000))
        conn.sendall(b"+OK logged in\r\n")
        received.append(conn.recv(1000))
        conn.sendall(b"+OK 100000 octets\r\n" + b"partial line\r\n" * 100)
    reply, client, setup, _, fake = faulty(script)
    assert reply == b"+OK logged in"
    client.send(b"RETR 1\r\n")
    assert client.line() == b"+OK 100000 octets"
    assert client.closed()
    assert client.buffer == b"partial line\r\n" * 100
    setup.log.wait_for(r"disconnect reason=\"server closed\" bytes_in=\d+ bytes_out=\d+")


def test_upstream_silent_after_connect_is_cut_at_timeout(shared_dir):
    def script(conn, received):
        conn.settimeout(30)
        try:
            received.append(conn.recv(1000))     # says nothing; waits for our give-up
        except socket.timeout:
            pass
    fake = helpers.FakeServer(script)
    setup = helpers.Setup(shared_dir / "gw", "127.0.0.1:%d" % fake.port)
    setup.lines.append("pop3-gw: timeout 2")      # the first timeout line wins: 20 s...
    setup.lines = [l for l in setup.lines if l != "pop3-gw: timeout 20"]
    setup.write_table()
    try:
        with helpers.Daemon(setup) as daemon:
            client, greeting = greeted(daemon.port)
            assert good_apop(client, greeting) == \
                b"-ERR [SYS/TEMP] mail server unavailable, try again later"
            setup.log.wait_for(r"upstream-fail .*no answer within 2s")
    finally:
        setup.log.close()
        fake.close()

"""pop3-gw to the inside POP3 server over TLS (`server-tls`, `server-ca`,
`server-tls-verify`): a real Dovecot with `ssl = required` (REAL-PEERS.md
"Dovecot POP3 with TLS required") by STLS and by implicit TLS on a high
port, a Dovecot whose certificate names another host, a CA that did not
sign the server's, and hostile stand-ins that omit STLS from CAPA or put
plaintext behind their +OK to STLS.

The gateway runs as root with its jailed, unprivileged session children
(the CA is loaded before the jail).  A failed TLS leg gets the client
`-ERR [SYS/TEMP]`, the log says why (`tls_error=`), and the server never
sees the APOP command in clear.
"""

import os
import random
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from tests.integration import pop3_helpers as helpers
from tests.integration import realpeers, tlspeers
from tests.integration.pop3_helpers import close_clients  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def peers():
    realpeers.require("dovecot", "openssl")
    realpeers.require_root()
    base = Path(tempfile.mkdtemp(prefix="mw-pop3tls-"))
    os.chmod(base, 0o755)
    started = []
    try:
        ca = tlspeers.TestCA(base / "ca")
        other = tlspeers.TestCA(base / "other-ca", name="other")
        good = ca.leaf("dovecot")
        wrong = ca.leaf("dovecot-wrong", sans=("DNS:other.example.test",),
                        cn="other.example.test")
        dovecot, tls_port = tlspeers.start_dovecot_tls(base / "dovecot", *good)
        started.append(dovecot)
        wrong_dovecot, wrong_tls_port = tlspeers.start_dovecot_tls(base / "dovecot-wrong",
                                                                   *wrong)
        started.append(wrong_dovecot)
        yield {"base": base, "ca": ca, "other": other, "dovecot": dovecot,
               "tls_port": tls_port, "wrong": wrong_dovecot, "wrong_tls_port": wrong_tls_port}
    finally:
        for peer in started:
            peer.stop()
        shutil.rmtree(base, ignore_errors=True)


def gateway_for(peers, name, server, extra):
    setup = helpers.Setup(peers["base"] / ("gw-" + name), server, extra=extra)
    return setup, helpers.Daemon(setup)


def apop_through(daemon, secret="alicesecret"):
    client = helpers.Client(daemon.port, timeout=60)
    greeting = client.line()
    return client, client.apop("alice", secret, greeting)


def retr_all(client, number):
    client.send(b"RETR %d\r\n" % number)
    assert client.line().startswith(b"+OK")
    return b"\n".join(client.multiline()) + b"\n"


def message(subject, size=0):
    rng = random.Random(subject)
    body = b"".join(b"line %d %s\n" % (n, rng.randbytes(20).hex().encode())
                    for n in range(size // 50 + 1))
    return b"From: x@example.org\nSubject: %s\n\n%s.\n..\n" % (subject, body)


@pytest.mark.parametrize("mode", ["stls", "implicit"])
def test_login_and_relay_over_verified_tls(peers, mode):
    dovecot = peers["dovecot"]
    port = dovecot.port if mode == "stls" else peers["tls_port"]
    wanted = message(b"tls-" + mode.encode(), 2 * 1024 * 1024)
    dovecot.deliver("alice", wanted)
    setup, daemon = gateway_for(peers, mode, "127.0.0.2:%d" % port,
                                ["pop3-gw: server-tls %s" % mode,
                                 "pop3-gw: server-ca %s" % peers["ca"].root])
    try:
        client, reply = apop_through(daemon)
        assert reply.startswith(b"+OK"), reply
        client.send(b"LIST\r\n")
        assert client.line().startswith(b"+OK")
        listing = client.multiline()
        got = [retr_all(client, int(line.split()[0])) for line in listing]
        assert wanted.replace(b"\n..\n", b"\n.\n") in [g.replace(b"\n..\n", b"\n.\n")
                                                       for g in got] or wanted in got
        assert client.command(b"QUIT").startswith(b"+OK")
        login = setup.log.wait_for(r"login .*user=alice")
        assert "upstream_tls=TLSv1.3" in login and "upstream_cipher=TLS_" in login
        setup.log.wait_for(r"disconnect .*upstream_tls=TLSv1.3")
        def logins():
            return [line for line in dovecot.read_log().splitlines()
                    if "Login: user=<alice>" in line]
        try:
            realpeers.wait_until(logins, 10)
        except TimeoutError:
            raise AssertionError(dovecot.read_log()) from None
        assert "TLS" in logins()[-1], logins()
    finally:
        daemon.stop()
        setup.log.close()


def test_without_server_tls_dovecot_refuses_the_plain_apop(peers):
    """The peer is real: without TLS the same login is refused by Dovecot."""
    setup, daemon = gateway_for(peers, "plain", "127.0.0.2:%d" % peers["dovecot"].port, [])
    try:
        client, reply = apop_through(daemon)
        assert reply.startswith(b"-ERR [AUTH]") and b"SSL/TLS" in reply
    finally:
        daemon.stop()
        setup.log.close()


@pytest.mark.parametrize("mode, which, ca, reason", [
    ("stls", "wrong", "ca", "IP address mismatch"),
    ("implicit", "wrong", "ca", "IP address mismatch"),
    ("implicit", "good", "other", "unable to get local issuer certificate"),
    ("stls", "good", "system", "unable to get local issuer certificate"),
])
def test_a_certificate_that_fails_verification_gets_no_login(peers, mode, which, ca, reason):
    dovecot = peers["dovecot"] if which == "good" else peers["wrong"]
    port = dovecot.port if mode == "stls" else peers["tls_port" if which == "good"
                                                     else "wrong_tls_port"]
    extra = ["pop3-gw: server-tls %s" % mode]
    if ca != "system":
        extra.append("pop3-gw: server-ca %s" % peers[ca].root)
    setup, daemon = gateway_for(peers, "%s-%s-%s" % (mode, which, ca), "127.0.0.2:%d" % port,
                                extra)
    try:
        client, reply = apop_through(daemon)
        assert reply.startswith(b"-ERR [SYS/TEMP]"), reply
        line = setup.log.wait_for(r"upstream-fail .*user=alice")
        assert "certificate verify failed" in line and reason in line and "tls_error=" in line
    finally:
        daemon.stop()
        setup.log.close()


def test_verify_no_encrypts_to_a_server_with_another_name(peers):
    setup, daemon = gateway_for(peers, "noverify", "127.0.0.2:%d" % peers["wrong"].port,
                                ["pop3-gw: server-tls stls", "pop3-gw: server-tls-verify no"])
    try:
        client, reply = apop_through(daemon)
        assert reply.startswith(b"+OK"), reply
        assert "upstream_tls=TLSv1.3" in setup.log.wait_for(r"login .*user=alice")
    finally:
        daemon.stop()
        setup.log.close()


def hostile(capa, stls_answer=b"+OK Begin TLS negotiation\r\n"):
    """A stand-in whose CAPA answer is `capa` and whose answer to STLS is
    stls_answer; it records every line it gets."""
    def script(conn, received):
        conn.sendall(b"+OK POP3 ready <1896.697170952@hostile.example.test>\r\n")
        reader = conn.makefile("rb")
        while True:
            line = reader.readline(1000)
            if not line:
                return
            received.append(line)
            if line.upper().startswith(b"CAPA"):
                conn.sendall(capa)
            elif line.upper().startswith(b"STLS"):
                conn.sendall(stls_answer)
            else:
                conn.sendall(b"+OK\r\n")
    return helpers.FakeServer(script)


@pytest.mark.parametrize("capa, stls_answer, reason, tls_error", [
    (b"+OK\r\nUSER\r\nUIDL\r\n.\r\n", None, "does not offer STLS", "STLS not offered"),
    (b"-ERR unknown command\r\n", None, "does not answer CAPA", "STLS not offered"),
    (b"+OK\r\nSTLS\r\n.\r\n", b"-ERR no TLS today\r\n", "refused STLS", "STLS refused"),
    (b"+OK\r\nSTLS\r\n.\r\n", b"+OK Begin TLS\r\n+OK Logged in (injected)\r\n",
     "before the handshake", "plaintext after +OK to STLS"),
])
def test_a_hostile_server_never_sees_the_apop_in_clear(peers, tmp_path, capa, stls_answer,
                                                        reason, tls_error):
    server = hostile(capa, stls_answer)
    setup, daemon = gateway_for(peers, "hostile-%d" % len(os.listdir(peers["base"])),
                                "127.0.0.1:%d" % server.port,
                                ["pop3-gw: server-tls stls",
                                 "pop3-gw: server-ca %s" % peers["ca"].root])
    try:
        client, reply = apop_through(daemon)
        assert reply.startswith(b"-ERR [SYS/TEMP]"), reply
        line = setup.log.wait_for(r"upstream-fail .*user=alice")
        assert reason in line and tls_error in line
        assert not any(line.upper().startswith(b"APOP") for line in server.received)
    finally:
        daemon.stop()
        setup.log.close()
        try:
            server.listener.shutdown(socket.SHUT_RDWR)      # wakes its accept()
        except OSError:
            pass
        server.close()


def test_a_vanished_client_commits_no_deletion_inside_tls(peers):
    """relay_tls turns the client's EOF into a half-close, never a QUIT:
    Dovecot skips its UPDATE state and the DELE is not committed."""
    dovecot = peers["dovecot"]
    dovecot.deliver("alice", message(b"keep-me"))
    setup, daemon = gateway_for(peers, "vanish", "127.0.0.2:%d" % dovecot.port,
                                ["pop3-gw: server-tls stls",
                                 "pop3-gw: server-ca %s" % peers["ca"].root])
    try:
        client, reply = apop_through(daemon)
        assert reply.startswith(b"+OK"), reply
        count = int(client.command(b"STAT").split()[1])
        assert count >= 1
        assert client.command(b"DELE 1").startswith(b"+OK")
        client.close()                                  # no QUIT
        setup.log.wait_for(r"disconnect .*user=alice")
        again, reply = apop_through(daemon)
        assert reply.startswith(b"+OK"), reply
        assert int(again.command(b"STAT").split()[1]) == count
        assert again.command(b"QUIT").startswith(b"+OK")
    finally:
        daemon.stop()
        setup.log.close()

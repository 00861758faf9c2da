"""APOP attacks against the real pop3-gw daemon (root, session children
chrooted and unprivileged).

The upstream here is a tiny malicious POP3 server written in the test
(tests/integration/pop3_helpers.FakeServer): no real server (Dovecot) can
be made to send a bad, chosen or repeated timestamp, and the tests must see
exactly what the gateway sends upstream.  Attacks and what must happen:

* wrong digest, or a digest replayed from an earlier banner: `-ERR`, and
  the gateway never even connects upstream;
* a malformed upstream timestamp (the chosen-challenge attack on APOP,
  Leurent 2007, needs arbitrary bytes there): no digest is sent upstream;
* a repeated upstream timestamp: the gateway's own banners stay fresh and
  what it sends upstream is never the client's digest;
* `user%server` aimed at a host no rule permits: refused, that host never
  hears from the gateway;
* user enumeration: unknown user, wrong digest, disabled user and a
  refused source get byte-identical answers;
* lockout: after `maxbad` failures from a source even the right digest is
  refused from there and the upstream is not contacted (the source, never
  the user: tests/security/test_login_penalty.py).
"""

import hashlib
import socket

import pytest

from common import apop, authdb
from tests.integration import pop3_helpers as helpers
from tests.integration import realpeers
from tests.integration.pop3_helpers import close_clients, shared_dir  # noqa: F401

FAILED = b"-ERR [AUTH] Authentication failed"


class Upstream:
    """A scripted upstream: greets with the next greeting, records lines,
    accepts any APOP with +OK, answers QUIT."""

    def __init__(self, greetings=None, default=b"+OK fake ready <1.2@fake.example>\r\n"):
        self.greetings = list(greetings or [])
        self.default = default
        self.connections = 0
        self.server = helpers.FakeServer(self.script)
        self.port = self.server.port

    def script(self, conn, received):
        self.connections += 1
        conn.sendall(self.greetings.pop(0) if self.greetings else self.default)
        buffer = b""
        while True:
            data = conn.recv(4096)
            if not data:
                return
            buffer += data
            while b"\r\n" in buffer:
                line, buffer = buffer.split(b"\r\n", 1)
                received.append(line)
                if line.startswith(b"APOP "):
                    conn.sendall(b"+OK logged in\r\n")
                elif line == b"QUIT":
                    conn.sendall(b"+OK bye\r\n")
                    return
                else:
                    conn.sendall(b"-ERR no\r\n")

    @property
    def received(self):
        return self.server.received

    def close(self):
        # shutdown() wakes the thread blocked in accept(); close() alone does not
        try:
            self.server.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server.close()


@pytest.fixture
def world(shared_dir):
    realpeers.require_root()
    made = {}

    def start(greetings=None, extra=(), rules=("permit-hosts 127.0.0.0/8",), users=None):
        upstream = Upstream(greetings)
        setup = helpers.Setup(shared_dir / "gw", "127.0.0.1:%d" % upstream.port, rules=rules,
                              users=users, extra=extra)
        daemon = helpers.Daemon(setup)
        made.update(upstream=upstream, setup=setup, daemon=daemon)
        return upstream, setup, daemon
    yield start
    if made:
        made["daemon"].stop()
        made["setup"].log.close()
        made["upstream"].close()


def greet(daemon, source="127.0.0.1"):
    client = helpers.Client(daemon.port, source=source, timeout=20)
    greeting = client.line()
    assert greeting.startswith(b"+OK")
    return client, greeting, apop.find_timestamp(greeting)


def test_wrong_digest_is_refused_and_nothing_goes_upstream(world):
    upstream, setup, daemon = world()
    client, _, stamp = greet(daemon)
    assert client.command(b"APOP alice " + apop.digest(stamp, "wrongsecret").encode()) == FAILED
    assert client.command(b"APOP alice " + b"0" * 32) == FAILED
    client.close()
    setup.log.wait_for(r"auth-fail .*user=alice")
    assert upstream.connections == 0


def test_digest_replayed_from_an_earlier_banner_is_refused(world):
    upstream, setup, daemon = world()
    client, _, stamp = greet(daemon)
    captured = apop.digest(stamp, "alicesecret").encode()
    assert client.command(b"APOP alice " + captured) == b"+OK logged in"
    assert client.command(b"QUIT") == b"+OK bye"
    client.close()
    assert upstream.connections == 1
    # the eavesdropper replays the captured line in a new session
    replay, _, new_stamp = greet(daemon)
    assert new_stamp != stamp
    assert replay.command(b"APOP alice " + captured) == FAILED
    replay.close()
    setup.log.wait_for(r"auth-fail .*user=alice .*wrong secret")
    assert upstream.connections == 1


MALFORMED = [
    b"+OK no timestamp at all\r\n",
    b"+OK <>\r\n",
    b"+OK <no-at-sign>\r\n",
    b"+OK <a b@c>\r\n",
    b"+OK <1.2@fake><3.4@fake>\r\n",
    b"+OK <a\x80\xff@fake>\r\n",
    b"+OK <a\"x\"@fake>\r\n",
    b"+OK <a(b)@fake>\r\n",
    b"+OK <" + b"a" * 300 + b"@fake>\r\n",
    b"+OK <a@b@c>\r\n",
    b"+OK <a..b@fake>\r\n",
    b"-ERR <1.2@fake>\r\n",
]


def test_malformed_upstream_timestamps_never_get_a_digest(world):
    upstream, setup, daemon = world(greetings=MALFORMED)
    for number, greeting in enumerate(MALFORMED):
        client, _, stamp = greet(daemon)
        reply = client.command(b"APOP alice " + apop.digest(stamp, "alicesecret").encode())
        assert reply.startswith(b"-ERR"), (greeting, reply)
        client.close()
        realpeers.wait_until(lambda: upstream.connections == number + 1, 10)
    assert upstream.connections == len(MALFORMED)
    assert not [line for line in upstream.received if line.startswith(b"APOP")], \
        upstream.received


def test_repeated_upstream_timestamp_gets_only_its_own_digest(world):
    stamp = b"<42.42@evil.example>"
    upstream, setup, daemon = world(greetings=[b"+OK " + stamp + b"\r\n"] * 3)
    client_digests, banners = [], set()
    for _ in range(3):
        client, greeting, ours = greet(daemon)
        banners.add(ours)
        mine = apop.digest(ours, "alicesecret")
        client_digests.append(mine.encode())
        assert client.command(b"APOP alice " + mine.encode()) == b"+OK logged in"
        client.command(b"QUIT")
        client.close()
    assert len(banners) == 3                       # the gateway's challenges are fresh
    sent = [line for line in upstream.received if line.startswith(b"APOP ")]
    expected = b"APOP alice " + hashlib.md5(stamp + b"alicesecret").hexdigest().encode()
    assert sent == [expected] * 3
    assert not set(d for d in client_digests) & {line.split()[-1] for line in sent}


def test_percent_server_to_an_unpermitted_host_is_refused(world):
    evil = Upstream()
    try:
        upstream, setup, daemon = world(rules=(
            "permit-hosts 127.0.0.0/8 -dest 127.0.0.9",
            "permit-hosts 127.0.0.0/8"))
        for target in (b"127.0.0.1:%d" % evil.port, b"localhost:%d" % evil.port):
            client, _, stamp = greet(daemon)
            reply = client.command(b"APOP alice%" + target + b" " +
                                   apop.digest(stamp, "alicesecret").encode())
            assert reply.startswith(b"-ERR"), reply
            client.close()
        setup.log.wait_for(r"deny .*user=alice")
        # the configured server still works for the same user
        client, _, stamp = greet(daemon)
        assert client.command(b"APOP alice " + apop.digest(stamp, "alicesecret").encode()) \
            == b"+OK logged in"
        client.close()
        assert evil.connections == 0 and evil.received == []
    finally:
        evil.close()


def test_unknown_user_wrong_digest_disabled_and_locked_answer_alike(world):
    upstream, setup, daemon = world(extra=("pop3-gw: maxbad 1", "pop3-gw: badsleep 3600"),
                                    users={"alice": "alicesecret", "bob": "bobsecret",
                                           "carol": "carolsecret", "dave": "davesecret"})

    def disable(users):
        users["carol"].enabled = False
    authdb.update(str(setup.authfile), disable)
    answers = {}
    # 127.0.0.14: one bad login refuses the source (maxbad 1); then dave's right digest
    client, _, stamp = greet(daemon, source="127.0.0.14")
    client.command(b"APOP dave " + apop.digest(stamp, "nope").encode())
    client.close()
    setup.log.wait_for(r"penalty addr=127.0.0.14 ")
    for case, user, secret, source in (("unknown", "mallory", "alicesecret", "127.0.0.11"),
                                       ("wrong digest", "bob", "wrong", "127.0.0.12"),
                                       ("disabled", "carol", "carolsecret", "127.0.0.13"),
                                       ("locked", "dave", "davesecret", "127.0.0.14")):
        client, _, stamp = greet(daemon, source=source)
        answers[case] = client.command(b"APOP %s %s" % (user.encode(),
                                                        apop.digest(stamp, secret).encode()))
        client.close()
    assert set(answers.values()) == {FAILED}, answers
    setup.log.wait_for(r"auth-fail .*addr=127.0.0.14 user=dave reason=\"source refused")
    assert upstream.connections == 0


def test_lockout_refuses_even_the_right_digest(world):
    upstream, setup, daemon = world(extra=("pop3-gw: maxbad 3", "pop3-gw: badsleep 3600"))
    for attempt in range(3):
        client, _, stamp = greet(daemon)
        assert client.command(b"APOP alice " + apop.digest(stamp, "guess%d" % attempt)
                              .encode()) == FAILED
        client.close()
    setup.log.wait_for(r"penalty addr=127.0.0.1 bad=3")
    client, _, stamp = greet(daemon)
    assert client.command(b"APOP alice " + apop.digest(stamp, "alicesecret").encode()) == FAILED
    client.close()
    setup.log.wait_for(r"auth-fail .*user=alice reason=\"source refused")
    assert upstream.connections == 0

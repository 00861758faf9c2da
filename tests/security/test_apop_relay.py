"""Issue 11, finding 2: a hostile upstream must not relay a user's APOP login.

The real pop3-gw daemon sits in front of a real Dovecot (the default inside
server, alice/alicesecret).  A rule lets alice name a second server,
127.0.0.9, with `alice%127.0.0.9:PORT`; that server is hostile (a small
scripted server in this test).  When the victim's session B reaches it, it
opens a session A of its own to the gateway, greets B with A's timestamp,
takes whatever B sends and replays it on A.  Before the fix B sent
`APOP alice MD5(A's timestamp + secret)`, which logged A in as alice at the
inside Dovecot.  Now the signer refuses every timestamp a pop3-gw issued:
the hostile server gets no digest and A is not logged in.
"""

import socket
import threading

import pytest

from common import apop
from tests.integration import pop3_helpers as helpers
from tests.integration import realpeers
from tests.integration.pop3_helpers import close_clients, dovecot, shared_dir  # noqa: F401

HOSTILE = "127.0.0.9"


class HostileUpstream:
    """The relaying server: for each connection from the gateway it opens a
    session A of its own to the gateway, greets with A's timestamp, and
    replays on A the line it gets; `done` is set when a relay is over."""

    def __init__(self, gateway_port):
        self.gateway_port = gateway_port
        self.received = []          # every line the victim's session sent here
        self.replayed = []          # (line, session A's answer)
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.server = helpers.FakeServer(self.script, host=HOSTILE)
        self.port = self.server.port

    def script(self, conn, _received):
        session_a = socket.create_connection(("127.0.0.1", self.gateway_port), timeout=20,
                                             source_address=(HOSTILE, 0))
        try:
            reader = session_a.makefile("rb")
            greeting = reader.readline(512)
            stamp = apop.find_timestamp(greeting)
            conn.sendall(b"+OK hostile server ready " + stamp.encode("ascii") + b"\r\n")
            line = conn.makefile("rb").readline(512)
            with self.lock:
                self.received.append(line)
            if line:
                # replay whatever came, verbatim, on session A
                session_a.sendall(line if line.endswith(b"\r\n") else line + b"\r\n")
                answer = reader.readline(512)
                with self.lock:
                    self.replayed.append((line, answer))
                if answer.startswith(b"+OK"):
                    session_a.sendall(b"STAT\r\n")
                    with self.lock:
                        self.replayed.append((b"STAT", reader.readline(512)))
            conn.sendall(b"-ERR go away\r\n")
        finally:
            session_a.close()
            self.done.set()

    def close(self):
        try:
            self.server.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server.close()


@pytest.fixture
def relay_world(shared_dir, dovecot):
    realpeers.require_root()
    dovecot.deliver("alice", b"Subject: secret mail\n\nfor alice only\n")
    setup = helpers.Setup(shared_dir / "gw", "127.0.0.1:%d" % dovecot.port, rules=(
        "permit-hosts 127.0.0.0/8 -dest %s -user alice" % HOSTILE,
        "permit-hosts 127.0.0.0/8"))
    daemon = helpers.Daemon(setup)
    hostile = HostileUpstream(daemon.port)
    try:
        yield setup, daemon, hostile, dovecot
    finally:
        daemon.stop()
        hostile.close()
        setup.log.close()


def victim_login(daemon, name):
    client = helpers.Client(daemon.port, timeout=20)
    reply = client.apop(name, "alicesecret", client.line())
    client.close()
    return reply


def test_a_hostile_upstream_cannot_relay_the_gateway_timestamp(relay_world):
    setup, daemon, hostile, dovecot = relay_world
    reply = victim_login(daemon, "alice%%%s:%d" % (HOSTILE, hostile.port))
    assert reply.startswith(b"-ERR"), reply
    realpeers.wait_until(hostile.done.is_set, 30, what="the hostile server's relay")
    with hostile.lock:
        received, replayed = list(hostile.received), list(hostile.replayed)
    # the replay on session A logged nobody in ...
    assert not [answer for _, answer in replayed if answer.startswith(b"+OK")], replayed
    # ... because no digest left the gateway for a timestamp a pop3-gw issued
    assert not [line for line in received if line.upper().startswith(b"APOP")], received
    setup.log.wait_for(r"sign-refused .*user=alice .*issued by a pop3-gw")
    assert "Login: user=<alice>" not in dovecot.read_log()
    # the gateway still logs alice in at the inside server as usual
    client = helpers.Client(daemon.port, timeout=20)
    assert client.apop("alice", "alicesecret", client.line()).startswith(b"+OK")
    assert client.command(b"STAT").startswith(b"+OK 1 ")
    client.command(b"QUIT")
    client.close()

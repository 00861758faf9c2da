"""Issue 11, finding 3: `-dest` is checked against where pop3-gw connects,
not against how the user spelled it.

A real Dovecot listens on 127.0.0.1 and the only rule denies that address
(`-dest !127.0.0.1 *`); a second real Dovecot on 127.0.0.2 is the
configured server.  Before the fix `alice%127.1`, `alice%2130706433`,
`alice%0x7f.1` and `alice%localhost` all logged in at 127.0.0.1: the rule
saw the spelling, the resolver turned it into 127.0.0.1 afterwards.  Now
every other spelling of 127.0.0.1 (and 0.0.0.0, which Linux connects to the
local host) gets `-ERR`, and the Dovecot on 127.0.0.1 never sees a
connection: its log names no remote address except the one of a direct
connection this test makes at the end as a marker.
"""

import re
import socket

import pytest

from tests.integration import pop3_helpers as helpers
from tests.integration import realpeers
from tests.integration.pop3_helpers import close_clients, dovecot, shared_dir  # noqa: F401

MARKER = "127.0.0.99"

SPELLINGS = [
    "127.1", "2130706433", "0x7f.1", "0x7f000001", "0177.0.0.1", "127.0.0.01",
    "127.000.000.001", "0x7f.0x0.0x0.0x1", "127.0.1", "127.0.0.1.", "localhost",
    "LOCALHOST", "localhost.", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "0.0.0.0", "0",
    "127.0.0.1",
]


@pytest.fixture
def second(shared_dir):
    with realpeers.Dovecot(shared_dir / "dovecot2", listen="127.0.0.2") as peer:
        peer.deliver("alice", b"Subject: on the permitted server\n\nhello\n")
        yield peer


@pytest.fixture
def guarded(shared_dir, dovecot, second):
    setup = helpers.Setup(shared_dir / "gw", "127.0.0.2:%d" % second.port, rules=(
        "permit-hosts 127.0.0.1 -dest !127.0.0.1 * -user alice",))
    try:
        with helpers.Daemon(setup) as daemon:
            yield setup, daemon, dovecot, second
    finally:
        setup.log.close()


def login(daemon, name):
    client = helpers.Client(daemon.port, timeout=20)
    return client.apop(name, "alicesecret", client.line()), client


def remote_addresses(log_text):
    return set(re.findall(r"rip=([0-9a-f.:]+)", log_text))


def test_no_spelling_of_a_denied_address_reaches_it(guarded):
    setup, daemon, dovecot, second = guarded
    for spelling in SPELLINGS:
        reply, client = login(daemon, "alice%%%s:%d" % (spelling, dovecot.port))
        assert reply.startswith(b"-ERR "), (spelling, reply)
        client.close()
    setup.log.wait_for(r"deny .*user=alice dest=localhost:%d" % dovecot.port)
    setup.log.wait_for(r"refuse .*user=alice dest=127.1:%d" % dovecot.port)
    # A marker connection straight to the guarded Dovecot: once its log shows
    # it, any connection the gateway had made would show too.
    with socket.create_connection(("127.0.0.1", dovecot.port), timeout=10,
                                  source_address=(MARKER, 0)) as direct:
        direct.recv(512)
        direct.sendall(b"QUIT\r\n")
        direct.recv(512)
    realpeers.wait_until(lambda: MARKER in remote_addresses(dovecot.read_log()), 15,
                         what="the marker connection in Dovecot's log")
    assert remote_addresses(dovecot.read_log()) == {MARKER}, dovecot.read_log()
    assert "Login: user=<alice>" not in dovecot.read_log()


def test_a_permitted_destination_still_works_end_to_end(guarded):
    setup, daemon, dovecot, second = guarded
    for name in ("alice", "alice%%127.0.0.2:%d" % second.port):
        reply, client = login(daemon, name)
        assert reply.startswith(b"+OK"), (name, reply)
        assert client.command(b"STAT").startswith(b"+OK 1 ")
        client.command(b"QUIT")
        client.close()
    setup.log.wait_for(r"permit .*user=alice dest=127.0.0.2:%d" % second.port)
    assert "Login: user=<alice>" in second.read_log()
    assert "Login: user=<alice>" not in dovecot.read_log()


@pytest.fixture
def name_permit(shared_dir, dovecot, second):
    # the rule a site writes for a partner: every host of a domain, by name
    setup = helpers.Setup(shared_dir / "gw", "127.0.0.2:%d" % second.port, rules=(
        "permit-hosts 127.0.0.1 -dest local* -user alice",))
    try:
        with helpers.Daemon(setup) as daemon:
            yield setup, daemon, dovecot
    finally:
        setup.log.close()


def test_a_name_permit_does_not_reach_an_inside_address(name_permit):
    """Review finding after issue 11: `-dest *.partner.example` permitted
    every address the partner's DNS gave, loopback and private ones
    included.  Here the permitted name `localhost` resolves to 127.0.0.1,
    where a real Dovecot listens: the login is refused and that Dovecot
    never sees a connection from the gateway."""
    setup, daemon, dovecot = name_permit
    for spelling in ("localhost", "LOCALHOST", "localhost."):
        reply, client = login(daemon, "alice%%%s:%d" % (spelling, dovecot.port))
        assert reply.startswith(b"-ERR "), (spelling, reply)
        client.close()
    setup.log.wait_for(r"deny .*user=alice dest=localhost:%d .*addresses=127.0.0.1" % dovecot.port)
    with socket.create_connection(("127.0.0.1", dovecot.port), timeout=10,
                                  source_address=(MARKER, 0)) as direct:
        direct.recv(512)
        direct.sendall(b"QUIT\r\n")
        direct.recv(512)
    realpeers.wait_until(lambda: MARKER in remote_addresses(dovecot.read_log()), 15,
                         what="the marker connection in Dovecot's log")
    assert remote_addresses(dovecot.read_log()) == {MARKER}, dovecot.read_log()

"""Open-relay tricks against the real `smap --daemon` on loopback.

The table accepts mail for example.com (and its subdomains) from anyone and
lets only 127.0.0.2 (`permit-relay`) send elsewhere.  Clients connect from
127.0.0.3 (outside) and 127.0.0.2 (inside).  Every classic trick to make an
outside host's mail leave the site again - `%` and `!` routing, quoted
local parts that hide an `@`, source routes, address literals, look-alike
domains - is refused at RCPT, and a message to such a recipient never
reaches the queue.  The controls prove that the same daemon does accept
local mail from outside and foreign mail from the inside host, and that
what it spools is exactly the recipient that was accepted.
"""

import pytest

from tests.security.harness import SmapSetup, queue_id_of

OUTSIDE, INSIDE = "127.0.0.3", "127.0.0.2"

RELAY_TRICKS = [
    "user@other.org",
    "user%other.org@example.com",
    "user%other.org",
    "other.org!user@example.com",
    "other.org!user",
    '"user@other.org"@example.com',
    '"user%other.org"@example.com',
    '"other.org!user"@example.com',
    "@example.com:user@other.org",
    "@example.com,@relay.org:user@other.org",
    "user@[192.0.2.1]",
    "user@[IPv6:2001:db8::1]",
    "user@[127.0.0.1]",
    "user@example.com@other.org",
    "user@otherexample.com",
    "user@example.com.other.org",
    "user@example.co",
    "user@other.org.",
    "user@example.com\\@other.org",
    "user@sub.example.com%other.org",
    # a domain with an empty label is refused whatever it names (issue 11, finding 8)
    "user@example.com.",
    "user@example.com..",
    "user@sub..example.com",
]

LOCAL = ["user@example.com", "USER@EXAMPLE.COM", "user@sub.example.com",
         "postmaster", "Postmaster"]


@pytest.fixture(scope="module")
def relay_daemon(tmp_path_factory):
    setup = SmapSetup(tmp_path_factory.mktemp("relay"), ["smap: permit-relay %s" % INSIDE])
    _, port = setup.daemon()
    setup.port = port
    yield setup
    setup.stop()


def start(setup, source):
    client = setup.connect(setup.port, source)
    assert client.reply()[0] == 220
    assert client.cmd("EHLO client.example.org")[0] == 250
    assert client.cmd("MAIL FROM:<sender@example.org>")[0] == 250
    return client


def deliver(client):
    assert client.cmd("DATA")[0] == 354
    client.send(b"Subject: relay test\r\n\r\nbody\r\n.\r\n")
    code, text = client.reply()
    assert code == 250, text
    return queue_id_of(text)


@pytest.mark.parametrize("rcpt", RELAY_TRICKS)
def test_outside_host_cannot_relay(relay_daemon, rcpt):
    before = set(relay_daemon.queued())
    client = start(relay_daemon, OUTSIDE)
    code, text = client.cmd("RCPT TO:<%s>" % rcpt)
    assert 500 <= code < 600, "%s accepted: %s" % (rcpt, text)
    # With no accepted recipient there is no message to send.
    code, _ = client.cmd("DATA")
    assert code >= 500
    assert client.cmd("QUIT")[0] == 221
    assert set(relay_daemon.queued()) == before


@pytest.mark.parametrize("rcpt", LOCAL)
def test_outside_host_may_send_to_the_site(relay_daemon, rcpt):
    client = start(relay_daemon, OUTSIDE)
    code, text = client.cmd("RCPT TO:<%s>" % rcpt)
    assert code == 250, text
    queue_id = deliver(client)
    envelope, _ = relay_daemon.message(queue_id)
    assert envelope["rcpt"] == [rcpt]
    assert envelope["client-addr"] == OUTSIDE
    client.cmd("QUIT")


@pytest.mark.parametrize("rcpt", ["user@other.org", "user@[192.0.2.1]", "a.b@mail.other.org"])
def test_inside_host_may_relay(relay_daemon, rcpt):
    client = start(relay_daemon, INSIDE)
    code, text = client.cmd("RCPT TO:<%s>" % rcpt)
    assert code == 250, text
    queue_id = deliver(client)
    envelope, _ = relay_daemon.message(queue_id)
    assert envelope["rcpt"] == [rcpt] and envelope["client-addr"] == INSIDE
    client.cmd("QUIT")


@pytest.mark.parametrize("rcpt", ["user%other.org@example.com", "other.org!user@example.com",
                                  "@example.com:user@other.org", '"a@b"@other.org'])
def test_inside_host_still_cannot_use_routing_tricks(relay_daemon, rcpt):
    # permit-relay lets an inside host name any domain, never a route.
    client = start(relay_daemon, INSIDE)
    code, text = client.cmd("RCPT TO:<%s>" % rcpt)
    assert 500 <= code < 600, "%s accepted: %s" % (rcpt, text)
    client.cmd("QUIT")


def test_one_refused_recipient_does_not_leak_into_an_accepted_message(relay_daemon):
    client = start(relay_daemon, OUTSIDE)
    assert client.cmd("RCPT TO:<user@example.com>")[0] == 250
    assert client.cmd("RCPT TO:<user%other.org@example.com>")[0] >= 500
    assert client.cmd("RCPT TO:<user@other.org>")[0] >= 500
    queue_id = deliver(client)
    envelope, _ = relay_daemon.message(queue_id)
    assert envelope["rcpt"] == ["user@example.com"]
    client.cmd("QUIT")

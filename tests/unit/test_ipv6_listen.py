"""IPv6 listeners and addresses (issue 16 item 2), without daemons:
`--daemon [::1]:PORT` and `[::]:PORT` parse; a `[::]` listener is dual
stack whatever net.ipv6.bindv6only says, and an IPv4 client on it is
judged by the host rules as the IPv4 address it is (::ffff:a.b.c.d);
IPv6 CIDR and globs in host rules; `mailhub`/`server [::1]:PORT` parse.

The dual-stack listener binds [::] on an ephemeral port for the few
milliseconds of one loopback connection (no daemon listens there)."""

import socket

import pytest

from common import cli, hostmatch, netperm, skeleton


def test_ipv6_daemon_addresses_parse():
    assert cli.parse_listen("[::1]:2525", 25) == ("::1", 2525)
    assert cli.parse_listen("[::]:2525", 25) == ("::", 2525)
    assert cli.parse_listen("[::1]", 110) == ("::1", 110)
    with pytest.raises(cli.StartupError):
        cli.parse_listen("::1:2525", 25)


def test_ipv6_loopback_listener_and_peer():
    listener = skeleton.listen("::1", 0)
    try:
        port = listener.getsockname()[1]
        with socket.create_connection(("::1", port), timeout=5):
            conn, _ = listener.accept()
            with conn:
                peer = hostmatch.peer_of_socket(conn, lambda addr: (None, False))
        assert peer.addr == "::1"
    finally:
        listener.close()


def test_ipv6_dual_stack_listener_takes_ipv4_as_ipv4():
    listener = skeleton.listen("::", 0)
    try:
        assert listener.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        port = listener.getsockname()[1]
        client = socket.socket()
        client.bind(("127.0.0.3", 0))
        client.connect(("127.0.0.1", port))
        with client:
            conn, raw = listener.accept()
            with conn:
                assert raw[0] == "::ffff:127.0.0.3"
                peer = hostmatch.peer_of_socket(conn, lambda addr: (None, False))
        assert peer.addr == "127.0.0.3"
        deny = hostmatch.parse_rule("deny-hosts", ["127.0.0.3"])
        assert hostmatch.decide([deny], peer, default=True) == (False, deny)
        with socket.create_connection(("::1", port), timeout=5):
            conn, _ = listener.accept()
            with conn:
                assert hostmatch.peer_of_socket(conn, lambda addr: (None, False)).addr == "::1"
    finally:
        listener.close()


@pytest.mark.parametrize("pattern,addr,expected", [
    ("2001:db8::/32", "2001:db8:ffff::1", True),
    ("2001:db8::/48", "2001:db8:1::1", False),
    ("::1/128", "::1", True),
    ("::ffff:0:0/96", "::ffff:192.0.2.1", False),   # judged as 192.0.2.1, an IPv4 address
    ("192.0.2.0/24", "::ffff:192.0.2.1", True),
    ("2001:db8::*", "2001:db8::42", True),
    ("fe80::*", "2001:db8::42", False),
    ("!2001:db8::/32", "2001:db8::1", False),
])
def test_ipv6_cidr_and_glob_host_patterns(pattern, addr, expected):
    peer = hostmatch.Peer(addr)
    assert hostmatch.list_matches([hostmatch.Pattern(pattern)], peer.addr, None) is expected


def test_ipv6_hub_and_server_parse():
    assert netperm.parse_hostport("[::1]:2526", 0) == ("::1", 2526)
    config = netperm.parse("smapd: mailhub [::1]:2526\n", "t", "smapd")
    assert not config.errors and config.get("mailhub") == ("::1", 2526)
    config = netperm.parse("pop3-gw: server [::1]:11110\n", "t", "pop3-gw")
    assert not config.errors and config.get("server") == ("::1", 11110)
    assert netperm.parse("pop3-gw: server [::ffff:127.0.0.1]:110\n", "t", "pop3-gw").errors

"""common.hostmatch: patterns (glob, CIDR, ADDR:MASK, IPv6, names, `!`) and
rules in file order; names count only when forward-confirmed."""

import socket

import pytest

from common import hostmatch
from common.hostmatch import Pattern, Peer, PatternError


def hits(pattern, addr, name=None):
    return Pattern(pattern).hits(hostmatch.normalize_address(addr) if addr else None, name)


@pytest.mark.parametrize("pattern,addr,expected", [
    ("*", "192.0.2.7", True),
    ("192.0.2.*", "192.0.2.7", True),
    ("192.0.2.*", "192.0.3.7", False),
    ("192.0.2.7", "192.0.2.7", True),
    ("192.0.2.0/24", "192.0.2.200", True),
    ("192.0.2.0/24", "192.0.1.200", False),
    ("192.0.2.0:255.255.255.0", "192.0.2.9", True),
    ("192.0.2.0:255.255.0.0", "192.0.9.9", True),
    ("10.0.0.0:255.0.0.0", "11.0.0.1", False),
    ("2001:db8::/32", "2001:db8:1::5", True),
    ("2001:db8::/32", "2001:db9::5", False),
    ("2001:DB8::5", "2001:db8::5", True),
    ("2001:db8::*", "2001:db8::5", True),
    ("192.0.2.7", "::ffff:192.0.2.7", True),
    ("127.0.0.1", "::1", False),
])
def test_address_patterns(pattern, addr, expected):
    assert hits(pattern, addr) is expected


def test_names_match_case_insensitively_when_confirmed():
    assert hits("*.Example.ORG", "192.0.2.7", "mail.example.org")
    assert not hits("*.example.org", "192.0.2.7", None)       # not confirmed
    assert not hits("*.example.org", "192.0.2.7", "mail.example.net")
    assert Peer("192.0.2.7", "Mail.Example.Org.").name == "mail.example.org"


def test_address_globs_never_match_names():
    # a PTR and A record an attacker controls must not pass as an address
    assert not hits("10.1.*", "198.51.100.9", "10.1.evil.example")
    assert not hits("10.1.1.?", "198.51.100.9", "10.1.1.x")


def test_peer_without_address_matches_only_star():
    peer = Peer()
    assert peer.addr_text == "unknown" and peer.name_text == "unknown"
    assert Pattern("*").hits(None, None)
    for pattern in ("127.0.0.1", "0.0.0.0/0", "*.example.org", "?*"):
        assert not Pattern(pattern).hits(None, None)


@pytest.mark.parametrize("bad", ["", "!", "10.0.0.0/33", "10.0.0.0:255.0.0.300",
                                 "10.0.0.0:junk", "bad\tname", "bad/pattern"])
def test_bad_patterns(bad):
    with pytest.raises(PatternError):
        Pattern(bad)


def test_negation_and_list_order():
    patterns = [Pattern("!192.0.2.66"), Pattern("192.0.2.0/24")]
    assert hostmatch.list_matches(patterns, "192.0.2.1", None)
    assert not hostmatch.list_matches(patterns, "192.0.2.66", None)
    assert not hostmatch.list_matches(patterns, "198.51.100.1", None)
    only_negated = [Pattern("!192.0.2.66")]
    assert hostmatch.list_matches(only_negated, "198.51.100.1", None)
    assert not hostmatch.list_matches([], "198.51.100.1", None)


def rules(*lines):
    return [hostmatch.parse_rule(words[0], words[1:], number)
            for number, words in enumerate((line.split() for line in lines), 1)]


def test_first_rule_that_applies_decides():
    table = rules("deny-hosts 127.0.0.2", "permit-hosts 127.0.0.0/8", "deny-hosts *")
    assert hostmatch.decide(table, Peer("127.0.0.2")) == (False, table[0])
    assert hostmatch.decide(table, Peer("127.0.0.1")) == (True, table[1])
    assert hostmatch.decide(table, Peer("192.0.2.1")) == (False, table[2])


def test_no_matching_rule_denies_and_no_rules_use_the_default():
    table = rules("permit-hosts 192.0.2.0/24")
    assert hostmatch.decide(table, Peer("198.51.100.1"), default=True) == (False, None)
    assert hostmatch.decide([], Peer("198.51.100.1"), default=True) == (True, None)
    assert hostmatch.decide([], Peer("198.51.100.1")) == (False, None)


def test_rule_options_dest_and_user():
    table = rules("permit-hosts 192.0.2.0/24 -dest mail.example.org 10.0.0.0/8 -user alice !bob")
    rule = table[0]
    peer = Peer("192.0.2.5")
    assert rule.applies(peer, dest="Mail.Example.Org", user="alice")
    assert rule.applies(peer, dest="10.1.2.3", user="alice")
    assert not rule.applies(peer, dest="pop.other.example", user="alice")
    assert not rule.applies(peer, dest="10.1.2.3", user="bob")
    assert hostmatch.may_connect(table, peer)
    assert not hostmatch.may_connect(table, Peer("198.51.100.1"))


@pytest.mark.parametrize("line,message", [
    ("permit-hosts", "needs at least one host pattern"),
    ("permit-hosts -dest x", "needs at least one host pattern"),
    ("permit-hosts * -bogus x", "unknown option -bogus"),
    ("deny-hosts * -dest x", "takes no options"),
    ("permit-hosts * -user", "needs at least one argument"),
])
def test_bad_rules(line, message):
    words = line.split()
    with pytest.raises(PatternError, match=message):
        hostmatch.parse_rule(words[0], words[1:])


def test_confirmed_name_requires_the_forward_lookup_to_match(monkeypatch):
    monkeypatch.setattr(socket, "gethostbyaddr", lambda addr: ("host.example.org", [], [addr]))
    monkeypatch.setattr(socket, "getaddrinfo",
                        lambda name, port, proto=0: [(2, 1, 6, "", ("192.0.2.7", 0))])
    assert hostmatch.confirmed_name("192.0.2.7") == ("host.example.org", False)
    assert hostmatch.confirmed_name("192.0.2.8") == (None, True)        # spoof

    def no_name(addr):
        raise socket.herror(1, "unknown host")
    monkeypatch.setattr(socket, "gethostbyaddr", no_name)
    assert hostmatch.confirmed_name("192.0.2.7") == (None, False)


def test_peer_of_unix_socket_is_unknown():
    left, right = socket.socketpair()
    with left, right:
        peer = hostmatch.peer_of_socket(left)
    assert peer.addr is None and peer.name is None

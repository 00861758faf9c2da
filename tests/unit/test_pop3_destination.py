"""pop3-gw's destination policy without sockets (issue 11, findings 2 and 3):
the spellings a destination may have, how a `-dest` list judges a resolved
destination, the monitor's Router with a stand-in DNS, and the gateway's
mark in its timestamps."""

import pytest

from common import apop, hostmatch, netperm
from pop3gw import gateway, session


class RecordingLog:
    def __init__(self):
        self.events = []

    def _add(self, event, **fields):
        self.events.append((event, fields))

    info = notice = warning = error = _add

    def named(self, event):
        return [fields for name, fields in self.events if name == event]


NUMERIC_SPELLINGS = [
    "127.1", "2130706433", "0x7f.1", "0x7f000001", "0177.0.0.1", "127.0.0.01",
    "1.2.3.04", "127.000.000.001", "0x7f.0x0.0x0.0x1", "127.0.1", "127.0.0.1.", "0",
    "mail.example.123", "[::ffff:127.0.0.1]", "[::FFFF:7f00:1]", "[0:0:0:0:0:0:0:1]",
    "[::0:1]", "[fe80::1%eth0]", "[2001:DB8:0:0::1]", "[2001:db8::0001]",
]


@pytest.mark.parametrize("host", NUMERIC_SPELLINGS)
def test_numbers_that_are_not_canonical_addresses_are_refused(host):
    with pytest.raises(ValueError):
        session.parse_server(host + ":110")
    with pytest.raises(ValueError):
        netperm.parse_hostport(host + ":110", 0)       # the table's `server`, `mailhub`


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:110", ("127.0.0.1", 110)), ("0.0.0.0", ("0.0.0.0", 110)),
    ("[::1]:995", ("::1", 995)), ("[2001:db8::1]", ("2001:db8::1", 110)),
    ("0xdead.example", ("0xdead.example", 110)), ("mail.example.org.", ("mail.example.org.", 110)),
    ("localhost:1", ("localhost", 1)), ("a1.b2.c3d", ("a1.b2.c3d", 110))])
def test_canonical_addresses_and_names_are_accepted(text, expected):
    assert session.parse_server(text) == expected


def dests(*words):
    return [hostmatch.Pattern(word) for word in words]


@pytest.mark.parametrize("patterns, dest, expected", [
    # a denied address is denied whatever the name
    (("!127.0.0.1", "*"), hostmatch.Destination("127.0.0.1", "localhost"), False),
    (("!127.0.0.0/8", "*"), hostmatch.Destination("127.0.0.2", "mail.example"), False),
    (("!127.0.0.1", "*"), hostmatch.Destination("10.0.0.1", "localhost"), True),
    # a denied name is denied whatever the address, a learned name too
    (("!*.evil.example", "*"), hostmatch.Destination("192.0.2.1", "pop.evil.example"), False),
    (("!*.evil.example", "*"),
     hostmatch.Destination("192.0.2.1", "innocent.example", ["pop.evil.example"]), False),
    # a permit by the typed name or by the address
    (("mail.example",), hostmatch.Destination("192.0.2.1", "mail.example"), True),
    (("192.0.2.0/24",), hostmatch.Destination("192.0.2.1", "anything.example"), True),
    (("mail.example",), hostmatch.Destination("192.0.2.1", "other.example"), False),
    # a learned (DNS) name never earns a permit
    (("mail.example",), hostmatch.Destination("192.0.2.1", "other.example", ["mail.example"]),
     False),
    (("mail.example",), hostmatch.Destination("192.0.2.1", None, ["mail.example"]), False),
    # all negated, none hit: matches
    (("!127.0.0.1",), hostmatch.Destination("192.0.2.1", "x.example"), True),
    (("!127.0.0.1",), hostmatch.Destination("127.0.0.1", None), False),
    # an address glob speaks for addresses only
    (("!127.*", "*"), hostmatch.Destination("127.0.0.5", "127.example"), False),
    (("!127.*", "*"), hostmatch.Destination("192.0.2.1", "127.example"), True),
])
def test_dest_lists_judge_every_form_of_the_destination(patterns, dest, expected):
    assert hostmatch.dest_matches(dests(*patterns), dest) is expected


NAMES = {
    "mixed.example": (["192.0.2.1", "127.0.0.1"], []),
    "zero.example": (["0.0.0.0"], []),
    "compat.example": (["::7f00:1"], []),
    "alias.example": (["192.0.2.7"], ["pop.evil.example"]),
    "mail.example": (["192.0.2.25"], []),
    # a partner whose DNS is hostile (or taken over): its names point inside
    "pop.partner.example": (["198.51.100.7"], []),          # documentation range: not global
    "www.partner.example": (["8.8.4.4"], []),
    "in.partner.example": (["10.1.2.3"], []),
    "lo.partner.example": (["127.0.0.1"], []),
    "ll.partner.example": (["169.254.169.254"], []),
    "cg.partner.example": (["100.64.0.9"], []),
    "v6lo.partner.example": (["::1"], []),
    "ula.partner.example": (["fd00::25"], []),
    "v6.partner.example": (["2a00:1450:4001:80b::200e"], []),
    "mix.partner.example": (["10.1.2.3", "8.8.4.4"], []),
}


def stand_in_resolver(host, port):
    if hostmatch.normalize_address(host):
        return [host], []
    if host not in NAMES:
        raise LookupError("Name or service not known")
    addresses, learned = NAMES[host]
    return list(addresses), list(learned)


def router(*lines, server=("mail.example", 110), peer="192.0.2.200"):
    rules = [hostmatch.parse_rule(line.split()[0], line.split()[1:], number)
             for number, line in enumerate(lines, 1)]
    log = RecordingLog()
    return gateway.Router(rules, server, hostmatch.Peer(peer), log, stand_in_resolver), log


def test_only_the_addresses_that_pass_are_given_out():
    route, log = router("permit-hosts * -dest !127.0.0.1 !*.evil.example *")
    assert route("alice", "mixed.example:110") == ("ok", (110, ["192.0.2.1"]))
    assert log.named("permit")[0]["refused"] == "127.0.0.1"
    assert route("alice", "127.0.0.1:110")[0] == "denied"
    assert route("alice", "alias.example:110")[0] == "denied"     # its canonical name
    assert route("alice", "zero.example:110")[0] == "denied"      # 0.0.0.0 is this host
    assert route("alice", "0.0.0.0:110")[0] == "denied"
    assert route("alice", "compat.example:110")[0] == "denied"    # ::a.b.c.d
    assert route("alice", "[::]:110")[0] == "denied"
    assert route("alice", "127.1:110")[0] == "denied"             # refused as spelled
    assert route("alice", "nowhere.example:110") == (
        "unavailable", "cannot resolve nowhere.example: Name or service not known")
    assert [fields["dest"] for fields in log.named("deny")][:2] == ["127.0.0.1:110",
                                                                    "alias.example:110"]


def test_a_percent_server_needs_a_rule_with_dest_the_configured_server_does_not():
    route, log = router("permit-hosts 192.0.2.200")
    assert route("alice", "-") == ("ok", (110, ["192.0.2.25"]))
    assert route("alice", "mail.example:110")[0] == "denied"
    route, _ = router("permit-hosts 192.0.2.200 -user bob")
    assert route("alice", "-")[0] == "denied"
    route, _ = router("permit-hosts 192.0.2.200", server=None)
    assert route("alice", "-") == ("denied", "no server configured")


def test_the_configured_server_is_checked_like_any_other():
    route, _ = router("permit-hosts * -dest !127.0.0.1 *", server=("mixed.example", 110))
    assert route("alice", "-") == ("ok", (110, ["192.0.2.1"]))


def test_resolve_for_real_numeric_and_named():
    assert gateway.resolve("127.0.0.1", 110) == (["127.0.0.1"], [])
    addresses, _ = gateway.resolve("localhost", 110)
    assert "127.0.0.1" in addresses
    with pytest.raises(LookupError):
        gateway.resolve("no-such-host.invalid", 110)


def test_gateway_timestamps_carry_the_mark_and_only_they():
    stamp = apop.make_timestamp("gw.example.org", pid=42, clock=lambda: 1000)
    assert stamp.startswith("<42.1000.") and stamp.endswith(".pop3gw@gw.example.org>")
    assert apop.valid_timestamp(stamp) and apop.issued_by_gateway(stamp)
    assert apop.issued_by_gateway(apop.make_timestamp("bad host<>"))
    for other in ("<1896.697170952@dbc.mtview.ca.us>", "<a.pop3gwx@h>", "<pop3gw.1@h>",
                  "<1.2@pop3gw>", "<x@[1.2.3.4]>"):
        assert not apop.issued_by_gateway(other), other


@pytest.mark.parametrize("pattern", ["127.1", "!0x7f.1", "!1.2.3.04", "2130706433"])
def test_a_pattern_that_spells_an_address_oddly_is_a_table_error(pattern):
    # `-dest !127.1 *` would deny nothing: no address is ever written so
    with pytest.raises(hostmatch.PatternError):
        hostmatch.Pattern(pattern)


@pytest.mark.parametrize("host", ["in.partner.example", "lo.partner.example",
                                  "ll.partner.example", "cg.partner.example",
                                  "v6lo.partner.example", "ula.partner.example",
                                  "pop.partner.example"])
def test_a_name_permit_never_reaches_an_inside_address(host):
    # Review finding: `-dest *.partner.example` permitted whatever the
    # partner's DNS said, so a hostile DNS reached the site's inside servers.
    route, log = router("permit-hosts * -dest *.partner.example")
    assert route("alice", host + ":110")[0] == "denied"
    assert log.named("deny")[0]["addresses"]
    assert not log.named("permit")


def test_a_name_permit_still_reaches_global_addresses_and_only_those():
    route, log = router("permit-hosts * -dest *.partner.example")
    assert route("alice", "www.partner.example:110") == ("ok", (110, ["8.8.4.4"]))
    assert route("alice", "v6.partner.example:995") == (
        "ok", (995, ["2a00:1450:4001:80b::200e"]))
    assert route("alice", "mix.partner.example:110") == ("ok", (110, ["8.8.4.4"]))
    assert log.named("permit")[-1]["refused"] == "10.1.2.3"


def test_an_inside_address_needs_an_address_pattern():
    route, _ = router("permit-hosts * -dest *.partner.example 10.1.2.0/24")
    assert route("alice", "in.partner.example:110") == ("ok", (110, ["10.1.2.3"]))
    assert route("alice", "lo.partner.example:110")[0] == "denied"
    route, _ = router("permit-hosts * -dest 127.0.0.1")
    assert route("alice", "lo.partner.example:110") == ("ok", (110, ["127.0.0.1"]))


def test_the_configured_server_by_name_is_the_tables_choice():
    # the table's own `server` is an inside host by name as a rule: the
    # site chose it, no user did
    route, _ = router("permit-hosts * -dest in.partner.example", server=("in.partner.example", 110))
    assert route("alice", "-") == ("ok", (110, ["10.1.2.3"]))
    assert route("alice", "in.partner.example:110")[0] == "denied"

"""pop3-gw's client side and the PROXY protocol / IPv6 (issue 16): a header
from a host that may not send one reaches the jailed session as client
talk and is refused there with a clear reason; `user%[::1]:PORT` names an
IPv6 inside server; host rules with IPv6 CIDR."""

from common import proxyproto
from pop3gw import session
from tests.unit.test_pop3_session import apop_line, make


def test_a_v1_header_before_login_is_refused_and_logged():
    pop, log, _ = make()
    reply = pop.feed(b"PROXY TCP4 10.0.0.1 127.0.0.1 4000 110\r\n")
    assert reply.startswith(b"-ERR PROXY") and pop.closed
    assert any("not in proxy-hosts" in (f.get("reason") or "") for _, f in log.events)


def test_a_v2_header_before_login_is_refused_and_logged():
    pop, log, _ = make()
    assert session.PROXY_V2_SIGNATURE == proxyproto.SIGNATURE
    reply = pop.feed(proxyproto.SIGNATURE + b"\x21\x11\x00\x0c" + bytes(12) + b"CAPA\r\n")
    assert reply.startswith(b"-ERR PROXY") and pop.closed
    assert any("PROXY" in (f.get("reason") or "") for _, f in log.events)


def test_ipv6_user_percent_bracket_server_port_is_parsed_and_routed():
    assert session.parse_server("[::1]:11110") == ("::1", 11110)
    pop, _, _ = make(table=("permit-hosts ::1 -dest ::1",), peer="::1")
    reply = pop.feed(apop_line("alice%[::1]:11110"))
    assert pop.login is not None, reply
    assert (pop.login.host, pop.login.port, pop.login.addresses) == ("::1", 11110, ["::1"])


def test_ipv6_cidr_source_rule_denies_a_destination_outside_it():
    pop, _, _ = make(table=("permit-hosts 2001:db8::/32 -dest 127.0.0.1",), peer="2001:db8::5")
    pop.feed(apop_line("alice%[::1]:11110"))
    assert pop.login is None

"""smap's session and the PROXY protocol / IPv6 (issue 16): a header from a
host that may not send one is refused with a clear reason, never read; the
Received: line writes an IPv6 client as an [IPv6:...] literal (RFC 5321
§4.1.3)."""

import os

from common import hostmatch, proxyproto, spool
from smap import session
from tests.unit.smap_fixtures import make_session, spooled


def test_a_v1_header_after_the_banner_is_refused_and_logged(tmp_path):
    smtp, log = make_session(tmp_path)
    reply = smtp.feed(b"PROXY TCP4 10.0.0.1 192.0.2.1 4000 25\r\n")
    assert reply.startswith(b"554 5.7.1 ") and smtp.closed
    assert any("PROXY protocol header from a host not in proxy-hosts" in (r or "")
               for r in log.reasons())
    assert spooled(tmp_path) == ([], [])


def test_a_v2_header_after_the_banner_is_refused_and_logged(tmp_path):
    smtp, log = make_session(tmp_path)
    header = proxyproto.SIGNATURE + b"\x21\x11\x00\x0c" + bytes(12)
    reply = smtp.feed(header + b"EHLO x\r\n")
    assert reply.startswith(b"554 5.7.1 ") and smtp.closed
    assert any("PROXY" in (r or "") for r in log.reasons())
    assert session.PROXY_V2_SIGNATURE == proxyproto.SIGNATURE


def test_proxy_after_helo_is_an_unknown_command_not_a_header(tmp_path):
    smtp, _ = make_session(tmp_path)
    smtp.feed(b"HELO client.example.net\r\n")
    assert smtp.feed(b"PROXY TCP4 10.0.0.1 192.0.2.1 4000 25\r\n").startswith(b"500 ")
    assert not smtp.closed


def test_pregreet_names_its_reason(tmp_path):
    smtp, log = make_session(tmp_path, greet=False)
    assert smtp.pregreet("PROXY protocol header from a host not in proxy-hosts").startswith(b"554")
    assert "PROXY protocol header from a host not in proxy-hosts" in log.reasons()


def test_ipv6_client_in_received_header_is_an_ipv6_literal(tmp_path):
    smtp, _ = make_session(tmp_path, peer=hostmatch.Peer("2001:DB8::7", None))
    smtp.feed(b"EHLO client.example.net\r\n")
    smtp.feed(b"MAIL FROM:<a@example.net>\r\n")
    smtp.feed(b"RCPT TO:<user@example.org>\r\n")
    smtp.feed(b"DATA\r\n")
    assert smtp.feed(b"x\r\n.\r\n").startswith(b"250 ")
    name = spooled(tmp_path)[0][0]
    envelope, message = spool.read_message(os.path.join(tmp_path, spool.QUEUE, name))
    assert message.startswith(b"Received: from client.example.net (unknown [IPv6:2001:db8::7])")
    assert envelope["client-addr"] == "2001:db8::7"


def test_ipv4_mapped_client_in_received_header_is_the_dotted_quad(tmp_path):
    smtp, _ = make_session(tmp_path, peer=hostmatch.Peer("::ffff:192.0.2.9", None))
    smtp.feed(b"HELO c\r\n")
    smtp.feed(b"MAIL FROM:<a@example.net>\r\n")
    smtp.feed(b"RCPT TO:<user@example.org>\r\n")
    smtp.feed(b"DATA\r\n")
    smtp.feed(b"x\r\n.\r\n")
    _, message = spool.read_message(os.path.join(tmp_path, spool.QUEUE, spooled(tmp_path)[0][0]))
    assert message.startswith(b"Received: from c (unknown [192.0.2.9])")

"""smapd.bounce: RFC 3464 reports built with the email package."""

import email
import email.policy

from smapd import bounce

HEADER = b"From: alice@example.net\r\nSubject: caf\xc3\xa9\r\nMessage-ID: <m1@example.net>\r\n\r\n"


def test_bounce_is_a_delivery_status_report():
    data = bounce.build_bounce("gw.example.org", {"id": "ABCD", "arrival": 0.0}, HEADER,
                               [("bob@example.org", "MTA exit 67 EX_NOUSER", "5.1.1")],
                               "alice@example.net")
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert message["To"] == "alice@example.net"
    assert message["Auto-Submitted"] == "auto-replied"
    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts] == \
        ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    status = parts[1].get_payload()
    assert status[0]["Reporting-MTA"] == "dns; gw.example.org"
    assert status[1]["Final-Recipient"] == "rfc822; bob@example.org"
    assert status[1]["Action"] == "failed" and status[1]["Status"] == "5.1.1"
    assert "Message-ID: <m1@example.net>" in parts[2].get_content()
    assert bounce.is_notice(data.split(b"\r\n\r\n")[0] + b"\r\n")


def test_is_notice_only_for_our_header():
    assert not bounce.is_notice(HEADER)
    assert not bounce.is_notice(b"Subject: X-Mailwall-Notice: no\r\n\r\n")
    assert bounce.is_notice(b"From: a\r\nx-mailwall-notice: bounce\r\n\r\n")


def test_notice_to_postmaster():
    data = bounce.build_notice("gw.example.org", "postmaster", "quarantined", "because\n")
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert message["To"] == "postmaster" and message["X-Mailwall-Notice"] == "notice"
    assert "because" in message.get_content()


# -- issue 11, finding 4: any bytes in, a 7-bit readable report out ------------

def parts_of(data):
    message = email.message_from_bytes(data, policy=email.policy.default)
    return message, list(message.iter_parts())


def assert_seven_bit(data):
    assert all(byte < 128 for byte in data), "not 7-bit"
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


REASONS = ["MTA exit 67 EX_NOUSER Empfänger unbekannt",      # UTF-8 from the agent
           "MTA exit 67 EX_NOUSER Empf\\xe4nger unbekannt",   # a raw byte, as the agent shows it
           "Empf\udce4nger",                                  # a lone surrogate (surrogateescape)
           "\x00\x1b[31m\r\nline\u2028two\x7f" + "\u00e9" * 3000,
           "\ud83d\udca5 \U0001f4a5 \ufeff"]


def test_bounce_carries_any_diagnostic_as_a_seven_bit_report():
    for reason in REASONS:
        data = bounce.build_bounce("gw.example.org", {"id": "ABCD", "arrival": 1.0}, HEADER,
                                   [("bob@example.org", reason, "5.1.1")], "alice@example.net")
        assert_seven_bit(data)
        message, parts = parts_of(data)
        text = parts[0].get_content()
        code = str(parts[1].get_payload()[1]["Diagnostic-Code"])
        assert code.startswith("X-mailwall; ") and code.isascii()
        assert len(text) < 2000 and len(code) < 2000
        for shown in (text, code):
            assert not any(c in shown for c in "\x00\x1b\x7f\u2028"), repr(shown)
    data = bounce.build_bounce("gw.example.org", {"id": "ABCD", "arrival": 1.0}, HEADER,
                               [("bob@example.org", REASONS[0], "5.1.1")], "alice@example.net")
    message, parts = parts_of(data)
    assert "Empfänger unbekannt" in parts[0].get_content()
    assert "Empf\\xe4nger unbekannt" in str(parts[1].get_payload()[1]["Diagnostic-Code"])


def test_the_quoted_header_keeps_its_exact_octets():
    for header, charset in ((HEADER, "utf-8"),
                            (b"Subject: \xe9t\xe9 caf\xc3\xa9\r\nX-Y: a=b\r\n\r\n", "iso-8859-1")):
        data = bounce.build_bounce("gw.example.org", {"id": "ABCD", "arrival": 1.0}, header,
                                   [("bob@example.org", "x", "5.0.0")], "alice@example.net")
        assert_seven_bit(data)
        part = parts_of(data)[1][2]
        assert part.get_content_charset() == charset
        assert part.get_payload(decode=True) == header


def test_an_arrival_that_is_no_time_leaves_the_date_out():
    for arrival in (float("nan"), float("inf"), -1e309, 1e300):
        data = bounce.build_bounce("gw.example.org", {"id": "ABCD", "arrival": arrival}, HEADER,
                                   [("bob@example.org", "x", "5.0.0")], "alice@example.net")
        status = parts_of(data)[1][1].get_payload()
        assert status[0]["Arrival-Date"] is None and status[0]["X-Mailwall-Queue-ID"] == "ABCD"


def test_notice_with_any_text():
    for text in REASONS:
        data = bounce.build_notice("gw.example.org", "postmaster", "quarantined \u00e9", text,
                                   b"Subject: \xff\r\n\r\n")
        assert_seven_bit(data)
        message, parts = parts_of(data)
        assert message["X-Mailwall-Notice"] == "notice"
        assert parts[1].get_payload(decode=True) == b"Subject: \xff\r\n\r\n"
    data = bounce.build_notice("gw.example.org", "postmaster", "q", "Empfänger\n")
    assert "Empfänger" in parts_of(data)[0].get_content()

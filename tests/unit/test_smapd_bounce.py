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

"""Delivery status notifications (RFC 3464) and notices to the postmaster.

Built with the standard `email` package: a multipart/report with a
human-readable part, a message/delivery-status part and the original
header section as text/rfc822-headers (never the original body: a
quarantined message may be hostile, and a bounce need not carry it).
Every message made here carries `Auto-Submitted: auto-replied` (RFC 3834)
and `X-Mailwall-Notice`, so smapd recognises its own notices and never
bounces a bounce.  The texts put in are untrusted and end up only inside
MIME parts that the package encodes.
"""

import datetime
import email.charset
import email.generator
import email.message
import email.policy
import email.utils
import io
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

NOTICE_HEADER = "X-Mailwall-Notice"
MAX_HEADERS_QUOTED = 64 * 1024


def is_notice(header):
    """Whether a header section (bytes) is one of our own notices."""
    return b"\r\n" + NOTICE_HEADER.lower().encode() + b":" in b"\r\n" + header.lower()


def now_text():
    return email.utils.format_datetime(datetime.datetime.now(datetime.timezone.utc))


def ascii_text(data):
    return data.decode("ascii", "replace").replace("\ufffd", "?")


def delivery_status(reporting_mta, message_id, arrival, failures):
    """The message/delivery-status part: per-message and per-recipient fields."""
    part = email.message.Message()
    part.set_type("message/delivery-status")
    blocks = []
    first = email.message.Message()
    first["Reporting-MTA"] = "dns; %s" % reporting_mta
    first["X-Mailwall-Queue-ID"] = message_id
    first["Arrival-Date"] = email.utils.format_datetime(
        datetime.datetime.fromtimestamp(arrival, datetime.timezone.utc))
    blocks.append(first)
    for recipient, reason, status in failures:
        block = email.message.Message()
        block["Final-Recipient"] = "rfc822; %s" % recipient
        block["Action"] = "failed"
        block["Status"] = status
        block["Diagnostic-Code"] = "X-mailwall; %s" % " ".join(reason.split())[:300]
        blocks.append(block)
    part.set_payload(blocks)
    return part


def build_bounce(reporting_mta, envelope, header, failures, to):
    """The DSN bytes (CRLF) for failures [(recipient, reason, status)] sent to `to`."""
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = "Mail Delivery System <MAILER-DAEMON@%s>" % reporting_mta
    report["To"] = to
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = now_text()
    report["Message-ID"] = email.utils.make_msgid("bounce", domain=reporting_mta)
    report["Auto-Submitted"] = "auto-replied"
    report[NOTICE_HEADER] = "bounce"
    lines = ["This is the mail gateway at %s." % reporting_mta, "",
             "Your message (queue id %s) could not be delivered to:" % envelope["id"], ""]
    for recipient, reason, _ in failures:
        lines.append("  <%s>: %s" % (recipient, " ".join(reason.split())[:300]))
    lines += ["", "The header of your message is attached."]
    report.attach(MIMEText("\n".join(lines) + "\n", "plain", "us-ascii"))
    report.attach(delivery_status(reporting_mta, envelope["id"], envelope["arrival"], failures))
    report.attach(MIMEText(ascii_text(header[:MAX_HEADERS_QUOTED]), "rfc822-headers", "us-ascii"))
    return flatten(report)


def build_notice(reporting_mta, to, subject, text, header=b""):
    """A plain notice to the postmaster (quarantine, undeliverable bounce)."""
    if header:
        notice = MIMEMultipart("mixed")
        notice.attach(MIMEText(text, "plain", "us-ascii"))
        notice.attach(MIMEText(ascii_text(header[:MAX_HEADERS_QUOTED]), "rfc822-headers",
                               "us-ascii"))
    else:
        notice = MIMEText(text, "plain", "us-ascii")
    notice["From"] = "Mail Delivery System <MAILER-DAEMON@%s>" % reporting_mta
    notice["To"] = to
    notice["Subject"] = subject
    notice["Date"] = now_text()
    notice["Message-ID"] = email.utils.make_msgid("notice", domain=reporting_mta)
    notice["Auto-Submitted"] = "auto-generated"
    notice[NOTICE_HEADER] = "notice"
    return flatten(notice)


def flatten(message):
    out = io.BytesIO()
    email.generator.BytesGenerator(out, policy=email.policy.SMTP).flatten(message)
    return out.getvalue()


def warm_up():
    """Build one of each before the chroot, so every lazy import is done."""
    envelope = {"id": "0000", "arrival": 0.0}
    build_bounce("localhost", envelope, b"Subject: x\r\n\r\n",
                 [("a@example.org", "test", "5.0.0")], "a@example.org")
    build_notice("localhost", "postmaster", "test", "test\n", b"Subject: x\r\n\r\n")
    "x".encode("idna")

"""Delivery status notifications (RFC 3464) and notices to the postmaster.

Built with the standard `email` package: a multipart/report with a
human-readable part, a message/delivery-status part and the original
header section as text/rfc822-headers (never the original body: a
quarantined message may be hostile, and a bounce need not carry it).
Every message made here carries `Auto-Submitted: auto-replied` (RFC 3834)
and `X-Mailwall-Notice`, so smapd recognises its own notices and never
bounces a bounce.  The texts put in are untrusted (an MTA's diagnostic,
a hub's reply, the original header) and may hold any character or byte:
the human-readable parts are UTF-8 in quoted-printable, the quoted header
keeps its exact octets (quoted-printable, declared UTF-8 when it is and
ISO-8859-1 otherwise), and the delivery-status fields, which RFC 3464 wants
in ASCII, show any other character as a backslash escape.  A bounce is
therefore 7-bit, with lines far below 998 octets, whatever went in.
"""

import datetime
import email.charset
import email.generator
import email.message
import email.policy
import email.utils
import io
import math
import quopri
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.mime.text import MIMEText

NOTICE_HEADER = "X-Mailwall-Notice"
MAX_HEADERS_QUOTED = 64 * 1024


def is_notice(header):
    """Whether a header section (bytes) is one of our own notices."""
    return b"\r\n" + NOTICE_HEADER.lower().encode() + b":" in b"\r\n" + header.lower()


def now_text():
    return email.utils.format_datetime(datetime.datetime.now(datetime.timezone.utc))


MAX_REASON = 300         # characters of one failure's reason shown


def quoted_printable_utf8():
    charset = email.charset.Charset("utf-8")
    charset.body_encoding = email.charset.QP
    return charset


UTF8 = quoted_printable_utf8()


def plain(text):
    """Text that any UTF-8 encoder takes: a lone surrogate (bytes decoded
    with surrogateescape somewhere) becomes a visible escape."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def one_line(text, limit=MAX_REASON):
    """One printable line of at most `limit` characters."""
    text = "".join(c if c.isprintable() else " " for c in plain(text))
    return " ".join(text.split())[:limit]


def ascii_field(text, limit=MAX_REASON):
    """A delivery-status field value: ASCII, other characters escaped."""
    return one_line(text, limit).encode("ascii", "backslashreplace").decode("ascii")


def text_part(text, subtype="plain"):
    return MIMEText(plain(text), subtype, UTF8)


def headers_part(header):
    """text/rfc822-headers with the header's exact octets (quoted-printable)."""
    data = bytes(header[:MAX_HEADERS_QUOTED])
    try:
        data.decode("utf-8")
        charset = "utf-8"
    except UnicodeDecodeError:
        charset = "iso-8859-1"      # every octet is one of its characters
    part = MIMENonMultipart("text", "rfc822-headers", charset=charset)
    # quopri works on LF lines; the generator writes them back with CRLF
    part.set_payload(quopri.encodestring(data.replace(b"\r\n", b"\n")).decode("ascii"))
    part["Content-Transfer-Encoding"] = "quoted-printable"
    return part


def date_of(timestamp):
    """An RFC 5322 date, or None for a time that is none (damage, not a crash)."""
    try:
        if not math.isfinite(timestamp):
            return None
        return email.utils.format_datetime(
            datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc))
    except (ValueError, OverflowError, OSError, TypeError):
        return None


def delivery_status(reporting_mta, message_id, arrival, failures):
    """The message/delivery-status part: per-message and per-recipient fields."""
    part = email.message.Message()
    part.set_type("message/delivery-status")
    blocks = []
    first = email.message.Message()
    first["Reporting-MTA"] = "dns; %s" % ascii_field(reporting_mta)
    first["X-Mailwall-Queue-ID"] = ascii_field(message_id)
    arrival_date = date_of(arrival)
    if arrival_date:
        first["Arrival-Date"] = arrival_date
    blocks.append(first)
    for recipient, reason, status in failures:
        block = email.message.Message()
        block["Final-Recipient"] = "rfc822; %s" % ascii_field(recipient)
        block["Action"] = "failed"
        block["Status"] = ascii_field(status, 16)
        block["Diagnostic-Code"] = "X-mailwall; %s" % ascii_field(reason)
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
        lines.append("  <%s>: %s" % (one_line(recipient), one_line(reason)))
    lines += ["", "The header of your message is attached."]
    report.attach(text_part("\n".join(lines) + "\n"))
    report.attach(delivery_status(reporting_mta, envelope["id"], envelope["arrival"], failures))
    report.attach(headers_part(header))
    return flatten(report)


def build_notice(reporting_mta, to, subject, text, header=b""):
    """A plain notice to the postmaster (quarantine, undeliverable bounce)."""
    if header:
        notice = MIMEMultipart("mixed")
        notice.attach(text_part(text))
        notice.attach(headers_part(header))
    else:
        notice = text_part(text)
    notice["From"] = "Mail Delivery System <MAILER-DAEMON@%s>" % reporting_mta
    notice["To"] = to
    notice["Subject"] = ascii_field(subject, 200)
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
    build_notice("localhost", "postmaster", "test", "t\u00e9st\n", b"Subject: \xe9\r\n\r\n")
    "x".encode("idna")

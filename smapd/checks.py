"""Checks of a spooled message before it goes anywhere, and the
`shorten-domain` rewriting (DESIGN §7).

Everything here works on untrusted bytes from the spool and runs in the
chrooted, unprivileged scanner.  A message passes only if its envelope
addresses are plain addresses (common.address), its header section is
well formed (field names of printable ASCII, folding only after a first
field, no NUL, lines of at most 998 octets, only CRLF line ends, a blank
line before the body) and no address header names a program, a file or
an option.  `problem_of` answers with a short reason, or None.
"""

import email.policy
import email.utils
import re

from common import address

MAX_LINE = 998                      # RFC 5322 §2.1.1, without the CRLF
MAX_HEADER_SECTION = 128 * 1024     # bounded work; no real header is near it
ADDRESS_FIELDS = frozenset((b"from", b"sender", b"reply-to", b"to", b"cc", b"bcc",
                            b"resent-from", b"resent-sender", b"resent-to",
                            b"resent-cc", b"resent-bcc", b"return-path",
                            b"disposition-notification-to", b"errors-to"))
_STRICT_HEADER = email.policy.default.header_factory   # imported before any chroot
SHORTEN_FIELDS = frozenset((b"from", b"sender", b"reply-to", b"cc"))
FIELD_NAME = re.compile(rb"^[\x21-\x39\x3b-\x7e]+$")
UNSAFE_IN_FIELD = re.compile(rb"[|/\\-]|=\?")


def envelope_problem(envelope):
    """None if sender and recipients are acceptable, else the reason."""
    sender = envelope.get("sender", "")
    if sender:
        reason = address.problem(sender)
        if reason:
            return "bad sender %s: %s" % (sender[:80], reason)
    for recipient in envelope["rcpt"]:
        reason = address.problem(recipient, allow_bare_postmaster=True)
        if reason:
            return "bad recipient %s: %s" % (recipient[:80], reason)
    return None


def split_message(data):
    """(header section with its CRLF CRLF, body); the header may be all there is."""
    if data.startswith(b"\r\n"):
        return b"\r\n", data[2:]
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data, b""
    return data[:end + 4], data[end + 4:]


def fields(header):
    """[(lowercase name, raw field bytes including folded lines and CRLF)]."""
    result = []
    for line in header.split(b"\r\n")[:-1]:
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            name, raw = result[-1]
            result[-1] = (name, raw + line + b"\r\n")
        else:
            name = line.split(b":", 1)[0].lower()
            result.append((name, line + b"\r\n"))
    return result


def header_problem(data):
    """None if the message's header section is well formed, else the reason."""
    if b"\0" in data:
        return "NUL in message"
    if data.count(b"\n") != data.count(b"\r\n") or data.count(b"\r") != data.count(b"\r\n"):
        return "bare CR or LF in message"
    header, _ = split_message(data)
    if len(header) > MAX_HEADER_SECTION:
        return "header section larger than %d octets" % MAX_HEADER_SECTION
    if not header.endswith(b"\r\n"):
        return "header section does not end with CRLF"
    first = True
    for line in header.split(b"\r\n")[:-1]:
        if not line:
            break
        if len(line) > MAX_LINE:
            return "header line longer than %d octets" % MAX_LINE
        if line[:1] in (b" ", b"\t"):
            if first:
                return "header section starts with a continuation line"
            continue
        first = False
        name, colon, _ = line.partition(b":")
        if not colon or not FIELD_NAME.match(name):
            return "unparseable header line %r (no blank line before the body?)" % line[:40]
    for name, raw in fields(header):
        if name in ADDRESS_FIELDS:
            reason = address_field_problem(raw)
            if reason:
                return "%s header: %s" % (name.decode(), reason)
    return None


def address_field_problem(raw):
    """A program, a file or an option in an address header."""
    value = raw.split(b":", 1)[1]
    if not UNSAFE_IN_FIELD.search(value):
        # No local part can start with "|", "/" or "-" when none of them is
        # in the field and nothing in it decodes to one (an encoded word
        # "=?", a quoted pair "\\"): neither reading below could object.
        return None
    text = value.decode("latin-1")
    text = text.replace("\r\n", "")
    # Both readings ask common.address, as smap and the agent do, what the
    # local part is once its quotes, quoted pairs and white space are gone.
    for _, spec in email.utils.getaddresses([text]):
        if address.names_option_program_or_file(spec.rsplit("@", 1)[0]):
            return "address %r names a program, a file or an option" % spec[:60]
    # The strict RFC 5322 parser may read the same field differently (what
    # one takes for a group's display name, `"-be"@x.orgFrom: a@b`, the other
    # takes for an address): whatever reads the header later, neither
    # reading may name a program, a file or an option.
    try:
        strict = [a.username for a in _STRICT_HEADER("to", text.strip()).addresses]
    except Exception:           # noqa: BLE001 - any parser failure: the first reading stands
        strict = []
    for local in strict:
        if address.names_option_program_or_file(local):
            return "address %r names a program, a file or an option" % local[:60]
    return None


def problem_of(envelope, data):
    return envelope_problem(envelope) or header_problem(data)


def shorten(header, domains):
    """Rewrite user@host.DOMAIN to user@DOMAIN in From/Sender/Reply-To/Cc."""
    if not domains:
        return header
    patterns = [re.compile(rb"@((?:[a-z0-9-]+\.)+)(" + re.escape(d.encode("ascii", "ignore"))
                           + rb")(?![a-z0-9.-])", re.IGNORECASE) for d in domains]
    out = []
    for name, raw in fields(header):
        if name in SHORTEN_FIELDS:
            head, colon, value = raw.partition(b":")
            for pattern in patterns:
                value = pattern.sub(lambda m: b"@" + m.group(2), value)
            raw = head + colon + value
        out.append(raw)
    rebuilt = b"".join(out)
    # keep whatever ended the section (the blank line, or nothing)
    return rebuilt + header[len(b"".join(raw for _, raw in fields(header))):]

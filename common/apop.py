"""APOP (RFC 1939 §7): greeting timestamps, their validation, and digests.

`make_timestamp` builds a fresh `<pid.time.random.pop3gw@host>` for a
banner.  The fixed `.pop3gw` at the end of its local part is the gateway's
mark: `issued_by_gateway` recognises it, and the signer refuses to sign
such a timestamp (a hostile upstream could otherwise offer the timestamp of
a pop3-gw session of its own and replay the digest there).  The mark needs
no key and no shared state: a relayed timestamp must be passed on verbatim,
since any change alters its digest, so every timestamp any mailwall gateway
issued carries the mark.
`find_timestamp` takes the timestamp out of an upstream server's greeting and
accepts it only when it is a well-formed RFC 822 msg-id (`<local@domain>`,
atoms of RFC 822 atom characters, which include `+ / =` as Dovecot uses
them) of bounded length: a server that may choose arbitrary challenges can
recover an APOP secret (Leurent, 2007), so anything else is refused.
`digest` is MD5(timestamp + secret) in lowercase hex; `check` compares a
client's digest with it in constant time.  Nothing here trusts its input;
nothing here does I/O except reading random bytes.
"""

import hashlib
import hmac
import os
import re
import time

DIGEST_LENGTH = 32            # 16 octets in hex (RFC 1939 §7)
MAX_TIMESTAMP = 256           # a greeting line is at most 512 octets (RFC 2449)
GATEWAY_MARK = "pop3gw"       # the last atom of the local part of our timestamps

# RFC 822 §3.3: atom = 1*<any CHAR except specials, SPACE and CTLs>
_ATOM = r"[!#$%&'*+\-/=?^_`{|}~0-9A-Za-z]+"
_DOT_ATOM = r"%s(?:\.%s)*" % (_ATOM, _ATOM)
_DOMAIN_LITERAL = r"\[[!-Z^-~]*\]"       # dtext: CHAR except [ ] \ CR
_MSG_ID = re.compile(r"<%s@(?:%s|%s)>" % (_DOT_ATOM, _DOT_ATOM, _DOMAIN_LITERAL))
_CANDIDATE = re.compile(rb"<[^<>]*>")
_DIGEST = re.compile(r"[0-9a-f]{%d}" % DIGEST_LENGTH)


def make_timestamp(hostname, pid=None, clock=time.time):
    """A fresh RFC 1939 timestamp with the gateway's mark:
    <pid.time.random.pop3gw@hostname>."""
    pid = os.getpid() if pid is None else pid
    host = hostname if valid_timestamp("<x@%s>" % hostname) else "localhost"
    return "<%d.%d.%s.%s@%s>" % (pid, int(clock()), os.urandom(8).hex(), GATEWAY_MARK, host)


def issued_by_gateway(timestamp):
    """True when the timestamp carries the mark make_timestamp puts in every
    gateway banner (compared without regard to case: cheaper to refuse a
    near miss than to reason about it)."""
    local = timestamp[1:].rpartition("@")[0]
    return local.rpartition(".")[2].lower() == GATEWAY_MARK


def valid_timestamp(text):
    """True when text is a bounded RFC 822 msg-id made of atoms."""
    return len(text) <= MAX_TIMESTAMP and _MSG_ID.fullmatch(text) is not None


def find_timestamp(greeting):
    """The validated timestamp in a greeting line (bytes), or raise ValueError."""
    found = _CANDIDATE.findall(greeting)
    if not found:
        raise ValueError("no APOP timestamp in the greeting")
    if len(found) > 1:
        raise ValueError("more than one <...> in the greeting")
    try:
        text = found[0].decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("APOP timestamp is not ASCII") from None
    if not valid_timestamp(text):
        raise ValueError("APOP timestamp is not a valid msg-id")
    return text


def digest(timestamp, secret):
    """MD5(timestamp + secret) as 32 lowercase hex digits."""
    data = timestamp.encode("ascii") + secret.encode("utf-8")
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def well_formed_digest(text):
    """32 lowercase hex digits, as RFC 1939 writes them."""
    return _DIGEST.fullmatch(text) is not None


def check(timestamp, secret, offered):
    """Constant-time comparison of a client's digest with the expected one."""
    expected = digest(timestamp, secret).encode("ascii")
    return hmac.compare_digest(expected, offered.encode("ascii", "replace"))

"""Recipient verification at the mail hub, smap's side (issue 14; DESIGN §12.2).

`Verifier.check(session, envelope, address)` answers one RCPT for an
address at an accept-domains domain, from the cache smapd's prober keeps
in the spool (common.verifycache):

    cached "ok"           -> accept
    cached "reject"       -> 550 5.1.1 with the hub's own reply text,
                             log reason="recipient verification" hub_reply="..."
    cached "unavailable"  -> verify-fallback: defer (450 4.1.1) or accept
    nothing (or damage)   -> ask the prober (one datagram to /.verify: the
                             address) and wait up to verify-wait for its
                             answer; then as above, or
                             450 4.1.1 <addr>: Recipient address rejected:
                             verification in progress
    no prober to ask      -> as "unavailable"

A record past half its life is still used, and the prober is asked to
refresh it.  smap stays jailed: it never connects to the hub, and its only
channel to the prober is that datagram; the prober's one-byte answer only
wakes it, what counts is the cache (a datagram anyone could forge says
nothing).  smap's own socket is autobound in the abstract namespace
(Linux), so the jail needs no socket file of smap's.

What this trusts: the cache only as far as common.verifycache checks it,
and the hub's reply text only after smap.policy's reply rules (one line
of printable ASCII of bounded length); otherwise the refusal carries
"User unknown" text instead.  Imported only when verify-recipients is on
(before the chroot); it imports nothing beyond what smap has loaded and
common.verifycache.

`VerifyRecipients` is the minimal hook installed when verification is on
and no `recipients` list is configured: the recipients-list hook
(smap/recipients.py, issue 14 item 1) calls Verifier.check itself for the
addresses its list does not hold, and replaces this hook when merged.
"""

import _socket
import time

from common import address as addresses, verifycache
from smap import policy

POLL = 0.25         # seconds between looks at the cache while waiting (a lost wake-up)
FALLBACK_DEFER, FALLBACK_ACCEPT = "defer", "accept"


class VerifyVerdict(policy.Verdict):
    """A Verdict with extra fields for its log line (hub_reply="...")."""

    __slots__ = ("fields",)

    def __init__(self, action, code=None, status=None, text=None, reason=None, fields=None):
        super().__init__(action, code, status, text, reason)
        self.fields = fields or {}


def unknown_text(path):
    return "<%s>: Recipient address rejected: User unknown" % path


class Verifier:
    """Answers RCPTs from the verification cache; one per session."""

    def __init__(self, wait=6, positive=2678400, negative=10800, fallback=FALLBACK_DEFER,
                 clock=time.time, monotonic=time.monotonic):
        self.wait = wait
        self.ttls = verifycache.lifetimes(positive, negative)
        self.fallback = fallback
        self.clock, self.monotonic = clock, monotonic
        self.sock = None

    @classmethod
    def from_config(cls, config):
        return cls(config.get("verify-wait"), config.get("verify-positive-ttl"),
                   config.get("verify-negative-ttl"), config.get("verify-fallback"))

    # -- the answer --------------------------------------------------------
    def check(self, session, envelope, path):
        """The Verdict for RCPT TO:<path> (an address at one of our domains)."""
        root = session.spool_root
        key = verifycache.key_of(path)
        record, _ = verifycache.read(root, key, self.clock(), self.ttls)
        if record is not None:
            if record.due(self.clock()):
                self.ask(root, path)        # still good: used now, refreshed meanwhile
            return self.verdict(session, envelope, path, record)
        problem = self.ask(root, path)
        if problem:
            return self.unavailable(session, envelope, path, problem)
        deadline = self.monotonic() + self.wait
        while True:
            remaining = deadline - self.monotonic()
            if remaining <= 0:
                break
            self.sleep(min(remaining, POLL))
            record, _ = verifycache.read(root, key, self.clock(), self.ttls)
            if record is not None:
                return self.verdict(session, envelope, path, record)
        return VerifyVerdict(policy.TEMPFAIL, 450, "4.1.1",
                             "<%s>: Recipient address rejected: verification in progress" % path,
                             reason="recipient verification in progress")

    def verdict(self, session, envelope, path, record):
        if record.kind == verifycache.OK:
            return policy.ACCEPTED
        if record.kind == verifycache.REJECT:
            text = hub_text(record.reply)
            if text is None or policy.reply_problem(policy.REJECT, 550, "5.1.1", text,
                                                    policy.RCPT):
                text = unknown_text(path)
            return VerifyVerdict(policy.REJECT, 550, "5.1.1", text,
                                 reason="recipient verification",
                                 fields={"to": "<%s>" % path, "hub_reply": record.reply})
        return self.unavailable(session, envelope, path, record.reply)

    def unavailable(self, session, envelope, path, why):
        """The hub cannot say: verify-fallback decides."""
        if self.fallback == FALLBACK_ACCEPT:
            session.log.notice("verify-fallback", id=envelope.id, to="<%s>" % path,
                               reason="accepted unverified: %s" % why)
            return policy.ACCEPTED
        return VerifyVerdict(policy.TEMPFAIL, 450, "4.1.1",
                             "<%s>: Recipient address rejected: unverified address: "
                             "mail hub unavailable, try again later" % path,
                             reason="recipient verification unavailable",
                             fields={"to": "<%s>" % path, "hub_reply": why})

    # -- the prober --------------------------------------------------------
    def ask(self, root, path):
        """Send the address to the prober; None when sent, else why not."""
        try:
            if self.sock is None:
                sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
                try:
                    sock.bind("")           # autobind: an abstract name, nothing in the jail
                except OSError:
                    sock.close()
                    raise
                self.sock = sock
            self.drain()
            self.sock.sendto(path.encode("ascii"), root.rstrip("/") + "/" + verifycache.SOCKET)
            return None
        except BlockingIOError:
            return "the prober is busy (its queue is full)"
        except OSError:
            return "no prober: smapd is not running with verify-recipients"

    def drain(self):
        """Forget wake-ups of earlier questions."""
        self.sock.setblocking(False)
        try:
            while self.sock.recv(64):
                pass
        except OSError:
            pass

    def sleep(self, seconds):
        """Until the prober wakes us, or seconds pass."""
        self.sock.settimeout(seconds)
        try:
            self.sock.recv(64)
        except OSError:         # the timeout, or anything else: look at the cache again
            pass

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def hub_text(reply):
    """The text of a hub's reply "550 5.1.1 <a@b>: ... User unknown" without
    its codes, or None."""
    words = reply.split(" ", 1)
    if len(words) != 2 or not words[0].isdigit():
        return None
    text = words[1]
    status, _, rest = text.partition(" ")
    parts = status.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts):
        text = rest
    return text.strip() or None


class VerifyRecipients:
    """The hook: RCPTs at our domains (not the postmaster) go to Verifier.check.
    Minimal on purpose: the recipients list's hook takes its place."""

    name = "verify"

    def __init__(self, verifier, accept_domains):
        self.verifier = verifier
        self.accept_domains = list(accept_domains)

    def on_rcpt(self, session, envelope, path):
        if "@" not in path or not addresses.in_domains(path, self.accept_domains):
            return policy.ACCEPTED      # the bare postmaster; a relayed domain is not ours to verify
        if path.rpartition("@")[0].lower() == "postmaster":
            return policy.ACCEPTED      # RFC 5321 §4.5.1: always accepted
        return self.verifier.check(session, envelope, path)

    def on_close(self, session):
        self.verifier.close()


def hooks_for(config):
    """The hooks that verification adds to a session (after the standard ones)."""
    if not config.get("verify-recipients") or config.has("recipients"):
        return []
    return [VerifyRecipients(Verifier.from_config(config), config.get("accept-domains") or ())]

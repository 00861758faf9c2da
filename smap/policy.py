"""smap's policy as hooks: what may connect, send and receive (DESIGN §5).

smap.session speaks SMTP; everything a site decides about a connection or
a message is a hook, an object with any of these methods, called at fixed
stages (aiosmtpd's handlers, Postfix's smtpd_*_restrictions and milters):

    on_connect(session)                  -> Verdict   before the banner
    on_helo(session, name)               -> Verdict   HELO/EHLO, syntax checked
    on_mail(session, envelope, address)  -> Verdict   MAIL, syntax and parameters checked
    on_rcpt(session, envelope, address)  -> Verdict   RCPT, syntax and maxrecip checked
    on_text(session, envelope, data)     -> None      message text as it is spooled
    on_data(session, envelope)           -> Verdict   end of data, before the commit
    on_reset(session, envelope)          -> None      a begun transaction ends uncommitted
    on_close(session)                    -> None      the session ends

Hooks run in the order given; the first verdict that is not "accept"
answers the command and the later hooks are not asked.  A hook keeps its
own state for a transaction in `envelope.notes` and for the connection in
`session.notes` (dicts, keyed by the hook's name).

on_text gets complete CRLF lines, dot-unstuffed, exactly the bytes the
spool gets, starting with smap's own Received: field; it is not called
once the message is refused anyway (size, NUL, an over-long line).  An
on_text that raises makes the message a temporary failure at the final
dot (a scanner that missed text must not let the message through).  With
no on_text or on_data hook the DATA path costs what it did before hooks.

What this module trusts: nothing a hook says.  A reply a hook asks for is
checked against RFC 5321 §4.2 and RFC 3463 (a 4xx for tempfail, a 5xx for
reject, an enhanced code of the same class, one line of printable ASCII):
anything else is refused, logged, and replaced by this stage's default
reply of the same kind, so a hook can never make smap send "250", a second
reply line or a 421 it did not mean.  Header changes are checked the same
way (a field name, a value whose only line breaks are folds); a verdict
with a bad change becomes a temporary failure: the message is neither
accepted unchanged nor stored with a forged header.  A hook that raises or
returns something that is not a Verdict is a temporary failure too.

The first hooks are today's rules: AddressCheck (addresses that could
become options, programs or files: common.address) and RelayControl
(permit-relay and accept-domains).
"""

from common import address

# Stages, as they appear in log lines.
CONNECT, HELO, MAIL, RCPT, DATA = "connect", "helo", "mail", "rcpt", "data"

# Verdict actions.
ACCEPT, REJECT, TEMPFAIL, DISCARD, QUARANTINE = (
    "accept", "reject", "tempfail", "discard", "quarantine")

# RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets with its CRLF;
# "NNN X.YYY.ZZZ " and CRLF take at most 18 of them.
MAX_TEXT = 512 - 18
# Header changes a hook may ask for on one message, and a field's size.
MAX_HEADER_CHANGES = 1000
MAX_FIELD_NAME = 256
MAX_FIELD_VALUE = 65536

# The reply of each stage when a hook gives none, or a bad one.  At the
# connect stage the session ends after the reply, so the codes are the
# ones RFC 5321 §3.1 and §4.2.3 give for that: 554 and 421.
DEFAULT_REPLIES = {
    CONNECT: {REJECT: (554, "5.7.1", "Error: access denied"),
              TEMPFAIL: (421, "4.7.1", "Error: service not available, try again later")},
    HELO: {REJECT: (550, "5.7.1", "Error: rejected by policy"),
           TEMPFAIL: (450, "4.7.1", "Error: temporarily rejected, try again later")},
    MAIL: {REJECT: (550, "5.7.1", "Error: rejected by policy"),
           TEMPFAIL: (450, "4.7.1", "Error: temporarily rejected, try again later")},
    RCPT: {REJECT: (550, "5.7.1", "Error: rejected by policy"),
           TEMPFAIL: (450, "4.7.1", "Error: temporarily rejected, try again later")},
    DATA: {REJECT: (554, "5.7.1", "Error: message rejected by policy"),
           TEMPFAIL: (451, "4.7.1", "Error: message temporarily rejected, try again later")},
}


class Verdict:
    """A hook's answer.  Make one with accept(), reject(), tempfail(),
    discard() or quarantine(); `reason` is for the log, never the client."""

    __slots__ = ("action", "code", "status", "text", "reason", "changes")

    def __init__(self, action, code=None, status=None, text=None, reason=None, changes=()):
        self.action, self.code, self.status, self.text = action, code, status, text
        self.reason = reason
        self.changes = tuple(changes)

    def __repr__(self):
        return "Verdict(%r, %r, %r, %r)" % (self.action, self.code, self.status, self.text)


ACCEPTED = Verdict(ACCEPT)


def accept(changes=()):
    """Go on; at end of data, `changes` (HeaderChange) are applied before the commit."""
    return Verdict(ACCEPT, changes=changes) if changes else ACCEPTED


def reject(code=None, status=None, text=None, reason=None):
    """A permanent refusal: a 5xx with a 5.x.x code (the stage's default for what is None)."""
    return Verdict(REJECT, code, status, text, reason)


def tempfail(code=None, status=None, text=None, reason=None):
    """A temporary refusal: a 4xx with a 4.x.x code; the client will retry."""
    return Verdict(TEMPFAIL, code, status, text, reason)


def discard(reason):
    """End of data only: answer 250 as if queued, spool nothing, log it."""
    return Verdict(DISCARD, reason=reason)


def quarantine(reason, changes=()):
    """End of data only: spool the message for the quarantine, with reason."""
    return Verdict(QUARANTINE, reason=reason, changes=changes)


class HeaderChange:
    """One change to the message header, as the milter protocol has them.
    `index`: for insert, the position (0: first field, before smap's
    Received:); for change and delete, which occurrence of `name` (1: the
    first).  Field names compare case-insensitively."""

    ADD, INSERT, CHANGE, DELETE = "add", "insert", "change", "delete"
    __slots__ = ("action", "name", "value", "index")

    def __init__(self, action, name, value=None, index=None):
        self.action, self.name, self.value, self.index = action, name, value, index

    def __repr__(self):
        return "HeaderChange(%r, %r, %r, %r)" % (self.action, self.name, self.value, self.index)

    def __eq__(self, other):
        return isinstance(other, HeaderChange) and (
            (self.action, self.name, self.value, self.index) ==
            (other.action, other.name, other.value, other.index))


def add_header(name, value):
    return HeaderChange(HeaderChange.ADD, name, value)


def insert_header(index, name, value):
    return HeaderChange(HeaderChange.INSERT, name, value, index)


def change_header(name, value, index=1):
    return HeaderChange(HeaderChange.CHANGE, name, value, index)


def delete_header(name, index=1):
    return HeaderChange(HeaderChange.DELETE, name, None, index)


# -- checking what a hook says ----------------------------------------------

def _printable(text):
    return all(" " <= c <= "~" for c in text)


def reply_problem(action, code, status, text, stage):
    """None when (code, status, text) is a reply a hook may have smap send
    for `action` at `stage` (None parts take the default), else why not."""
    if code is not None:
        if type(code) is not int:
            return "reply code is not a number"
        wanted = "5" if action == REJECT else "4"
        digits = "%d" % code
        if len(digits) != 3 or digits[0] != wanted or digits[1] not in "012345":
            return "reply code %s is not a %sxx code" % (digits[:6], wanted)
        if stage != CONNECT and code == 421:
            return "421 would close the session"
    if status is not None:
        if type(status) is not str:
            return "enhanced status code is not text"
        parts = status.split(".")
        first = str(code)[0] if code is not None else ("5" if action == REJECT else "4")
        if len(parts) != 3 or parts[0] != first or not all(
                part.isascii() and part.isdigit() and len(part) <= 3 for part in parts[1:]):
            return "enhanced status code %r does not fit the reply" % status[:20]
    if text is not None:
        if type(text) is not str:
            return "reply text is not text"
        if not text or len(text) > MAX_TEXT or not _printable(text):
            return "reply text is empty, too long or not printable ASCII on one line"
    return None


def reply_of(verdict, stage, hostname):
    """(reply bytes, problem) for a reject or tempfail verdict at `stage`:
    the hook's reply when it passes reply_problem, else the stage's default
    (problem then says what was wrong with the hook's)."""
    code, status, text = DEFAULT_REPLIES[stage][verdict.action]
    problem = reply_problem(verdict.action, verdict.code, verdict.status, verdict.text, stage)
    if not problem:
        code = code if verdict.code is None else verdict.code
        status = status if verdict.status is None else verdict.status
        text = text if verdict.text is None else verdict.text
    if stage == CONNECT:
        # the session ends: only the default 554 and 421 say so
        code = DEFAULT_REPLIES[stage][verdict.action][0]
        text = ("%s %s" % (hostname, text))[:MAX_TEXT]
    return ("%d %s %s\r\n" % (code, status, text)).encode(), problem


def change_problem(change):
    """None when a HeaderChange is well formed, else why not."""
    if not isinstance(change, HeaderChange):
        return "not a HeaderChange"
    name, value, index = change.name, change.value, change.index
    if type(name) is not str or not 0 < len(name) <= MAX_FIELD_NAME or not all(
            "!" <= c <= "~" and c != ":" for c in name):
        return "bad field name"
    if change.action in (HeaderChange.ADD, HeaderChange.INSERT, HeaderChange.CHANGE):
        if type(value) is not str or len(value) > MAX_FIELD_VALUE or "\0" in value:
            return "bad field value"
        # line breaks only as folds: CRLF followed by a space or a tab
        unfolded = value.replace("\r\n ", "").replace("\r\n\t", "")
        if "\r" in unfolded or "\n" in unfolded or value.endswith("\r\n"):
            return "line break in field value that is not a fold"
    elif change.action != HeaderChange.DELETE:
        return "unknown header change %r" % str(change.action)[:20]
    if change.action == HeaderChange.ADD:
        return None if index is None else "index given for add"
    lowest = 0 if change.action == HeaderChange.INSERT else 1
    if type(index) is not int or not lowest <= index <= 1 << 20:
        return "bad index"
    return None


def changes_problem(changes):
    """None when every change of a verdict is well formed and they are not too many."""
    if len(changes) > MAX_HEADER_CHANGES:
        return "more than %d header changes" % MAX_HEADER_CHANGES
    for change in changes:
        problem = change_problem(change)
        if problem:
            return problem
    return None


# -- running the hooks ------------------------------------------------------

METHODS = (("connect", "on_connect"), ("helo", "on_helo"), ("mail", "on_mail"),
           ("rcpt", "on_rcpt"), ("text", "on_text"), ("data", "on_data"),
           ("reset", "on_reset"), ("close", "on_close"))


def name_of(hook):
    return getattr(hook, "name", None) or type(hook).__name__


class Hooks:
    """The hooks of a session, sorted by stage once: for each stage a list
    of (name, bound method), empty when no hook has that method (the
    session then does nothing for it)."""

    def __init__(self, hooks=()):
        self.hooks = list(hooks)
        for stage, method in METHODS:
            setattr(self, stage, [(name_of(hook), getattr(hook, method))
                                  for hook in self.hooks if hasattr(hook, method)])

    def ask(self, stage, calls, arguments):
        """(name, Verdict) of the first hook of `calls` that does not
        accept, or (None, ACCEPT verdict with every accepting hook's header
        changes, in order).  A hook that raises or answers with something
        else than a Verdict gives a tempfail."""
        changes = []
        for name, call in calls:
            try:
                verdict = call(*arguments)
            except Exception as err:    # a broken hook must not accept by accident
                return name, tempfail(reason="hook failed: %s: %s" % (type(err).__name__, err))
            if not isinstance(verdict, Verdict):
                return name, tempfail(reason="hook answered %s, not a Verdict"
                                      % type(verdict).__name__)
            if verdict.action == ACCEPT:
                if verdict.changes and stage != DATA:
                    return name, tempfail(reason="header changes are only for the end of data")
                changes.extend(verdict.changes)
                continue
            if verdict.action not in (REJECT, TEMPFAIL, DISCARD, QUARANTINE):
                return name, tempfail(reason="unknown verdict %r" % str(verdict.action)[:20])
            if verdict.action not in (REJECT, TEMPFAIL) and stage != DATA:
                return name, tempfail(reason="%s is only for the end of data" % verdict.action)
            if verdict.action == QUARANTINE:
                changes.extend(verdict.changes)
                problem = changes_problem(changes)
                if problem:
                    return name, tempfail(reason="refused header change: %s" % problem)
                verdict = Verdict(QUARANTINE, reason=verdict.reason, changes=changes)
            return name, verdict
        problem = changes_problem(changes)
        if problem:
            return None, tempfail(reason="refused header change: %s" % problem)
        return None, (accept(changes) if changes else ACCEPTED)

    def tell(self, calls, arguments):
        """Notify (on_text, on_reset, on_close answer nothing); returns the
        reason of the first hook that raised, or None.  The others are
        still told."""
        failed = None
        for name, call in calls:
            try:
                call(*arguments)
            except Exception as err:    # a broken hook must not stop the session
                failed = failed or "hook %s failed: %s: %s" % (name, type(err).__name__, err)
        return failed


# -- the first hooks: today's rules -----------------------------------------

class AddressCheck:
    """Sender and recipient addresses that could become an option, a
    program or a file for a delivery agent, or that route through other
    hosts, are refused with 553 (common.address judges them)."""

    name = "address"

    def on_mail(self, session, envelope, path):
        if not path:
            return ACCEPTED             # <>: the null sender of bounces
        reason = address.problem(path)
        if reason:
            return reject(553, "5.1.7", "Error: bad sender address: %s" % reason,
                          reason="sender %s" % reason)
        return ACCEPTED

    def on_rcpt(self, session, envelope, path):
        reason = address.problem(path, allow_bare_postmaster=True)
        if reason:
            return reject(553, "5.1.3", "Error: bad recipient address: %s" % reason,
                          reason="recipient %s" % reason)
        return ACCEPTED


class RelayControl:
    """A recipient must be in an accept-domains domain (or be the bare
    `postmaster`) unless the client may relay (permit-relay)."""

    name = "relay"

    def __init__(self, accept_domains=(), relay_ok=False):
        self.accept_domains = [d.lower().rstrip(".") for d in accept_domains]
        self.relay_ok = relay_ok

    def on_rcpt(self, session, envelope, path):
        if self.relay_ok or "@" not in path or address.in_domains(path, self.accept_domains):
            return ACCEPTED
        return reject(554, "5.7.1", "<%s>: Relay access denied" % path,
                      reason="relay denied to=<%s>" % path)


def standard_hooks(accept_domains=(), relay_ok=False):
    """The hooks of every smap session, in order; later issues append theirs."""
    return [AddressCheck(), RelayControl(accept_domains, relay_ok)]

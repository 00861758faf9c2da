"""The scanner's decisions about one message, as pure functions (DESIGN §7).

Given what smapd knows of a message (its delivery state, its envelope
recipients, its arrival time, whether it is a notice of our own), the time
and the agent's outcomes, these functions say what happens next: retry at
a time, go on with the next batch of recipients now, bounce these failures
to that address, keep it in the quarantine, or done.  They touch no file,
no clock and no process; smapd.scan carries the answer out.  They trust
their inputs only as far as they check them: an outcome text is made one
printable, bounded line (state.one_line) before it is kept anywhere, and an
outcome kind other than "ok" or "perm" counts as temporary.

The rules (smapd(8)): "ok" delivers, "perm" fails the recipient for good,
anything else is temporary; a message with a pending recipient after a
temporary failure is retried `retry` seconds later while it is at most
`maxage` seconds old (not counting the time it spent on hold), after
that its pending recipients fail with "gave up after".  Once every
recipient is settled, failures are bounced to the sender, or to the
postmaster when the sender is empty, except a failed notice of our own
(empty sender and our notice header): it is never bounced (no bounce
loops) but kept in the quarantine without a notice.
"""

import collections
import math

from smapd import state

RETRY, NEXT, BOUNCE, QUARANTINE, DONE = "retry", "next", "bounce", "quarantine", "done"
NO_OUTCOME = "no outcome from the delivery agent"


class Action(collections.namedtuple("Action", "kind at to failures reason")):
    """What to do with one message.

    retry: save the state, try again at `at`; next: save the state, go on
    with the recipients still pending at once; bounce: send `failures`
    [(recipient, reason, status)] to `to`, then remove the message;
    quarantine: move it to the quarantine with `reason`, tell nobody;
    done: remove it.
    """

    __slots__ = ()


def retry_at(when):
    return Action(RETRY, when, None, (), None)


def go_on():
    return Action(NEXT, 0.0, None, (), None)


def bounce_to(to, failures):
    return Action(BOUNCE, None, to, tuple(failures), None)


def quarantine(reason):
    return Action(QUARANTINE, None, None, (), reason)


def done():
    return Action(DONE, None, None, (), None)


def is_due(record, now, force=False):
    """Whether a message with this state is to be tried at `now`."""
    return force or not record.next_try > now


def copy_of(record):
    new = state.State()
    new.attempts = record.attempts
    new.next_try = record.next_try
    new.last_error = record.last_error
    new.done = list(record.done)
    new.failed = list(record.failed)
    new.held_since = record.held_since
    new.held_seconds = record.held_seconds
    return new


def record_outcomes(record, targets, outcomes):
    """(new state, whether a failure was temporary) after one attempt.

    targets: {delivered address: [envelope recipients]} of the request;
    outcomes: {delivered address: (kind, text)} from the agent; a target
    without an outcome failed temporarily.
    """
    new = copy_of(record)
    new.attempts += 1
    temporary = False
    for target, originals in targets.items():
        kind, text = outcomes.get(target, ("temp", NO_OUTCOME))
        text = state.one_line(text)
        if kind == "ok":
            new.done += originals
        elif kind == "perm":
            new.failed += [(r, text) for r in originals]
        else:
            temporary = True
            new.last_error = text
    return new, temporary


def settle(record, recipients, targets, outcomes, arrival, now, retry, maxage,
           sender, notice, postmaster):
    """(new state, Action) for the agent's outcomes of one attempt."""
    new, temporary = record_outcomes(record, targets, outcomes)
    if not new.finished(recipients) and temporary:
        # the time on hold (smapd --hold) does not count: a released message
        # gets what was left of its maxage when it was held
        age = now - arrival - record.held_seconds
        if not math.isfinite(age):
            # the spool reader refuses such an arrival; a caller that did not
            # gets a message that gives up, not an exception
            age = maxage + 1
        if age <= maxage:
            new.next_try = now + retry
            return new, retry_at(new.next_try)
        reason = state.one_line("gave up after %d seconds: %s" % (age, new.last_error))
        new.failed += [(r, reason) for r in new.pending(recipients)]
    if not new.finished(recipients):
        # more recipients than one request carries: the rest go out at once
        new.next_try = 0.0
        return new, go_on()
    return new, finish(new, sender, notice, postmaster)


def finish(record, sender, notice, postmaster):
    """The Action for a message whose every recipient is settled."""
    if not record.failed:
        return done()
    if not sender and notice:
        # never bounce a bounce: keep it for the postmaster instead
        return quarantine("undeliverable notice: " + record.failed[0][1])
    return bounce_to(sender or postmaster,
                     [(r, why, status_of(why)) for r, why in record.failed])


def status_of(reason):
    """An RFC 3463 status for a failure text."""
    for code, status in (("EX_NOUSER", "5.1.1"), ("EX_NOHOST", "5.1.2"),
                         ("EX_DATAERR", "5.6.0"), ("gave up after", "4.4.7")):
        if code in reason:
            return status
    return "5.0.0"

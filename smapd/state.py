"""Per-message delivery state, kept in the spool as state/ID (DESIGN §6).

The file is a few `key value` text lines: attempts, next-try (epoch
seconds), last-error, one `done RCPT` per recipient already delivered and
one `failed RCPT<TAB>REASON` per recipient that failed for good; a message
that was put on hold also has `held-since` (when, epoch seconds, while it
is on hold) and `held-seconds` (the time it spent on hold before, which
does not count towards `maxage`).  It is
written to a temporary name, fsync'ed, renamed over state/ID and the
directory fsync'ed, so a crash leaves either the old or the new state.
Its content is trusted only as far as `load` checks it: a regular file
(anything else, a link or a FIFO, is no state), attempts a small
whole number, next-try a finite time in range, written as decimal digits; a
damaged file is treated as no state at all (at worst a recipient is tried
again), never as a time that is never reached.
"""

import os
import stat

from common import spool

MAX_STATE = 1 << 20
MAX_TEXT = 400
MAX_ATTEMPTS = 10 ** 6


class State:
    """What smapd remembers about one message between attempts."""

    def __init__(self):
        self.attempts = 0
        self.next_try = 0.0
        self.last_error = ""
        self.done = []
        self.failed = []          # (recipient, reason)
        self.held_since = 0.0     # when `smapd --hold` put it on hold (0: not held)
        self.held_seconds = 0.0   # time spent on hold before: not counted towards maxage

    def finished(self, recipients):
        """Whether every recipient has been delivered or has failed for good."""
        closed = set(self.done) | {r for r, _ in self.failed}
        return all(r in closed for r in recipients)

    def pending(self, recipients):
        closed = set(self.done) | {r for r, _ in self.failed}
        return [r for r in recipients if r not in closed]

    def encode(self):
        lines = ["attempts %d" % self.attempts, "next-try %.3f" % self.next_try]
        if self.held_since:
            lines.append("held-since %.3f" % self.held_since)
        if self.held_seconds:
            lines.append("held-seconds %.3f" % self.held_seconds)
        if self.last_error:
            lines.append("last-error %s" % one_line(self.last_error))
        lines += ["done %s" % r for r in self.done]
        lines += ["failed %s\t%s" % (r, one_line(why)) for r, why in self.failed]
        return ("\n".join(lines) + "\n").encode("utf-8", "replace")


def one_line(text):
    """Text safe for one state line: printable, no tab or newline, bounded."""
    text = "".join(c if c.isprintable() and c != "\t" else " " for c in str(text))
    return text[:MAX_TEXT]


def path_of(root, message_id):
    return os.path.join(root, spool.STATE, message_id)


def load(root, message_id):
    """The State of a message; a fresh one if none exists or it is damaged."""
    state = State()
    # The spool is the scanner's own, but a FIFO, a device or a link where a
    # state file belongs must read as no state, not block or go elsewhere.
    try:
        fd = os.open(path_of(root, message_id), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return state
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return state
        with os.fdopen(fd, "rb") as source:
            fd = None
            data = source.read(MAX_STATE + 1)
    except OSError:
        return state
    finally:
        if fd is not None:
            os.close(fd)
    if len(data) > MAX_STATE:
        return State()
    try:
        for line in data.decode("utf-8").split("\n"):
            if not line:
                continue
            key, _, value = line.partition(" ")
            if key == "attempts":
                attempts = spool.decimal(value, fraction=False)
                if attempts is None or attempts > MAX_ATTEMPTS:
                    return State()
                state.attempts = attempts
            elif key == "next-try":
                next_try = spool.decimal(value)
                if next_try is None or next_try > spool.MAX_TIME:
                    return State()
                state.next_try = float(next_try)
            elif key in ("held-since", "held-seconds"):
                when = spool.decimal(value)
                if when is None or when > spool.MAX_TIME:
                    return State()
                setattr(state, key.replace("-", "_"), float(when))
            elif key == "last-error":
                state.last_error = value
            elif key == "done":
                state.done.append(value)
            elif key == "failed":
                recipient, _, reason = value.partition("\t")
                state.failed.append((recipient, reason))
            else:
                return State()
    except ValueError:
        return State()
    return state


def save(root, message_id, state):
    """Write state/ID atomically: temporary file, fsync, rename, fsync dir."""
    directory = os.path.join(root, spool.STATE)
    final = os.path.join(directory, message_id)
    temporary = final + ".new"      # never a valid queue id, never read as state
    # whatever is left under the temporary name (a crash, a link, a FIFO that
    # would block an open for writing) is removed, and the file made afresh
    try:
        os.unlink(temporary)
    except FileNotFoundError:
        pass
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        data = state.encode()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, final)
    spool.fsync_dir(directory)


def remove(root, message_id):
    try:
        os.unlink(path_of(root, message_id))
    except FileNotFoundError:
        pass


def sweep_orphans(root):
    """Remove state files whose message is gone (a crash after the message's removal).

    A message on hold keeps its state.  queue/ is listed before and after
    hold/, so that a message `smapd --hold` or `--release` renames between
    the listings is seen in one of them."""
    present = set(spool.queued(root))
    present |= set(spool.held(root))
    present |= set(spool.queued(root))
    removed = []
    try:
        names = os.listdir(os.path.join(root, spool.STATE))
    except OSError:
        return removed
    for name in names:
        base = name[:-4] if name.endswith(".new") else name
        if base not in present:
            try:
                os.unlink(os.path.join(root, spool.STATE, name))
                removed.append(name)
            except OSError:
                pass
    return removed

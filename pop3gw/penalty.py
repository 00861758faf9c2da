"""pop3-gw's bad-login penalty, kept per source address, never per user
(issue 11, finding 6; modelled on Dovecot's auth penalty).

The policy, decided by the root monitor of each session:

* The key is the client's source: an IPv4 address as it is, an IPv6
  address by its /64 (one end site; a host there can change its low 64
  bits at will), an IPv4-mapped IPv6 address as the IPv4 address, a peer
  that is not an IP socket as `unknown`.
* Each bad login from a source (unknown user, wrong digest, disabled or
  secret-less account: all alike) adds one to the source's count and notes
  the time.  Its answer is delayed by `delay(count)`: 1, 2, 4, 8 then 15
  seconds at most.  A source whose last bad login is `badsleep` seconds old
  is forgotten.
* A source with `maxbad` bad logins is refused, even with the right digest,
  until `badsleep` has passed since its last counted bad login.  Attempts
  while it is refused are delayed like a bad login but not counted (right
  and wrong digests alike, so the refusal is no oracle, and a client that
  keeps polling with its fixed password gets in again after `badsleep`):
  a source gets at most `maxbad` guesses every `badsleep` seconds.
* A good login does not clear its source's count (one account of the
  attacker's own would otherwise reset the guessing budget at will): the
  count ages out `badsleep` after the source's last bad login, or
  `authmgr unblock ADDRESS` clears it.
* Nothing here depends on the user name: an attacker can make only its
  own source (and those sharing its IPv4 address or IPv6 /64) wait.

The state must outlive the session's processes (in inetd mode every
session is its own pair), so it is a small file beside the auth db,
`AUTHFILE.penalty`, one source a line: `KEY COUNT LAST-BAD-LOGIN`.  Every
decision is one transaction under the exclusive lock `AUTHFILE.penalty.lock`
(authdb.locked): read, decide, and write only when something changed,
to `AUTHFILE.penalty.tmp.PID` (0600, fsync), renamed over the file, the
directory fsynced.  At most MAX_ENTRIES sources are kept (expired ones
first, then the oldest go).  The file is root's, 0600, opened without
following a link, and trusted only as far as `parse` reads it: a line that
does not parse is ignored (that can only forget a penalty, never make one).
"""

import contextlib
import errno
import os
import re

from common import authdb, fsguard, hostmatch

SUFFIX = ".penalty"
HEADER = "# mailwall pop3-gw bad logins by source, version 1: written by pop3-gw"
MAX_ENTRIES = 4096
MAX_FILE_BYTES = 1 << 20
MAX_COUNT = 1 << 20
MAX_DELAY = 15              # seconds, as Dovecot's AUTH_PENALTY_MAX_SECS
IPV6_PREFIX = 64
UNKNOWN = "unknown"
_KEY = re.compile(r"unknown|[0-9.]{7,15}|[0-9a-f:]{2,39}/64")
_NUMBER = re.compile(r"[0-9]{1,12}")

GOOD, BAD, REFUSED = "good", "bad", "refused"


class PenaltyError(Exception):
    """The penalty state cannot be used (unsafe or unreadable file)."""


class Entry:
    __slots__ = ("count", "last")

    def __init__(self, count, last):
        self.count, self.last = count, last

    def __eq__(self, other):
        return isinstance(other, Entry) and (self.count, self.last) == (other.count, other.last)

    def __repr__(self):
        return "Entry(%d, %d)" % (self.count, self.last)


class Verdict:
    """What one attempt came to: `outcome` GOOD, BAD (counted) or REFUSED
    (the source is past maxbad), the source's `count` after it, how long its
    answer waits (`delay`, seconds) and until when a refused source stays
    refused (`until`, 0 if it is not)."""
    __slots__ = ("outcome", "count", "delay", "until")

    def __init__(self, outcome, count, delay, until=0):
        self.outcome, self.count, self.delay, self.until = outcome, count, delay, until


def source_key(address):
    """The key of a client's source address (text as hostmatch.Peer has it)."""
    canonical = hostmatch.normalize_address(address) if address else None
    if canonical is None:
        return UNKNOWN
    if ":" not in canonical:
        return canonical
    import ipaddress            # IPv6 only; the monitor is a long way from smap's start
    network = ipaddress.IPv6Network("%s/%d" % (canonical, IPV6_PREFIX), strict=False)
    return "%s/%d" % (network.network_address, IPV6_PREFIX)


def delay(count):
    """Seconds a bad login's answer waits, the source's count included."""
    if count <= 0:
        return 0
    return min(MAX_DELAY, 2 ** min(count - 1, 8))


def live(entry, now, badsleep):
    """The entry if it still counts at `now`, else None."""
    if entry is None or now - entry.last >= badsleep:
        return None
    return entry


def parse(text):
    """{key: Entry} from the file's text; lines that do not parse are skipped."""
    entries = {}
    for line in text.split("\n"):
        fields = line.split(" ")
        if len(fields) != 3 or not _KEY.fullmatch(fields[0]) or fields[0] in entries \
                or not _NUMBER.fullmatch(fields[1]) or not _NUMBER.fullmatch(fields[2]):
            continue
        count = int(fields[1])
        if 0 < count <= MAX_COUNT:
            entries[fields[0]] = Entry(count, int(fields[2]))
        if len(entries) >= MAX_ENTRIES:
            break
    return entries


def format_entries(entries):
    return HEADER + "\n" + "".join("%s %d %d\n" % (key, entry.count, entry.last)
                                   for key, entry in sorted(entries.items()))


def prune(entries, now, badsleep):
    """Drop the entries that no longer count, then the oldest beyond MAX_ENTRIES."""
    for key in [key for key, entry in entries.items() if live(entry, now, badsleep) is None]:
        del entries[key]
    if len(entries) > MAX_ENTRIES:
        oldest = sorted(entries, key=lambda key: entries[key].last)
        for key in oldest[:len(entries) - MAX_ENTRIES]:
            del entries[key]


def _directory(path):
    """The auth db's directory, reached without links and root's alone."""
    try:
        return authdb.open_directory_of(path)
    except authdb.AuthDbError as err:
        raise PenaltyError(str(err)) from None


def load(path):
    """{key: Entry} from path; a missing file is an empty state."""
    dir_fd = _directory(path)
    try:
        try:
            fd = os.open(os.path.basename(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                         | os.O_NONBLOCK, dir_fd=dir_fd)
        except FileNotFoundError:
            return {}
        except OSError as err:
            raise PenaltyError("%s: %s" % (path, "is a symbolic link" if err.errno == errno.ELOOP
                                           else err.strerror)) from None
    finally:
        os.close(dir_fd)
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        try:
            fsguard.check_trusted_file(info, path, secret=True)
        except fsguard.UnsafePath as err:
            raise PenaltyError(str(err)) from None
        data = handle.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise PenaltyError("%s: larger than %d bytes" % (path, MAX_FILE_BYTES))
    return parse(data.decode("ascii", "replace"))


def store(path, entries):
    """Replace path atomically with entries (call with the lock held)."""
    try:
        authdb.replace_file(path, format_entries(entries).encode("ascii"))
    except authdb.AuthDbError as err:
        raise PenaltyError(str(err)) from None


@contextlib.contextmanager
def _locked(path):
    """authdb's writer lock, on PATH.lock in the same checked directory."""
    try:
        with authdb.locked(path):
            yield
    except authdb.AuthDbError as err:
        raise PenaltyError(str(err)) from None


class Ledger:
    """The penalty state of one auth db's users' logins: `settle` decides one
    attempt, `clear` forgets a source (authmgr)."""

    def __init__(self, authfile, maxbad, badsleep):
        self.path = authfile + SUFFIX
        self.maxbad, self.badsleep = maxbad, badsleep

    def settle(self, key, good, now):
        """The Verdict on one attempt from source `key` whose digest and
        account were right (`good`) or not, at `now`; recorded before it is
        returned.  The work is the same for every user name."""
        now = int(now)
        with _locked(self.path):
            entries = load(self.path)
            entry = live(entries.get(key), now, self.badsleep)
            if entry is not None and entry.last > now:
                entry.last = now                # the clock went back: count from now
            if entry is not None and entry.count >= self.maxbad:
                return Verdict(REFUSED, entry.count, delay(entry.count),
                               entry.last + self.badsleep)
            if good:
                # Not cleared: a client with an account of its own would reset
                # its count with a good login after each maxbad-1 guesses at
                # another user's secret.  The count ages out badsleep after the
                # source's last bad login (or `authmgr unblock`).
                if entry is None and key in entries:
                    del entries[key]            # aged out: tidy it away
                    prune(entries, now, self.badsleep)
                    store(self.path, entries)
                return Verdict(GOOD, entry.count if entry is not None else 0, 0)
            count = (entry.count if entry is not None else 0) + 1
            entries[key] = Entry(count, now)
            prune(entries, now, self.badsleep)
            store(self.path, entries)
        until = now + self.badsleep if count >= self.maxbad else 0
        return Verdict(BAD, count, delay(count), until)

    def clear(self, key):
        """Forget source `key`; True if it had an entry."""
        with _locked(self.path):
            entries = load(self.path)
            if key not in entries:
                return False
            del entries[key]
            store(self.path, entries)
            return True


class NoLedger:
    """For an Authority without a db file (test doubles): nothing is kept."""

    def settle(self, key, good, now):
        return Verdict(GOOD if good else BAD, 0, 0)

"""smapd's metrics in Prometheus' text exposition format (issue 16,
`smapd: metrics-file PATH`), for node_exporter's textfile collector.

Who writes it.  The scanner runs chrooted in the spool as `userid` and the
metrics file lies outside the spool (node_exporter's textfile directory,
or a directory of its own beside it), so the scanner could neither reach
it by name nor should root write it for uucp.  Instead the start-up, still
root, opens the file's directory as a descriptor (`prepare`): reached
from "/" without following a link through directories of root's alone
(common.fsguard), and owned by `userid` (made and given to it when
missing; an existing directory of someone else's is refused, never
chowned).  The scanner keeps that descriptor through the chroot and
writes with openat: `NAME.tmp` (never read by node_exporter, which reads
only `*.prom`) created afresh without following a link, written, fsync'ed,
fchmod'ed 0644 so that node_exporter's user can read it, renamed over
NAME, and the directory fsync'ed.  A scrape sees the old file or the new
one, never half of one.

What it writes, at every scan (at most once a second, and once more when
the scanner stops): the queue (messages, bytes, the oldest message's age
from its spool file's time), the messages on hold and in the quarantine,
the deliveries in progress, and counters that survive restarts: delivery
outcomes per recipient by result (ok, temp, perm), bounces, quarantined
messages, and the messages smap accepted.

smap's accepted messages are counted by smapd, not by smap: every message
smap accepts ("250" after the rename into queue/) is seen by the scanner
before anything else happens to it, so the scanner counts each message it
first looks at that has had no attempt yet and is not one of its own
notices.  smap writes nothing: its inetd path stays as cheap as it was,
and no file is shared between two writers.  (A crash during a message's
first delivery can count it twice.)

The counters live in the spool as `.smapd.counters`, `name value` lines,
written with the metrics (atomically, as the scanner's other state), so a
crash loses at most the last second of counts; Prometheus' rate()
treats a counter that goes back as a reset.  It trusts the file only as
far as it checks it: decimal whole numbers, bounded, known names;
anything else starts that counter at 0.  uucp can write it, so a
taken-over uucp can lie in the metrics; it cannot make root write
anywhere.
"""

import os
import stat
import time

from common import exposition, fsguard, spool

COUNTERS = ".smapd.counters"
MIN_INTERVAL = 1.0      # seconds between two writes of the metrics file
MAX_COUNTERS = 4096     # octets of the counters file read
MAX_COUNT = 10 ** 18

DELIVERY_RESULTS = ("ok", "temp", "perm")
COUNTER_NAMES = ("deliveries_ok", "deliveries_temp", "deliveries_perm", "bounces",
                 "quarantined", "received_messages", "received_bytes")


class Target:
    """The metrics file's directory, opened by root before the chroot."""

    def __init__(self, dir_fd, name, shown):
        self.dir_fd, self.name, self.shown = dir_fd, name, shown

    def close(self):
        if self.dir_fd is not None:
            os.close(self.dir_fd)
            self.dir_fd = None


def prepare(path, uid, gid, root):
    """The Target of metrics-file PATH, or None when it is not set.

    The directory is reached without following a link through directories
    of root's that no one else may write; it must belong to userid (the
    scanner writes there after the drop): when missing it is made (0755)
    and given to userid:groupid, when present of anyone else's refused.
    Raises fsguard.UnsafePath (`PATH: reason`)."""
    if not path:
        return None
    path = os.path.normpath(path)
    parent, name = os.path.split(path)
    if not name or name in (".", ".."):
        raise fsguard.UnsafePath(path, "not a file name")
    owners = (uid,) if root else fsguard.trusted_owners()
    try:
        dir_fd = fsguard.open_directory(parent, owners=owners)
    except fsguard.UnsafePath as err:
        if not err.missing:
            if "owned by" in err.reason:
                raise fsguard.UnsafePath(parent, err.reason + " (the scanner writes "
                                         "the metrics there as userid)") from None
            raise
        dir_fd = fsguard.open_or_make_directory(parent, 0o755, owners=(0,) + tuple(owners))
        try:
            if root:
                os.fchown(dir_fd, uid, gid)
        except BaseException:
            os.close(dir_fd)
            raise
    return Target(dir_fd, name, path)


def read_counters(base):
    """The counters kept in the spool; missing or damaged values are 0."""
    counts = dict.fromkeys(COUNTER_NAMES, 0)
    try:
        fd = os.open(os.path.join(base, COUNTERS), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return counts
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return counts
        data = os.read(fd, MAX_COUNTERS)
    except OSError:
        return counts
    finally:
        os.close(fd)
    for line in data.decode("ascii", "replace").split("\n"):
        key, _, value = line.partition(" ")
        number = spool.decimal(value, fraction=False)
        if key in counts and number is not None and number <= MAX_COUNT:
            counts[key] = number
    return counts


def queue_snapshot(base, baddir, now):
    """The gauges read from the spool (names, lstat: no message is opened)."""
    names = spool.queued(base)
    size, oldest = 0, None
    queue_dir = os.path.join(base, spool.QUEUE)
    for name in names:
        try:
            info = os.lstat(os.path.join(queue_dir, name))
        except OSError:
            continue
        size += info.st_size
        oldest = info.st_mtime if oldest is None else min(oldest, info.st_mtime)
    try:
        quarantined = sum(1 for n in os.listdir(baddir) if n.endswith(".reason"))
    except (OSError, TypeError):
        quarantined = 0
    return {"queue_messages": len(names), "queue_bytes": size,
            "queue_oldest_age_seconds": 0 if oldest is None else max(0.0, now - oldest),
            "held_messages": len(spool.held(base)),
            "quarantine_messages": quarantined}


GAUGES = (
    ("queue_messages", "Messages in smapd's queue waiting for delivery (not those on hold)."),
    ("queue_bytes", "Octets of the spool files in smapd's queue."),
    ("queue_oldest_age_seconds",
     "Age of the oldest message in the queue, from its spool file's time (0 when empty)."),
    ("held_messages", "Messages on hold (smapd --hold): neither delivered nor expired."),
    ("quarantine_messages", "Messages in the quarantine (baddir)."),
    ("deliveries_in_progress", "Messages the delivery agent is delivering now."),
    ("last_scan_timestamp_seconds", "When smapd last scanned its queue (Unix time)."),
)
TOTALS = (
    ("bounces_total", "bounces", "Bounce notices smapd sent (delivery status notifications)."),
    ("quarantined_total", "quarantined", "Messages smapd moved to the quarantine."),
    ("received_messages_total", "received_messages",
     "Messages smap accepted, counted by smapd when it first looks at them."),
    ("received_bytes_total", "received_bytes", "Octets of the messages smap accepted."),
)


def render(spool_name, gauges, counts):
    """The exposition: HELP and TYPE lines, one sample a line, LF ends each."""
    label = 'spool="%s"' % exposition.escape(spool_name)
    lines = []
    for name, text in GAUGES:
        lines += exposition.family("mailwall_" + name, "gauge", text,
                                   [(label, gauges.get(name, 0))])
    # labels in name order, as node_exporter serves them
    lines += exposition.family(
        "mailwall_deliveries_total", "counter",
        "Delivery outcomes, one per recipient and attempt, by result "
        "(ok: delivered, temp: deferred, perm: failed for good).",
        [('result="%s",%s' % (result, label), counts["deliveries_" + result])
         for result in DELIVERY_RESULTS])
    for name, key, text in TOTALS:
        lines += exposition.family("mailwall_" + name, "counter", text, [(label, counts[key])])
    return ("\n".join(lines) + "\n").encode("utf-8")


class Metrics:
    """The scanner's counters and its writes of the metrics file."""

    def __init__(self, target, base, baddir, spool_name, log, clock=time.time):
        self.target = target
        self.base = base
        self.baddir = baddir
        self.spool_name = spool_name
        self.log = log
        self.clock = clock
        self.counts = read_counters(base)
        self.last_write = None      # monotonic time of the last write
        self.dirty = True
        self.failing = False
        self.last_scan = 0.0

    def count(self, key, amount=1):
        self.counts[key] = min(MAX_COUNT, self.counts[key] + amount)
        self.dirty = True

    def scanned(self):
        self.last_scan = self.clock()
        self.dirty = True

    def wait(self):
        """Seconds until a pending write is due; None when none is pending."""
        if not self.dirty:
            return None
        if self.last_write is None:
            return 0.0
        return max(0.0, MIN_INTERVAL - (time.monotonic() - self.last_write))

    def write(self, inflight=0, force=False):
        """Write the counters and the metrics file if due (or force)."""
        pending = self.wait()
        if pending is None or (pending > 0 and not force):
            return False
        self.last_write = time.monotonic()
        self.dirty = False
        now = self.clock()
        try:
            base_fd = os.open(self.base, fsguard.DIRECTORY_FLAGS)
            try:
                exposition.write_atomically(base_fd, COUNTERS, b"".join(
                    b"%s %d\n" % (key.encode(), value) for key, value in self.counts.items()),
                    0o600)
            finally:
                os.close(base_fd)
            if self.target is not None:
                gauges = queue_snapshot(self.base, self.baddir, now)
                gauges["deliveries_in_progress"] = inflight
                gauges["last_scan_timestamp_seconds"] = self.last_scan or now
                exposition.write_atomically(self.target.dir_fd, self.target.name,
                                 render(self.spool_name, gauges, self.counts), 0o644)
        except OSError as err:
            if not self.failing:        # once, not at every scan
                self.log.error("metrics", file=self.target.shown if self.target else COUNTERS,
                               reason=err.strerror or str(err))
            self.failing = True
            return False
        if self.failing:
            self.log.notice("metrics", file=self.target.shown if self.target else COUNTERS,
                            reason="written again")
        self.failing = False
        return True

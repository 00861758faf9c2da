"""pop3-gw's login counters in Prometheus' text format (issue 16,
`pop3-gw: metrics-file PATH`), for node_exporter's textfile collector.

Why pop3-gw writes its own file.  Its logins are decided by the root
monitor of each session (pop3gw.authority), and in inetd mode every
session is its own process pair: there is no long-lived process to hold
a count, and smapd (uucp, chrooted in the spool) can neither read pop3-gw's
root-only files nor should it be handed root's numbers through uucp's
spool.  So each monitor adds its one login to a small file of root's in a
directory of root's, node_exporter's textfile directory itself
(/var/lib/prometheus/node-exporter on Debian), and no server is shared.

The file is its own state: one transaction per login attempt under an
exclusive lock on `PATH.lock` (waited for at most LOCK_WAIT seconds, then
that attempt goes uncounted and is logged): read the counts back from
PATH, add one, and write PATH anew (common.exposition: NAME.tmp made
afresh without following a link, fsync, rename, fsync of the directory).
The directory must be reached from "/" without a link through directories
of root's that no one else may write, and the lock and the file must be
regular files of root's with one link (common.fsguard): nobody but root
can change the counts.  A count that does not read as a plain decimal
number starts at 0.  Removing the file resets the counters (Prometheus'
rate() takes that as a restart).  A failure to count is logged and never
refuses a login.
"""

import fcntl
import os
import time

from common import exposition, fsguard, spool

RESULTS = ("good", "bad", "refused")
NAME = "mailwall_pop3_logins_total"
HELP = ("APOP logins at pop3-gw by result (good; bad: unknown user, wrong secret, "
        "disabled account; refused: its source is past maxbad).")
LOCK_WAIT = 2.0
MAX_FILE = 65536
MAX_COUNT = 10 ** 18


def parse(text):
    """{result: count} read back from our own file; anything else is 0."""
    counts = dict.fromkeys(RESULTS, 0)
    for line in text.split("\n"):
        for result in RESULTS:
            prefix = '%s{result="%s"} ' % (NAME, result)
            if line.startswith(prefix):
                value = spool.decimal(line[len(prefix):], fraction=False)
                if value is not None and value <= MAX_COUNT:
                    counts[result] = value
    return counts


def render(counts):
    lines = exposition.family(NAME, "counter", HELP,
                              [('result="%s"' % result, counts[result]) for result in RESULTS])
    return ("\n".join(lines) + "\n").encode("ascii")


class Tally:
    """Counts each login attempt a monitor decides into PATH."""

    def __init__(self, path, log, clock=time.monotonic, sleep=time.sleep):
        self.path = os.path.normpath(path)
        self.parent, self.name = os.path.split(self.path)
        self.log = log
        self.clock, self.sleep = clock, sleep

    def count(self, result):
        """Add one `result` login; True when it was counted."""
        try:
            self.transaction(result)
        except (OSError, fsguard.UnsafePath, TimeoutError) as err:
            self.log.error("metrics", file=self.path,
                           reason=getattr(err, "strerror", None) or str(err))
            return False
        return True

    def transaction(self, result):
        dir_fd = fsguard.open_directory(self.parent, writable_last=False)
        try:
            lock = fsguard.open_regular(dir_fd, self.name + ".lock", os.O_RDWR | os.O_CREAT,
                                        0o600, shown=self.path + ".lock")
            try:
                self.take(lock)
                counts = self.read(dir_fd)
                counts[result] = min(MAX_COUNT, counts[result] + 1)
                exposition.write_atomically(dir_fd, self.name, render(counts), 0o644)
            finally:
                os.close(lock)
        finally:
            os.close(dir_fd)

    def take(self, lock):
        deadline = self.clock() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if self.clock() >= deadline:
                    raise TimeoutError("the lock %s.lock stays taken" % self.path) from None
                self.sleep(0.01)

    def read(self, dir_fd):
        try:
            fd = fsguard.open_regular(dir_fd, self.name, os.O_RDONLY, shown=self.path)
        except FileNotFoundError:
            return dict.fromkeys(RESULTS, 0)
        try:
            fsguard.check_trusted_file(os.fstat(fd), self.path)
            data = os.read(fd, MAX_FILE)
        finally:
            os.close(fd)
        return parse(data.decode("ascii", "replace"))

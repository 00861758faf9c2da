"""Shared helpers for the smap unit tests: a recording log, a session on a
spool under tmp_path, and spool writers that fail like a full disk.

Trusts nothing but common.spool, smap.session and smap.policy, which it drives.
"""

import errno
import os

from common import hostmatch, spool
from smap import policy, session

HOSTNAME = "mx.example.org"
CLOCK = 1700000000.0


class RecordingLog:
    """Stands in for common.log.Log: keeps (level, event, fields)."""

    def __init__(self):
        self.events = []

    def _record(self, level, event, fields):
        self.events.append((level, event, dict(fields)))

    def info(self, event, **fields):
        self._record("info", event, fields)

    def notice(self, event, **fields):
        self._record("notice", event, fields)

    def warning(self, event, **fields):
        self._record("warning", event, fields)

    def error(self, event, **fields):
        self._record("error", event, fields)

    def reasons(self):
        return [f.get("reason") for _, _, f in self.events if f.get("reason")]


def make_session(root, relay_ok=False, maxbytes=10485760, maxrecip=100,
                 accept_domains=("example.org",), writer_factory=spool.MessageWriter,
                 peer=None, greet=True, hooks=()):
    """A Session on a fresh spool under root, with smap's standard hooks
    followed by `hooks`; returns (session, log)."""
    spool.make_dirs(str(root))
    log = RecordingLog()
    settings = session.Settings(HOSTNAME, maxbytes, maxrecip)
    peer = peer or hostmatch.Peer("192.0.2.7", "client.example.net")
    smtp = session.Session(settings, policy.standard_hooks(accept_domains, relay_ok) + list(hooks),
                           peer, str(root), log, writer_factory=writer_factory,
                           clock=lambda: CLOCK)
    if greet:
        smtp.greeting()
    return smtp, log


def spooled(root):
    """(names in queue/, names in tmp/)."""
    return (sorted(os.listdir(os.path.join(root, spool.QUEUE))),
            sorted(os.listdir(os.path.join(root, spool.TMP))))


def unstuff(data):
    """The message text of DATA input (without its final '.CRLF'), dot-unstuffed."""
    lines = data.split(b"\r\n")[:-1]
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


def full_disk_writer(where):
    """A MessageWriter class that fails with ENOSPC at 'open', 'write' or 'commit'."""

    class FullDiskWriter(spool.MessageWriter):
        def __init__(self, root, message_id):
            if where == "open":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            super().__init__(root, message_id)
            self.writes = 0
            self.started = False

        def start(self, envelope):
            super().start(envelope)
            self.started = True

        def write(self, data):
            # the first write is the Received: header at DATA; fail in the text
            self.writes += 1
            super().write(data)
            if where == "write" and self.writes >= 2:
                self.flush()       # reach the disk now, as a big message would

        def _write(self, data):
            if self.started and (where == "commit" or (where == "write" and self.writes >= 2)):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            super()._write(data)

    return FullDiskWriter

"""Helpers for smap's integration tests: a spool and a netperm-table under a
test's tmp_path, smap started exactly as inetd starts it (the connected
socket on fd 0, 1 and 2), and a small SMTP client over a raw socket that
keeps every byte smap sent so tests can prove nothing but SMTP came out.

Trusts realpeers for the rules on real components (skip, or fail under
MAILWALL_REQUIRE_REAL=1); every wait is bounded, every process is stopped
by its pid.
"""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from common import spool
from tests.integration import realpeers

REPLY_LINE = re.compile(rb"^[2-5]\d\d[ -][\x20-\x7e]*\r\n$")
SMAP_USER = "uucp"


def smap_program():
    """The console script of the venv the tests run in."""
    path = Path(sys.executable).parent / "smap"
    if not path.exists():
        realpeers._missing("smap console script missing: %s (make .venv/.installed)" % path)
    return str(path)


def make_spool(root):
    """A spool as smap's first start as root would leave it (uucp owns the subdirectories)."""
    uid, gid = realpeers._ids(SMAP_USER)
    spool.make_dirs(str(root), uid, gid)
    return Path(root)


def write_table(path, spool_dir, *lines, logsocket=None):
    """A netperm-table for smap; extra lines are written as given."""
    text = ["smap: directory %s" % spool_dir, "smap: userid %s" % SMAP_USER,
            "smap: hostname mx.example.org", "smap: accept-domains example.org"]
    if logsocket:
        text.append("*: logsocket %s" % logsocket)
    text += list(lines)
    Path(path).write_text("\n".join(text) + "\n")
    return str(path)


def contents(spool_dir):
    """(names in queue/, names in tmp/)."""
    spool_dir = Path(spool_dir)
    return (sorted(os.listdir(spool_dir / spool.QUEUE)), sorted(os.listdir(spool_dir / spool.TMP)))


class InetdSmap:
    """smap on one end of a socketpair: fd 0, 1 and 2 are the socket, as
    inetd and xinetd hand it over.  .client is the other end (SmtpClient)."""

    def __init__(self, table, before_start=b""):
        server_end, client_end = socket.socketpair()
        if before_start:
            client_end.sendall(before_start)
        self.proc = subprocess.Popen(
            [smap_program(), "-c", str(table)], stdin=server_end.fileno(),
            stdout=server_end.fileno(), stderr=server_end.fileno(), close_fds=True)
        server_end.close()
        self.pid = self.proc.pid
        self.client = SmtpClient(client_end)

    def wait(self, timeout=20):
        return self.proc.wait(timeout=timeout)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=20)
        self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class SmtpClient:
    """A deliberately dumb SMTP client: raw bytes out, whole replies in,
    and a record of everything received."""

    def __init__(self, sock, timeout=20):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.received = b""
        self.buffer = b""

    @classmethod
    def connect(cls, host, port, source=None, timeout=20):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if source:
            sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.connect((host, port))
        return cls(sock, timeout)

    def send(self, data):
        self.sock.sendall(data)

    def _line(self):
        while b"\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("connection closed; received so far: %r" % self.received)
            self.received += data
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line + b"\r\n"

    def reply(self):
        """One whole (possibly multi-line) reply."""
        lines = [self._line()]
        while lines[-1][3:4] == b"-":
            lines.append(self._line())
        return b"".join(lines)

    def command(self, data):
        self.send(data)
        return self.reply()

    def rest(self):
        """Everything until the server closes (bounded by the socket timeout)."""
        while True:
            data = self.sock.recv(65536)
            if not data:
                return
            self.received += data
            self.buffer += data

    def only_smtp(self):
        """True when every byte received is a well-formed SMTP reply line."""
        lines = self.received.split(b"\r\n")
        return lines[-1] == b"" and all(REPLY_LINE.match(line + b"\r\n") for line in lines[:-1])

    def close(self):
        self.sock.close()


def send_message(client, sender=b"sender@example.net", rcpt=b"user@example.org",
                 body=b"Subject: test\r\n\r\nhello\r\n"):
    """A whole transaction after the banner; returns the reply to the final dot."""
    assert client.command(b"EHLO client.example.net\r\n").startswith(b"250")
    assert client.command(b"MAIL FROM:<%s>\r\n" % sender) == b"250 2.1.0 Ok\r\n"
    assert client.command(b"RCPT TO:<%s>\r\n" % rcpt) == b"250 2.1.5 Ok\r\n"
    assert client.command(b"DATA\r\n").startswith(b"354 ")
    return client.command(body + b".\r\n")


def proc_status(pid):
    """Uid, Gid and Groups lines of /proc/PID/status as lists of numbers."""
    fields = {}
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            fields[key] = [int(v) for v in value.split()]
    return fields


IDLE_TITLE = b"smap: waiting"


def session_child(parent_pid, timeout=10):
    """The pid of parent's only child that serves a connection (an xinetd
    session, or the one busy --daemon worker: idle workers are titled
    "smap: waiting"), bounded wait."""
    def find():
        path = Path("/proc/%d/task/%d/children" % (parent_pid, parent_pid))
        try:
            pids = [int(p) for p in path.read_text().split()]
        except OSError:
            return None
        busy = [pid for pid in pids if not title_of(pid).startswith(IDLE_TITLE)]
        return busy[0] if len(busy) == 1 else None
    return realpeers.wait_until(find, timeout, what="a session child of %d" % parent_pid)


def title_of(pid):
    """The process title (its cmdline), b"" when it is gone."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as cmdline:
            return cmdline.read().rstrip(b"\0")
    except OSError:
        return b""


def wait_for_file(directory, timeout=10):
    return realpeers.wait_until(lambda: os.listdir(directory), timeout,
                                what="a file in %s" % directory)


def sleep_briefly():
    time.sleep(0.05)

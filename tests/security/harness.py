"""Run the real mailwall programs for the security tests (issue 7).

`SmapSetup` writes a private netperm-table and spool under a test's
temporary directory, collects smap's syslog lines on a private datagram
socket, and starts the real `smap` executable (the console script in the
virtualenv) either in inetd mode - the connected socket as its fd 0, 1 and
2, exactly as inetd hands it, over a socketpair or over a loopback TCP
connection from a chosen 127.0.0.x source address - or as
`smap --daemon 127.0.0.1:PORT -F`.  `SmtpClient` is a strict little SMTP
client that sends raw bytes (so it can send what no real client would) and
reads whole replies.

It trusts only the virtualenv's console scripts and the loopback network;
every process it starts is stopped by its pid, every wait is bounded.
"""

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import spool
from tests.integration import realpeers
from tests.integration.pop3_helpers import LogCatcher

BIN = Path(sys.executable).parent


def program(name):
    """Absolute path of a mailwall console script in the virtualenv."""
    path = BIN / name
    if not path.exists():
        realpeers._missing("mailwall program %s is not installed in %s" % (name, BIN))
    return str(path)


class LogCollector(LogCatcher):
    """pop3_helpers.LogCatcher (a private datagram socket standing where
    syslog would be, drained by a thread) in a temporary directory of its
    own; wait_for() takes plain text rather than a regex."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="mwsec-"))
        os.chmod(self.dir, 0o755)
        super().__init__(self.dir / "log.sock")

    def read(self):
        return self.lines()

    def wait_for(self, text, timeout=5):
        return super().wait_for(re.escape(text), timeout)

    def close(self):
        super().close()
        shutil.rmtree(self.dir, ignore_errors=True)


class SmtpClient:
    """Raw SMTP over one socket: send(bytes), reply() -> (code, text)."""

    def __init__(self, sock, timeout=10):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.buffer = b""

    def send(self, data):
        self.sock.sendall(data)

    def _line(self):
        while b"\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("connection closed; pending %r" % self.buffer)
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def reply(self):
        """The next complete reply as (code, all text lines joined)."""
        lines = []
        while True:
            line = self._line()
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return int(line[:3]), b"\n".join(lines).decode("ascii", "replace")

    def cmd(self, line):
        self.send(line if isinstance(line, bytes) else line.encode() + b"\r\n")
        return self.reply()

    def closed_by_server(self, timeout=10):
        """True when the server closes the connection (EOF) within timeout;
        any pending bytes are read and discarded."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buffer += data
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False
        return False

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.close()


class SmapSetup:
    """A private table and spool for smap, and ways to start it."""

    def __init__(self, tmp_path, lines=(), timeout=30, maxchildren=None):
        self.root = Path(tmp_path)
        self.root.mkdir(parents=True, exist_ok=True)
        self.spool = self.root / "spool"
        self.logs = LogCollector()
        self.table = self.root / "netperm-table"
        text = ["smap, smapd: directory %s" % self.spool,
                "smap, smapd: accept-domains example.com",
                "smap: hostname mx.example.com",
                "smap: timeout %d" % timeout,
                "*: logsocket %s" % self.logs.path]
        if maxchildren:
            text.append("smap: maxchildren %d" % maxchildren)
        text += list(lines)
        self.table.write_text("\n".join(text) + "\n")
        self.processes = []
        self.clients = []

    # -- what is in the spool --------------------------------------------
    def queued(self):
        return spool.queued(str(self.spool))

    def tmp_files(self):
        with contextlib.suppress(FileNotFoundError):
            return sorted(os.listdir(self.spool / spool.TMP))
        return []

    def message(self, queue_id):
        return spool.read_message(str(self.spool / spool.QUEUE / queue_id))

    # -- inetd mode ---------------------------------------------------------
    def inetd(self, source=None, timeout=10):
        """An SmtpClient talking to a fresh `smap` in inetd mode.  With
        source (a 127.0.0.x address) the connection is TCP from there;
        otherwise a socketpair (the peer is then `unknown`: an outside host)."""
        if source is None:
            ours, theirs = socket.socketpair()
        else:
            with socket.socket() as listener:
                listener.bind(("127.0.0.1", 0))
                listener.listen(1)
                ours = socket.socket()
                ours.bind((source, 0))
                ours.connect(listener.getsockname())
                theirs, _ = listener.accept()
        proc = subprocess.Popen([program("smap"), "-c", str(self.table)],
                                stdin=theirs, stdout=theirs, stderr=theirs,
                                close_fds=True)
        theirs.close()
        self.processes.append(proc)
        client = SmtpClient(ours, timeout)
        client.proc = proc
        self.clients.append(client)
        return client

    def wait_exit(self, client, timeout=10):
        """Exit status of the inetd-mode smap behind client (killed after timeout)."""
        try:
            return client.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            client.proc.kill()
            client.proc.wait(5)
            raise AssertionError("smap did not exit within %ss" % timeout) from None

    # -- daemon mode --------------------------------------------------------
    def daemon(self, port=None):
        """`smap --daemon 127.0.0.1:PORT -F`; returns (Proc, port)."""
        port = port or realpeers.free_port()
        proc = realpeers.Proc([program("smap"), "-c", str(self.table),
                               "--daemon", "127.0.0.1:%d" % port, "-F"],
                              new_session=True, log=self.root / "smap-daemon.out")
        self.processes.append(proc)
        try:
            realpeers.wait_for_listen("127.0.0.1", port, 10)
        except TimeoutError:
            proc.stop()
            raise AssertionError("smap --daemon did not listen: %s" % proc.output())
        return proc, port

    def connect(self, port, source="127.0.0.1", timeout=10):
        sock = socket.socket()
        sock.bind((source, 0))
        sock.settimeout(timeout)
        try:
            sock.connect(("127.0.0.1", port))
        except OSError:
            sock.close()
            raise
        client = SmtpClient(sock, timeout)
        self.clients.append(client)
        return client

    def stop(self):
        for client in self.clients:
            client.close()
        for proc in self.processes:
            if isinstance(proc, realpeers.Proc):
                proc.stop()
            elif proc.poll() is None:
                proc.kill()
                proc.wait(5)
        self.logs.close()


def send_message(client, sender, recipients, body):
    """EHLO .. DATA with waits for each reply; returns the final reply."""
    code, _ = client.reply()
    assert code == 220
    assert client.cmd("EHLO client.example.org")[0] == 250
    assert client.cmd("MAIL FROM:<%s>" % sender)[0] == 250
    for rcpt in recipients:
        assert client.cmd("RCPT TO:<%s>" % rcpt)[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(body + b".\r\n")
    return client.reply()


def queue_id_of(reply_text):
    """The queue id of a `250 2.0.0 Ok: queued as ID` reply."""
    assert "queued as " in reply_text, reply_text
    return reply_text.rsplit("queued as ", 1)[1].split()[0]

"""Helpers for smapd's integration tests: tables, spool files, the real
`smap` over a socketpair, running smapd and reading the recording MTA.

Everything runs on loopback or AF_UNIX, every wait is bounded, and every
process started here is stopped by its own pid.
"""

import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from common import spool
from tests.integration import realpeers

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python")
SMAP = str(VENV_BIN / "smap")
SMAPD = str(VENV_BIN / "smapd")
RECORDING_MTA = str(Path(__file__).with_name("recording_mta.py"))
USER = "uucp"


def uucp_ids():
    entry = pwd.getpwnam(USER)
    return entry.pw_uid, entry.pw_gid


def write_table(path, directory, lines=(), sendmail=None, logsocket=None):
    """A netperm-table for smap and smapd on the spool `directory`."""
    # the first matching line wins: the test's own lines go first
    text = list(lines) + ["smap, smapd: directory %s" % directory,
            "smap, smapd: userid %s" % USER,
            "smap, smapd: accept-domains example.org",
            "smap: hostname gw.example.org",
            "smapd: wakeup 60"]
    if sendmail:
        text.append("smapd: sendmail %s" % " ".join(sendmail))
    if logsocket:
        text.append("*: logsocket %s" % logsocket)
    Path(path).write_text("\n".join(text) + "\n")
    return Path(path)


def make_spool(directory):
    uid, gid = uucp_ids()
    os.makedirs(directory, exist_ok=True)
    os.chown(directory, uid, gid)
    os.chmod(directory, 0o700)
    spool.make_dirs(str(directory), uid, gid)
    return Path(directory)


def spool_message(directory, sender, recipients, data, message_id=None, raw=None,
                  arrival=None):
    """Write a spool file as smap would (owned by uucp); returns its id.

    `raw`, when given, replaces the whole file (for damaged files)."""
    uid, gid = uucp_ids()
    message_id = message_id or spool.new_id()
    if raw is not None:
        path = Path(directory) / spool.QUEUE / message_id
        path.write_bytes(raw)
        os.chown(path, uid, gid)
        os.chmod(path, 0o600)
        return message_id
    writer = spool.MessageWriter(str(directory), message_id)
    writer.start({"id": message_id, "arrival": "%.6f" % (arrival or time.time()),
                  "client-addr": "192.0.2.1", "client-name": "unknown", "helo": "test",
                  "sender": sender, "rcpt": list(recipients), "size": len(data)})
    writer.write(data)
    os.fchown(writer.fd, uid, gid)
    writer.commit()
    return message_id


def recorder_dir(path):
    """A directory the recording MTA (run as uucp) can write."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    realpeers.open_up(path)
    os.chmod(path, 0o777)
    return path


def recording_sendmail(directory, code=0):
    return [PYTHON, RECORDING_MTA, str(directory), str(code)]


def recorded_runs(directory):
    """[(argv, stdin bytes, mtime)] of the recording MTA's runs, oldest first."""
    runs = []
    for argv_file in sorted(Path(directory).glob("*.argv")):
        stdin_file = argv_file.with_suffix(".stdin")
        runs.append((json.loads(argv_file.read_text()), stdin_file.read_bytes(),
                     argv_file.stat().st_mtime))
    return runs


def run_once(table, timeout=60):
    return subprocess.run([SMAPD, "-c", str(table), "--once"], capture_output=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


class Smapd:
    """`smapd -F` in the background, stopped by its pid."""

    def __init__(self, table, directory, log_path):
        self.directory = Path(directory)
        self.proc = realpeers.Proc([SMAPD, "-c", str(table), "-F"], log=log_path)
        self.pid = self.proc.pid
        realpeers.wait_until(self.ready, 15, what="smapd pid file and agent")

    def ready(self):
        try:
            pid = int((self.directory / ".smapd.pid").read_text())
        except (OSError, ValueError):
            return False
        return pid == self.pid and len(self.children()) >= 1

    def children(self):
        return children_of(self.pid)

    def agent_pid(self):
        children = self.children()
        return children[0] if children else None

    def stop(self, timeout=30):
        return self.proc.stop(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def parent_of(pid):
    try:
        text = Path("/proc/%d/stat" % pid).read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else int(fields[1])


def children_of(pid):
    """Live (non-zombie) children of pid, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and parent_of(int(entry)) == pid:
            found.append(int(entry))
    return sorted(found)


def descendants_of(pid):
    result, todo = [], [pid]
    while todo:
        for child in children_of(todo.pop()):
            result.append(child)
            todo.append(child)
    return result


def proc_status(pid, key):
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].split()
    return None


def title_of(pid):
    return Path("/proc/%d/cmdline" % pid).read_bytes().replace(b"\0", b" ").strip().decode()


# -- the real smap over a socketpair, exactly as inetd hands it a socket ----

class SmtpOverSocket:
    def __init__(self, table):
        self.sock, theirs = socket.socketpair()
        self.proc = subprocess.Popen([SMAP, "-c", str(table)], stdin=theirs, stdout=theirs,
                                     stderr=subprocess.DEVNULL, close_fds=True)
        theirs.close()
        self.sock.settimeout(60)
        self.buffer = b""

    def reply(self):
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                data = self.sock.recv(65536)
                if not data:
                    raise EOFError("smap closed: %r" % lines)
                self.buffer += data
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), b"\n".join(lines)

    def command(self, line):
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def close(self):
        try:
            self.command(b"QUIT")
        except (OSError, EOFError):
            pass
        self.sock.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def smap_submit(table, sender, recipients, message):
    """Send one message (CRLF lines) through the real smap; returns its queue id."""
    client = SmtpOverSocket(table)
    try:
        code, text = client.reply()
        assert code == 220, text
        assert client.command(b"EHLO client.example.net")[0] == 250
        code, text = client.command(b"MAIL FROM:<%s>" % sender.encode())
        assert code == 250, text
        for recipient in recipients:
            code, text = client.command(b"RCPT TO:<%s>" % recipient.encode())
            assert code == 250, text
        assert client.command(b"DATA")[0] == 354
        stuffed = b"\r\n".join(b"." + line if line.startswith(b".") else line
                               for line in message.split(b"\r\n"))
        if not stuffed.endswith(b"\r\n"):
            stuffed += b"\r\n"
        client.sock.sendall(stuffed + b".\r\n")
        code, text = client.reply()
        assert code == 250, text
        return text.rsplit(b" ", 1)[1].decode()
    finally:
        client.close()

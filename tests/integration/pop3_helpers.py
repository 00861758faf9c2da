"""Helpers for the pop3-gw integration tests: a netperm-table and auth db in
a temporary directory, pop3-gw started for real (`--daemon` in the
foreground, or inetd mode by xinetd), a syslog catcher on a datagram socket
that the gateway uses as `logsocket`, and small POP3 clients and fake
faulty servers.  Every process is stopped by its own pid; every wait is
bounded."""

import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from common import authdb
from tests.integration import realpeers

ROOT = Path(__file__).resolve().parents[2]
PYTHON = str(ROOT / ".venv" / "bin" / "python")
POP3GW = [PYTHON, "-m", "pop3gw"]
AUTHMGR = [PYTHON, "-m", "pop3gw.authmgr"]


class LogCatcher:
    """A datagram socket standing in for syslog, drained by a thread (a
    full socket queue would block every logging process): lines() gives
    what arrived."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o666)
        self.sock.settimeout(0.2)
        self.seen = []
        self.lock = threading.Lock()
        self.running = True
        self.thread = threading.Thread(target=self.drain, daemon=True)
        self.thread.start()

    def drain(self):
        while self.running:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.seen.append(data.decode("utf-8", "replace"))

    def lines(self):
        with self.lock:
            return list(self.seen)

    def wait_for(self, pattern, timeout=15):
        """The first line matching the regex pattern (bounded wait)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines():
                if regex.search(line):
                    return line
            if time.monotonic() > deadline:
                raise AssertionError("%r not logged; got:\n%s"
                                     % (pattern, "\n".join(self.lines())))
            time.sleep(0.05)

    def close(self):
        self.running = False
        self.thread.join(5)
        self.sock.close()


class Setup:
    """A table, an auth db and a log socket under `root`."""

    def __init__(self, root, server, rules=("permit-hosts 127.0.0.0/8",), users=None,
                 extra=()):
        self.root = realpeers.open_up(Path(root))
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        self.authfile = self.root / "pop3-auth"
        self.table = self.root / "netperm-table"
        self.chroot = self.root / "empty"
        self.log = LogCatcher(self.root / "log.sock")
        self.lines = ["pop3-gw: server %s" % server,
                      "pop3-gw, authmgr: authfile %s" % self.authfile,
                      "pop3-gw: directory %s" % self.chroot,
                      "pop3-gw: logsocket %s" % self.log.path,
                      "pop3-gw: timeout 20"] + list(extra) + \
                     ["pop3-gw: %s" % rule for rule in rules]
        self.write_table()
        self.set_users(users if users is not None else {"alice": "alicesecret"})

    def write_table(self):
        self.table.write_text("\n".join(self.lines) + "\n")

    def set_users(self, users):
        def change(current):
            current.clear()
            for name, secret in users.items():
                current[name] = authdb.User(name, True, secret)
        authdb.update(str(self.authfile), change)

    def user(self, name):
        return authdb.load(str(self.authfile))[0][name]


class Daemon:
    """pop3-gw --daemon 127.0.0.1:PORT -F, stopped by pid."""

    def __init__(self, setup, port=None, host="127.0.0.1"):
        self.setup, self.host = setup, host
        self.port = port or realpeers.free_port(host)
        self.pidfile = setup.root / "pop3-gw.pid"
        self.proc = realpeers.Proc(
            POP3GW + ["-c", str(setup.table), "--daemon", realpeers.host_port(host, self.port), "-F",
                      "--pidfile", str(self.pidfile)],
            log=setup.root / "pop3-gw.out", cwd=str(ROOT))
        try:
            realpeers.wait_for_listen(host, self.port, 15)
        except Exception:
            self.proc.stop()
            raise RuntimeError("pop3-gw did not start: %s" % self.proc.output())

    def stop(self):
        return self.proc.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class Client:
    """A raw POP3 client with bounded reads (for the exchanges poplib refuses)."""

    opened = []

    def __init__(self, port, host="127.0.0.1", source="127.0.0.1", timeout=30):
        Client.opened.append(self)
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0))
        self.buffer = b""

    def line(self):
        while b"\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(self.buffer)
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def multiline(self):
        lines = []
        while True:
            line = self.line()
            if line == b".":
                return lines
            lines.append(line[1:] if line.startswith(b"..") else line)

    def send(self, data):
        self.sock.sendall(data)

    def command(self, data):
        self.send(data + b"\r\n")
        return self.line()

    def apop(self, user, secret, greeting):
        from common import apop
        stamp = apop.find_timestamp(greeting)
        return self.command(b"APOP %s %s" % (user.encode(), apop.digest(stamp, secret).encode()))

    def closed(self):
        """True when the other side has closed (reads EOF)."""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buffer += data
        except (ConnectionResetError, socket.timeout):
            return False

    def close(self):
        self.sock.close()


class FakeServer:
    """A misbehaving POP3 server on loopback for the fault tests: `script`
    is called with each accepted socket in a thread."""

    def __init__(self, script, host="127.0.0.1"):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.script = script
        self.received = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            conn.settimeout(20)
            try:
                self.script(conn, self.received)
            except OSError:
                pass
            finally:
                conn.close()

    def close(self):
        self.listener.close()
        self.thread.join(5)


def run(argv, **kwargs):
    return subprocess.run([str(a) for a in argv], capture_output=True, timeout=60,
                          cwd=str(ROOT), **kwargs)


def title_of(pid):
    """A process's title (its cmdline, raw), b"" when it is gone."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as cmdline:
            return cmdline.read()
    except OSError:
        return b""


def standby_pair(daemon_pid):
    """The pids of the standby monitor and its jailed child (sorted: the
    monitor forks the child), once both exist; else None."""
    found = [pid for pid in session_children(daemon_pid)
             if title_of(pid).startswith(b"pop3-gw: standby")]
    return sorted(found) if len(found) == 2 else None


def session_children(daemon_pid):
    """pids of the daemon's descendants (from /proc), grandchildren included."""
    found, frontier = [], [daemon_pid]
    while frontier:
        parent = frontier.pop()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                found.append(int(entry.name))
                frontier.append(int(entry.name))
    return found


@pytest.fixture
def shared_dir():
    """A 0755 directory outside pytest's basetemp: a concurrent pytest run
    resets /tmp/pytest-of-root to 0700 when it starts, which would lock
    Dovecot's mail uid (nobody) out of Maildirs under tmp_path mid-test."""
    path = Path(tempfile.mkdtemp(prefix="mw-pop3-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def dovecot(shared_dir):
    """Dovecot POP3 with APOP (alice/alicesecret) with its Maildirs in shared_dir."""
    realpeers.require("dovecot")
    realpeers.require_root()
    with realpeers.Dovecot(shared_dir / "dovecot") as peer:
        yield peer


@pytest.fixture
def setup(shared_dir, dovecot):
    """Table, auth db (alice/alicesecret) and log catcher for a gateway in
    front of the dovecot fixture, named by host name (resolved outside the jail)."""
    made = Setup(shared_dir / "gw", "localhost:%d" % dovecot.port)
    try:
        yield made
    finally:
        made.log.close()


@pytest.fixture
def gateway(setup):
    """pop3-gw --daemon in the foreground on a free loopback port."""
    with Daemon(setup) as daemon:
        yield daemon


@pytest.fixture(autouse=True)
def close_clients():
    """Close every Client a test opened, however it ended."""
    yield
    while Client.opened:
        Client.opened.pop().close()


def status_of(pid):
    """The fields of /proc/PID/status as {name: value text}."""
    with open("/proc/%d/status" % pid) as status:
        return {key: value.strip() for key, _, value in
                (line.partition(":") for line in status)}


def jailed_children(ancestor, uid=65534):
    """Descendants of ancestor whose real, effective, saved and fs uid are uid."""
    found = []
    for pid in session_children(ancestor):
        try:
            if status_of(pid)["Uid"].split() == [str(uid)] * 4:
                found.append(pid)
        except (OSError, KeyError):
            continue
    return found

#!/usr/bin/env python3
"""demo/run.py: the quick start (`make run`), the whole gateway on loopback.

It creates a run directory (demo/run unless --dir), starts demo/hub.py as
the internal mail hub, writes the run directory's netperm-table from
demo/netperm-table.in, creates the demo user (authmgr: user `demo`, secret
`demo-secret`; the hub knows the same secret), and starts

    smap --daemon 127.0.0.1:2525 -F      smapd -F
    pop3-gw --daemon 127.0.0.1:1110 -F

from the same virtualenv as this interpreter, all as the invoking user (as
root they chroot and drop to uucp/nobody, as in production).  Their syslog
lines arrive on a private datagram socket that this process reads and
copies to RUN/mailwall.log.  It prints ready-to-paste client commands, and
on Ctrl-C (SIGINT) or SIGTERM stops every process it started, by pid (each
runs in its own process group, so session children are stopped too).

It trusts its checkout and its command line; the programs it starts check
their own table.  `Demo` is importable: tests/integration/test_quickstart.py
runs this very file.
"""

import argparse
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
DEMO = CHECKOUT / "demo"
MARKER = ".mailwall-demo"
USER, SECRET, DOMAIN = "demo", "demo-secret", "mailwall.test"
START_TIMEOUT = 20


class DemoError(Exception):
    pass


class LogReader:
    """A syslog datagram socket; every line goes to a file, without the <PRI>."""

    def __init__(self, socket_path, log_path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(socket_path))
        os.chmod(socket_path, 0o666)     # the dropped users (uucp, nobody) write here
        self.sock.settimeout(0.5)
        self.out = open(log_path, "ab", buffering=0)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stopping.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if data.startswith(b"<") and b">" in data[:5]:
                data = data.split(b">", 1)[1]
            self.out.write(data.rstrip(b"\n") + b"\n")

    def stop(self):
        self.stopping.set()
        self.thread.join(2)
        self.sock.close()
        self.out.close()


class Demo:
    """The quick start's processes, started in order and stopped by pid."""

    def __init__(self, run_dir, smtp_port=2525, pop3_port=1110, bindir=None):
        self.run_dir = Path(run_dir).resolve()
        self.smtp_port, self.pop3_port = smtp_port, pop3_port
        self.bindir = Path(bindir or Path(sys.executable).parent)
        self.table = self.run_dir / "netperm-table"
        self.log_path = self.run_dir / "mailwall.log"
        self.processes = []            # (name, Popen), in start order
        self.log = None
        self.hub_ports = None

    # -- helpers --------------------------------------------------------
    def program(self, name):
        path = self.bindir / name
        if not os.access(path, os.X_OK):
            raise DemoError("%s is not installed in %s: run `make run`, which installs "
                            "mailwall into .venv" % (name, self.bindir))
        return str(path)

    def spawn(self, name, argv):
        out = open(self.run_dir / ("%s.out" % name), "ab")
        try:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True,
                                       cwd=str(self.run_dir))
        finally:
            out.close()
        self.processes.append((name, process))
        return process

    def wait_for(self, what, predicate):
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            for name, process in self.processes:
                if process.poll() is not None:
                    raise DemoError("%s exited with status %s while waiting for %s; see %s"
                                    % (name, process.returncode, what,
                                       self.run_dir / ("%s.out" % name)))
            if predicate():
                return
            time.sleep(0.05)
        raise DemoError("%s did not happen within %d s" % (what, START_TIMEOUT))

    @staticmethod
    def listening(port):
        """Is 127.0.0.1:port in LISTEN state?  Read from /proc/net/tcp, so that no
        probe connection shows up in the logs as a client that said nothing."""
        try:
            with open("/proc/net/tcp") as table:
                next(table)
                for line in table:
                    fields = line.split()
                    address, _, hexport = fields[1].partition(":")
                    if fields[3] == "0A" and int(hexport, 16) == port \
                            and address in ("0100007F", "00000000"):
                        return True
            return False
        except OSError:
            with socket.socket() as probe:
                probe.settimeout(0.5)
                return probe.connect_ex(("127.0.0.1", port)) == 0

    def run_tool(self, argv, stdin=None):
        result = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                                timeout=60, cwd=str(self.run_dir))
        if result.returncode != 0:
            raise DemoError("%s failed (%d): %s%s" % (" ".join(argv), result.returncode,
                                                       result.stdout, result.stderr))
        return result.stdout

    # -- start ----------------------------------------------------------
    def prepare(self):
        """A fresh run directory (an old demo one is replaced, anything else refused)."""
        if self.run_dir.exists() and any(self.run_dir.iterdir()):
            if not (self.run_dir / MARKER).exists():
                raise DemoError("%s exists and is not a demo run directory" % self.run_dir)
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o755)
        (self.run_dir / MARKER).write_text("created by demo/run.py\n")
        for sub in ("spool", "empty", "mail"):
            (self.run_dir / sub).mkdir(mode=0o755 if sub == "empty" else 0o700)
        if os.geteuid() == 0:           # smap/smapd will run as uucp in the spool
            uucp = pwd.getpwnam("uucp")
            os.chown(self.run_dir / "spool", uucp.pw_uid, uucp.pw_gid)
        users = self.run_dir / "hub-users"
        users.write_text("%s:%s\n" % (USER, SECRET))
        os.chmod(users, 0o600)

    def start_hub(self):
        ready = self.run_dir / "hub.ready"
        self.spawn("hub", [sys.executable, str(DEMO / "hub.py"),
                           "--maildirs", str(self.run_dir / "mail"),
                           "--users", str(self.run_dir / "hub-users"),
                           "--ready", str(ready)])
        self.wait_for("the hub", ready.exists)
        ports = dict(line.split() for line in ready.read_text().splitlines())
        self.hub_ports = int(ports["smtp"]), int(ports["pop3"])

    def write_table(self):
        text = (DEMO / "netperm-table.in").read_text()
        for key, value in (("@RUN@", str(self.run_dir)), ("@CHECKOUT@", str(CHECKOUT)),
                           ("@HUB_SMTP_PORT@", str(self.hub_ports[0])),
                           ("@HUB_POP3_PORT@", str(self.hub_ports[1]))):
            text = text.replace(key, value)
        self.table.write_text(text)

    def add_user(self):
        authmgr = self.program("authmgr")
        self.run_tool([authmgr, "-c", str(self.table), "adduser", USER, "Demo User"])
        self.run_tool([authmgr, "-c", str(self.table), "password", "--stdin", USER],
                      stdin=SECRET + "\n")

    def check_table(self):
        for name in ("smap", "smapd", "pop3-gw"):
            self.run_tool([self.program(name), "-c", str(self.table), "-n"])

    def start(self):
        self.prepare()
        self.log = LogReader(self.run_dir / "log.sock", self.log_path)
        self.start_hub()
        self.write_table()
        self.check_table()
        self.add_user()
        table = ["-c", str(self.table)]
        self.spawn("smap", [self.program("smap"), *table, "--daemon",
                            "127.0.0.1:%d" % self.smtp_port, "-F"])
        self.spawn("smapd", [self.program("smapd"), *table, "-F"])
        self.spawn("pop3-gw", [self.program("pop3-gw"), *table, "--daemon",
                               "127.0.0.1:%d" % self.pop3_port, "-F",
                               "--pidfile", str(self.run_dir / "pop3-gw.pid")])
        self.wait_for("smap on port %d" % self.smtp_port, lambda: self.listening(self.smtp_port))
        self.wait_for("pop3-gw on port %d" % self.pop3_port, lambda: self.listening(self.pop3_port))
        self.wait_for("smapd's pid file", (self.run_dir / "spool" / ".smapd.pid").exists)
        (self.run_dir / "pids").write_text("".join("%s %d\n" % (name, process.pid)
                                                   for name, process in self.processes))
        (self.run_dir / "ready").write_text("ready\n")

    # -- stop -----------------------------------------------------------
    def stop(self, timeout=10):
        """SIGTERM each process (newest first), wait, then its process group; reap."""
        for name, process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, process in reversed(self.processes):
            while time.monotonic() < deadline:
                try:
                    # WNOWAIT: exited but not reaped, so the pgid stays ours
                    if os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                        break
                except ChildProcessError:
                    break
                time.sleep(0.05)
            for signum in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(process.pid, signum)    # session children left behind
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        self.processes = []
        if self.log is not None:
            self.log.stop()
            self.log = None

    # -- what to paste --------------------------------------------------
    def instructions(self):
        here = os.getcwd()

        def short(path):
            path = str(path)
            return os.path.relpath(path, here) if path.startswith(here + os.sep) else path

        python = short(sys.executable)
        message = "Subject: hello\\r\\n\\r\\nHello through the firewall.\\r\\n"
        lines = [
            "mailwall quick start is running on 127.0.0.1 (Ctrl-C stops everything):",
        ]
        for name, process in self.processes:
            lines.append("  %-8s pid %d" % (name, process.pid))
        lines += [
            "  smap     SMTP on 127.0.0.1:%d, domain %s" % (self.smtp_port, DOMAIN),
            "  pop3-gw  POP3 on 127.0.0.1:%d, APOP user %s secret %s" % (self.pop3_port, USER, SECRET),
            "  hub      SMTP 127.0.0.1:%d, POP3 127.0.0.1:%d (the inside mail hub)" % self.hub_ports,
            "",
            "Send a message (swaks, or Python's smtplib):",
            "  swaks --server 127.0.0.1:%d --from you@example.org --to %s@%s"
            % (self.smtp_port, USER, DOMAIN),
            "  %s -c 'import smtplib; smtplib.SMTP(\"127.0.0.1\", %d).sendmail("
            "\"you@example.org\", [\"%s@%s\"], \"%s\")'"
            % (python, self.smtp_port, USER, DOMAIN, message),
            "",
            "Read it back through pop3-gw with APOP:",
            "  %s -c 'import poplib; p = poplib.POP3(\"127.0.0.1\", %d); "
            "p.apop(\"%s\", \"%s\"); n = p.stat()[0]; "
            "print(b\"\\n\".join(p.retr(n)[1]).decode()); p.quit()'"
            % (python, self.pop3_port, USER, SECRET),
            "",
            "Logs:   tail -f %s" % short(self.log_path),
            "Queue:  %s -c %s -q" % (short(self.bindir / "smapd"), short(self.table)),
            "Table:  %s" % short(self.table),
        ]
        return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description="mailwall's quick start on loopback")
    parser.add_argument("--dir", default=str(DEMO / "run"), help="run directory (default demo/run)")
    parser.add_argument("--smtp-port", type=int, default=2525)
    parser.add_argument("--pop3-port", type=int, default=1110)
    args = parser.parse_args(argv)
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    demo = Demo(args.dir, args.smtp_port, args.pop3_port)
    status = 0
    try:
        demo.start()
        sys.stdout.write(demo.instructions())
        sys.stdout.flush()
        while not stopping.wait(0.5):
            dead = [(name, p.returncode) for name, p in demo.processes if p.poll() is not None]
            if dead:
                sys.stderr.write("stopping: %s exited with status %s (see %s)\n"
                                 % (dead[0][0], dead[0][1], demo.run_dir))
                status = 1
                break
    except DemoError as err:
        sys.stderr.write("make run: %s\n" % err)
        status = 1
    finally:
        demo.stop()
    if status == 0:
        sys.stdout.write("stopped; mail and logs stay in %s\n" % demo.run_dir)
    return status


if __name__ == "__main__":
    sys.exit(main())

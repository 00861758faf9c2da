"""pop3-gw against a direct Dovecot, perdition and nginx's mail proxy.

All four paths end at the same Dovecot (bench.peers), whose mailboxes are
filled once: alice 200 × 50 KB, bob one 20 MB message, carol empty.
Dovecot direct and pop3-gw are driven with APOP (pop3-gw then performs a
second APOP upstream); perdition and nginx only relay USER/PASS.

- connect + login + QUIT: mean latency of sequential sessions (carol);
- bulk: LIST + RETR of every message of alice, MB/s;
- 20 MB: one RETR of bob's message, MB/s;
- logins/s: 20 concurrent clients, each doing sequential login + QUIT;
- the bulk cases with two clients: a plain socket, and one that re-arms
  TCP_QUICKACK before each read (the plain one exposes a Nagle/delayed-ACK
  stall at the end of each RETR, the other shows the raw relay cost);
- memory: private memory (smaps_rollup Private_*) of one pop3-gw session
  child after login (and perdition's, for comparison).

It trusts nothing it receives beyond what a POP3 client needs: every reply
must start with +OK, multi-line answers end with CRLF.CRLF.
"""

import hashlib
import re
import socket
import threading
import time

from bench import peers
from bench.harness import Measurement, NotMeasured, Variant
from bench.smtp_bench import missing_any

TIMEOUT = 60


class Client:
    """A minimal POP3 client on a plain socket (optionally re-arming
    TCP_QUICKACK before every read)."""

    def __init__(self, port, quickack=False):
        self.sock = socket.create_connection((peers.LOOPBACK, port), timeout=TIMEOUT)
        self.quickack = quickack
        self.buf = b""
        self.received = 0

    def close(self):
        self.sock.close()

    def _recv(self):
        if self.quickack:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        data = self.sock.recv(262144)
        if not data:
            raise RuntimeError("connection closed by the server")
        self.received += len(data)
        return data

    def line(self):
        while b"\r\n" not in self.buf:
            if len(self.buf) > 65536:
                raise RuntimeError("reply line too long")
            self.buf += self._recv()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def ok(self, line):
        if not line.startswith(b"+OK"):
            raise RuntimeError("server said %r" % line[:200])
        return line

    def command(self, text):
        self.sock.sendall(text.encode() + b"\r\n")
        return self.ok(self.line())

    def multiline(self, text):
        """Send a command whose answer is multi-line; return its size."""
        self.command(text)
        size = 0
        tail = b"\r\n"          # the status line's CRLF precedes the body
        data, self.buf = self.buf, b""
        while True:
            if data:
                size += len(data)
                window = tail + data
                if window.endswith(b"\r\n.\r\n") or window == b"\r\n.\r\n":
                    return size
                tail = window[-5:]
            data = self._recv()

    def login(self, mode, user, secret):
        greeting = self.ok(self.line())
        if mode == "apop":
            stamp = re.search(rb"<[^<>]+>", greeting)
            if not stamp:
                raise RuntimeError("no APOP timestamp in %r" % greeting[:200])
            digest = hashlib.md5(stamp.group(0) + secret.encode()).hexdigest()
            self.command("APOP %s %s" % (user, digest))
        else:
            self.command("USER %s" % user)
            self.command("PASS %s" % secret)

    def quit(self):
        self.command("QUIT")
        self.close()


TARGETS = [("Dovecot direct", "dovecot", "apop"), ("pop3-gw", "pop3-gw", "apop"),
           ("perdition", "perdition", "userpass"), ("nginx mail", "nginx", "userpass")]


def _port(env, server):
    info = env.get(server)
    return info["port"]


def login_and_quit(port, mode):
    """One whole session: connect, log in as carol (an empty mailbox), QUIT."""
    client = Client(port)
    try:
        client.login(mode, "carol", peers.Env.USERS["carol"])
        client.quit()
    finally:
        client.close()


def session_latency_ms(port, mode, count):
    started = time.monotonic()
    for _ in range(count):
        login_and_quit(port, mode)
    return (time.monotonic() - started) * 1000.0 / count


def bulk_mbps(port, mode, quickack, expected, size):
    client = Client(port, quickack)
    try:
        client.login(mode, "alice", peers.Env.USERS["alice"])
        started = time.monotonic()
        client.multiline("LIST")
        total = 0
        for n in range(1, expected + 1):
            total += client.multiline("RETR %d" % n)
        elapsed = time.monotonic() - started
        client.quit()
    finally:
        client.close()
    if total < expected * size:
        raise RuntimeError("RETR gave %d octets in all, expected at least %d"
                           % (total, expected * size))
    return total / elapsed / 1e6


def big_mbps(port, mode, quickack, expected_size):
    client = Client(port, quickack)
    try:
        client.login(mode, "bob", peers.Env.USERS["bob"])
        started = time.monotonic()
        size = client.multiline("RETR 1")
        elapsed = time.monotonic() - started
        client.quit()
    finally:
        client.close()
    if size < expected_size:
        raise RuntimeError("RETR gave %d octets, expected at least %d" % (size, expected_size))
    return size / elapsed / 1e6


def concurrent_logins_per_s(port, mode, clients, each):
    errors = []
    barrier = threading.Barrier(clients + 1)

    def worker():
        try:
            barrier.wait(TIMEOUT)
            for _ in range(each):
                login_and_quit(port, mode)
        except Exception as err:    # reported below, after every thread ended
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait(TIMEOUT)
    started = time.monotonic()
    for thread in threads:
        thread.join(TIMEOUT * each)
    elapsed = time.monotonic() - started
    if errors:
        raise RuntimeError("%d of %d clients failed: %s" % (len(errors), clients, errors[0]))
    return clients * each / elapsed


def _missing(server):
    names = {"dovecot": ("dovecot",), "pop3-gw": ("dovecot", "pop3-gw"),
             "perdition": ("dovecot", "perdition"), "nginx": ("dovecot", "nginx")}[server]
    return missing_any(*names)


def measurements(env, smoke):
    latency_count = 3 if smoke else 50
    clients, each = (3, 1) if smoke else (20, 10)
    out = []

    def variants(make):
        return [Variant(label, make(server, mode), _missing(server))
                for label, server, mode in TARGETS]

    out.append(Measurement(
        "pop3", "connect + login + QUIT (%d sequential)" % latency_count, "ms", False,
        variants(lambda server, mode: lambda: session_latency_ms(
            _port(env, server), mode, latency_count)), baseline="Dovecot direct"))
    for quickack, client in ((False, "plain client"), (True, "TCP_QUICKACK client")):
        out.append(Measurement(
            "pop3", "bulk LIST + RETR %s × 50 KB, %s" % ("5" if smoke else "200", client),
            "MB/s", True,
            variants(lambda server, mode, q=quickack: lambda: bulk_mbps(
                _port(env, server), mode, q, env.get("dovecot")["bulk_count"],
                env.get("dovecot")["bulk_size"])),
            baseline="Dovecot direct"))
        out.append(Measurement(
            "pop3", "bulk one RETR of %s, %s" % ("256 KB" if smoke else "20 MB", client),
            "MB/s", True,
            variants(lambda server, mode, q=quickack: lambda: big_mbps(
                _port(env, server), mode, q, env.get("dovecot")["big_size"])),
            baseline="Dovecot direct"))
    out.append(Measurement(
        "pop3", "logins/s, %d concurrent clients × %d" % (clients, each), "logins/s", True,
        variants(lambda server, mode: lambda: concurrent_logins_per_s(
            _port(env, server), mode, clients, each)), baseline="Dovecot direct"))
    return out


def session_child_private_mib(env, server, mode):
    info = env.get(server)
    pid = info.get("pid")
    if pid is None:
        raise NotMeasured("no parent pid for %s" % server)
    client = Client(info["port"])
    try:
        client.login(mode, "carol", peers.Env.USERS["carol"])
        children = []
        deadline = time.monotonic() + 10
        while not children and time.monotonic() < deadline:
            # pop3-gw --daemon keeps the next session's pair ready ("standby")
            children = [child for child in peers.children_of(pid)
                        if not peers.title_of(child).startswith("pop3-gw: standby")]
            if not children:
                time.sleep(0.02)
        if len(children) != 1:
            raise RuntimeError("expected one session process under %d, found %r"
                               % (pid, children))
        private = peers.memory_of(children[0])[1]
        client.quit()
    finally:
        client.close()
    if private is None:
        raise NotMeasured("/proc/PID/smaps_rollup unreadable")
    return private / 1024.0


def memory_measurements(env, smoke):
    return [Measurement(
        "memory", "private (Private_*) of one pop3-gw / perdition session process", "MiB",
        False,
        [Variant("pop3-gw", lambda: session_child_private_mib(env, "pop3-gw", "apop"),
                 _missing("pop3-gw")),
         Variant("perdition", lambda: session_child_private_mib(env, "perdition", "userpass"),
                 _missing("perdition"))])]

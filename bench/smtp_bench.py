"""smap's measurements: intake with smtp-source, per-connection cost, memory.

- intake: Postfix's smtp-source against smap --daemon, smap under xinetd and
  Postfix's own smtpd (discard transport), -s 1 and -s 10, 5 KB and 100 KB,
  a new connection per message and -d; messages per second.  For smap the
  spool is checked to hold exactly the messages sent (then emptied).
- per-connection cost under inetd: sequential connect, banner, QUIT, EOF
  through xinetd for smap, against xinetd running the bare interpreter
  (`python -I -S -c pass`, the interpreter of .venv); and the same without
  xinetd, each program started directly on one end of a socketpair.
- memory: VmRSS (and private memory) of one smap connection process, under
  xinetd (a fresh interpreter) and as a --daemon worker (forked, reused).

It trusts the servers from bench.peers and the smtp-source binary.
"""

import os
import socket
import subprocess
import sys
import time

from bench import peers
from bench.harness import Measurement, NotMeasured, Variant
from tests.integration import realpeers as rp

SENDER = "bench@example.org"
RECIPIENT = "user@example.com"


def smtp_source(port, sessions, messages, size, reuse, timeout=600):
    argv = [rp.which("smtp-source"), "-s", str(sessions), "-m", str(messages),
            "-l", str(size), "-f", SENDER, "-t", RECIPIENT]
    if reuse:
        argv.append("-d")
    argv.append("%s:%d" % (peers.LOOPBACK, port))
    started = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - started
    if r.returncode != 0 or "fatal" in r.stderr or "warning" in r.stderr:
        raise RuntimeError("smtp-source exited %d: %s" % (r.returncode, r.stderr.strip()[:300]))
    return messages / elapsed


def count_and_clear(spool, expected, timeout=30):
    """The smap queue must hold `expected` messages (children may still be
    finishing their last fsync when smtp-source returns); then empty it."""
    queue = os.path.join(spool, "queue")
    deadline = time.monotonic() + timeout
    while True:
        found = len(os.listdir(queue)) if os.path.isdir(queue) else 0
        if found >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    peers.clear_dir(queue)
    if found != expected:
        raise RuntimeError("smap spooled %d of %d messages" % (found, expected))


def intake_measurements(env, smoke):
    sizes = [(5 * 1024, "5 KB", 5 if smoke else 500),
             (100 * 1024, "100 KB", 3 if smoke else 200)]
    out = []
    for sessions in (1, 10):
        for size, size_label, messages in sizes:
            for reuse in (False, True):
                def postfix(sessions=sessions, size=size, messages=messages, reuse=reuse):
                    return smtp_source(env.get("postfix")["port"], sessions, messages, size,
                                       reuse)

                def smap_daemon(sessions=sessions, size=size, messages=messages, reuse=reuse):
                    info = env.get("smap")
                    peers.clear_dir(os.path.join(info["spool"], "queue"))
                    rate = smtp_source(info["port"], sessions, messages, size, reuse)
                    count_and_clear(info["spool"], messages)
                    return rate

                def smap_xinetd(sessions=sessions, size=size, messages=messages, reuse=reuse):
                    info = env.get("xinetd")
                    peers.clear_dir(os.path.join(info["spool"], "queue"))
                    rate = smtp_source(info["smap_port"], sessions, messages, size, reuse)
                    count_and_clear(info["spool"], messages)
                    return rate

                name = "-s %d, %s, %s (%d msgs)" % (
                    sessions, size_label, "-d (one connection)" if reuse
                    else "new connection per message", messages)
                variants = [Variant("Postfix smtpd", postfix, missing_any("smtp-source", "postfix")),
                            Variant("smap --daemon", smap_daemon, missing_any("smtp-source", "smap")),
                            Variant("smap under xinetd (make install launcher)",
                                    smap_xinetd,
                                    missing_any("smtp-source", "smap", "xinetd"))]
                out.append(Measurement("smap intake", name, "msg/s", True, variants,
                                       baseline="Postfix smtpd"))
    return out


def missing_any(*names):
    for name in names:
        reason = peers.program_missing(name)
        if reason:
            return reason
    return None


def recv_line(sock):
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("connection closed before a reply: %r" % data[:100])
        data += chunk
        if len(data) > 65536:
            raise RuntimeError("reply too long")
    return data


def smtp_quit_session(sock):
    banner = recv_line(sock)
    if not banner.startswith(b"220"):
        raise RuntimeError("no 220 banner: %r" % banner[:100])
    sock.sendall(b"QUIT\r\n")
    reply = recv_line(sock)
    if not reply.startswith(b"221"):
        raise RuntimeError("QUIT answered %r" % reply[:100])
    while sock.recv(4096):
        pass


def wait_eof(sock):
    while sock.recv(4096):
        pass


def per_connection_ms(port, connections, session):
    """Mean wall time of `connections` sequential connections, in ms."""
    started = time.monotonic()
    for _ in range(connections):
        with socket.create_connection((peers.LOOPBACK, port), timeout=30) as sock:
            session(sock)
    return (time.monotonic() - started) * 1000.0 / connections


def spawn_on_socketpair_ms(argv, connections, session):
    """Start argv with one end of a socketpair as fd 0/1 (as inetd would,
    without inetd), run `session` on the other end, wait for the exit."""
    started = time.monotonic()
    for _ in range(connections):
        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(argv, stdin=theirs, stdout=theirs,
                                    stderr=subprocess.DEVNULL, close_fds=True)
            theirs.close()
            ours.settimeout(30)
            session(ours)
            if proc.wait(timeout=30) != 0:
                raise RuntimeError("%s exited %d" % (argv[0], proc.returncode))
        finally:
            ours.close()
            theirs.close()
    return (time.monotonic() - started) * 1000.0 / connections


LAUNCHER_LABELS = {"install": "smap (make install launcher, -IS, explicit sys.path)",
                   "site": "smap (previous make install launcher, -I)",
                   "venv": "smap (.venv/bin/smap, editable console script)"}


def inetd_measurements(env, smoke):
    connections = 3 if smoke else 100
    need_x = missing_any("smap", "xinetd")
    python = os.path.realpath(peers.VENV_BIN / "python")
    bare = lambda: per_connection_ms(env.get("xinetd")["bare_port"], connections, wait_eof)

    def smap_xinetd(kind):
        return lambda: per_connection_ms(env.get("xinetd")["smap_ports"][kind], connections,
                                         smtp_quit_session)

    def bare_direct():
        return spawn_on_socketpair_ms([python, "-I", "-S", "-c", "pass"], connections, wait_eof)

    def smap_direct(kind):
        def measure():
            table = env.get("smap_table")["table"]
            return spawn_on_socketpair_ms([env.launcher(kind), "-c", str(table)],
                                          connections, smtp_quit_session)
        return measure

    base = "python -I -S -c pass"
    return [
        Measurement("smap per connection", "under xinetd: connect, banner, QUIT, close (%d)"
                    % connections, "ms", False,
                    [Variant(base, bare, need_x)]
                    + [Variant(LAUNCHER_LABELS[kind], smap_xinetd(kind), need_x)
                       for kind in peers.Env.LAUNCHERS], baseline=base),
        Measurement("smap per connection", "started on a socketpair, no inetd (%d)"
                    % connections, "ms", False,
                    [Variant(base, bare_direct, None)]
                    + [Variant(LAUNCHER_LABELS[kind], smap_direct(kind), missing_any("smap"))
                       for kind in peers.Env.LAUNCHERS], baseline=base),
    ]


def smap_process_memory(port, parent_pid, which):
    """Open one SMTP session, find its smap process under parent_pid, read
    its memory after EHLO; return the figure `which` (0 RSS, 1 private) in MiB."""
    with socket.create_connection((peers.LOOPBACK, port), timeout=30) as sock:
        recv_line(sock)
        sock.sendall(b"EHLO bench.example\r\n")
        reply = b""
        while not reply.endswith(b"\r\n") or reply.split(b"\r\n")[-2][3:4] == b"-":
            chunk = sock.recv(4096)
            if not chunk:
                raise RuntimeError("closed after EHLO")
            reply += chunk
        children = []
        deadline = time.monotonic() + 10
        while not children and time.monotonic() < deadline:
            # smap --daemon keeps idle workers ("smap: waiting") beside the busy one
            children = [pid for pid in peers.children_of(parent_pid)
                        if not peers.title_of(pid).startswith("smap: waiting")]
            if not children:
                time.sleep(0.02)
        if len(children) != 1:
            raise RuntimeError("expected one connection process under %d, found %r"
                               % (parent_pid, children))
        figures = peers.memory_of(children[0])
        sock.sendall(b"QUIT\r\n")
        recv_line(sock)
    if figures[which] is None:
        raise NotMeasured("/proc/PID/smaps_rollup unreadable")
    return figures[which] / 1024.0


def memory_measurements(env, smoke):
    def under(kind, which):
        def measure():
            if kind == "xinetd":
                info = env.get("xinetd")
                return smap_process_memory(info["smap_port"], info["pid"], which)
            info = env.get("smap")
            return smap_process_memory(info["port"], info["pid"], which)
        return measure
    out = []
    for which, label in ((0, "resident (VmRSS) of one smap connection process"),
                         (1, "private (Private_*) of one smap connection process")):
        out.append(Measurement("memory", label, "MiB", False,
                               [Variant("smap under xinetd (make install launcher)",
                                        under("xinetd", which),
                                        missing_any("smap", "xinetd")),
                                Variant("smap --daemon worker", under("daemon", which),
                                        missing_any("smap"))]))
    return out


def spawn_ms(argv, count):
    """Mean wall time of fork+exec+exit of argv, in ms."""
    started = time.monotonic()
    for _ in range(count):
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        if r.returncode != 0:
            raise RuntimeError("%s exited %d" % (" ".join(argv), r.returncode))
    return (time.monotonic() - started) * 1000.0 / count


IMPORTS = ("socket", "signal", "getopt", "ipaddress", "fnmatch", "collections",
           "encodings.idna", "setproctitle", "smap.main")


def startup_measurements(env, smoke):
    """Where a fresh smap's start-up goes: the bare interpreter, with site,
    and the cost of each module smap's connection path used to import (or
    still imports), each alone in `python -IS` with the same sys.path as the
    -IS launcher.  This is the evidence for docs/PERFORMANCE.md."""
    count = 3 if smoke else 40
    python = os.path.realpath(peers.VENV_BIN / "python")
    venv_python = str(peers.VENV_BIN / "python")
    site = "%s/lib/python%d.%d/site-packages" % (peers.VENV_BIN.parent, *sys.version_info[:2])
    path = "import sys; sys.path[:0] = [%r, %r]; " % (str(peers.ROOT), site)
    base = "python -IS -c pass"
    variants = [Variant(base, lambda: spawn_ms([python, "-IS", "-c", "pass"], count)),
                Variant("venv python -I -c pass (site)",
                        lambda: spawn_ms([venv_python, "-I", "-c", "pass"], count))]
    for module in IMPORTS:
        variants.append(Variant(
            "python -IS: import %s" % module,
            lambda module=module: spawn_ms([python, "-IS", "-c", path + "import " + module],
                                           count),
            missing_any("smap") if module == "smap.main" else None))
    return [Measurement("start-up", "spawn, import, exit (%d)" % count, "ms", False, variants,
                        baseline=base)]


def daemon_child_cost(env, which, smoke):
    """CPU and page faults of smap --daemon's session processes per
    connection: the daemon's cutime/cstime/cminflt (workers that ended)
    plus the utime/stime/minflt and c* figures of every live descendant
    (workers stay after a run, and so do their resolver helpers), around
    one smtp-source run."""
    def measure():
        info = env.get("smap")
        messages = 10 if smoke else 300
        peers.clear_dir(os.path.join(info["spool"], "queue"))
        before = _family_stat(info["pid"])
        smtp_source(info["port"], 10, messages, 5 * 1024, False)
        count_and_clear(info["spool"], messages)
        time.sleep(0.2)                         # the last sessions log and go idle
        after = _family_stat(info["pid"])
        delta = [a - b for a, b in zip(after, before)]
        ticks = os.sysconf("SC_CLK_TCK")
        return {"user": delta[1] * 1000.0 / ticks / messages,
                "system": delta[2] * 1000.0 / ticks / messages,
                "faults": delta[0] / messages}[which]
    return measure


def _stat_fields(pid):
    with open("/proc/%d/stat" % pid) as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    # after the name: state(0) ppid ... minflt(7) cminflt(8) ... utime(11) stime(12)
    # cutime(13) cstime(14)
    return [int(f) for f in fields[7:15]]


def _family_stat(pid):
    """(minor faults, user ticks, system ticks) of pid's descendants, the
    ended ones (pid's c* fields) and the live ones (their own and c*)."""
    own = _stat_fields(pid)
    faults, user, system = own[1], own[6], own[7]
    pending = list(peers.children_of(pid))
    while pending:
        child = pending.pop()
        try:
            f = _stat_fields(child)
        except OSError:
            continue                            # ended meanwhile: then in pid's c* next time
        faults += f[0] + f[1]
        user += f[4] + f[6]
        system += f[5] + f[7]
        pending.extend(peers.children_of(child))
    return faults, user, system


def fork_cost_measurements(env, smoke):
    need = missing_any("smtp-source", "smap")
    return [
        Measurement("smap --daemon worker", "user CPU per connection (-s 10, 5 KB)", "ms", False,
                    [Variant("smap --daemon worker", daemon_child_cost(env, "user", smoke), need)]),
        Measurement("smap --daemon worker", "system CPU per connection (-s 10, 5 KB)", "ms",
                    False, [Variant("smap --daemon worker", daemon_child_cost(env, "system",
                                                                           smoke), need)]),
        Measurement("smap --daemon worker", "minor page faults per connection (-s 10, 5 KB)",
                    "faults", False,
                    [Variant("smap --daemon worker", daemon_child_cost(env, "faults", smoke),
                             need)]),
    ]

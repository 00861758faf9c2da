"""Command-line and start-up errors of every program: one line, never a
traceback (issue 12, Deliver 6).

Each of smap, smapd, pop3-gw and authmgr is run for real with bad
arguments (bad --daemon addresses, unknown options, missing option values,
a table that does not exist or has errors, a busy port, a second pop3-gw
or smapd on the same pid file or spool, a pid file that cannot be
written), as root and, where it makes sense, as an ordinary user.  Each
run must exit non-zero with exactly one line on stderr that starts with
the program's name (or that line and the usage text, for usage errors),
and with no "Traceback" and no Python exception class name on stdout or
stderr.  In inetd mode fd 2 is the client's socket: nothing may reach it
but the protocol's own refusal.

Every port is a free high port on 127.0.0.1 or ::1; every process started
here is stopped by its pid, every wait is bounded.
"""

import builtins
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration import pop3_helpers, realpeers, smapd_helpers

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
PROGRAMS = {name: str(BIN / name) for name in ("smap", "smapd", "pop3-gw", "authmgr")}
# what a traceback or a leaked exception would show: every built-in
# exception class and the ones of the libraries and modules we use
EXCEPTION_NAMES = sorted(
    {name for name, value in vars(builtins).items()
     if isinstance(value, type) and issubclass(value, BaseException)}
    | {"AlreadyLocked", "LockFailed", "LockTimeout", "LockError", "NotLocked", "NotMyLock",
       "DaemonError", "DaemonOSEnvironmentError", "DaemonProcessDetachError",
       "UsageError", "StartupError", "AlreadyRunning", "PrivilegeError", "AuthDbError",
       "UnsafePath", "SpoolError", "Refused", "GetoptError"})
LEAK = re.compile(r"Traceback|\b(%s)\b" % "|".join(map(re.escape, EXCEPTION_NAMES)))


def leaks(text):
    return [match.group(0) for match in LEAK.finditer(text)]


@pytest.fixture
def place(tmp_path):
    """A table for all four programs, its spool, the pop3-gw chroot and auth
    db, and a log socket standing in for syslog (so nothing reaches the
    host's /dev/log from the daemon paths)."""
    realpeers.require_root()
    root = realpeers.open_up(tmp_path)
    os.chmod(root, 0o755)
    spool_dir = smapd_helpers.make_spool(root / "spool")
    (root / "empty").mkdir(mode=0o755)
    catcher = pop3_helpers.LogCatcher(root / "log.sock")
    upstream = realpeers.free_port()
    lines = ["smap, smapd: directory %s" % spool_dir,
             "smap, smapd: userid uucp",
             "smap, smapd: accept-domains example.org",
             "smap: hostname mx.example.org",
             "smapd: wakeup 60",
             "pop3-gw: server 127.0.0.1:%d" % upstream,
             "pop3-gw: directory %s" % (root / "empty"),
             "pop3-gw, authmgr: authfile %s" % (root / "pop3-auth"),
             "pop3-gw: permit-hosts 127.0.0.0/8",
             "*: logsocket %s" % catcher.path]
    table = root / "netperm-table"
    table.write_text("\n".join(lines) + "\n")
    broken = root / "broken-table"
    # two errors for every program (authmgr reads only `authfile`)
    broken.write_text("*: timeout never\n*: maxchildren lots\n"
                      "authmgr: authfile\nauthmgr: authfile a b\n")
    os.chmod(table, 0o644)
    os.chmod(broken, 0o644)

    class Place:
        pass
    place = Place()
    place.root, place.table, place.broken, place.spool = root, table, broken, spool_dir
    place.log = catcher
    yield place
    catcher.close()


def run(argv, user=None, timeout=60):
    argv = [str(a) for a in argv]
    if user:
        argv = realpeers.as_user(user, argv)
    result = subprocess.run(argv, capture_output=True, timeout=timeout,
                            stdin=subprocess.DEVNULL, cwd="/")
    return result.returncode, result.stdout.decode(errors="replace"), \
        result.stderr.decode(errors="replace")


def assert_one_line(program, status, out, err, usage=False, expect=None, code=None):
    """Non-zero status (2 for the command line, else 1, or `code`), one line
    `PROGRAM: ...` on stderr (then the usage text for a usage error),
    nothing that looks like Python."""
    assert status not in (0, None), (status, out, err)
    assert status == (code or (2 if usage else 1)), (status, out, err)
    assert leaks(out + err) == [], out + err
    lines = err.splitlines()
    assert lines and lines[0].startswith(program + ": "), err
    assert len(lines[0]) < 300, err
    if usage:
        assert lines[1].startswith("usage: %s" % program), err
    else:
        assert len(lines) == 1 and err.endswith("\n"), err
    assert out == "", out
    if expect is not None:
        assert expect in lines[0], (expect, err)
    return lines[0]


def daemon_argv(program, place, address, *extra):
    argv = [PROGRAMS[program], "-c", place.table, "--daemon", address, "-F"]
    if program == "pop3-gw":
        argv += ["--pidfile", place.root / "pop3-gw.pid"]
    return argv + list(extra)


BAD_ADDRESSES = [
    # (the --daemon text with PORT for a free port, what the line must say)
    ("::1:PORT", "(use [::1]:PORT)"),
    ("127.0.0.1:notaport", "--daemon"),
    ("127.0.0.1:70000", "--daemon"),
    ("127.0.0.1:-5", "--daemon"),
    (":PORT", "--daemon"),
    ("[::1]xPORT", "--daemon"),
    ("[::1:PORT", "--daemon"),
    ("[]:PORT", "--daemon"),
    ("127.0.0.1:PORT:1", "--daemon"),
    ("notaport", "--daemon"),
    ("99999", "--daemon"),
    ("bad host:PORT", "--daemon"),
    ("127.1:PORT", "--daemon"),
]


@pytest.mark.parametrize("program", ["smap", "pop3-gw"])
@pytest.mark.parametrize("address, expect", BAD_ADDRESSES)
@pytest.mark.parametrize("user", [None, "nobody"])
def test_bad_daemon_address(place, program, address, expect, user):
    port = str(realpeers.free_port())
    address, expect = address.replace("PORT", port), expect.replace("PORT", port)
    status, out, err = run(daemon_argv(program, place, address), user=user)
    line = assert_one_line(program, status, out, err, expect=expect, code=2)
    assert repr(address) in line or address in line, line


def test_the_issue_example(place):
    """The line the issue asks for, word for word."""
    status, out, err = run(daemon_argv("smap", place, "::1:25"))
    assert (status, out, err) == (2, "", "smap: --daemon: bad address '::1:25' (use [::1]:25)\n")


@pytest.mark.parametrize("program", ["smap", "pop3-gw"])
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_busy_port(place, program, host):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    try:
        holder.bind((host, 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        address = "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)
        status, out, err = run(daemon_argv(program, place, address))
        assert_one_line(program, status, out, err,
                        expect="--daemon %s: Address already in use" % address)
    finally:
        holder.close()


@pytest.mark.parametrize("program", ["smap", "pop3-gw"])
def test_privileged_port_as_ordinary_user(place, program):
    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as setting:
        if int(setting.read()) <= 25:
            pytest.skip("ordinary users may bind port 25 here")
    status, out, err = run(daemon_argv(program, place, "127.0.0.1:25"), user="nobody")
    assert_one_line(program, status, out, err,
                    expect="--daemon 127.0.0.1:25: Permission denied")


USAGE_CASES = [
    ("smap", ["--daemon", "127.0.0.1:PORT", "-F", "--bogus"]),
    ("smap", ["--daemon"]),
    ("smap", ["-n", "-c"]),
    ("smap", ["--daemon", "127.0.0.1:PORT", "-x"]),
    ("pop3-gw", ["--daemon", "127.0.0.1:PORT", "-F", "--bogus"]),
    ("pop3-gw", ["--daemon"]),
    ("pop3-gw", ["--daemon", "127.0.0.1:PORT", "-F", "--pidfile"]),
    ("smapd", ["--bogus"]),
    ("smapd", ["-c"]),
    ("smapd", ["extra-argument"]),
    ("authmgr", ["--bogus", "list"]),
    ("authmgr", ["-c"]),
    ("authmgr", ["-c", "TABLE"]),
    ("authmgr", ["-c", "TABLE", "frobnicate", "bob"]),
    ("authmgr", ["-c", "TABLE", "adduser"]),
]


@pytest.mark.parametrize("program, argv", USAGE_CASES)
@pytest.mark.parametrize("user", [None, "nobody"])
def test_usage_errors(place, program, argv, user):
    port = str(realpeers.free_port())
    argv = [str(place.table) if a == "TABLE" else a.replace("PORT", port) for a in argv]
    status, out, err = run([PROGRAMS[program]] + argv, user=user)
    assert_one_line(program, status, out, err, usage=True)


def table_cases(place):
    port = realpeers.free_port()
    address = "127.0.0.1:%d" % port
    pidfile = ["--pidfile", place.root / "pop3-gw.pid"]
    return {
        "smap": ["--daemon", address, "-F"],
        "pop3-gw": ["--daemon", address, "-F"] + pidfile,
        "smapd": ["-F"],
        "smapd --once": ["--once"],
        "smapd -q": ["-q"],
        "smapd --flush": ["--flush"],
        "authmgr": ["list"],
    }


@pytest.mark.parametrize("case", ["smap", "pop3-gw", "smapd", "smapd --once", "smapd -q",
                                  "smapd --flush", "authmgr"])
@pytest.mark.parametrize("which", ["missing", "broken"])
@pytest.mark.parametrize("user", [None, "nobody"])
def test_bad_table(place, case, which, user):
    program = case.split()[0]
    table = place.root / "no-such-table" if which == "missing" else place.broken
    argv = [PROGRAMS[program], "-c", table] + table_cases(place)[case]
    status, out, err = run(argv, user=user)
    line = assert_one_line(program, status, out, err)
    assert str(table) in line, line


def test_second_pop3gw_on_the_same_pid_file(place):
    """The issue's "RuntimeError: already running": in the foreground (-F)
    and detaching, a second pop3-gw names the pid and the pid file."""
    pidfile = place.root / "pop3-gw.pid"
    first = realpeers.Proc(daemon_argv("pop3-gw", place, "127.0.0.1:%d" % realpeers.free_port()),
                           log=place.root / "first.out")
    try:
        realpeers.wait_until(lambda: pidfile.exists()
                             and pidfile.read_text().strip() == str(first.pid), 15,
                             what="the first pop3-gw's pid file")
        for foreground in (True, False):
            port = realpeers.free_port()
            argv = daemon_argv("pop3-gw", place, "127.0.0.1:%d" % port)
            if not foreground:
                argv.remove("-F")
            try:
                status, out, err = run(argv)
            finally:
                stop_strays(port)
            line = assert_one_line("pop3-gw", status, out, err)
            assert str(first.pid) in line and str(pidfile) in line, line
        assert pidfile.read_text().strip() == str(first.pid)
        assert first.alive()
    finally:
        first.stop()


def test_stale_pid_file_does_not_stop_pop3gw(place):
    """A pid file left by a pop3-gw that died (no such process) is no reason
    to refuse, in either mode."""
    pidfile = place.root / "pop3-gw.pid"
    dead = subprocess.Popen(["true"])
    dead.wait()
    for foreground in (True, False):
        pidfile.write_text("%d\n" % dead.pid)
        port = realpeers.free_port()
        argv = daemon_argv("pop3-gw", place, "127.0.0.1:%d" % port)
        if not foreground:
            argv.remove("-F")
        proc = realpeers.Proc(argv, log=place.root / "stale.out")
        try:
            realpeers.wait_for_listen("127.0.0.1", port, 15)
        finally:
            proc.stop()
            stop_strays(port)
        assert leaks(proc.output()) == [], proc.output()


@pytest.mark.parametrize("where", ["no-such-dir/pop3-gw.pid", "empty-file/pop3-gw.pid"])
@pytest.mark.parametrize("foreground", [True, False])
def test_bad_pidfile_path(place, where, foreground):
    (place.root / "empty-file").write_text("")
    pidfile = place.root / where
    port = realpeers.free_port()
    argv = [PROGRAMS["pop3-gw"], "-c", place.table, "--daemon", "127.0.0.1:%d" % port,
            "--pidfile", pidfile] + (["-F"] if foreground else [])
    try:
        status, out, err = run(argv)
    finally:
        stop_strays(port)
    line = assert_one_line("pop3-gw", status, out, err)
    assert str(pidfile) in line, line


def test_second_smapd_on_the_same_spool(place):
    first = smapd_helpers.Smapd(place.table, place.spool, place.root / "smapd.out")
    try:
        for mode in (["-F"], ["--once"], []):
            status, out, err = run([PROGRAMS["smapd"], "-c", place.table] + mode)
            line = assert_one_line("smapd", status, out, err)
            assert str(place.spool) in line, line
        assert first.proc.alive()
    finally:
        first.proc.stop()


def test_smapd_spool_that_cannot_be_made(place):
    table = place.root / "spool-table"
    table.write_text("smapd: directory /dev/null/spool\nsmapd: userid uucp\n"
                     "*: logsocket %s\n" % place.log.path)
    status, out, err = run([PROGRAMS["smapd"], "-c", table, "--once"])
    line = assert_one_line("smapd", status, out, err)
    assert "/dev/null" in line, line


def test_authmgr_database_in_a_missing_directory(place):
    table = place.root / "auth-table"
    table.write_text("authmgr: authfile %s\n" % (place.root / "no-such-dir" / "pop3-auth"))
    for argv in (["adduser", "bob"], ["deluser", "bob"]):
        status, out, err = run([PROGRAMS["authmgr"], "-c", table] + argv)
        assert_one_line("authmgr", status, out, err)


# --- inetd mode: fd 0, 1 and 2 are the client's socket -----------------------

def inetd_run(argv, timeout=30):
    """Run argv with a socketpair end on fd 0, 1 and 2; (status, every byte
    the client end received)."""
    ours, theirs = socket.socketpair()
    try:
        proc = subprocess.Popen([str(a) for a in argv], stdin=theirs.fileno(),
                                stdout=theirs.fileno(), stderr=theirs.fileno(),
                                close_fds=True, cwd="/")
        theirs.close()
        try:
            status = proc.wait(timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        ours.settimeout(5)
        received = b""
        while True:
            data = ours.recv(65536)
            if not data:
                break
            received += data
        return status, received
    finally:
        ours.close()


INETD_CASES = [
    # (program, argv, exit status: 2 for the command line)
    ("smap", ["-c", "NOTABLE"], 1),
    ("smap", ["-c", "BROKEN"], 1),
    ("smap", ["-c", "TABLE", "--bogus"], 2),
    ("smap", ["-c", "TABLE", "-x", "extra"], 2),
    ("smap", ["-c"], 2),
    ("pop3-gw", ["-c", "NOTABLE"], 1),
    ("pop3-gw", ["-c", "BROKEN"], 1),
    ("pop3-gw", ["-c", "TABLE", "--bogus"], 2),
    ("pop3-gw", ["-c", "TABLE", "--pidfile"], 2),
]


@pytest.mark.parametrize("program, argv, code", INETD_CASES)
def test_inetd_mode_answers_the_protocol_only(place, program, argv, code):
    names = {"TABLE": place.table, "BROKEN": place.broken,
             "NOTABLE": place.root / "no-such-table"}
    status, received = inetd_run([PROGRAMS[program]] + [names.get(a, a) for a in argv])
    assert status == code, (status, received)
    if program == "smap":
        assert re.fullmatch(rb"421 4\.3\.0 [\x20-\x7e]*\r\n", received), received
    else:
        assert re.fullmatch(rb"-ERR \[SYS/TEMP\] [\x20-\x7e]*\r\n", received), received


def stop_strays(port):
    """A detached daemon a failed test may have left listening on `port`: found
    by its command line in /proc and stopped by its pid."""
    mark = ("127.0.0.1:%d" % port).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as cmdline:
                words = cmdline.read().split(b"\0")
        except OSError:
            continue
        if mark in words:
            try:
                os.kill(int(entry), 15)
            except ProcessLookupError:
                pass

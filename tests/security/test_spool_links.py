"""Issue 11, finding 1: uucp, who owns the spool, must not become root
through links planted in it (DESIGN §12.6).

Each test plays the taken-over uucp account: it tampers with a spool that
uucp owns (a removed queue/, `.trigger` and `bad` replaced by links to
files of root's, a planted `.smapd.pid.<pid>`, a state file linked to a
root file, a FIFO where the pid file should be), then starts the real
programs as root (smap under inetd and with --daemon, smapd, `smapd
--flush`, `smapd -q`, pop3-gw, `make install`) and checks the outcome:
every file of root's keeps its owner, mode and content, and the program
refuses with one `PATH: reason` line instead of working through the link.

Trusts only the virtualenv's console scripts, make, and loopback; every
process started here is stopped by its pid and every wait is bounded.
"""

import os
import pwd
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from common import spool
from tests.integration import realpeers
from tests.integration.pop3_helpers import POP3GW, Setup as Pop3Setup
from tests.integration.smapd_helpers import PYTHON, ROOT, SMAPD, spool_message
from tests.security.harness import SmapSetup, program

UUCP = pwd.getpwnam("uucp")

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def as_root():
    realpeers.require_root()


def uucp_ids():
    entry = pwd.getpwnam("uucp")
    return entry.pw_uid, entry.pw_gid


def root_file(path, content=b"root's own file\n", mode=0o600):
    """A file of root's that uucp would like to own."""
    path = Path(path)
    path.write_bytes(content)
    os.chown(path, 0, 0)
    os.chmod(path, mode)
    return path


def root_fifo(path, mode=0o600):
    os.mkfifo(path, mode)
    os.chown(path, 0, 0)
    os.chmod(path, mode)
    return Path(path)


def root_directory(path, mode=0o755):
    path = Path(path)
    path.mkdir()
    os.chown(path, 0, 0)
    os.chmod(path, mode)
    return path


def snapshot(path):
    """Owner, group, mode and (files) content: what an attack would change."""
    info = os.lstat(path)
    content = Path(path).read_bytes() if stat.S_ISREG(info.st_mode) else None
    children = sorted(os.listdir(path)) if stat.S_ISDIR(info.st_mode) else None
    return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode), content, children


def uucp_spool(directory):
    """A clean spool as smapd's first start leaves it: uucp's, mode 0700."""
    uid, gid = uucp_ids()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    os.chown(directory, uid, gid)
    os.chmod(directory, 0o700)
    for name in (spool.TMP, spool.QUEUE, spool.STATE, spool.BAD):
        (directory / name).mkdir(mode=0o700)
        os.chown(directory / name, uid, gid)
    os.mkfifo(directory / spool.TRIGGER, 0o600)
    os.chown(directory / spool.TRIGGER, uid, gid)
    return directory


def tamper(directory, victims):
    """What uucp can do to its own spool: queue/ removed, .trigger and bad/
    replaced by links to two files of root's."""
    trigger_target = root_file(victims / "trigger-target", b"first secret\n")
    bad_target = root_file(victims / "bad-target", b"second secret\n")
    os.rmdir(directory / spool.QUEUE)
    os.unlink(directory / spool.TRIGGER)
    os.symlink(trigger_target, directory / spool.TRIGGER)
    os.rmdir(directory / spool.BAD)
    os.symlink(bad_target, directory / spool.BAD)
    return {path: snapshot(path) for path in (trigger_target, bad_target)}


def victims_dir(tmp_path):
    return root_directory(tmp_path / "root-files", 0o700)


def assert_untouched(before):
    for path, seen in before.items():
        assert snapshot(path) == seen, "%s was changed through a link in the spool" % path


# -- smap -----------------------------------------------------------------

def test_smap_inetd_refuses_a_spool_with_links(tmp_path):
    setup = SmapSetup(tmp_path / "smap")
    uucp_spool(setup.spool)
    before = tamper(setup.spool, victims_dir(tmp_path))
    try:
        client = setup.inetd()
        code, text = client.reply()
        if code == 220:
            client.cmd("QUIT")
        client.closed_by_server()
        status = setup.wait_exit(client)
        assert_untouched(before)
        assert code == 421, text
        assert status != 0
        line = setup.logs.wait_for("%s/bad: " % setup.spool)
        assert "symbolic link" in line
    finally:
        setup.stop()
    assert not (setup.spool / spool.QUEUE).is_symlink()


def test_smap_daemon_refuses_a_spool_with_links(tmp_path):
    setup = SmapSetup(tmp_path / "smap")
    uucp_spool(setup.spool)
    before = tamper(setup.spool, victims_dir(tmp_path))
    try:
        _, port = setup.daemon()
        client = setup.connect(port)
        code, text = client.reply()
        client.close()
        assert_untouched(before)
        assert code == 421, text
        assert "symbolic link" in setup.logs.wait_for("%s/bad: " % setup.spool)
    finally:
        setup.stop()
    assert_untouched(before)


def test_smap_still_makes_a_missing_spool(tmp_path):
    """The refusal is for links and foreign owners only: a missing queue/ in
    a sound spool is made again (uucp's) and the session works."""
    setup = SmapSetup(tmp_path / "smap")
    uucp_spool(setup.spool)
    os.rmdir(setup.spool / spool.QUEUE)
    try:
        client = setup.inetd()
        assert client.reply()[0] == 220
        assert client.cmd("QUIT")[0] == 221
        assert setup.wait_exit(client) == 0
    finally:
        setup.stop()
    info = os.lstat(setup.spool / spool.QUEUE)
    assert stat.S_ISDIR(info.st_mode) and info.st_uid == uucp_ids()[0]


def test_smap_refuses_a_spool_of_another_user(tmp_path):
    setup = SmapSetup(tmp_path / "smap")
    uucp_spool(setup.spool)
    os.chown(setup.spool, 65534, 65534)         # nobody's: not root's, not uucp's
    try:
        client = setup.inetd()
        code, text = client.reply()
        if code == 220:
            client.cmd("QUIT")
        setup.wait_exit(client)
        assert code == 421, text
        assert "owned by uid 65534" in setup.logs.wait_for("%s: " % setup.spool)
    finally:
        setup.stop()


# -- smapd ----------------------------------------------------------------

def run_smapd(table, *arguments, timeout=60):
    return subprocess.run([SMAPD, "-c", str(table), *arguments], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def assert_one_line_refusal(result, path, reason):
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "%s: " % path in lines[0] and reason in lines[0], lines[0]


def test_smapd_refuses_a_spool_with_links(tmp_path):
    setup = SmapSetup(tmp_path / "smap")
    uucp_spool(setup.spool)
    before = tamper(setup.spool, victims_dir(tmp_path))
    try:
        result = run_smapd(setup.table, "--once")
        assert_untouched(before)
        assert_one_line_refusal(result, setup.spool / "bad", "symbolic link")
        assert "symbolic link" in setup.logs.wait_for("%s/bad: " % setup.spool)
    finally:
        setup.stop()


def test_smapd_refuses_a_trigger_link(tmp_path):
    """.trigger alone replaced by a link to a FIFO of root's: smapd must not
    open it (and hand it to the jailed scanner) nor chown it."""
    setup = SmapSetup(tmp_path / "smap")
    uucp_spool(setup.spool)
    target = root_fifo(victims_dir(tmp_path) / "root-fifo")
    before = {target: snapshot(target)}
    os.unlink(setup.spool / spool.TRIGGER)
    os.symlink(target, setup.spool / spool.TRIGGER)
    try:
        result = run_smapd(setup.table, "--once")
        assert_untouched(before)
        assert_one_line_refusal(result, setup.spool / spool.TRIGGER, "symbolic link")
    finally:
        setup.stop()


def test_smapd_refuses_a_baddir_reached_through_a_link(tmp_path):
    """baddir configured deeper in the spool, with a link on the way to a
    directory of root's: nothing is made or chowned there."""
    setup = SmapSetup(tmp_path / "smap", ["smapd: baddir %s/quarantine/held" % (tmp_path / "smap/spool")])
    uucp_spool(setup.spool)
    target = root_directory(victims_dir(tmp_path) / "root-dir", 0o700)
    os.symlink(target, setup.spool / "quarantine")
    before = {target: snapshot(target)}
    try:
        result = run_smapd(setup.table, "--once")
        assert_untouched(before)
        assert_one_line_refusal(result, setup.spool / "quarantine", "symbolic link")
    finally:
        setup.stop()


def test_smapd_makes_a_deep_baddir_for_uucp(tmp_path):
    setup = SmapSetup(tmp_path / "smap", ["smapd: baddir %s/quarantine/held" % (tmp_path / "smap/spool")])
    uucp_spool(setup.spool)
    try:
        result = run_smapd(setup.table, "--once")
        assert result.returncode == 0, result.stderr
    finally:
        setup.stop()
    for path in (setup.spool / "quarantine", setup.spool / "quarantine/held"):
        info = os.lstat(path)
        assert stat.S_ISDIR(info.st_mode) and info.st_uid == uucp_ids()[0], path


def test_smapd_refuses_a_hard_link_as_its_lock(tmp_path):
    """A hard link to a file of root's where .smapd.lock should be (the
    kernel allows it when protected_hardlinks is off): refused after open."""
    setup = SmapSetup(tmp_path / "smap")
    uucp_spool(setup.spool)
    target = root_file(setup.spool.parent / "root-lock-target")  # same file system
    os.link(target, setup.spool / spool.LOCK)
    try:
        result = run_smapd(setup.table, "--once")
        assert_one_line_refusal(result, setup.spool / spool.LOCK, "hard links")
    finally:
        setup.stop()


PAUSE_THEN_EXEC = """
import os, sys, time
open(sys.argv[1] + ".new", "w").write("%d" % os.getpid())
os.rename(sys.argv[1] + ".new", sys.argv[1])
deadline = time.monotonic() + 20
while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline:
    time.sleep(0.02)
os.execv(sys.argv[3], sys.argv[3:])
"""


def test_smapd_does_not_write_its_pid_file_through_a_planted_link(tmp_path):
    """The pid of the smapd to come is known (a wrapper that execs smapd
    tells it first): `.smapd.pid.<pid>` is planted as a link to root's file."""
    setup = SmapSetup(tmp_path / "smap")
    uucp_spool(setup.spool)
    target = root_file(victims_dir(tmp_path) / "pid-target", b"keep me\n")
    before = {target: snapshot(target)}
    told, go = tmp_path / "pid-told", tmp_path / "go"
    proc = realpeers.Proc([PYTHON, "-c", PAUSE_THEN_EXEC, told, go, SMAPD, "-c",
                           setup.table, "-F"], log=tmp_path / "smapd.out")
    try:
        realpeers.wait_until(told.exists, 20, what="the wrapper's pid")
        pid = int(told.read_text())
        os.symlink(target, setup.spool / (".smapd.pid.%d" % pid))
        go.write_text("")

        def pid_file():
            try:
                return int((setup.spool / ".smapd.pid").read_text()) == pid
            except (OSError, ValueError):
                return False
        realpeers.wait_until(lambda: pid_file() or proc.exited(), 20, what="smapd's pid file")
        assert not proc.exited(), (tmp_path / "smapd.out").read_text()
        assert_untouched(before)
        info = os.lstat(setup.spool / ".smapd.pid")
        assert stat.S_ISREG(info.st_mode) and info.st_uid != 0
    finally:
        proc.stop(20)
        setup.stop()
    assert_untouched(before)


def test_smapd_flush_does_not_open_a_fifo_as_its_pid_file(tmp_path):
    """`smapd --flush` (root) reads the pid file uucp can replace: a FIFO
    there must not hang it, a link must not be followed."""
    setup = SmapSetup(tmp_path / "smap")
    uucp_spool(setup.spool)
    os.mkfifo(setup.spool / ".smapd.pid", 0o644)
    try:
        try:
            result = run_smapd(setup.table, "--flush", timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("smapd --flush hung on a FIFO planted as its pid file")
        assert result.returncode == 1
        assert "not running" in result.stderr
    finally:
        setup.stop()


def test_smapd_queue_listing_does_not_read_root_files_through_links(tmp_path):
    """`smapd -q` as root: a state file linked to a file of root's must not
    be read (the listing runs as uucp in the spool's jail)."""
    setup = SmapSetup(tmp_path / "smap")
    uucp_spool(setup.spool)
    message_id = spool_message(setup.spool, "a@example.org", ["b@example.com"],
                               b"Subject: x\r\n\r\nbody\r\n")
    secret = root_file(victims_dir(tmp_path) / "state-secret",
                       b"attempts 7\nlast-error ROOTS-SECRET-TEXT\n")
    os.symlink(secret, setup.spool / spool.STATE / message_id)
    try:
        result = run_smapd(setup.table, "-q", timeout=30)
        assert result.returncode == 0, result.stderr
        assert message_id in result.stdout
        assert "ROOTS-SECRET-TEXT" not in result.stdout
    finally:
        setup.stop()


# -- pop3-gw --------------------------------------------------------------

def pop3_greeting(setup):
    """The first line a fresh inetd-mode pop3-gw sends (over a socketpair)."""
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(POP3GW + ["-c", str(setup.table)], stdin=theirs, stdout=theirs,
                            stderr=subprocess.DEVNULL, close_fds=True, cwd=str(ROOT))
    theirs.close()
    ours.settimeout(20)
    try:
        data = b""
        while b"\r\n" not in data:
            chunk = ours.recv(4096)
            if not chunk:
                break
            data += chunk
        return data.split(b"\r\n")[0]
    finally:
        ours.close()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def pop3_setup(tmp_path, chroot):
    # a socketpair's peer is `unknown`, which only `*` matches
    setup = Pop3Setup(tmp_path / "gw", "127.0.0.1:%d" % realpeers.free_port(),
                      rules=("permit-hosts *",))
    setup.lines = [line if not line.startswith("pop3-gw: directory ")
                   else "pop3-gw: directory %s" % chroot for line in setup.lines]
    setup.write_table()
    return setup


@pytest.mark.parametrize("layout", ["under-uucp", "link", "sound"])
def test_pop3gw_directory_must_be_reached_through_roots_directories(tmp_path, layout):
    base = root_directory(tmp_path / "base")
    if layout == "under-uucp":
        parent = root_directory(base / "uucp-owned")
        os.chown(parent, *uucp_ids())           # uucp could swap the chroot for its own
        chroot = root_directory(parent / "empty")
        refused = str(parent)
    elif layout == "link":
        real = root_directory(base / "real-empty")
        chroot = base / "empty"
        os.symlink(real, chroot)
        refused = str(chroot)
    else:
        chroot = root_directory(base / "empty")
    setup = pop3_setup(tmp_path, chroot)
    try:
        greeting = pop3_greeting(setup)
        if layout == "sound":
            assert greeting.startswith(b"+OK "), greeting
        else:
            assert greeting.startswith(b"-ERR [SYS/TEMP]"), greeting
            setup.log.wait_for("%s: " % refused)
    finally:
        setup.log.close()


# -- make install ---------------------------------------------------------

@pytest.mark.parametrize("planted", ["bad", ".trigger", "queue-file"])
def test_make_install_does_not_chown_through_links_in_the_spool(tmp_path, planted):
    realpeers.require("make", "install", "/usr/bin/python3")
    dest = tmp_path / "dest"
    spool_dir = uucp_spool(dest / "var/spool/smap")
    victims = victims_dir(tmp_path)
    if planted == "bad":
        target = root_directory(victims / "root-dir", 0o755)
        os.rmdir(spool_dir / "bad")
        os.symlink(target, spool_dir / "bad")
        reason = "symbolic link"
    elif planted == ".trigger":
        target = root_fifo(victims / "root-fifo", 0o600)
        os.unlink(spool_dir / ".trigger")
        os.symlink(target, spool_dir / ".trigger")
        reason = "symbolic link"
    else:
        target = root_file(victims / "root-file")
        os.rmdir(spool_dir / "queue")
        os.symlink(target, spool_dir / "queue")
        reason = "symbolic link"
    before = {target: snapshot(target)}
    result = subprocess.run(["make", "-s", "-C", str(ROOT), "install", "DESTDIR=%s" % dest,
                             "PREFIX=/usr/local"], capture_output=True, text=True, timeout=300)
    assert_untouched(before)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    name = "queue" if planted == "queue-file" else planted
    assert "%s/%s: " % (spool_dir, name) in output and reason in output, output


def test_smapd_flush_never_signals_a_root_process_named_in_a_forged_pid_file(tmp_path):
    """uucp owns the spool: it can hold `.smapd.lock` itself and write any
    pid into `.smapd.pid`.  A root process whose command line contains
    "smapd" (an administrator's `tail -f /var/log/smapd.log`) must not get
    root's SIGUSR1, which would end it (found by the review)."""
    realpeers.require_root()
    import fcntl
    import signal
    root = tmp_path / "flush"
    root.mkdir()
    os.chmod(root, 0o755)
    directory = root / "spool"
    os.close(spool.open_spool(str(directory), UUCP.pw_uid, UUCP.pw_gid, own_top=True))
    table = root / "table"
    table.write_text("smap, smapd: directory %s\n" % directory)
    victim = subprocess.Popen(["bash", "-c", 'exec -a "tail -f /var/log/smapd.log" sleep 60'])
    try:
        lock_path = directory / ".smapd.lock"
        lock = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        os.fchown(lock, UUCP.pw_uid, UUCP.pw_gid)
        fcntl.flock(lock, fcntl.LOCK_EX)          # held, as a forging uucp would
        pidfile = directory / ".smapd.pid"
        pidfile.write_text("%d\n" % victim.pid)
        os.chown(pidfile, UUCP.pw_uid, UUCP.pw_gid)
        result = subprocess.run([program("smapd"), "-c", str(table), "--flush"],
                                capture_output=True, timeout=30)
        assert result.returncode == 1, result
        assert b"is not smapd" in result.stderr
        time.sleep(0.3)
        assert victim.poll() is None, "the root process was signalled"
        os.close(lock)
    finally:
        victim.send_signal(signal.SIGTERM)
        victim.wait(10)

"""`make install` builds the tree an administrator expects, and it works.

1. `make install DESTDIR=... PREFIX=/usr/local`: programs (wrappers in
   sbin over the packages in lib/mailwall), man pages in man5/man8, the
   sample /etc/mailwall/netperm-table, the rsyslog snippet, the spool with
   queue/ tmp/ state/ bad/ mode 0700 (owned by uucp when installed by
   root) and /var/empty; a second install never overwrites the table.
2. An install into a private PREFIX (every path inside the test's
   directory): the installed wrappers run with the system interpreter
   (`-IS`, an explicit sys.path that finds Debian's python3-daemon and
   python3-setproctitle), check the installed table, the installed smap
   answers an SMTP session on a socketpair, and the installed systemd units pass
   `systemd-analyze verify` (skipped where it is missing).

Real tools only: make, install, the system python3, systemd-analyze.
"""

import os
import shutil
import pwd
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.integration import realpeers

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = ["smap", "smapd", "pop3-gw", "authmgr"]
pytestmark = pytest.mark.integration


def make_install(*settings):
    realpeers.require("make", "install", "/usr/bin/python3")
    result = subprocess.run(["make", "-s", "-C", str(ROOT), "install", *settings],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_install_into_destdir(tmp_path):
    dest = tmp_path / "dest"
    make_install("DESTDIR=%s" % dest, "PREFIX=/usr/local")
    prefix = dest / "usr/local"
    for name in PROGRAMS:
        wrapper = prefix / "sbin" / name
        assert mode(wrapper) == 0o755, name
        text = wrapper.read_text()
        # -IS: isolated and without `site` (the inetd start-up target), so
        # sys.path is explicit: the library first, Debian's dist-packages last
        assert text.startswith("#!/usr/bin/python3 -IS\n")
        lines = text.splitlines()
        first = lines.index('sys.path.insert(0, "/usr/local/lib/mailwall")')  # no DESTDIR inside
        assert lines.index('sys.path.append("/usr/lib/python3/dist-packages")') > first
        assert str(dest) not in text
    for package in ("common", "smap", "smapd", "pop3gw"):
        assert (prefix / "lib/mailwall" / package / "__init__.py").is_file()
    assert (prefix / "lib/mailwall/smap/__pycache__").is_dir()        # compiled: fast inetd start
    for page in ("smap.8", "smapd.8", "pop3-gw.8", "authmgr.8"):
        assert (prefix / "share/man/man8" / page).read_bytes() == (ROOT / "man" / page).read_bytes()
    assert (prefix / "share/man/man5/netperm-table.5").is_file()
    table = dest / "etc/mailwall/netperm-table"
    assert table.read_bytes() == (ROOT / "conf/netperm-table").read_bytes()
    assert mode(table) == 0o644
    assert "imuxsock" in (dest / "etc/rsyslog.d/mailwall.conf").read_text()
    assert (prefix / "share/doc/mailwall/examples/systemd/smap.socket").is_file()

    spool = dest / "var/spool/smap"
    uucp = pwd.getpwnam("uucp")
    for path in [spool] + [spool / sub for sub in ("queue", "tmp", "state", "bad")]:
        assert path.is_dir() and mode(path) == 0o700, path
        if os.geteuid() == 0:
            assert (path.stat().st_uid, path.stat().st_gid) == (uucp.pw_uid, uucp.pw_gid), path
    assert stat.S_ISFIFO(os.lstat(spool / ".trigger").st_mode)
    empty = dest / "var/empty"
    assert empty.is_dir() and mode(empty) == 0o755 and not any(empty.iterdir())
    if os.geteuid() == 0:
        assert empty.stat().st_uid == 0

    # a second install keeps the administrator's table
    table.write_text("smap: hostname mine.example\n")
    make_install("DESTDIR=%s" % dest, "PREFIX=/usr/local")
    assert table.read_text() == "smap: hostname mine.example\n"


def test_installed_programs_run_and_units_verify(tmp_path):
    top = tmp_path / "top"
    make_install("PREFIX=%s/usr" % top, "SYSCONFDIR=%s/etc" % top,
                 "SPOOLDIR=%s/spool" % top, "EMPTYDIR=%s/empty" % top)
    table = top / "etc/mailwall/netperm-table"
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
    for name in PROGRAMS:
        program = top / "usr/sbin" / name
        version = subprocess.run([str(program), "--version"], capture_output=True,
                                 text=True, timeout=60, env=env)
        assert (version.returncode, version.stdout.split()[0]) == (0, "mailwall"), version.stderr
        check = subprocess.run([str(program), "-c", str(table), "-n"], capture_output=True,
                               text=True, timeout=60, env=env)
        assert check.returncode == 0, check.stdout + check.stderr
    # the wrappers run the system python3 with -IS, and their explicit
    # sys.path finds Debian's python3-daemon and python3-setproctitle
    smap_wrapper = top / "usr/sbin/smap"
    assert smap_wrapper.read_text().startswith("#!/usr/bin/python3 -IS\n")
    prelude = smap_wrapper.read_text().split("from smap.main")[0]
    probe = prelude + ("print(sys.flags.isolated, sys.flags.no_site)\n"
                       "import smap.main\nprint(smap.main.__file__)\n")
    ran = subprocess.run(["/usr/bin/python3", "-IS", "-c", probe], capture_output=True,
                         text=True, timeout=60, env=env)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["1", "1", str(top / "usr/lib/mailwall/smap/main.py")]
    have = subprocess.run(["/usr/bin/python3", "-c", "import daemon, setproctitle"],
                          capture_output=True, timeout=60, env=env)
    if have.returncode == 0:
        found = subprocess.run(["/usr/bin/python3", "-IS", "-c",
                                prelude + "import daemon, setproctitle\n"],
                               capture_output=True, text=True, timeout=60, env=env)
        assert found.returncode == 0, found.stderr
    # the installed smap answers a session on a socketpair, as inetd starts it
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([str(smap_wrapper), "-c", str(table)], stdin=theirs,
                            stdout=theirs, stderr=subprocess.PIPE, env=env, close_fds=True)
    theirs.close()
    try:
        ours.settimeout(60)
        session = ours.makefile("rwb")
        assert session.readline().startswith(b"220 ")
        session.write(b"EHLO client.example.net\r\n")
        session.flush()
        replies = [session.readline()]
        while replies[-1][3:4] == b"-":
            replies.append(session.readline())
        assert all(line.startswith(b"250") for line in replies), replies
        session.write(b"QUIT\r\n")
        session.flush()
        assert session.readline().startswith(b"221 ")
        assert session.readline() == b""
        session.close()
        assert proc.wait(60) == 0, proc.stderr.read()
    finally:
        ours.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()

    # -n really checks: a broken table is refused by the installed smap
    broken = tmp_path / "broken-table"
    broken.write_text("smap: timeout soon\n")
    check = subprocess.run([str(top / "usr/sbin/smap"), "-c", str(broken), "-n"],
                           capture_output=True, text=True, timeout=60, env=env)
    assert check.returncode == 1 and "broken-table:1:" in check.stdout + check.stderr

    units = top / "usr/share/doc/mailwall/examples/systemd"
    assert "ExecStart=%s/usr/sbin/smapd -c %s/etc/mailwall/netperm-table -F" % (top, top) \
        in (units / "smapd.service").read_text()
    socket_unit = (units / "smap.socket").read_text()
    assert "Accept=yes" in socket_unit
    assert "StandardInput=socket" in (units / "smap@.service").read_text()
    if realpeers.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed: units not verified")
    names = ["smap.socket", "smap@.service", "smapd.service", "pop3-gw.service"]
    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", *("./" + n for n in names)],
                            cwd=units, capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # and verify does fail on a broken unit
    (units / "smap.socket").write_text(socket_unit.replace("ListenStream=25", "ListenStream=x"))
    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", "./smap.socket"],
                            cwd=units, capture_output=True, text=True, timeout=120)
    assert verify.returncode != 0


def test_rsyslog_snippet_makes_a_log_socket_in_the_spool(tmp_path):
    """conf/rsyslog.d/mailwall.conf, as installed, under the real rsyslogd:
    it creates dev/log inside the spool (the smap chroot) and what smap
    logs there arrives."""
    realpeers.require("rsyslogd")
    from common import log

    work = Path(tempfile.mkdtemp(prefix="mwrs-"))      # short: AF_UNIX path limit
    try:
        spool = work / "spool"
        spool.mkdir(mode=0o700)
        (work / "work").mkdir()
        snippet = (ROOT / "conf/rsyslog.d/mailwall.conf").read_text()
        assert 'Socket="/var/spool/smap/dev/log"' in snippet
        (work / "mailwall.conf").write_text(snippet.replace("/var/spool/smap", str(spool)))
        conf = work / "rsyslog.conf"
        conf.write_text(
            'global(workDirectory="%s/work")\n'
            'module(load="imuxsock" SysSock.Use="off")\n'
            'include(file="%s/mailwall.conf")\n'
            '*.* action(type="omfile" file="%s/messages")\n' % (work, work, work))
        check = subprocess.run(["rsyslogd", "-N1", "-f", str(conf)], capture_output=True,
                               text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        daemon = realpeers.Proc(["rsyslogd", "-n", "-f", conf, "-i", work / "pid"],
                                log=work / "rsyslogd.out")
        try:
            socket_path = realpeers.wait_for_path(spool / "dev/log", 15)
            logger = log.Log("smap", 2, str(socket_path))
            logger.info("message", id="INSTALLTEST1", size=1)
            realpeers.wait_until(
                lambda: (work / "messages").exists()
                and "smap[%d]: message id=INSTALLTEST1" % os.getpid() in (work / "messages").read_text(),
                15, what="the log line through the chroot socket")
            logger.close()
        finally:
            daemon.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

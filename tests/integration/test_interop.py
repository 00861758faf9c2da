"""Interop with real mail software beyond the earlier issues' tests.

* Postfix as the *sending* MTA: a private Postfix instance with
  `relayhost = [127.0.0.1]:SMAPPORT` relays a locally submitted message
  into `smap --daemon` (running as root, so chrooted to the spool as uucp).
  The message must land in smap's spool complete, with the envelope Postfix
  gave; a recipient in a foreign domain must be refused by smap (no open
  relay) and Postfix must report that refusal.
* getmail6 as a POP3 client with APOP, through `pop3-gw --daemon` in front
  of a real Dovecot: it must fetch the very message Dovecot holds.

Real peers from Debian only (postfix, dovecot-pop3d, getmail6); a missing
one skips the test, or fails it under MAILWALL_REQUIRE_REAL=1.  Loopback
high ports; every process started here is stopped by its pid.
"""

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from common import spool
from tests.integration import realpeers

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.integration


class LogSocket:
    """A private syslog datagram socket; .text() is everything received."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="mwio-"))
        os.chmod(self.dir, 0o755)
        self.path = self.dir / "log.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        os.chmod(self.path, 0o666)
        self.sock.settimeout(0.2)
        self.lines, self.stopping = [], threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stopping.is_set():
            try:
                self.lines.append(self.sock.recv(65536).decode("utf-8", "replace"))
            except socket.timeout:
                continue
            except OSError:
                return

    def text(self):
        return "\n".join(self.lines)

    def close(self):
        self.stopping.set()
        self.thread.join(2)
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def logsocket():
    log = LogSocket()
    yield log
    log.close()


def mailwall(name):
    path = BIN / name
    if not os.access(path, os.X_OK):
        pytest.fail("%s is not installed beside %s" % (name, sys.executable))
    return str(path)


def test_postfix_relays_into_smap(tmp_path, logsocket):
    realpeers.require("postfix", "postconf", "sendmail")
    realpeers.require_root()
    uucp = pwd.getpwnam("uucp")
    spool_dir = realpeers.open_up(tmp_path / "spool")
    spool_dir.mkdir()
    os.chown(spool_dir, uucp.pw_uid, uucp.pw_gid)
    table = tmp_path / "netperm-table"
    table.write_text(
        "*: logsocket %s\n"
        "smap: directory %s\n"
        "smap: hostname fire-out.yoyodyne.test\n"
        "smap: accept-domains yoyodyne.test\n" % (logsocket.path, spool_dir))
    port = realpeers.free_port()
    smap = realpeers.Proc([mailwall("smap"), "-c", table, "--daemon", "127.0.0.1:%d" % port, "-F"],
                          new_session=True, log=tmp_path / "smap.out")
    try:
        realpeers.wait_for_listen("127.0.0.1", port)
        with realpeers.Postfix(tmp_path / "postfix", port) as postfix:
            body = b"Subject: interop %d\n\nfrom Postfix to smap\n.\n..\n" % time.time_ns()
            result = postfix.sendmail(body, "penny@inside.test",
                                      ["john@yoyodyne.test", "eve@elsewhere.test"])
            assert result.returncode == 0, result.stderr
            queue = spool_dir / "queue"
            realpeers.wait_until(lambda: queue.is_dir() and list(queue.iterdir()), 60, 0.2,
                                 "a spooled message")
            # Postfix hears smap refuse the foreign domain (no open relay)
            log = realpeers.wait_until(
                lambda: "Relay access denied" in postfix.maillog() and postfix.maillog(),
                60, 0.2, "Postfix logging smap's refusal")
            assert "eve@elsewhere.test" in log
    finally:
        smap.stop()
    files = list((spool_dir / "queue").iterdir())
    assert len(files) == 1
    envelope, message = spool.read_message(files[0])
    assert envelope["sender"] == "penny@inside.test"
    assert envelope["rcpt"] == ["john@yoyodyne.test"]
    assert envelope["client-addr"] == "127.0.0.1"
    assert b"from Postfix to smap\r\n.\r\n..\r\n" in message       # dots survive both hops
    assert b"(Postfix" in message                                   # Postfix's own Received:
    assert b"by fire-out.yoyodyne.test" in message                  # smap's Received:
    assert os.stat(files[0]).st_uid == uucp.pw_uid                  # written after the drop
    assert "message id=%s from=<penny@inside.test>" % envelope["id"] in logsocket.text()


def test_getmail6_fetches_through_pop3_gw(tmp_path, dovecot, logsocket):
    realpeers.require("getmail")
    message = b"Subject: for getmail %d\r\nFrom: a@b.test\r\n\r\nthrough the firewall\r\n" \
        % time.time_ns()
    dovecot.deliver("alice", message)
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)
    realpeers.open_up(empty)
    table = tmp_path / "netperm-table"
    table.write_text(
        "*: logsocket %s\n"
        "pop3-gw: directory %s\n"
        "pop3-gw: server 127.0.0.1:%d\n"
        "pop3-gw, authmgr: authfile %s\n"
        "pop3-gw: permit-hosts 127.0.0.1 -dest 127.0.0.1 -user alice\n"
        % (logsocket.path, empty, dovecot.port, tmp_path / "pop3-auth"))
    for argv, stdin in ((["adduser", "alice"], None), (["password", "--stdin", "alice"], "alicesecret\n")):
        done = subprocess.run([mailwall("authmgr"), "-c", str(table), *argv], input=stdin,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    port = realpeers.free_port()
    gateway = realpeers.Proc([mailwall("pop3-gw"), "-c", table, "--daemon", "127.0.0.1:%d" % port,
                              "-F", "--pidfile", tmp_path / "pop3-gw.pid"],
                             new_session=True, log=tmp_path / "pop3-gw.out")
    try:
        realpeers.wait_for_listen("127.0.0.1", port)
        # getmail refuses to deliver as root: it runs as nobody, in its own home
        nobody = pwd.getpwnam("nobody")
        as_nobody = dict(user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[])
        home = realpeers.open_up(tmp_path / "getmail")
        home.mkdir()
        maildir = home / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True)
        for path in [home, maildir] + [maildir / sub for sub in ("cur", "new", "tmp")]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        (home / "getmailrc").write_text(
            "[retriever]\ntype = SimplePOP3Retriever\nserver = 127.0.0.1\nport = %d\n"
            "username = alice\npassword = alicesecret\nuse_apop = true\ntimeout = 30\n\n"
            "[destination]\ntype = Maildir\npath = %s/\n\n"
            "[options]\nread_all = true\ndelete = false\nverbose = 2\n" % (port, maildir))
        os.chown(home / "getmailrc", nobody.pw_uid, nobody.pw_gid)
        run = subprocess.run(["getmail", "--getmaildir", str(home), "--rcfile", "getmailrc"],
                             capture_output=True, text=True, timeout=120, cwd=str(home),
                             env={"PATH": "/usr/bin:/bin", "HOME": str(home)}, **as_nobody)
        assert run.returncode == 0, run.stdout + run.stderr
        fetched = [p.read_bytes() for p in (maildir / "new").iterdir()]
        assert len(fetched) == 1
        assert b"through the firewall" in fetched[0]
        assert message.split(b"\r\n")[0].decode() in fetched[0].decode().replace("\r\n", "\n")

        # a wrong secret: getmail fails, and pop3-gw said why in the log
        (home / "getmailrc").write_text((home / "getmailrc").read_text()
                                        .replace("password = alicesecret", "password = wrong"))
        run = subprocess.run(["getmail", "--getmaildir", str(home), "--rcfile", "getmailrc"],
                             capture_output=True, text=True, timeout=120, cwd=str(home),
                             env={"PATH": "/usr/bin:/bin", "HOME": str(home)}, **as_nobody)
        assert run.returncode != 0
        assert "-ERR [AUTH]" in run.stdout + run.stderr
        assert len(list((maildir / "new").iterdir())) == 1
    finally:
        gateway.stop()
    assert "user=alice" in logsocket.text()

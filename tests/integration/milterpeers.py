"""Real milters for the milter tests, started privately (issue 15).

ClamAV (clamd with a signature database made here: the EICAR test string
as a custom signature, no freshclam, no network) behind clamav-milter;
rspamd's milter proxy with a minimal offline configuration; opendkim in
verify mode with its public key in a local key table instead of DNS.
The recipes are REAL-PEERS.md's.  Each listens on 127.0.0.1 at a free high
port (or a unix socket in a private directory), writes everything under
its own temporary directory and is stopped by its pid (rspamd: its
process group).  Waits are bounded polls.

What it trusts: the Debian binaries and the system users clamav, _rspamd
and opendkim.
"""

import base64
import hashlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.integration import realpeers

EICAR = (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*")
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def _private_dir(prefix, user):
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o755)
    uid, gid = realpeers._ids(user)
    os.chown(path, uid, gid)
    return path


def _chown_tree(path, user):
    uid, gid = realpeers._ids(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, uid, gid)
        for name in files:
            os.chown(os.path.join(root, name), uid, gid)


def _pid_of(path):
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class ClamAV(realpeers._Stoppable):
    """clamd + clamav-milter.  `spec` is the milter's SPEC for smap
    (inet:127.0.0.1:PORT, or unix:PATH with unix_socket=True)."""

    def __init__(self, unix_socket=False):
        realpeers.require("clamd", "clamav-milter")
        realpeers.require_root()
        self.dir = _private_dir("mwclam-", "clamav")
        for name in ("db", "tmp"):
            (self.dir / name).mkdir()
        (self.dir / "db" / "local-test.ndb").write_text(
            "Local.Test.EICAR:0:*:%s\n" % EICAR.hex())
        (self.dir / "clamd.conf").write_text("\n".join([
            "Foreground yes", "LogFile %s/clamd.log" % self.dir,
            "PidFile %s/clamd.pid" % self.dir, "TemporaryDirectory %s/tmp" % self.dir,
            "DatabaseDirectory %s/db" % self.dir, "OfficialDatabaseOnly no", "Bytecode no",
            "LocalSocket %s/clamd.sock" % self.dir, "LocalSocketMode 666", "User clamav",
            "ScanMail yes", ""]))
        _chown_tree(self.dir, "clamav")
        self.clamd = realpeers.Proc([realpeers._bin("clamd"), "-c", self.dir / "clamd.conf"],
                                    log=self.dir / "clamd.out")
        self.milter = None
        try:
            self.wait_clamd()
            if unix_socket:
                self.socket_path = self.dir / "milter.sock"
                where = "unix:%s" % self.socket_path
                self.spec = "unix:%s" % self.socket_path
            else:
                self.port = realpeers.free_port()
                where = "inet:%d@127.0.0.1" % self.port
                self.spec = "inet:127.0.0.1:%d" % self.port
            (self.dir / "clamav-milter.conf").write_text("\n".join([
                "MilterSocket %s" % where, "MilterSocketMode 666",
                "ClamdSocket unix:%s/clamd.sock" % self.dir, "Foreground yes",
                "PidFile %s/clamav-milter.pid" % self.dir,
                "TemporaryDirectory %s/tmp" % self.dir,
                "LogFile %s/clamav-milter.log" % self.dir, "LogInfected Basic",
                "LogClean Basic", "OnClean Accept", "OnInfected Reject",
                "RejectMsg Infected: %v", "OnFail Defer", "AddHeader Replace",
                "User clamav", ""]))
            _chown_tree(self.dir, "clamav")
            self.milter = realpeers.Proc(
                [realpeers._bin("clamav-milter"), "-c", self.dir / "clamav-milter.conf"],
                log=self.dir / "clamav-milter.out")
            if unix_socket:
                realpeers.wait_for_path(self.socket_path, 30)
            else:
                realpeers.wait_for_listen("127.0.0.1", self.port, 30)
        except BaseException:
            self.stop()
            raise

    def wait_clamd(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.clamd.alive():
                raise RuntimeError("clamd exited: %s" % self.clamd.output()[-2000:])
            try:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(2)
                    sock.connect(str(self.dir / "clamd.sock"))
                    sock.sendall(b"zPING\0")
                    if sock.recv(16).startswith(b"PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError("clamd did not answer PING: %s" % self.clamd.output()[-2000:])

    def log(self):
        try:
            return (self.dir / "clamav-milter.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self):
        for proc in (self.milter, self.clamd):
            if proc is not None:
                proc.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Rspamd(realpeers._Stoppable):
    """rspamd with only its milter proxy (self-scan), no redis, no DNS."""

    def __init__(self):
        realpeers.require("rspamd")
        realpeers.require_root()
        self.dir = _private_dir("mwrsp-", "_rspamd")
        for name in ("run", "tmp", "db"):
            (self.dir / name).mkdir()
        (self.dir / "tld.dat").write_text("test\ncom\norg\nnet\n")
        self.port = realpeers.free_port()
        self.spec = "inet:127.0.0.1:%d" % self.port
        d = self.dir
        (d / "rspamd.conf").write_text("""
options {
  pidfile = "%(d)s/run/rspamd.pid";
  filters = "";
  dns { nameserver = ["127.0.0.1:1"]; timeout = 1s; retransmits = 1; }
  local_addrs = [];
  tempdir = "%(d)s/tmp";
  hs_cache_dir = "%(d)s/db/";
  cache_file = "%(d)s/db/symbols.cache";
  control_socket = "%(d)s/run/rspamd.sock mode=0600";
  url_tld = "%(d)s/tld.dat";
  task_timeout = 8s;
}
logging { type = "file"; filename = "%(d)s/rspamd.log"; level = "info"; }
actions { reject = 15; add_header = 6; greylist = 4; }
worker "rspamd_proxy" {
  bind_socket = "127.0.0.1:%(port)d";
  milter = yes;
  timeout = 60s;
  upstream "local" { default = yes; self_scan = yes; }
  count = 1;
}
modules { path = "/usr/share/rspamd/plugins/milter_headers.lua"; }
milter_headers {
  use = ["x-spamd-result", "x-rspamd-server", "x-rspamd-queue-id"];
  skip_local = false;
  skip_authenticated = false;
}
""" % {"d": d, "port": self.port})
        _chown_tree(d, "_rspamd")
        self.proc = realpeers.Proc([realpeers._bin("rspamd"), "-f", "-c", d / "rspamd.conf",
                                    "-u", "_rspamd", "-g", "_rspamd"],
                                   new_session=True, log=d / "rspamd.out")
        try:
            realpeers.wait_for_listen("127.0.0.1", self.port, 60)
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout=60):
        """The proxy listens before it can negotiate: wait for an OPTNEG answer."""
        from smap import milter
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                    sock.sendall(milter.optneg())
                    if sock.recv(64)[4:5] == b"O":
                        sock.sendall(milter.packet(milter.QUIT))
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("rspamd proxy not negotiating")

    def log(self):
        try:
            return (self.dir / "rspamd.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self):
        self.proc.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class OpenDKIM(realpeers._Stoppable):
    """opendkim verifying with a key of its own, published in a local table."""

    DOMAIN, SELECTOR = "outside.test", "acc"

    def __init__(self):
        realpeers.require("opendkim", "opendkim-genkey", "openssl")
        realpeers.require_root()
        self.dir = _private_dir("mwdkim-", "opendkim")
        d = self.dir
        realpeers._run([realpeers._bin("opendkim-genkey"), "-b", "2048", "-h", "sha256",
                        "-d", self.DOMAIN, "-s", self.SELECTOR, "-D", d])
        record = "".join(re.findall(r'"([^"]*)"', (d / ("%s.txt" % self.SELECTOR)).read_text()))
        (d / "test-public-keys").write_text("%s._domainkey.%s %s\n" % (
            self.SELECTOR, self.DOMAIN, record))
        (d / "internal-hosts").write_text("192.0.2.1\n")
        self.port = realpeers.free_port()
        self.spec = "inet:127.0.0.1:%d" % self.port
        (d / "opendkim.conf").write_text("\n".join([
            "Mode v", "Syslog no", "Background no", "Socket inet:%d@127.0.0.1" % self.port,
            "PidFile %s/opendkim.pid" % d, "UserID opendkim",
            "TestPublicKeys %s/test-public-keys" % d, "InternalHosts %s/internal-hosts" % d,
            "AuthservID gw.test", "AlwaysAddARHeader yes", ""]))
        self.key = d / ("%s.private" % self.SELECTOR)
        _chown_tree(d, "opendkim")
        self.proc = realpeers.Proc([realpeers._bin("opendkim"), "-f", "-x", d / "opendkim.conf"],
                                   log=d / "opendkim.out")
        try:
            realpeers.wait_for_listen("127.0.0.1", self.port, 30)
        except BaseException:
            self.stop()
            raise

    def sign(self, header_lines, body):
        """A DKIM-Signature field (relaxed/relaxed, rsa-sha256) for the
        header fields `header_lines` ([(name, value)]) and `body` (CRLF
        bytes), signed with openssl and this instance's key."""
        body_lines = [re.sub(rb"[ \t]+", b" ", line).rstrip(b" ")
                      for line in body.split(b"\r\n")]
        while body_lines and body_lines[-1] == b"":
            body_lines.pop()
        canonical_body = b"".join(line + b"\r\n" for line in body_lines)
        body_hash = base64.b64encode(hashlib.sha256(canonical_body).digest()).decode()
        names = ":".join(name.lower() for name, _ in header_lines)
        value = ("v=1; a=rsa-sha256; c=relaxed/relaxed; d=%s; s=%s; h=%s; bh=%s; b="
                 % (self.DOMAIN, self.SELECTOR, names, body_hash))

        def relaxed(name, text):
            return "%s:%s" % (name.lower(), re.sub(r"[ \t]+", " ",
                                                   text.replace("\r\n", "")).strip())
        signed = "".join(relaxed(n, v) + "\r\n" for n, v in header_lines)
        signed += relaxed("DKIM-Signature", value)
        result = subprocess.run([realpeers._bin("openssl"), "dgst", "-sha256", "-sign",
                                 str(self.key)], input=signed.encode(), capture_output=True,
                                check=True, timeout=30)
        return value + base64.b64encode(result.stdout).decode()

    def stop(self):
        self.proc.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

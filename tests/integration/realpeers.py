"""Helpers that start real Debian mail peers privately, for integration tests.

What this module does
---------------------
Each helper starts one real program from the Debian packages (rsyslog,
Postfix, Postfix's smtp-sink, Dovecot, xinetd, ucspi-tcp's tcpserver,
fetchmail) with a private configuration written under a test's temporary
directory, listening only on 127.0.0.0/8 high ports (or on private
AF_UNIX sockets), and stops it again by its own pid (or its own process
group, whose id is that pid).  Nothing here uses pkill/killall, touches
the system's running services, or listens on a non-loopback address.

One change outside the temporary directories is unavoidable: a non-root
user may only run ``sendmail -C DIR`` when DIR is listed in
``alternate_config_directories`` of the default /etc/postfix/main.cf
(postdrop is setgid and checks it).  :class:`Postfix` adds its directory
there under a file lock and removes it again on ``stop()``.

What it trusts
--------------
* The Debian binaries in /usr/sbin and /usr/bin, and their stock
  configuration files (/etc/postfix is copied, Dovecot's conf.d is not
  used).
* The system users ``nobody``/``nogroup`` (mail uid, smtp-sink user),
  ``postfix``, ``dovecot`` and ``dovenull``.
* That it runs as root for everything but :func:`free_port`,
  :func:`wait_for_port`, :func:`wait_for_path` and :class:`Proc`;
  fixtures call :func:`require_root`.

Missing programs or missing root make a test *skip*, unless the
environment has ``MAILWALL_REQUIRE_REAL=1`` (CI), where they *fail*.

Every wait is a bounded poll loop; every helper has ``stop()`` and is a
context manager.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import grp
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Sequence

import pytest

LOOPBACK = "127.0.0.1"
_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


# --------------------------------------------------------------------------
# Requirements
# --------------------------------------------------------------------------

def _strict() -> bool:
    return os.environ.get("MAILWALL_REQUIRE_REAL") == "1"


def _missing(reason: str) -> None:
    """Fail under MAILWALL_REQUIRE_REAL=1, skip otherwise."""
    if _strict():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def which(name: str) -> str | None:
    """Absolute path of a program: an absolute path that exists, or a name
    found on PATH or in the sbin/bin directories (root's PATH may lack
    /usr/sbin)."""
    if os.path.isabs(name):
        return name if os.access(name, os.X_OK) else None
    found = shutil.which(name)
    if found:
        return found
    return shutil.which(name, path=os.pathsep.join(_SBIN_DIRS))


def require(*binaries: str) -> None:
    """Skip (or fail under MAILWALL_REQUIRE_REAL=1) unless every program is
    installed."""
    for name in binaries:
        if which(name) is None:
            _missing(f"required real component missing: {name}")


def require_root() -> None:
    """Skip (or fail under MAILWALL_REQUIRE_REAL=1) unless running as root."""
    if os.geteuid() != 0:
        _missing("required real component missing: root privileges")


def _bin(name: str) -> str:
    path = which(name)
    if path is None:
        raise FileNotFoundError(name)
    return path


# --------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------

def free_port(host: str = LOOPBACK) -> int:
    """An unused TCP port on host (the kernel picks it: bind to port 0)."""
    _check_loopback(host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_loopback(host: str) -> None:
    if not host.startswith("127.") and host != "::1":
        raise ValueError(f"only 127.0.0.0/8 and ::1 are allowed here, not {host!r}")


def host_port(host: str, port: int) -> str:
    """HOST:PORT, or [V6]:PORT."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def wait_for_port(host: str, port: int, timeout: float = 10) -> None:
    """Poll until a TCP connect to host:port succeeds (bounded)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError as exc:
            last = exc
            time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} not accepting after {timeout}s: {last}")


def listening(host: str, port: int) -> bool:
    """True if a TCP socket is in LISTEN state on host:port (or on
    0.0.0.0:port), from /proc/net/tcp: unlike a test connection this does
    not start a session (and a log line) in the server."""
    if ":" in host:
        return _listening6(host, port)
    want = {socket.inet_aton(host)[::-1].hex().upper(), "00000000"}
    with contextlib.suppress(OSError):
        with open("/proc/net/tcp") as fh:
            next(fh)
            for line in fh:
                f = line.split()
                addr, _, p = f[1].partition(":")
                if f[3] == "0A" and int(p, 16) == port and addr in want:
                    return True
    return False


def _listening6(host: str, port: int) -> bool:
    """listening() for an IPv6 address, from /proc/net/tcp6 (each 32-bit
    word of the address in host byte order)."""
    packed = socket.inet_pton(socket.AF_INET6, host)
    text = "".join(packed[i:i + 4][::-1].hex().upper() for i in range(0, 16, 4))
    want = {text, "0" * 32}
    with contextlib.suppress(OSError):
        with open("/proc/net/tcp6") as fh:
            next(fh)
            for line in fh:
                f = line.split()
                addr, _, p = f[1].partition(":")
                if f[3] == "0A" and int(p, 16) == port and addr in want:
                    return True
    return False


def wait_for_listen(host: str, port: int, timeout: float = 10) -> None:
    """Poll /proc/net/tcp until host:port is listening (bounded); falls
    back to wait_for_port where /proc/net/tcp is unreadable."""
    if not os.path.exists("/proc/net/tcp"):
        return wait_for_port(host, port, timeout)
    wait_until(lambda: listening(host, port), timeout,
               what=f"listener on {host}:{port}")


def wait_for_path(path, timeout: float = 10) -> Path:
    """Poll until path exists (bounded)."""
    path = Path(path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return path
        time.sleep(0.05)
    raise TimeoutError(f"{path} did not appear within {timeout}s")


def wait_until(predicate, timeout: float = 10, interval: float = 0.05,
               what: str = "condition"):
    """Poll predicate() until it returns a true value (bounded); return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not met within {timeout}s")
        time.sleep(interval)


def open_up(path) -> Path:
    """Make path and its ancestors inside the temp dir (mkdtemp/pytest dirs
    are 0700) traversable and readable (o+rx), so daemons' unprivileged
    users (postfix, dovecot, nobody, uucp) can reach into them."""
    path = Path(path).resolve()
    tmp = Path(tempfile.gettempdir()).resolve()
    chain = [path, *path.parents]
    for p in chain:
        if p == tmp or tmp not in p.parents:
            break
        if p.is_dir():
            mode = p.stat().st_mode & 0o7777
            if mode & 0o755 != 0o755:
                os.chmod(p, mode | 0o755)
    return path


def _short_dir(prefix: str) -> Path:
    """A private directory with a short path for AF_UNIX sockets (limit 108
    bytes; pytest's tmp_path is already ~65)."""
    return open_up(Path(tempfile.mkdtemp(prefix=prefix)))


def _ids(user: str, group: str | None = None) -> tuple[int, int]:
    pw = pwd.getpwnam(user)
    gid = grp.getgrnam(group).gr_gid if group else pw.pw_gid
    return pw.pw_uid, gid


def _mkdir(path, mode: int = 0o755, owner: tuple[int, int] | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    if owner is not None:
        os.chown(path, *owner)
    return path


class _Stoppable:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------

class Proc(_Stoppable):
    """A subprocess started from an argv list (never a shell).

    ``new_session=True`` starts it as leader of its own session/process
    group (pgid == pid): ``stop()`` then signals the whole group, which
    also reaches children it forked (perdition sessions, xinetd/tcpserver
    servers).  The leader is not reaped until the group has been signalled,
    so its pid/pgid cannot be reused in between.

    stdout/stderr go to ``log`` (a file path) when given, else /dev/null.
    """

    def __init__(self, argv: Sequence[str], *, new_session: bool = False,
                 log=None, env: dict | None = None, cwd=None,
                 stdin=subprocess.DEVNULL):
        self.argv = [str(a) for a in argv]
        self.new_session = new_session
        self.log = Path(log) if log else None
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        err = subprocess.STDOUT if self.log else subprocess.DEVNULL
        try:
            self.popen = subprocess.Popen(
                self.argv, stdin=stdin, stdout=out, stderr=err, env=env,
                cwd=cwd, start_new_session=new_session, close_fds=True)
        finally:
            if self.log:
                out.close()
        self.pid = self.popen.pid
        self.returncode: int | None = None

    def exited(self) -> bool:
        """True once the process has exited (does not reap it)."""
        if self.returncode is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self.pid,
                             os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    def alive(self) -> bool:
        return not self.exited()

    def output(self) -> str:
        if self.log and self.log.exists():
            return self.log.read_text(errors="replace")
        return ""

    def _kill(self, sig: int) -> None:
        if not self.exited():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def _killpg(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def stop(self, timeout: float = 5) -> int | None:
        """SIGTERM the process, wait (bounded) for it to exit, else SIGKILL;
        with new_session, then SIGTERM and SIGKILL what is left of its
        group; reap it and return its exit status."""
        if self.returncode is not None:
            return self.returncode
        self._kill(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while not self.exited() and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.new_session:
            # the leader is gone but not reaped yet, so its pgid is still
            # ours: clean up the children it left behind
            self._killpg(signal.SIGTERM)
            time.sleep(0.1)
            self._killpg(signal.SIGKILL)
        self._kill(signal.SIGKILL)
        try:
            self.returncode = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # pragma: no cover - D state
            self.returncode = None
        return self.returncode


def _run(argv: Sequence[str], timeout: float = 60, check: bool = True,
         **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in argv], stdin=kw.pop("stdin", subprocess.DEVNULL),
                       capture_output=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{argv} exited {r.returncode}: "
                           f"{r.stdout!r} {r.stderr!r}")
    return r


def as_user(user: str, argv: Sequence[str]) -> list[str]:
    """argv prefixed to run as user (uid and primary gid, no supplementary
    groups) via setpriv."""
    uid, gid = _ids(user)
    return [_bin("setpriv"), f"--reuid={uid}", f"--regid={gid}",
            "--clear-groups", "--", *map(str, argv)]


# --------------------------------------------------------------------------
# rsyslog
# --------------------------------------------------------------------------

class Rsyslog(_Stoppable):
    """rsyslogd on a private AF_UNIX datagram socket ``<tmpdir>/log.sock``
    (mode 0666), writing every message to ``<tmpdir>/messages`` in the
    traditional file format, e.g.
    ``Nov 28 09:01:41 vm test[123]: hello id=X`` (tag and pid kept).
    imuxsock's /dev/log socket is off and rate limiting is disabled."""

    def __init__(self, tmpdir, timeout: float = 10):
        require("rsyslogd")
        self.dir = open_up(_mkdir(Path(tmpdir)))
        self.socket = self.dir / "log.sock"
        self.file = self.dir / "messages"
        self.conf = self.dir / "rsyslog.conf"
        self.pidfile = self.dir / "rsyslogd.pid"
        work = _mkdir(self.dir / "work", 0o700)
        self.conf.write_text(
            f'global(workDirectory="{work}")\n'
            'module(load="imuxsock" SysSock.Use="off")\n'
            f'input(type="imuxsock" Socket="{self.socket}" CreatePath="on" '
            'RateLimit.Interval="0")\n'
            f'*.* action(type="omfile" file="{self.file}" '
            'template="RSYSLOG_TraditionalFileFormat")\n')
        _run([_bin("rsyslogd"), "-N1", "-f", self.conf])
        self.proc = Proc([_bin("rsyslogd"), "-n", "-f", self.conf,
                          "-i", self.pidfile], log=self.dir / "rsyslogd.out")
        try:
            wait_for_path(self.socket, timeout)
            os.chmod(self.socket, 0o666)
        except Exception:
            self.stop()
            raise

    def read(self) -> str:
        try:
            return self.file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def send(self, line: str | bytes) -> None:
        """Send one raw datagram (e.g. ``<22>tag[123]: text``)."""
        data = line.encode() if isinstance(line, str) else line
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(data, str(self.socket))

    def wait_for(self, pattern, timeout: float = 10) -> str:
        """Return the first line containing pattern (str: substring;
        compiled regex: re.search); AssertionError with the file after
        timeout."""
        def match(line):
            if isinstance(pattern, re.Pattern):
                return pattern.search(line)
            return pattern in line
        deadline = time.monotonic() + timeout
        while True:
            for line in self.read().splitlines():
                if match(line):
                    return line
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{pattern!r} not logged within {timeout}s; "
                    f"{self.file}:\n{self.read()}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.stop()


# --------------------------------------------------------------------------
# smtp-sink
# --------------------------------------------------------------------------

class SinkMessage:
    """One smtp-sink dump file, parsed.

    smtp-sink (``-d DIR/%Y%m%d%H%M%S.``) writes one file per transaction,
    named by the strftime template plus a random hex id, holding LF-ended
    lines (CRLF becomes LF; the message is un-dot-stuffed):

    * ``X-Client-Addr: 127.0.0.1``
    * ``X-Client-Proto: ESMTP`` (or SMTP/LMTP)
    * ``X-Helo-Args: <helo name>`` (if HELO/EHLO was sent)
    * ``X-Mail-Args: <sender> [ESMTP params]`` (from Postfix: just
      ``<sender>``)
    * ``X-Rcpt-Args: <rcpt> [params]`` (one per RCPT, in order; Postfix
      sends ``ORCPT=rfc822;rcpt``)
    * ``Received: from helo ([addr])`` + 2 continuation lines
      (``\\tby host (smtp-sink) with ESMTP id HEX;`` and ``\\tDATE``)
    * the message header and body as received, then one extra empty line.

    ``data`` is the message as received (LF line ends, the extra final
    empty line removed); ``raw`` the whole file.
    """

    def __init__(self, path: Path, raw: bytes):
        self.path = path
        self.raw = raw
        lines = raw.split(b"\n")
        self.envelope: list[tuple[str, str]] = []
        i = 0
        while i < len(lines):
            line = lines[i]
            if (line.startswith(b"Received: ") and i + 1 < len(lines)
                    and b"(smtp-sink)" in lines[i + 1]):
                i += 3
                break
            name, _, value = line.partition(b": ")
            self.envelope.append((name.decode(), value.decode(errors="replace")))
            i += 1
        body = b"\n".join(lines[i:])
        if body.endswith(b"\n\n"):
            body = body[:-1]
        self.data = body

    def _args(self, name):
        return [v for k, v in self.envelope if k == name]

    @property
    def mail_from(self) -> str:
        """The sender address of X-Mail-Args, without <> and parameters."""
        return self._args("X-Mail-Args")[0].split()[0].strip("<>")

    @property
    def mail_args(self) -> str:
        return self._args("X-Mail-Args")[0]

    @property
    def rcpt_to(self) -> list[str]:
        return [v.split()[0].strip("<>") for v in self._args("X-Rcpt-Args")]

    @property
    def client_addr(self) -> str:
        return self._args("X-Client-Addr")[0]

    def header(self, name: str) -> list[bytes]:
        """Values of a header of the message itself (unfolded, raw bytes)."""
        head = self.data.split(b"\n\n", 1)[0]
        out, cur = [], None
        for line in head.split(b"\n"):
            if line[:1] in (b" ", b"\t") and cur is not None:
                cur += b" " + line.strip()
                out[-1] = cur
                continue
            k, _, v = line.partition(b":")
            cur = None
            if k.strip().lower() == name.lower().encode():
                cur = v.strip()
                out.append(cur)
        return out

    @property
    def body(self) -> bytes:
        """Message body after the first empty line (LF line ends)."""
        return self.data.split(b"\n\n", 1)[1] if b"\n\n" in self.data else b""


class SmtpSink(_Stoppable):
    """Postfix's ``smtp-sink`` on 127.0.0.1:port (a free port by default),
    storing each transaction as one file in ``.dir`` (see
    :class:`SinkMessage` for the format).  As root it runs with
    ``-u nobody`` and the directory belongs to nobody.

    A dump file is complete once smtp-sink has closed it; completeness is
    checked through /proc/PID/fd, so ``dumps()`` never returns a message
    still being received."""

    def __init__(self, tmpdir, port: int | None = None, host: str = LOOPBACK,
                 user: str = "nobody", extra_args: Sequence[str] = ()):
        require("smtp-sink")
        _check_loopback(host)
        self.host = host
        self.port = port or free_port(host)
        self.root = open_up(_mkdir(Path(tmpdir)))
        self.dir = self.root / "dumps"
        owner = _ids(user) if os.geteuid() == 0 else None
        _mkdir(self.dir, 0o755, owner)
        argv = [_bin("smtp-sink")]
        if os.geteuid() == 0:
            argv += ["-u", user]
        argv += [*extra_args, "-d", f"{self.dir}/%Y%m%d%H%M%S.",
                 host_port(self.host, self.port), "100"]
        self.proc = Proc(argv, log=self.root / "smtp-sink.out")
        try:
            wait_for_listen(self.host, self.port)
        except Exception:
            self.stop()
            raise

    def _open_files(self) -> set[str]:
        fds = Path(f"/proc/{self.proc.pid}/fd")
        out = set()
        with contextlib.suppress(OSError):
            for fd in fds.iterdir():
                with contextlib.suppress(OSError):
                    out.add(os.readlink(fd))
        return out

    def dumps(self) -> list[SinkMessage]:
        """Completed transactions, oldest first."""
        busy = self._open_files() if self.proc.alive() else set()
        files = []
        for p in self.dir.iterdir():
            if p.is_file() and str(p) not in busy:
                st = p.stat()
                files.append((st.st_mtime_ns, p.name, p))
        return [SinkMessage(p, p.read_bytes()) for _, _, p in sorted(files)]

    def messages(self) -> list[bytes]:
        """The received messages (header+body, LF line ends), oldest first."""
        return [m.data for m in self.dumps()]

    def wait_count(self, n: int, timeout: float = 30) -> list[SinkMessage]:
        """Wait until at least n transactions are complete; return them."""
        try:
            return wait_until(lambda: (d := self.dumps()) and len(d) >= n and d,
                              timeout, what=f"{n} messages at smtp-sink")
        except TimeoutError:
            raise AssertionError(
                f"smtp-sink has {len(self.dumps())} of {n} messages after "
                f"{timeout}s") from None

    def stop(self) -> None:
        self.proc.stop()


# --------------------------------------------------------------------------
# Postfix
# --------------------------------------------------------------------------

_ALT_LOCK = "/run/lock/mailwall-postfix-altconf.lock"
_DEFAULT_POSTFIX = "/etc/postfix"


def _age_config(confdir) -> None:
    """Postfix programs sleep (in 300 ms steps) until main.cf/master.cf are
    older than about a second, to avoid reading a half-written file; after
    our own complete rewrites, date them back so that nothing waits."""
    past = time.time() - 60
    for name in ("main.cf", "master.cf"):
        with contextlib.suppress(FileNotFoundError):
            os.utime(Path(confdir) / name, (past, past))


@contextlib.contextmanager
def _altconf_lock():
    os.makedirs(os.path.dirname(_ALT_LOCK), exist_ok=True)
    with open(_ALT_LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _edit_alternate_config_directories(add: str | None = None,
                                       remove: str | None = None) -> None:
    """Add/remove a directory in alternate_config_directories of the default
    main.cf, under a lock (several instances/processes may do this).  Also
    drops entries below the temp dir that no longer exist (left by killed
    runs); other entries are kept."""
    tmp = tempfile.gettempdir().rstrip("/") + "/"
    postconf = _bin("postconf")
    with _altconf_lock():
        cur = _run([postconf, "-c", _DEFAULT_POSTFIX, "-h",
                    "alternate_config_directories"]).stdout.decode()
        entries = [e for e in re.split(r"[\s,]+", cur.strip()) if e]
        keep = [e for e in entries
                if not (e.startswith(tmp) and not os.path.isdir(e))
                and e != remove]
        if add and add not in keep:
            keep.append(add)
        if keep == entries:
            return
        if keep:
            _run([postconf, "-c", _DEFAULT_POSTFIX, "-e",
                  "alternate_config_directories=" + ", ".join(keep)])
        else:
            _run([postconf, "-c", _DEFAULT_POSTFIX, "-X",
                  "alternate_config_directories"])
        _age_config(_DEFAULT_POSTFIX)


class Postfix(_Stoppable):
    """A private Postfix instance that relays everything to
    [127.0.0.1]:relay_port (an :class:`SmtpSink`, say).

    * config: a copy of /etc/postfix in ``<tmpdir>/conf`` (``.confdir``),
      changed with ``postconf -c``: own queue (a short /tmp/mwpf-* dir,
      removed on stop, so AF_UNIX socket paths stay short) and data dir,
      ``inet_interfaces=loopback-only``, ``inet_protocols=ipv4``,
      ``mydestination=`` (nothing is local), ``relayhost``, no chroot, and
      every ``inet`` service removed from master.cf (nothing listens on
      port 25 or any other TCP port);
    * log: ``maillog_file=<tmpdir>/maillog`` (``.maillog()``), no syslog;
    * ``.confdir`` is added to ``alternate_config_directories`` of
      /etc/postfix/main.cf (and removed on stop) so that non-root users
      such as uucp may run ``sendmail -C confdir`` (postdrop, setgid
      postdrop, checks that list).

    Submit with ``.sendmail_argv() + ['-bm', '-oi', '-f', SENDER, '--',
    RCPT...]`` (from root or any user, e.g. uucp).

    What Postfix 3.7 changes, as seen at smtp-sink (checked by
    tests/integration/test_realpeers.py):

    * the body arrives byte-identical for LF-ended input: lines "." and
      "..", 8-bit bytes and multi-MB messages (up to
      ``message_size_limit``, 10240000 by default);
    * it prepends ``Received: by HOST (Postfix, from userid UID)`` /
      ``\tid QUEUEID; DATE`` and, when missing, appends to the header
      ``Message-Id: <DATE.QUEUEID@HOST>``, ``Date: ...`` and
      ``From: GECOS <sender>`` (local submission); no ``To:``, no
      ``Return-Path``;
    * CRLF-ended input arrives like LF-ended input (sendmail drops the CR
      before LF); a lone CR inside a line arrived at smtp-sink as a space
      (which of the two converts it is not established); a missing final
      newline
      is added; lines over 998 bytes are broken with CRLF SPACE
      (``smtp_line_length_limit``);
    * the envelope goes out as ``MAIL FROM:<sender>`` and
      ``RCPT TO:<rcpt> ORCPT=rfc822;rcpt``; without ``-C`` listed in
      alternate_config_directories a non-root sendmail exits 75 with
      "unauthorized configuration directory name".
    """

    def __init__(self, tmpdir, relay_port: int, relay_host: str = LOOPBACK,
                 settings: dict | None = None, timeout: float = 30):
        require("postfix", "postconf", "sendmail", "postqueue")
        require_root()
        _check_loopback(relay_host)
        self.root = open_up(_mkdir(Path(tmpdir)))
        self.confdir = self.root / "conf"
        if self.confdir.exists():
            shutil.rmtree(self.confdir)
        shutil.copytree(_DEFAULT_POSTFIX, self.confdir)
        open_up(self.confdir)
        self.queue = _short_dir("mwpf-")
        self.data = _mkdir(self.root / "data", 0o700, _ids("postfix"))
        self.maillog_path = self.root / "maillog"
        self.name = "postfix-" + self.queue.name.replace("_", "-")
        self._started = False
        prefixes = ["/var", "/dev/stdout", "/tmp"]
        tmp = tempfile.gettempdir()
        if tmp not in prefixes:
            prefixes.append(tmp)
        conf = {
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mydestination": "",
            "relayhost": f"[{relay_host}]:{relay_port}",
            "multi_instance_name": self.name,
            "syslog_name": self.name,
            "maillog_file_prefixes": ", ".join(prefixes),
            "maillog_file": str(self.maillog_path),
            "alternate_config_directories": "",
            "multi_instance_directories": "",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
        }
        conf.update(settings or {})
        pc = _bin("postconf")
        _run([pc, "-c", self.confdir, "-e",
              *(f"{k}={v}" for k, v in conf.items())])
        _age_config(self.confdir)
        # nothing listens on TCP; nothing chroots (the queue is private)
        for line in _run([pc, "-c", self.confdir, "-M"]).stdout.decode().splitlines():
            f = line.split()
            if len(f) >= 2 and f[1] == "inet":
                _run([pc, "-c", self.confdir, "-MX", f"{f[0]}/{f[1]}"])
                _age_config(self.confdir)
        _run([pc, "-c", self.confdir, "-F", "*/*/chroot=n"])
        _age_config(self.confdir)
        try:
            _edit_alternate_config_directories(add=str(self.confdir))
            _run([_bin("postfix"), "-c", self.confdir, "check"], timeout=timeout)
            _run([_bin("postfix"), "-c", self.confdir, "start"], timeout=timeout)
            self._started = True
            wait_for_path(self.queue / "pid" / "master.pid", timeout)
            wait_for_path(self.queue / "public" / "pickup", timeout)
        except Exception:
            self.stop()
            raise

    def sendmail_argv(self) -> list[str]:
        """['/usr/sbin/sendmail', '-C', confdir]: append e.g.
        ['-bm', '-oi', '-f', sender, '--', *rcpts]."""
        return [_bin("sendmail"), "-C", str(self.confdir)]

    def sendmail(self, message: bytes, sender: str, rcpts: Iterable[str],
                 user: str | None = None, timeout: float = 60
                 ) -> subprocess.CompletedProcess:
        """Submit message via sendmail -C (as user, e.g. 'uucp', if given)."""
        argv = self.sendmail_argv() + ["-bm", "-oi", "-f", sender, "--", *rcpts]
        if user:
            argv = as_user(user, argv)
        return _run(argv, timeout=timeout, check=False, input=message,
                    stdin=None)

    def flush(self) -> None:
        """Retry deferred mail now (postfix -c DIR flush)."""
        _run([_bin("postfix"), "-c", self.confdir, "flush"])

    def queue_empty(self) -> bool:
        out = _run([_bin("postqueue"), "-c", self.confdir, "-p"], check=False)
        return b"Mail queue is empty" in out.stdout

    def wait_queue_empty(self, timeout: float = 30) -> None:
        wait_until(self.queue_empty, timeout, 0.2, "empty Postfix queue")

    def maillog(self) -> str:
        try:
            return self.maillog_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _master_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.queue / "pid" / "master.pid").read_text().split()[0])
        return None

    def stop(self, timeout: float = 20) -> None:
        if self._started:
            pid = self._master_pid()
            _run([_bin("postfix"), "-c", self.confdir, "stop"],
                 timeout=timeout, check=False)
            if pid:
                # `postfix stop` signals master and returns; wait for it
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline and _pid_alive(pid):
                    time.sleep(0.05)
                if _pid_alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            self._started = False
        _edit_alternate_config_directories(remove=str(self.confdir))
        shutil.rmtree(self.queue, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive for our purposes
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


# --------------------------------------------------------------------------
# Dovecot
# --------------------------------------------------------------------------

class Dovecot(_Stoppable):
    """A standalone Dovecot POP3 server (not Debian's conf.d, which turns on
    TLS) on listen:port (free port by default), plaintext allowed, with
    ``auth_mechanisms = plain apop``, a passwd-file of ``{PLAIN}`` secrets
    (APOP needs them), a static userdb (uid nobody, Maildir in
    ``<tmpdir>/mail/USER``), ``first_valid_uid = 1`` and
    ``mail_max_userip_connections = 1000``.  Logs go to ``.log_path``.
    Several instances may run at once (own ports / addresses; base_dir is
    a short /tmp/mwdc-* dir, removed on stop)."""

    MAIL_USER = "nobody"

    def __init__(self, tmpdir, users: dict | None = None, port: int | None = None,
                 listen: str = LOOPBACK, timeout: float = 15):
        require("dovecot")
        require_root()
        _check_loopback(listen)
        self.users = dict(users if users is not None else {"alice": "alicesecret"})
        self.host = listen
        self.port = port or free_port(listen)
        self.root = open_up(_mkdir(Path(tmpdir)))
        self.mail = _mkdir(self.root / "mail", 0o755)
        self.base_dir = _short_dir("mwdc-")
        state = _mkdir(self.root / "state", 0o755)
        self.log_path = self.root / "dovecot.log"
        self.uid, self.gid = _ids(self.MAIL_USER)
        for user in self.users:
            self.maildir(user)
        passwd = self.root / "users"
        passwd.write_text("".join(f"{u}:{{PLAIN}}{s}\n"
                                  for u, s in self.users.items()))
        os.chown(passwd, 0, grp.getgrnam("dovecot").gr_gid)
        os.chmod(passwd, 0o640)
        self.conf = self.root / "dovecot.conf"
        self.conf.write_text(f"""\
protocols = pop3
listen = {listen}
base_dir = {self.base_dir}
state_dir = {state}
instance_name = {self.base_dir.name}
log_path = {self.log_path}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain apop
mail_location = maildir:{self.mail}/%u
first_valid_uid = 1
first_valid_gid = 1
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd}
}}
userdb {{
  driver = static
  args = uid={self.MAIL_USER} gid={grp.getgrgid(self.gid).gr_name} home={self.mail}/%u
}}
protocol pop3 {{
  mail_max_userip_connections = 1000
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {listen}
    port = {self.port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
""")
        self.proc = Proc([_bin("dovecot"), "-F", "-c", self.conf],
                         new_session=True, log=self.root / "dovecot.out")
        try:
            wait_for_listen(self.host, self.port, timeout)
        except Exception:
            out = self.proc.output() + self.read_log()
            self.stop()
            raise RuntimeError(f"dovecot did not start: {out}")

    def maildir(self, user: str) -> Path:
        md = self.mail / user
        for sub in ("", "cur", "new", "tmp"):
            _mkdir(md / sub, 0o700, (self.uid, self.gid))
        return md

    _seq = 0

    def deliver(self, user: str, message: bytes) -> Path:
        """Put message into user's Maildir new/ (owned by nobody).  CRLF line
        ends are stored as LF (the Maildir convention).  Dovecot sends it
        with CRLF line ends, dot-stuffed, and counts those CRLF octets in
        STAT/LIST; poplib's ``b"\\n".join(retr(n)[1]) + b"\\n"`` gives
        back the LF-ended message."""
        md = self.maildir(user)
        Dovecot._seq += 1
        data = message.replace(b"\r\n", b"\n")
        name = f"{int(time.time())}.M{Dovecot._seq}P{os.getpid()}.mailwall,S={len(data)}"
        tmp = md / "tmp" / name
        tmp.write_bytes(data)
        os.chown(tmp, self.uid, self.gid)
        os.chmod(tmp, 0o600)
        final = md / "new" / name
        os.rename(tmp, final)
        return final

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        self.proc.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)


# --------------------------------------------------------------------------
# inetd-style launchers
# --------------------------------------------------------------------------

class Xinetd(_Stoppable):
    """xinetd in the foreground with a private config: a ``defaults {}``
    block (log to ``<tmpdir>/xinetd.log``) plus service_text.  Waits for
    every ``port = N`` in service_text (or for ``ports``).  Build a
    service with :meth:`service`."""

    def __init__(self, tmpdir, service_text: str, ports: Iterable[int] | None = None,
                 host: str = LOOPBACK, timeout: float = 10):
        require("xinetd")
        _check_loopback(host)
        self.root = open_up(_mkdir(Path(tmpdir)))
        self.conf = self.root / "xinetd.conf"
        self.pidfile = self.root / "xinetd.pid"
        self.log_path = self.root / "xinetd.log"
        self.conf.write_text(
            "defaults\n{\n"
            f"\tlog_type = FILE {self.log_path}\n"
            "\tlog_on_success = PID HOST EXIT DURATION\n"
            "\tlog_on_failure = HOST\n"
            "}\n\n" + service_text)
        self.ports = list(ports) if ports is not None else [
            int(p) for p in re.findall(r"^\s*port\s*=\s*(\d+)", service_text, re.M)]
        self.proc = Proc([_bin("xinetd"), "-dontfork", "-f", self.conf,
                          "-pidfile", self.pidfile],
                         new_session=True, log=self.root / "xinetd.out")
        try:
            for port in self.ports:
                wait_for_listen(host, port, timeout)
        except Exception:
            out = self.proc.output()
            self.stop()
            raise RuntimeError(f"xinetd did not start: {out}")

    @staticmethod
    def service(name: str, port: int, server: str, server_args: str = "",
                user: str = "root", bind: str = LOOPBACK, extra: str = "") -> str:
        """Text of an UNLISTED stream service on bind:port."""
        _check_loopback(bind)
        args = f"\tserver_args = {server_args}\n" if server_args else ""
        return (f"service {name}\n{{\n\ttype = UNLISTED\n\tport = {port}\n"
                f"\tsocket_type = stream\n\tprotocol = tcp\n\twait = no\n"
                f"\tbind = {bind}\n\tuser = {user}\n\tserver = {server}\n"
                f"{args}{extra}}}\n")

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        self.proc.stop()


class Tcpserver(_Stoppable):
    """ucspi-tcp's ``tcpserver -R -H -l 0 [-c N] [-u UID -g GID] HOST PORT
    argv...``: runs argv per connection with the socket as stdin/stdout
    (and TCPREMOTEIP etc. in the environment).  Its error messages go to
    ``.log_path``."""

    def __init__(self, tmpdir, argv: Sequence[str], port: int | None = None,
                 host: str = LOOPBACK, user: str | None = None,
                 limit: int = 40, options: Sequence[str] = (),
                 env: dict | None = None, timeout: float = 10):
        require("tcpserver")
        _check_loopback(host)
        self.root = open_up(_mkdir(Path(tmpdir)))
        self.host = host
        self.port = port or free_port(host)
        self.log_path = self.root / "tcpserver.log"
        cmd = [_bin("tcpserver"), "-R", "-H", "-l", "0", "-c", str(limit)]
        if user:
            uid, gid = _ids(user)
            cmd += ["-u", str(uid), "-g", str(gid)]
        cmd += [*options, host, str(self.port), *argv]
        self.proc = Proc(cmd, new_session=True, log=self.log_path, env=env)
        try:
            wait_for_listen(host, self.port, timeout)
        except Exception:
            out = self.proc.output()
            self.stop()
            raise RuntimeError(f"tcpserver did not start: {out}")

    def stop(self) -> None:
        self.proc.stop()


# --------------------------------------------------------------------------
# fetchmail
# --------------------------------------------------------------------------

_fetch_seq = 0


def fetchmail_apop(tmpdir, host: str, port: int, user: str, secret: str,
                   timeout: float = 60, invisible: bool = True,
                   extra_options: str = "") -> tuple[int, list[bytes]]:
    """Run fetchmail once (protocol APOP, ``keep``, no TLS) against
    host:port; return (exit code, messages in fetch order).

    Each call works in a fresh ``<tmpdir>/fetchmail-N`` (FETCHMAILHOME, id
    file and pid/lock file there: its UIDL list starts empty, so every
    kept message is fetched again, and concurrent runs do not collide).
    The mda writes each message to its own numbered file; messages are
    as fetchmail hands them to an mda: LF line ends, un-dot-stuffed, and
    with ``invisible`` (default) no Received header of its own.
    Exit codes: 0 mail fetched, 1 no mail, 3 authentication failed, ...
    (see fetchmail(1)).  The transcript (-v) is in ``fetchmail.out``."""
    require("fetchmail")
    _check_loopback(host)
    global _fetch_seq
    _fetch_seq += 1
    work = _mkdir(Path(tmpdir) / f"fetchmail-{_fetch_seq}", 0o700)
    out = _mkdir(work / "out", 0o700)
    for ch in "\"'\\ ":
        if ch in str(out) or ch in user or ch in secret:
            raise ValueError("unquotable character in fetchmail settings")
    me = pwd.getpwuid(os.geteuid()).pw_name
    rc = work / "fetchmailrc"
    mda = (f"/bin/sh -c 'n=$(ls {out} | wc -l); "
           f"cat > {out}/$(printf %06d $n).msg'")
    rc.write_text(
        f"poll {host} with protocol APOP port {port} timeout 10:\n"
        f'  user "{user}" there with password "{secret}" is {me} here\n'
        f"  sslproto '' keep mda \"{mda}\" {extra_options}\n")
    os.chmod(rc, 0o600)
    env = dict(os.environ, FETCHMAILHOME=str(work), HOME=str(work))
    with open(work / "fetchmail.out", "wb") as log:
        argv = [_bin("fetchmail"), "-f", str(rc), "-v", "-N", "--nosyslog",
                "-i", str(work / "fetchids"),
                # as root the lock is /var/run/fetchmail.pid otherwise, which
                # makes concurrent runs exit 8 ("another fetchmail running")
                "--pidfile", str(work / "fetchmail.pid")]
        if invisible:
            argv.append("--invisible")
        r = subprocess.run(argv,
                           stdin=subprocess.DEVNULL, stdout=log,
                           stderr=subprocess.STDOUT, env=env, timeout=timeout)
    msgs = [p.read_bytes() for p in sorted(out.iterdir())]
    return r.returncode, msgs


# --------------------------------------------------------------------------
# HAProxy (issue 16: the PROXY protocol)
# --------------------------------------------------------------------------

class HAProxy(_Stoppable):
    """Debian's HAProxy in TCP mode with a private configuration: one
    frontend per entry of ``frontends``, ``{name: (bind host, [(host,
    port), ...], "send-proxy" | "send-proxy-v2"[, extra server options])}``
    (``"check inter 1s"``: health checks, which carry a v2 LOCAL or a v1
    UNKNOWN header), each balancing its
    servers round robin, connecting to them from ``source`` (the address
    the servers see: their proxy-hosts).  ``.ports[name]`` is a frontend's
    port; ``.config`` the file, ``.output()`` its stdout (one tcplog line a
    connection).  Checked with ``haproxy -c`` before it starts; started in
    the foreground (``-db``) and stopped by pid."""

    def __init__(self, tmpdir, frontends: dict, source: str = "127.0.0.8"):
        require("haproxy")
        _check_loopback(source)
        self.root = _mkdir(Path(tmpdir))
        self.ports = {}
        lines = ["global", "    log stdout format raw local0 info", "defaults",
                 "    mode tcp", "    log global", "    option tcplog",
                 "    timeout connect 5s", "    timeout client 120s",
                 "    timeout server 120s"]
        for name, (bind, servers, send, *extra) in frontends.items():
            _check_loopback(bind)
            if send not in ("send-proxy", "send-proxy-v2"):
                raise ValueError(send)
            self.ports[name] = free_port(bind)
            lines += [f"frontend {name}", f"    bind {host_port(bind, self.ports[name])}",
                      f"    default_backend be_{name}", f"backend be_{name}",
                      "    balance roundrobin", f"    source {source}"]
            for number, (host, port) in enumerate(servers, 1):
                _check_loopback(host)
                lines.append(f"    server s{number} {host_port(host, port)} {send}"
                             + "".join(f" {option}" for option in extra))
        self.config = self.root / "haproxy.cfg"
        self.config.write_text("\n".join(lines) + "\n")
        checked = _run([_bin("haproxy"), "-c", "-f", self.config], check=False)
        if checked.returncode != 0:
            raise RuntimeError(f"haproxy -c: {checked.stdout!r} {checked.stderr!r}")
        self.proc = Proc([_bin("haproxy"), "-f", self.config, "-db"],
                         log=self.root / "haproxy.out")
        try:
            for name, (bind, *_) in frontends.items():
                wait_for_listen(bind, self.ports[name])
        except Exception:
            out = self.proc.output()
            self.stop()
            raise RuntimeError(f"haproxy did not start: {out}")

    def output(self) -> str:
        return self.proc.output()

    def stop(self) -> None:
        self.proc.stop()

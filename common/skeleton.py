"""The shared process skeleton: inetd mode and the forking --daemon mode.

inetd mode: the client is on fd 0 and fd 1, and fd 2 is very often the same
socket, so fd 2 is pointed at /dev/null before anything can write to it.
Daemon, the forking accept loop (pop3-gw's, which hands each connection
to a session pair forked ahead): listen, fork one child per connection,
make the connection the child's fd 0/1 and run exactly the inetd-mode
path; the parent reaps its children, bounds their number and answers
SIGTERM (stop accepting) and SIGHUP (the program's reload hook).  smap's
--daemon uses common.workers instead (pre-forked, reused processes).  The skeleton trusts its caller's
handler to drop privileges; it never does work for a client itself.
What can fail at start-up here (listen, the pid file, detaching) raises
cli.StartupError with a one-line reason.
"""

import _socket
import errno
import os
import select
import sys

from common import cli

# `signal` and `socket` (both build enums at import) are imported only by
# the --daemon code below: smap under inetd starts a fresh interpreter for
# every connection and does not need them.

_title = None


def set_title(text):
    """setproctitle when available (it is a dependency; tests may lack it)."""
    global _title
    if _title is None:
        _title = _title_function()
    if _title:
        _title(text)


def _title_function():
    """setproctitle's C function.  Its package __init__ (1.3.x) imports
    `logging` only to report a missing C module, about 9 ms at every smap
    start under inetd, so the extension is loaded by itself when it is where
    that package keeps it; otherwise (an older single-module setproctitle,
    say) by a plain import.  False when there is none."""
    if "setproctitle" not in sys.modules:
        try:
            # importlib.machinery re-exports these from the import system's
            # own modules, which are always loaded; importing the package
            # `importlib` (and `warnings`) for them would cost 0.4 ms
            from _frozen_importlib import ModuleSpec
            from _frozen_importlib_external import EXTENSION_SUFFIXES, ExtensionFileLoader
        except ImportError:  # pragma: no cover - another Python implementation
            from importlib.machinery import EXTENSION_SUFFIXES, ExtensionFileLoader, ModuleSpec
        for entry in sys.path:
            for suffix in EXTENSION_SUFFIXES:
                path = os.path.join(entry or ".", "setproctitle", "_setproctitle" + suffix)
                if not os.path.isfile(path):
                    continue
                try:
                    loader = ExtensionFileLoader("setproctitle._setproctitle", path)
                    spec = ModuleSpec(loader.name, loader, origin=path)
                    module = loader.create_module(spec)
                    loader.exec_module(module)
                    return module.setproctitle
                except (ImportError, AttributeError, OSError):
                    break
    try:
        from setproctitle import setproctitle
    except ImportError:  # pragma: no cover - the package is installed
        return False
    return setproctitle


def silence_stderr():
    """fd 2 → /dev/null: under inetd it is the client's socket."""
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 2)
    if devnull != 2:
        os.close(devnull)
    sys.stderr = open(os.devnull, "w")


def peer_of_fd(fd=0):
    """A socket object on a dup of fd when fd is a socket, else None."""
    duplicate = os.dup(fd)
    try:
        return _socket.socket(fileno=duplicate)
    except OSError:
        os.close(duplicate)     # a pipe (swaks --pipe): do not leak the dup
        return None


def listen(host, port, backlog=128, name=None):
    """A listening socket on host:port; StartupError `NAME: reason` when the
    address is busy or not ours (name: what the administrator typed)."""
    import socket
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listener = socket.socket(family, socket.SOCK_STREAM)
    except OSError as err:
        raise cli.StartupError("%s: %s" % (name or host, err.strerror or err)) from None
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # `[::]:PORT` is dual stack whatever net.ipv6.bindv6only says; an
            # IPv4 client then arrives as ::ffff:a.b.c.d, which
            # hostmatch.normalize_address makes the IPv4 address it is
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind((host, port))
        listener.listen(backlog)
    except OSError as err:
        listener.close()
        where = name or ("[%s]:%d" % (host, port) if family == socket.AF_INET6
                         else "%s:%d" % (host, port))
        raise cli.StartupError("%s: %s" % (where, err.strerror or err)) from None
    return listener


class Signals:
    """The signals a long-lived poll/select loop answers, one helper for
    every such loop (the pop3-gw and smap daemons, smapd's scanner and
    agent).  `handlers`: {signal number: a function of no arguments, None
    to do nothing but wake the loop, or signal.SIG_IGN}.  Every caught
    signal also writes to a non-blocking pipe (signal.set_wakeup_fd) whose
    read end, fileno(), the loop watches, so that it wakes at once instead
    of at its next timeout; drain() empties that pipe.  SIGCHLD with None
    wakes a loop that reaps (reap_children)."""

    def __init__(self, handlers):
        import signal
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        signal.set_wakeup_fd(self.write_fd)
        for signum, handler in handlers.items():
            signal.signal(signum, _signal_handler(handler))

    def fileno(self):
        return self.read_fd

    def drain(self):
        drain(self.read_fd)

    def close(self):
        """The loop is over: no wakeup fd any more, the pipe closed."""
        import signal
        signal.set_wakeup_fd(-1)
        self.close_in_child()

    def close_in_child(self):
        """In a forked child (after reset_child_signals): the pipe closed."""
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def _signal_handler(handler):
    if handler is None:
        return lambda signum, frame: None
    if not callable(handler) or isinstance(handler, int):
        return handler              # signal.SIG_IGN or SIG_DFL
    return lambda signum, frame: handler()


def drain(fd):
    """Read and drop everything a non-blocking descriptor holds now (a
    signal pipe, smapd's trigger FIFO); never waits."""
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def take_client(fd):
    """Make fd the connection on fds 0 and 1 (inetd's layout), then close fd."""
    os.dup2(fd, 0)
    os.dup2(fd, 1)
    if fd > 1:
        os.close(fd)


def release_client(devnull=None):
    """Point fds 0 and 1 at /dev/null: this process is done with its
    client's connection (or never had one), and whatever still writes or
    reads there must not reach a client or block.  A jailed process has no
    /dev/null: it passes a descriptor on it opened before the jail."""
    fd = os.open(os.devnull, os.O_RDWR) if devnull is None else devnull
    os.dup2(fd, 0)
    os.dup2(fd, 1)
    if devnull is None and fd > 1:
        os.close(fd)


def accept(listener, log):
    """The next connection on listener, or None when there is none after all
    (another process took it, or the client went away); other errors are
    logged."""
    try:
        conn, _ = listener.accept()
    except OSError as err:
        if err.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EINTR):
            log.error("accept", reason=err.strerror)
        return None
    return conn


def refuse(conn, reply):
    """Answer a connection that will not be served, never blocking, and close it."""
    try:
        conn.setblocking(False)
        conn.send(reply)
    except OSError:
        pass
    conn.close()


def reap_children(ended):
    """ended(pid, wait status) for each child that has ended (never waits);
    False when the process has no child left at all."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True
        ended(pid, status)


def reset_child_signals():
    """In a freshly forked child: the parent's signal handlers and wakeup fd off."""
    import signal
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)


def run_child(body):
    """In a forked child: run body() and leave with its status (None is 0,
    an exception 1); never returns into the parent's code."""
    status = 1
    try:
        status = body() or 0
    except SystemExit as done:
        status = done.code if isinstance(done.code, int) else 0
    except BaseException:
        status = 1
    finally:
        os._exit(status)


class Daemon:
    """A forking accept loop (pop3-gw's --daemon): run() answers SIGTERM and
    SIGINT (stop accepting), SIGHUP (the program's reload hook) and SIGCHLD
    (reap: `children` are the pids it counts against `maxchildren`), and
    calls accept_one() whenever the listener is readable; the subclass
    accepts there and decides who serves the connection."""

    def __init__(self, listener, log, maxchildren, busy_reply=b"",
                 on_reload=None, title="daemon", more_listeners=()):
        self.listener = listener
        # pop3-gw: --daemon and --tls-daemon in one process; accept_one(listener)
        self.listeners = [listener] + list(more_listeners)
        self.log = log
        self.maxchildren = maxchildren
        self.busy_reply = busy_reply
        self.on_reload = on_reload
        self.title = title
        self.children = set()
        self.stopping = False
        self.reload = False
        self.signals = None

    def stop(self):
        self.stopping = True

    def ask_reload(self):
        self.reload = True

    def reap(self):
        if self.children and not reap_children(lambda pid, status: self.children.discard(pid)):
            self.children.clear()

    def run(self):
        import signal
        self.signals = Signals({signal.SIGTERM: self.stop, signal.SIGINT: self.stop,
                                signal.SIGHUP: self.ask_reload, signal.SIGCHLD: None})
        set_title(self.title)
        try:
            while not self.stopping:
                self.reap()
                if self.reload:
                    self.reload = False
                    if self.on_reload:
                        self.on_reload()
                try:
                    ready, _, _ = select.select(self.listeners + [self.signals], [], [], 5.0)
                except InterruptedError:
                    continue
                if self.signals in ready:
                    self.signals.drain()
                for listener in self.listeners:
                    if listener in ready and not self.stopping:
                        self.accept_one(listener)
        finally:
            self.signals.close()
            for listener in self.listeners:
                listener.close()
        self.log.info("stop", children=len(self.children))

    def accept_one(self, listener):
        raise NotImplementedError


# Set by daemonize: stderr is /dev/null from then on, so cli.program logs a
# start-up failure instead (to detached_log, or to syslog's default socket).
detached = False
detached_log = None


def daemonize(pidfile=None, keep_fds=(), logger=None):
    """Detach with python-daemon (imported only here: inetd mode never pays
    for it).  What would make it fail after the fork, where no one sees
    stderr (a pid file held by a running process, or one that cannot be
    made), is checked before, as StartupError; a failure of its own is
    StartupError too, and logged when it comes after the fork."""
    global detached, detached_log
    import daemon
    import daemon.pidfile
    if pidfile:
        check_pidfile(pidfile)
        _probe_directory(pidfile)
    context = daemon.DaemonContext(
        working_directory="/", umask=0o022, detach_process=True,
        files_preserve=list(keep_fds),
        pidfile=daemon.pidfile.TimeoutPIDLockFile(pidfile) if pidfile else None,
        signal_map={})
    before = os.getpid()
    try:
        context.open()
    except Exception as err:    # noqa: BLE001  (python-daemon's and lockfile's own classes)
        reason = "cannot detach: %s" % cli.describe(err)
        if os.getpid() != before:
            detached, detached_log = True, logger
        raise cli.StartupError(reason) from None
    detached, detached_log = True, logger
    return context


def check_pidfile(path):
    """StartupError when the pid file names a live process other than this
    one; a stale or unreadable-as-a-number one is removed."""
    try:
        with open(path) as existing:
            text = existing.read(64).strip()
    except FileNotFoundError:
        return
    except OSError as err:
        raise cli.StartupError("%s: %s" % (path, err.strerror)) from None
    other = int(text) if text.isdigit() and text.isascii() else 0
    if other and other != os.getpid():
        try:
            os.kill(other, 0)
        except ProcessLookupError:
            pass
        except PermissionError:     # alive, another user's
            raise cli.StartupError("%s: already running as pid %d" % (path, other)) from None
        else:
            raise cli.StartupError("%s: already running as pid %d" % (path, other))
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise cli.StartupError("%s: %s" % (path, err.strerror)) from None


def _probe_directory(path):
    """StartupError unless a file can be made beside `path` (its directory
    exists, is one and is writable)."""
    probe = "%s.%d" % (path, os.getpid())
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))
        os.unlink(probe)
    except OSError as err:
        raise cli.StartupError("%s: %s" % (path, err.strerror)) from None


def write_pidfile(path):
    """Write our pid (foreground mode); StartupError naming the pid and the
    file if a live process holds it, or when it cannot be written."""
    check_pidfile(path)
    temporary = "%s.%d" % (path, os.getpid())
    try:
        with open(temporary, "w") as out:
            out.write("%d\n" % os.getpid())
        os.rename(temporary, path)
    except OSError as err:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise cli.StartupError("%s: %s" % (path, err.strerror)) from None

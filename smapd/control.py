"""smapd's start-up sequence, its single-instance lock, the pid file,
`--flush` and the `-q` queue listing.

Start-up (as root): check the table, make the spool, take the lock
`.smapd.lock` (a second smapd on the same spool refuses to run),
daemonise unless -F/--once, write the pid file `.smapd.pid` in the spool,
warm up everything the jailed scanner needs, fork the delivery agent
(setuid `userid`, no chroot), open the trigger FIFO, then chroot to the
spool and drop to `userid` and run the scanner.  No process keeps root.

The pid file lives in the spool (`DIRECTORY/.smapd.pid`): one per spool,
so several smapd on several spools do not collide, and the jailed scanner
can remove it when it stops.  Because the spool belongs to `userid`,
`--flush` does not trust the file blindly: it signals the pid only while
the lock is held and when /proc says the process is an smapd.
"""

import fcntl
import os
import signal
import socket
import sys
import time

from common import log, privs, skeleton, spool
from smapd import agent, bounce, checks, scan, state

PROGRAM = "smapd"
PIDFILE = ".smapd.pid"


class AlreadyRunning(Exception):
    pass


def take_lock(directory):
    """The open, flocked lock file; AlreadyRunning if another smapd holds it."""
    fd = os.open(os.path.join(directory, spool.LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning("another smapd is running on %s" % directory) from None
    return fd


def lock_is_held(directory):
    try:
        fd = take_lock(directory)
    except AlreadyRunning:
        return True
    except OSError:
        return False
    os.close(fd)
    return False


def write_pidfile(directory):
    path = os.path.join(directory, PIDFILE)
    temporary = "%s.%d" % (path, os.getpid())
    with open(temporary, "w") as out:
        out.write("%d\n" % os.getpid())
    os.rename(temporary, path)


def read_pid(directory):
    try:
        with open(os.path.join(directory, PIDFILE)) as source:
            return int(source.read(32).strip())
    except (OSError, ValueError):
        return None


def flush(config, stream):
    """--flush: SIGUSR1 to the running smapd; 0 when sent, 1 otherwise."""
    directory = config.get("directory")
    pid = read_pid(directory)
    if pid is None or not lock_is_held(directory):
        stream.write("smapd: not running on %s\n" % directory)
        return 1
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as source:
            is_smapd = b"smapd" in source.read(4096)
    except OSError:
        is_smapd = False
    if not is_smapd:
        stream.write("smapd: pid %d in %s is not smapd\n" % (pid, PIDFILE))
        return 1
    os.kill(pid, signal.SIGUSR1)
    return 0


def listing(config, stream):
    """-q: the queue like mailq (id, age, size, sender, attempts, error, recipients)."""
    directory = config.get("directory")
    names = spool.queued(directory)
    now = time.time()
    if not names:
        stream.write("Mail queue is empty\n")
        return 0
    stream.write("%-24s %8s %9s  %s\n" % ("Queue ID", "Age", "Size", "Sender / Recipients"))
    for name in names:
        try:
            fd = os.open(os.path.join(directory, spool.QUEUE, name), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            envelope, _, length = spool.locate(fd)
        except (spool.SpoolError, OSError) as err:
            stream.write("%-24s %8s %9s  (unreadable: %s)\n" % (name, "-", "-", err))
            continue
        finally:
            os.close(fd)
        record = state.load(directory, name)
        stream.write("%-24s %8s %9d  <%s> attempts=%d\n" % (
            name, age_text(now - envelope["arrival"]), length, envelope["sender"],
            record.attempts))
        if record.last_error:
            stream.write("%44s(%s)\n" % ("", record.last_error[:200]))
        closed = set(record.done)
        for recipient in envelope["rcpt"]:
            mark = " (delivered)" if recipient in closed else ""
            stream.write("%44s<%s>%s\n" % ("", recipient, mark))
    stream.write("-- %d message%s\n" % (len(names), "" if len(names) == 1 else "s"))
    return 0


def age_text(seconds):
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return "%d%s" % (seconds // size, unit)
    return "%ds" % seconds


def jailed_path(path, directory, jailed):
    """path as the scanner sees it; None when it lies outside a chroot."""
    if not jailed:
        return path
    relative = os.path.relpath(path, directory)
    if relative == ".." or relative.startswith("../"):
        return None
    return os.path.normpath(os.path.join("/", relative))


def warm_up():
    """Everything the jailed scanner needs, loaded before the chroot."""
    bounce.warm_up()
    checks.problem_of({"sender": "a@example.org", "rcpt": ["postmaster"]},
                      b"From: a@example.org\r\nTo: b@example.org\r\n\r\nx\r\n")
    checks.shorten(b"From: a@b.example.org\r\n\r\n", ["example.org"])
    agent.decode_result(agent.encode_result("0000", [("a@b", "ok", "x")]))
    time.localtime()
    time.strftime("%b %d %H:%M:%S")
    skeleton.set_title("smapd: starting")     # setproctitle sets itself up from /proc
    return socket.getfqdn()


def start(config, options, stderr):
    """Run smapd; returns the exit status of the scanner."""
    directory = config.get("directory")
    uid, gid, user = privs.user_and_group(config)
    root = os.geteuid() == 0
    baddir = config.get("baddir") or os.path.join(directory, spool.BAD)
    if root and jailed_path(baddir, directory, True) is None:
        stderr.write("smapd: baddir %s must lie inside the spool %s\n" % (baddir, directory))
        return 1
    echo = stderr if options.foreground and stderr.isatty() else None
    logger = log.Log(PROGRAM, config.get("logfacility"), config.get("logsocket"), echo)
    spool.make_dirs(directory, uid if root else None, gid)
    if not os.path.isdir(baddir):
        os.makedirs(baddir, 0o700)
        if root:
            os.chown(baddir, uid, gid)
    if root:
        os.chown(directory, uid, gid)
    try:
        lock_fd = take_lock(directory)
    except AlreadyRunning as err:
        stderr.write("smapd: %s\n" % err)
        logger.error("refuse", reason=str(err))
        return 1
    once = "--once" in options.flags
    if not options.foreground and not once:
        keep = [lock_fd] + ([logger.sock.fileno()] if logger.sock else [])
        skeleton.daemonize(keep_fds=keep)
    if not once:
        write_pidfile(directory)
    reporting_mta = warm_up()
    scanner_end, agent_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(lock_fd)
            scanner_end.close()
            privs.drop(directory, uid, gid, chroot=False)
            os.chdir("/")
            status = agent.Agent(agent_end, config, logger, reporting_mta).run()
        except BaseException as err:      # the agent must never unwind into the scanner's code
            logger.error("agent-fatal", reason=str(err))
        finally:
            os._exit(status)
    agent_end.close()
    trigger = os.open(os.path.join(directory, spool.TRIGGER), os.O_RDWR | os.O_NONBLOCK)
    jailed = privs.drop(directory, uid, gid)
    if not jailed:
        logger.warning("unprivileged", user=user,
                       reason="not started as root: no chroot, no setuid")
    base = "/" if jailed else directory
    logger.info("start", directory=directory, agent=pid, once="yes" if once else None)
    scanner = scan.Scanner(base, config, logger, scanner_end, trigger, reporting_mta,
                           jailed_path(baddir, directory, jailed), once)
    status = scanner.run()
    scanner_end.close()         # the agent lets its workers finish, then exits
    if once:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    elif read_pid(base) == os.getpid():
        try:
            os.unlink(os.path.join(base, PIDFILE))
        except OSError:
            pass
    return status

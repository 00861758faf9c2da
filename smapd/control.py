"""smapd's start-up sequence, its single-instance lock, the pid file,
and `--flush` (the `-q` listing and queue control are smapd.queuectl).

Start-up (as root): check the table; make the spool, its subdirectories,
baddir and the trigger FIFO and give them to `userid`; take the lock
`.smapd.lock` (a second smapd on the same spool refuses to run) and open
the trigger FIFO; daemonise unless -F/--once; warm up everything the
jailed scanner needs, fork the delivery agent (setuid `userid`, no
chroot), then chroot to the spool and drop to `userid`, write the pid file
`.smapd.pid` and run the scanner.  No process keeps root.

The spool belongs to `userid`, so whatever root does there goes through
descriptors and never follows a link (common.fsguard, DESIGN §12.6): a
link, a hard link, another type or a foreign owner where the spool's own
entries should be makes smapd refuse to start with one line `PATH:
reason`.  The pid file is written by the scanner after the drop, with
`userid`'s rights only.

The pid file lives in the spool (`DIRECTORY/.smapd.pid`): one per spool,
so several smapd on several spools do not collide, and the jailed scanner
can remove it when it stops.  Because the spool belongs to `userid`,
`--flush` does not trust the file blindly: it reads it without following
a link and signals the pid only while the lock is held and when /proc says
the process is an smapd.
"""

import fcntl
import os
import signal
import socket
import time

from common import fsguard, log, privs, skeleton, spool
from smapd import agent, bounce, checks, metrics, prober, scan

PROGRAM = "smapd"
PIDFILE = ".smapd.pid"


class AlreadyRunning(Exception):
    pass


def spool_owners(uid):
    """Who may own the spool and what root opens in it: root, userid, and
    the invoking user when not started as root."""
    return tuple(sorted({0, uid} | set(fsguard.trusted_owners())))


def take_lock(dir_fd, directory, owners):
    """The open, flocked lock file in the spool (dir_fd); AlreadyRunning if
    another smapd holds it.  Opened without following a link and refused
    (fsguard.UnsafePath) unless it is a regular file of owners' with one
    link: uucp could have put a hard link to a file of root's there."""
    fd = fsguard.open_regular(dir_fd, spool.LOCK, os.O_RDWR | os.O_CREAT, 0o600, owners,
                              shown=os.path.join(directory, spool.LOCK))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning("another smapd is running on %s" % directory) from None
    return fd


def lock_is_held(dir_fd, directory, owners):
    try:
        fd = take_lock(dir_fd, directory, owners)
    except AlreadyRunning:
        return True
    except (OSError, fsguard.UnsafePath):
        return False
    os.close(fd)
    return False


def write_pidfile(base):
    """Write base/.smapd.pid (temporary name, then rename).  Called by the
    scanner after it dropped to userid: the spool is that user's, so the
    file is made with that user's rights only; a link or a stale file
    planted at the temporary name is removed, never followed."""
    path = os.path.join(base, PIDFILE)
    temporary = "%s.%d" % (path, os.getpid())
    try:
        os.unlink(temporary)
    except FileNotFoundError:
        pass
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    try:
        os.write(fd, b"%d\n" % os.getpid())
    finally:
        os.close(fd)
    os.rename(temporary, path)


def read_pid(dir_fd, owners):
    """The pid in the spool's pid file (dir_fd), or None.  Root reads it
    from a directory that uucp writes: a regular file of owners' with one
    link, opened without following a link or blocking, read bounded."""
    try:
        fd = fsguard.open_regular(dir_fd, PIDFILE, os.O_RDONLY, owners=owners)
    except (OSError, fsguard.UnsafePath):
        return None
    try:
        return int(os.read(fd, 32).strip())
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def flush(config, stream):
    """--flush: SIGUSR1 to the running smapd; 0 when sent, 1 otherwise."""
    directory = config.get("directory")
    uid, _, _ = privs.user_and_group(config)
    owners = spool_owners(uid)
    try:
        dir_fd = fsguard.open_directory(directory, owners=owners)
    except fsguard.UnsafePath as err:
        stream.write("smapd: %s\n" % (("not running on %s" % directory) if err.missing else err))
        return 1
    try:
        pid = read_pid(dir_fd, owners)
        running = pid is not None and lock_is_held(dir_fd, directory, owners)
    finally:
        os.close(dir_fd)
    if not running:
        stream.write("smapd: not running on %s\n" % directory)
        return 1
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as source:
            is_smapd = b"smapd" in source.read(4096)
    except OSError:
        is_smapd = False
    # The pid file and the lock are uucp's to forge: signal only a process
    # that runs as the scanner does (userid), which uucp could signal itself,
    # never a process of root's that happens to have "smapd" in its name.
    scanner_uid = uid if os.geteuid() == 0 else os.geteuid()
    if not is_smapd or process_uids(pid) != {scanner_uid}:
        stream.write("smapd: pid %d in %s is not smapd\n" % (pid, PIDFILE))
        return 1
    os.kill(pid, signal.SIGUSR1)
    return 0


def process_uids(pid):
    """The set of a process's real, effective, saved and file-system uids
    (empty when it cannot be read)."""
    try:
        with open("/proc/%d/status" % pid, "rb") as source:
            for line in source.read(8192).split(b"\n"):
                if line.startswith(b"Uid:"):
                    return {int(word) for word in line.split()[1:5]}
    except (OSError, ValueError):
        pass
    return set()


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


def make_baddir(dir_fd, directory, baddir, uid, gid):
    """Make baddir (inside the spool) component by component under the
    spool's descriptor, each a directory of root's or uid's reached without
    a link and given to uid:gid; raises fsguard.UnsafePath."""
    relative = os.path.relpath(os.path.normpath(baddir), directory)
    if relative == ".." or relative.startswith("../"):
        # only when not started as root (start refuses it otherwise): the
        # invoking user's own directories, nobody's privileges at stake
        os.makedirs(baddir, 0o700, exist_ok=True)
        return
    fd = os.dup(dir_fd)
    shown = directory
    try:
        for part in [] if relative == "." else relative.split("/"):
            shown = os.path.join(shown, part)
            next_fd = fsguard.ensure_directory(fd, part, 0o700, uid, gid, shown=shown)
            os.close(fd)
            fd = next_fd
    finally:
        os.close(fd)


def prepare_spool(directory, baddir, uid, gid, root):
    """Everything smapd does in the spool before the drop, on descriptors:
    make it (spool.open_spool), give it to uid when root, make baddir, take
    the lock and open the trigger FIFO.  Returns (lock fd, trigger fd);
    raises fsguard.UnsafePath (`PATH: reason`) or AlreadyRunning."""
    owners = spool_owners(uid)
    dir_fd = spool.open_spool(directory, uid if root else None, gid, own_top=root)
    try:
        make_baddir(dir_fd, directory, baddir, uid if root else None, gid)
        lock_fd = take_lock(dir_fd, directory, owners)
        try:
            # read and write: the FIFO never sees end of file while smapd runs
            trigger = fsguard.open_fifo(dir_fd, spool.TRIGGER, os.O_RDWR, owners,
                                        shown=os.path.join(directory, spool.TRIGGER))
        except BaseException:
            os.close(lock_fd)
            raise
        return lock_fd, trigger
    finally:
        os.close(dir_fd)


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
    try:
        lock_fd, trigger = prepare_spool(directory, baddir, uid, gid, root)
        # the metrics file's directory, opened now: the scanner writes there from its jail
        target = metrics.prepare(config.get("metrics-file"), uid, gid, root)
    except fsguard.UnsafePath as err:
        stderr.write("smapd: %s\n" % err)     # one line, as common.cli.program writes them
        logger.error("refuse", reason=str(err))
        return 1
    except (AlreadyRunning, OSError) as err:
        reason = str(err) if isinstance(err, AlreadyRunning) else \
            "%s: %s" % (directory, err.strerror or err)
        stderr.write("smapd: %s\n" % reason)
        logger.error("refuse", reason=reason)
        return 1
    once = "--once" in options.flags
    if not options.foreground and not once:
        keep = [lock_fd, trigger] + ([logger.sock.fileno()] if logger.sock else []) \
            + ([target.dir_fd] if target else [])
        skeleton.daemonize(keep_fds=keep)
    reporting_mta = warm_up()
    scanner_end, agent_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(lock_fd)
            os.close(trigger)
            if target:
                target.close()
            scanner_end.close()
            privs.drop(directory, uid, gid, chroot=False)
            os.chdir("/")
            status = agent.Agent(agent_end, config, logger, reporting_mta).run()
        except BaseException as err:      # the agent must never unwind into the scanner's code
            logger.error("agent-fatal", reason=str(err))
        finally:
            os._exit(status)
    agent_end.close()
    # issue 14: the recipient prober, beside the agent (smapd.prober); it ends with the scanner
    verification = None if once else prober.settings_of(config, reporting_mta)
    if verification is not None:
        prober.start(verification, logger, directory, uid, gid,
                     close=(lock_fd, trigger, scanner_end.fileno()))
    jailed = privs.drop(directory, uid, gid)
    if not jailed:
        logger.warning("unprivileged", user=user,
                       reason="not started as root: no chroot, no setuid")
    base = "/" if jailed else directory
    if not once:
        try:
            write_pidfile(base)         # as userid, in its own spool
        except OSError as err:
            logger.error("pidfile", reason="%s: %s" % (os.path.join(directory, PIDFILE),
                                                         err.strerror or err))
    logger.info("start", directory=directory, agent=pid, once="yes" if once else None)
    jailed_baddir = jailed_path(baddir, directory, jailed)
    counting = metrics.Metrics(target, base, jailed_baddir, directory, logger) if target else None
    scanner = scan.Scanner(base, config, logger, scanner_end, trigger, reporting_mta,
                           jailed_baddir, once, metrics=counting)
    status = scanner.run()
    scanner_end.close()         # the agent lets its workers finish, then exits
    if once:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    else:
        remove_pidfile(base)
    return status


def remove_pidfile(base):
    """The scanner's last act: remove the pid file if it is still its own."""
    try:
        dir_fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        if read_pid(dir_fd, spool_owners(os.geteuid())) == os.getpid():
            os.unlink(PIDFILE, dir_fd=dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)

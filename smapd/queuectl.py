"""Queue control, like Postfix's postsuper and postqueue (issue 16, DESIGN §12.4):
`smapd --hold ID…`, `--release ID…`, `--delete ID…`, `--requeue ID…`,
and the queue listing `smapd -q` (with `--json`: one object per message).

A message on hold lives in hold/ID instead of queue/ID: the scanner only
looks at queue/, so it is neither delivered nor expired nor bounced until
`--release` renames it back.  Its delivery state (state/ID) stays where
it is; `held-since` records when it was held, and at the release the time
on hold is added to `held-seconds`, which smapd.decide does not count
towards `maxage` (Postfix keeps counting; an administrator who holds a
suspect message over a weekend expects it to be tried when released, not
bounced at once).  `--release` and `--requeue` clear the retry time and
wake the scanner through the trigger FIFO.

Against a running smapd: the scanner delivers a message only while it
holds an exclusive flock on its open spool file and re-checks the name
after locking (smapd.scan.claim).  Every command here takes the same lock
without waiting, re-checks the name after locking, and does its one
rename or unlink while it holds the lock.  A locked message is being
delivered: it is reported busy and left alone (the administrator tries
again).  A message is at every instant in exactly one of queue/ and hold/,
so two commands that race (hold and deliver, delete and release) each
find it where the other left it, or not at all: none is lost or doubled.

What it trusts: nothing in the spool.  The spool is uucp's, so a command
started as root first does what `-q` always did: the same chroot and drop
to `userid` as the scanner (common.privs), and only then touches the
spool, through descriptors of queue/ and hold/ opened without following a
link.  A link uucp planted where a message or the hold directory should
be then leads at worst to uucp's own files inside the jail.  Queue ids
from the command line are checked strictly (common.spool.valid_id): a
path such as `../x` or `/etc/passwd` is refused before anything is
opened.  The syslog socket is opened before the drop.
"""

import errno
import fcntl
import json
import os
import stat
import sys
import time

from common import cli, fsguard, log, privs, spool
from smapd import state

PROGRAM = "smapd"
COMMANDS = ("--hold", "--release", "--delete", "--requeue")
FLAGS = frozenset(COMMANDS + ("--json",))
LONG_OPTIONS = ["hold", "release", "delete", "requeue", "json"]
DONE_WORDS = {"--hold": "held", "--release": "released", "--delete": "deleted",
              "--requeue": "requeued"}
MAX_IDS = 10000         # ids one command takes (the argv limit would allow more)
MAX_ROUNDS = 4          # lookups of one id that another command keeps moving


class Refused(Exception):
    """One id could not be acted on; the text says why."""


class Unchanged(Exception):
    """Nothing to do for one id (already on hold, already queued): not a failure."""


def spool_owners(uid):
    return tuple(sorted({0, uid} | set(fsguard.trusted_owners())))


def run(config, options, stdout=sys.stdout, stderr=sys.stderr):
    """The entry point for the flags in FLAGS (and -q); the exit status."""
    chosen = [flag for flag in COMMANDS if flag in options.flags]
    listing_asked = bool(options.flags & {"-q", "--queue"})
    if "--json" in options.flags and not listing_asked:
        raise cli.UsageError("--json goes with -q")
    if listing_asked:
        if chosen:
            raise cli.UsageError("-q and %s do not go together" % chosen[0])
        if options.args:
            raise cli.UsageError("unexpected argument %s" % options.args[0])
        return listing(config, stdout, stderr, as_json="--json" in options.flags)
    if len(chosen) > 1:
        raise cli.UsageError("give one of %s" % ", ".join(COMMANDS))
    command = chosen[0]
    if not options.args:
        raise cli.UsageError("%s needs at least one queue id" % command)
    if len(options.args) > MAX_IDS:
        raise cli.UsageError("at most %d queue ids at once" % MAX_IDS)
    return control(config, command, options.args, stdout, stderr)


def enter_spool(config, errors):
    """Jail and drop as the scanner does; the spool's path as seen now, or
    None (the reason written to errors)."""
    directory = config.get("directory")
    uid, gid, _ = privs.user_and_group(config)
    try:
        os.close(fsguard.open_directory(directory, owners=spool_owners(uid)))
        jailed = privs.drop(directory, uid, gid)
    except fsguard.UnsafePath as err:
        errors.write("smapd: %s\n" % (("no spool at %s" % directory) if err.missing else err))
        return None
    except (OSError, privs.PrivilegeError) as err:
        errors.write("smapd: %s: %s\n" % (directory, getattr(err, "strerror", None) or err))
        return None
    return "/" if jailed else directory


# -- the commands ---------------------------------------------------------------

def control(config, command, ids, stdout, stderr):
    invoker = os.getuid()
    logger = log.Log(PROGRAM, config.get("logfacility"), config.get("logsocket"))
    base = enter_spool(config, stderr)
    if base is None:
        return 1
    try:
        spool_dir = Spool(base)
    except Refused as why:
        stderr.write("smapd: %s\n" % why)
        return 1
    failed = done = 0
    seen = set()
    try:
        for message_id in ids:
            if message_id in seen:
                continue
            seen.add(message_id)
            try:
                if not spool.valid_id(message_id):
                    raise Refused("not a queue id")
                detail = ACTIONS[command](spool_dir, message_id)
            except Unchanged as why:
                stderr.write("smapd: %s: %s\n" % (message_id, why))
                continue
            except Refused as why:
                failed += 1
                stderr.write("smapd: %s: %s\n" % (log.clean(message_id)[:80], why))
                if spool.valid_id(message_id):
                    logger.warning(command[2:], id=message_id, uid=invoker, reason=str(why))
                continue
            done += 1
            logger.notice(command[2:], id=message_id, uid=invoker, **detail)
    finally:
        spool_dir.close()
    if done and command in ("--release", "--requeue"):
        spool.poke(base)
    stdout.write("smapd: %s %d message%s\n" % (DONE_WORDS[command], done,
                                              "" if done == 1 else "s"))
    return 1 if failed else 0


class Spool:
    """Descriptors of queue/ and hold/ inside the (jailed) spool."""

    def __init__(self, base):
        self.base = base
        self.queue = self.open_directory(spool.QUEUE, make=False)
        self.hold = self.open_directory(spool.HOLD, make=False)

    def open_directory(self, name, make):
        path = os.path.join(self.base, name)
        if make:
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
        try:
            return os.open(path, fsguard.DIRECTORY_FLAGS)
        except FileNotFoundError:
            return None
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENOTDIR):
                raise Refused("%s/ is not a directory (a link?)" % name) from None
            raise Refused("%s/: %s" % (name, err.strerror)) from None

    def hold_directory(self):
        if self.hold is None:
            self.hold = self.open_directory(spool.HOLD, make=True)
        return self.hold

    def directory(self, where):
        return self.queue if where == spool.QUEUE else self.hold

    def close(self):
        for fd in (self.queue, self.hold):
            if fd is not None:
                os.close(fd)
        self.queue = self.hold = None

    def claim(self, where, name):
        """(fd, info) of where/name, flocked; None when it is not there.
        Raises Refused for a busy message or one that is not a message."""
        dir_fd = self.directory(where)
        if dir_fd is None:
            return None
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise Refused("%s/%s is a symbolic link, not a message" % (where, name)) from None
            raise Refused("%s/%s: %s" % (where, name, err.strerror)) from None
        try:
            opened = os.fstat(fd)
            if not stat.S_ISREG(opened.st_mode):
                raise Refused("%s/%s is not a regular file" % (where, name))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Refused("busy: being delivered now; try again") from None
            try:
                named = os.lstat(name, dir_fd=dir_fd)
            except FileNotFoundError:
                named = None
            if named is None or (named.st_dev, named.st_ino) != (opened.st_dev, opened.st_ino):
                os.close(fd)        # moved or removed while we locked it: look again
                return False
            return fd
        except BaseException:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
            raise

    def find(self, name, places):
        """(where, locked fd) of the message in one of places; Refused if none."""
        for _ in range(MAX_ROUNDS):
            moved = False
            for where in places:
                fd = self.claim(where, name)
                if fd is False:
                    moved = True
                    break
                if fd is not None:
                    return where, fd
            if not moved:
                break
        raise Refused("no such message" if not moved else "it keeps moving; try again")

    def in_the_way(self, where, name):
        dir_fd = self.directory(where)
        if dir_fd is None:
            return False
        try:
            os.lstat(name, dir_fd=dir_fd)
        except FileNotFoundError:
            return False
        return True

    def move(self, name, source, target):
        """Rename source/name to target/name, made durable; never over something."""
        if self.in_the_way(target, name):
            raise Refused("%s/%s is in the way" % (target, name))
        os.rename(name, name, src_dir_fd=self.directory(source),
                  dst_dir_fd=self.directory(target))
        os.fsync(self.directory(target))
        os.fsync(self.directory(source))


def envelope_fields(fd):
    try:
        envelope, _, length = spool.locate(fd)
    except (spool.SpoolError, OSError):
        return {}
    return {"from": "<%s>" % envelope["sender"], "nrcpt": len(envelope["rcpt"]),
            "size": length}


def hold(spool_dir, name):
    spool_dir.hold_directory()
    if spool_dir.in_the_way(spool.HOLD, name) and not spool_dir.in_the_way(spool.QUEUE, name):
        raise Unchanged("already on hold")
    where, fd = spool_dir.find(name, (spool.QUEUE,))
    try:
        if spool_dir.in_the_way(spool.HOLD, name):
            raise Refused("hold/%s is in the way" % name)
        record = state.load(spool_dir.base, name)
        record.held_since = time.time()
        state.save(spool_dir.base, name, record)
        spool_dir.move(name, spool.QUEUE, spool.HOLD)
        return envelope_fields(fd)
    finally:
        os.close(fd)


def release(spool_dir, name):
    if spool_dir.in_the_way(spool.QUEUE, name) and not spool_dir.in_the_way(spool.HOLD, name):
        raise Unchanged("not on hold")
    where, fd = spool_dir.find(name, (spool.HOLD,))
    try:
        if spool_dir.in_the_way(spool.QUEUE, name):
            raise Refused("queue/%s is in the way" % name)
        record = state.load(spool_dir.base, name)
        now = time.time()
        held = max(0.0, now - record.held_since) if record.held_since else 0.0
        record.held_seconds = min(spool.MAX_TIME, record.held_seconds + held)
        record.held_since = 0.0
        record.next_try = 0.0
        state.save(spool_dir.base, name, record)
        spool_dir.move(name, spool.HOLD, spool.QUEUE)
        return dict(envelope_fields(fd), held=int(held))
    finally:
        os.close(fd)


def delete(spool_dir, name):
    where, fd = spool_dir.find(name, (spool.QUEUE, spool.HOLD))
    try:
        detail = envelope_fields(fd)
        record = state.load(spool_dir.base, name)
        dir_fd = spool_dir.directory(where)
        os.unlink(name, dir_fd=dir_fd)
        os.fsync(dir_fd)
        state.remove(spool_dir.base, name)
        if record.done:
            detail["delivered"] = len(record.done)
        return dict(detail, queue=where)
    finally:
        os.close(fd)


def requeue(spool_dir, name):
    if spool_dir.in_the_way(spool.HOLD, name) and not spool_dir.in_the_way(spool.QUEUE, name):
        raise Refused("on hold: --release it")
    where, fd = spool_dir.find(name, (spool.QUEUE,))
    try:
        record = state.load(spool_dir.base, name)
        record.next_try = 0.0
        state.save(spool_dir.base, name, record)
        return {}
    finally:
        os.close(fd)


ACTIONS = {"--hold": hold, "--release": release, "--delete": delete, "--requeue": requeue}


# -- the listing ----------------------------------------------------------------

def entries(base, now):
    """One dict per message of queue/ and hold/ (see `as_object`)."""
    for where, names in ((spool.QUEUE, spool.queued(base)), (spool.HOLD, spool.held(base))):
        for name in names:
            yield read_entry(base, where, name, now)


def read_entry(base, where, name, now):
    entry = {"id": name, "queue": where, "held": where == spool.HOLD}
    try:
        fd = os.open(os.path.join(base, where, name),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)   # a FIFO must not hang -q
    except OSError as err:
        entry["error"] = err.strerror or str(err)
        return entry
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise spool.SpoolError("not a regular file")
        envelope, _, length = spool.locate(fd)
    except (spool.SpoolError, OSError) as err:
        entry["error"] = str(err)
        return entry
    finally:
        os.close(fd)
    record = state.load(base, name)
    delivered = set(record.done)
    failed = dict(record.failed)
    recipients = []
    for recipient in envelope["rcpt"]:
        if recipient in delivered:
            recipients.append({"address": recipient, "state": "delivered"})
        elif recipient in failed:
            recipients.append({"address": recipient, "state": "failed",
                               "reason": failed[recipient]})
        else:
            recipients.append({"address": recipient, "state": "pending"})
    entry.update({
        "sender": envelope["sender"], "recipients": recipients, "size": length,
        "arrival_time": int(envelope["arrival"]),
        "age": max(0, int(now - envelope["arrival"])),
        "attempts": record.attempts,
        "next_retry": int(record.next_try) if record.next_try and where == spool.QUEUE else None,
        "last_error": record.last_error or None})
    if record.held_since and where == spool.HOLD:
        entry["held_since"] = int(record.held_since)
    return entry


def listing(config, stream, errors=sys.stderr, as_json=False):
    """-q: the queue like mailq (a `!` after the id marks a held message,
    as Postfix's mailq does); with as_json one JSON object a line.  Made
    after the same jail and drop as the scanner's (started as root)."""
    directory = config.get("directory")
    uid, _, _ = privs.user_and_group(config)
    try:
        os.close(fsguard.open_directory(directory, owners=spool_owners(uid)))
    except fsguard.UnsafePath as err:
        if err.missing:
            if not as_json:
                stream.write("Mail queue is empty\n")
            return 0
        errors.write("smapd: %s\n" % err)
        return 1
    base = enter_spool(config, errors)
    if base is None:
        return 1
    now = time.time()
    if as_json:
        for entry in entries(base, now):
            stream.write(json.dumps(entry, sort_keys=True) + "\n")
        return 0
    count = 0
    for entry in entries(base, now):
        if not count:
            stream.write("%-24s %8s %9s  %s\n" % ("Queue ID", "Age", "Size",
                                                  "Sender / Recipients"))
        count += 1
        shown = entry["id"] + ("!" if entry["held"] else "")
        if "error" in entry:
            stream.write("%-24s %8s %9s  (unreadable: %s)\n" % (shown, "-", "-", entry["error"]))
            continue
        stream.write("%-24s %8s %9d  <%s> attempts=%d%s\n" % (
            shown, age_text(entry["age"]), entry["size"], entry["sender"],
            entry["attempts"], " (on hold)" if entry["held"] else ""))
        if entry["last_error"]:
            stream.write("%44s(%s)\n" % ("", entry["last_error"][:200]))
        for recipient in entry["recipients"]:
            mark = " (delivered)" if recipient["state"] == "delivered" else ""
            stream.write("%44s<%s>%s\n" % ("", recipient["address"], mark))
    if not count:
        stream.write("Mail queue is empty\n")
        return 0
    stream.write("-- %d message%s\n" % (count, "" if count == 1 else "s"))
    return 0


def age_text(seconds):
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return "%d%s" % (seconds // size, unit)
    return "%ds" % seconds

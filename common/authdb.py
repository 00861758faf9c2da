"""The APOP user database of pop3-gw and authmgr (DESIGN §8).

One text file, owned by root and mode 0600 (APOP needs the secret itself, so
the file's permissions are its only protection).  A header line, then one
user a line, fields separated by a TAB:

    name  flags  secret  bad  locked-until  last-login  full-name

`flags` is `enabled` or `disabled`; `secret` and `full-name` are
percent-encoded so that any character survives; `last-login` is a Unix
time (0: never).  `bad` and `locked-until` stay for compatibility and are
always 0 from now on: earlier versions counted bad logins and locked the
account there, which let anyone lock a user out; pop3-gw now counts bad
logins per source address (pop3gw.penalty), and a good login, `authmgr
enable` or `authmgr password` clears what an old version left.

Writers (authmgr, and the root side of each pop3-gw session noting a good
login) take an exclusive fcntl lock on the side file `PATH.lock`,
re-read the file, change it, write `PATH.tmp.PID` (0600, fsync) and rename
it over PATH, then fsync the directory: readers never see half a file and
two writers never lose each other's change.  Readers need no lock.

The file holds secrets that root acts on, so it is used only when it and
every directory above it are root's alone (common.fsguard: no link on the
way, a regular file owned by root, mode 0600, in directories no one else
may write); the lock file and the temporary file are opened relative to
that directory, never through a link.  The content is trusted only as far
as `parse` checks it.
"""

import contextlib
import fcntl
import os
import re
import time
import urllib.parse

from common import fsguard

HEADER = "# mailwall pop3-gw APOP users, version 1: edit with authmgr, not by hand"
MAX_FILE_BYTES = 16 << 20
MAX_SECRET = 255
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+\-]{0,63}")


class AuthDbError(Exception):
    """The database cannot be used (unreadable, unsafe or malformed)."""


def valid_name(name):
    return NAME.fullmatch(name) is not None


def valid_secret(secret):
    return 0 < len(secret) <= MAX_SECRET and all(32 <= ord(c) != 127 for c in secret)


class User:
    __slots__ = ("name", "enabled", "secret", "bad", "locked_until", "last_login", "fullname")

    def __init__(self, name, enabled=True, secret="", bad=0, locked_until=0, last_login=0,
                 fullname=""):
        self.name, self.enabled, self.secret = name, enabled, secret
        self.bad, self.locked_until, self.last_login = bad, locked_until, last_login
        self.fullname = fullname

    def locked(self, now):
        return self.locked_until > now

    def line(self):
        return "\t".join([
            self.name, "enabled" if self.enabled else "disabled",
            urllib.parse.quote(self.secret, safe=""), str(self.bad),
            str(self.locked_until), str(self.last_login),
            urllib.parse.quote(self.fullname, safe="")])


def parse(text, path="authfile"):
    """{name: User} from the file's text; AuthDbError names the bad line."""
    users = {}
    for number, line in enumerate(text.split("\n"), 1):
        if not line or line.startswith("#"):
            continue
        fields = line.split("\t")
        where = "%s:%d" % (path, number)
        if len(fields) != 7:
            raise AuthDbError("%s: %d fields, not 7" % (where, len(fields)))
        name, flags, secret, bad, locked, last, fullname = fields
        if not valid_name(name):
            raise AuthDbError("%s: bad user name" % where)
        if flags not in ("enabled", "disabled"):
            raise AuthDbError("%s: bad flags %r" % (where, flags))
        try:
            numbers = [int(value, 10) for value in (bad, locked, last)]
        except ValueError:
            raise AuthDbError("%s: bad number" % where) from None
        if any(value < 0 for value in numbers):
            raise AuthDbError("%s: negative number" % where)
        if name in users:
            raise AuthDbError("%s: user %s listed twice" % (where, name))
        users[name] = User(name, flags == "enabled", urllib.parse.unquote(secret, errors="strict"),
                           numbers[0], numbers[1], numbers[2],
                           urllib.parse.unquote(fullname, errors="replace"))
    return users


def format_users(users):
    return HEADER + "\n" + "".join(users[name].line() + "\n" for name in sorted(users))


def check_file(info, path):
    """Refuse a file others may touch: the secrets are in clear."""
    try:
        fsguard.check_trusted_file(info, path, secret=True)
    except fsguard.UnsafePath as err:
        raise AuthDbError(str(err)) from None


def load(path):
    """(users, identity) from path; a missing file is an empty database."""
    try:
        fd = fsguard.open_trusted_file(os.path.abspath(path), secret=True)
    except fsguard.UnsafePath as err:
        if err.missing:
            return {}, None
        raise AuthDbError(str(err)) from None
    except OSError as err:
        raise AuthDbError("cannot open %s: %s" % (path, err.strerror)) from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        data = handle.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise AuthDbError("%s is larger than %d bytes" % (path, MAX_FILE_BYTES))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthDbError("%s is not UTF-8 text" % path) from None
    return parse(text, path), identity(info)


def identity(info):
    """What changes whenever the file is replaced or rewritten."""
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def open_directory_of(path):
    """The directory of the db, opened without links and checked like the
    file's (root's alone): the lock and the temporary file live in it."""
    try:
        return fsguard.open_directory(os.path.dirname(os.path.abspath(path)),
                                      writable_last=False)
    except fsguard.UnsafePath as err:
        raise AuthDbError(str(err)) from None


@contextlib.contextmanager
def locked(path):
    """An exclusive lock for writers, on PATH.lock (PATH itself is replaced),
    opened in the db's own directory without following a link."""
    dir_fd = open_directory_of(path)
    try:
        name = os.path.basename(path) + ".lock"
        try:
            fd = fsguard.open_regular(dir_fd, name, os.O_RDWR | os.O_CREAT, 0o600,
                                      shown=path + ".lock")
        except fsguard.UnsafePath as err:
            raise AuthDbError(str(err)) from None
    finally:
        os.close(dir_fd)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write(path, users):
    """Replace path atomically with users (call with the lock held)."""
    replace_file(path, format_users(users).encode("utf-8"))


def replace_file(path, data):
    """Replace a root-only file beside the db (the db itself, its penalty
    state) with data: a temporary file made O_EXCL in the checked directory,
    mode 0600, fsync'ed and renamed over path, then the directory fsync'ed;
    never through a link.  Call with the file's lock held."""
    dir_fd = open_directory_of(path)
    name = os.path.basename(path)
    temporary = "%s.tmp.%d" % (name, os.getpid())
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fchmod(handle.fileno(), 0o600)
                os.fsync(handle.fileno())
            os.rename(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=dir_fd)
            raise
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def update(path, change):
    """Lock, re-read, change(users) (it may raise to change nothing), write.
    Returns what change returned."""
    with locked(path):
        users, _ = load(path)
        result = change(users)
        write(path, users)
        return result


def record_login(path, name, now=None):
    """Note a good login of name: the last-login time, and the bad-login
    count and lock of earlier versions cleared.  Bad logins are never
    written here (pop3gw.penalty counts them per source address): a user's
    entry is not something an attacker can change.  Returns the user's
    record after the change, or None if unknown."""
    now = int(time.time() if now is None else now)

    def change(users):
        user = users.get(name)
        if user is None:
            return None
        user.bad, user.locked_until, user.last_login = 0, 0, now
        return user
    return update(path, change)


class Cache:
    """The daemon's copy of the database: `refresh()` (cheap: one stat) reloads
    it when the file changed; `reload()` always does (SIGHUP)."""

    def __init__(self, path):
        self.path = path
        self.users = {}
        self.identity = "never loaded"
        self.error = None

    def reload(self):
        try:
            self.users, self.identity = load(self.path)
            self.error = None
        except AuthDbError as err:
            self.users, self.identity, self.error = {}, "unusable", str(err)
        return self.error

    def forget(self):
        """Drop the users (keep knowing which file was seen): a process that
        forks jailed children should not hand them the secrets."""
        self.users = {}
        self.identity = "forgotten"

    def refresh(self):
        """Reload if the file is not the one loaded; returns True if it reloaded."""
        try:
            current = identity(os.stat(self.path))
        except OSError:
            current = None
        if current == self.identity and self.error is None:
            return False
        self.reload()
        return True

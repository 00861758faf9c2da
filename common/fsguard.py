"""File operations of a root process near directories that others can write
(DESIGN §12.6).

A root process must never follow a link, nor trust an owner, in a directory
that a less privileged user can write: uucp owns the spool, and a path
there that root opens, creates or chowns by name could have been replaced
by a link to /etc/shadow a moment before.  So everything here works on
descriptors:

* `open_directory(path)` walks from "/" one component at a time with
  openat(O_NOFOLLOW | O_DIRECTORY): no link is followed anywhere on the way.
  Every directory before the last must be owned by a trusted user (root,
  and the invoking user when not started as root) and writable by no one
  else, except a sticky directory owned by a trusted user (/tmp), where
  others cannot rename or remove what they do not own.  The last directory
  must be owned by one of the owners the caller names.
* `open_trusted_file(path)` is the check sshd's StrictModes makes, for the
  files root reads for policy or secrets (the netperm-table, the auth db,
  TLS keys): the directories as above, the file itself regular, not a link,
  owned by a trusted user and writable by no one else; `secret=True` also
  refuses a file others may read.
* `open_or_make_directory(path)` is `open_directory` after making what is
  missing of path, each directory inside its checked parent's descriptor.
* `ensure_directory`, `ensure_fifo`, `open_fifo` and `open_regular` make or
  open one entry inside an already opened directory, without following a
  link, and check the type and owner of what they got after opening it.

Every refusal is an `UnsafePath` whose text is `PATH: reason`, the one line
a program prints before it refuses to start.
"""

import errno
import os
import stat

DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(Exception):
    """A path that a privileged process must not use; str() is `PATH: reason`."""

    def __init__(self, path, reason, missing=False):
        super().__init__("%s: %s" % (path, reason))
        self.path, self.reason = path, reason
        self.missing = missing          # nothing is there at all (not a refusal of what is)


def trusted_owners():
    """Who may own what root trusts: root, and the invoking user when the
    program was not started as root (the quick start, unprivileged tests)."""
    euid = os.geteuid()
    return (0,) if euid == 0 else (0, euid)


def _writable_by_others(info):
    return bool(info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _check_step(info, path, trusted):
    """A directory on the way to something root trusts."""
    if info.st_uid not in trusted:
        raise UnsafePath(path, "owned by uid %d, not by root" % info.st_uid)
    if _writable_by_others(info) and not info.st_mode & stat.S_ISVTX:
        raise UnsafePath(path, "writable by group or others (mode %04o)"
                         % stat.S_IMODE(info.st_mode))


def _components(path):
    if not os.path.isabs(path):
        raise UnsafePath(path, "not an absolute path")
    return [part for part in os.path.normpath(path).split("/") if part]


def _open_step(name, parent_fd, shown):
    try:
        return os.open(name, DIRECTORY_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        raise UnsafePath(shown, "does not exist", missing=True) from None
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):   # O_NOFOLLOW met a link, or a file
            kind = _kind_of(name, parent_fd)
            raise UnsafePath(shown, "is %s, not a directory" % kind) from None
        raise UnsafePath(shown, err.strerror or str(err)) from None


def _kind_of(name, parent_fd):
    try:
        mode = os.lstat(name, dir_fd=parent_fd).st_mode
    except OSError:
        return "not usable"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "a special file"


def open_directory(path, owners=None, writable_last=True):
    """An O_DIRECTORY descriptor of path, reached without following any link.
    owners: who may own the last directory (default: the trusted owners);
    writable_last=False also refuses a last directory others may write
    (unless it is sticky, like the ones before it)."""
    trusted = trusted_owners()
    owners = trusted if owners is None else tuple(owners)
    parts = _components(path)
    fd = os.open("/", DIRECTORY_FLAGS)
    shown = "/"
    try:
        info = os.fstat(fd)
        for index, part in enumerate(parts):
            _check_step(info, shown, trusted)
            shown = "/" + "/".join(parts[:index + 1])
            next_fd = _open_step(part, fd, shown)
            os.close(fd)
            fd = next_fd
            info = os.fstat(fd)
        if info.st_uid not in owners:
            raise UnsafePath(path, "owned by uid %d, not by %s" % (info.st_uid, _owners_text(owners)))
        if not writable_last:
            _check_step(info, path, owners)
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_trusted_file(path, secret=False):
    """An open descriptor of a file root reads for policy or secrets; raises
    UnsafePath unless the file and every directory above it are root's
    alone (see the module docstring); `missing` is set on it when the file
    or a directory on the way does not exist."""
    parent = os.path.dirname(os.path.normpath(path)) or "/"
    name = os.path.basename(os.path.normpath(path))
    dir_fd = open_directory(parent, writable_last=False)
    try:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         dir_fd=dir_fd)
        except FileNotFoundError:
            raise UnsafePath(path, "does not exist", missing=True) from None
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise UnsafePath(path, "is a symbolic link") from None
            raise UnsafePath(path, err.strerror or str(err)) from None
    finally:
        os.close(dir_fd)
    try:
        check_trusted_file(os.fstat(fd), path, secret)
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def check_trusted_file(info, path, secret=False):
    """Raise UnsafePath unless info is a regular file that a trusted user owns
    and no one else may write (secret: nor read)."""
    if not stat.S_ISREG(info.st_mode):
        raise UnsafePath(path, "not a regular file")
    if info.st_uid not in trusted_owners():
        raise UnsafePath(path, "owned by uid %d, not by root" % info.st_uid)
    if _writable_by_others(info):
        raise UnsafePath(path, "writable by group or others (mode %04o)"
                         % stat.S_IMODE(info.st_mode))
    if secret and info.st_mode & 0o077:
        raise UnsafePath(path, "readable by group or others (mode %04o); it must be 0600"
                         % stat.S_IMODE(info.st_mode))


def _owners_text(owners):
    return " or ".join("root" if uid == 0 else "uid %d" % uid for uid in sorted(set(owners)))


def _check_entry(info, shown, kind_test, kind_name, owners):
    if not kind_test(info.st_mode):
        raise UnsafePath(shown, "not a %s" % kind_name)
    if info.st_uid not in owners:
        raise UnsafePath(shown, "owned by uid %d, not by %s" % (info.st_uid, _owners_text(owners)))


def ensure_directory(dir_fd, name, mode, uid=None, gid=None, shown=None):
    """The O_DIRECTORY descriptor of dir_fd/name, made (mode) if missing and
    then given to uid:gid through its descriptor; refuses a link, another
    type, or an owner other than root and uid."""
    shown = shown or name
    try:
        os.mkdir(name, mode, dir_fd=dir_fd)
    except FileExistsError:
        pass
    fd = _open_step(name, dir_fd, shown)
    try:
        owners = (0,) + ((uid,) if uid is not None else ()) + trusted_owners()
        _check_entry(os.fstat(fd), shown, stat.S_ISDIR, "directory", owners)
        if uid is not None:
            os.fchown(fd, uid, gid if gid is not None else -1)
        return fd
    except BaseException:
        os.close(fd)
        raise


def ensure_fifo(dir_fd, name, mode, uid=None, gid=None, shown=None):
    """Make the FIFO dir_fd/name if missing and give it to uid:gid through a
    descriptor of it (open_fifo: no link followed, a FIFO of root's or
    uid's with one link); nothing stays open."""
    shown = shown or name
    try:
        os.mkfifo(name, mode, dir_fd=dir_fd)
    except FileExistsError:
        pass
    owners = (0,) + ((uid,) if uid is not None else ()) + trusted_owners()
    fd = open_fifo(dir_fd, name, os.O_RDONLY, owners, shown)
    try:
        if uid is not None:
            os.fchown(fd, uid, gid if gid is not None else -1)
    finally:
        os.close(fd)


def open_fifo(dir_fd, name, flags, owners=None, shown=None):
    """A non-blocking descriptor of the FIFO dir_fd/name (flags: O_RDONLY,
    O_RDWR...), never following a link.  What is there is looked at first
    (lstat), so that nothing but a FIFO is ever opened (opening a device
    can have effects); after opening, it must still be that FIFO, owned by
    one of owners (default: the trusted owners), with one link (a hard link
    to a FIFO of root's elsewhere would hand that one over)."""
    shown = shown or name
    owners = trusted_owners() if owners is None else tuple(owners)
    try:
        seen = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        raise UnsafePath(shown, "does not exist", missing=True) from None
    if stat.S_ISLNK(seen.st_mode):
        raise UnsafePath(shown, "is a symbolic link, not a FIFO")
    _check_entry(seen, shown, stat.S_ISFIFO, "FIFO", owners)
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnsafePath(shown, "is a symbolic link, not a FIFO") from None
        raise UnsafePath(shown, err.strerror or str(err)) from None
    try:
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) != (seen.st_dev, seen.st_ino):
            raise UnsafePath(shown, "was replaced while it was being opened")
        _check_entry(info, shown, stat.S_ISFIFO, "FIFO", owners)
        if info.st_nlink != 1:
            raise UnsafePath(shown, "has %d hard links" % info.st_nlink)
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_regular(dir_fd, name, flags, mode=0o600, owners=None, shown=None):
    """Open dir_fd/name (flags may include O_CREAT) without following a link;
    refuses anything but a regular file with one link, owned by one of owners
    (default: the trusted owners), after opening it."""
    shown = shown or name
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode,
                     dir_fd=dir_fd)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnsafePath(shown, "is a symbolic link") from None
        raise
    try:
        info = os.fstat(fd)
        _check_entry(info, shown, stat.S_ISREG, "regular file",
                     trusted_owners() if owners is None else tuple(owners))
        if info.st_nlink != 1:
            # a hard link made by another user to a file of root's
            raise UnsafePath(shown, "has %d hard links" % info.st_nlink)
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_or_make_directory(path, mode=0o755, owners=None, writable_last=True):
    """open_directory(path, owners, writable_last), after making what is
    missing of it: each missing directory is made (the last one with mode,
    those above it 0755; root's, or the invoking user's) inside its
    parent's descriptor, and only under parents
    that pass the checks of open_directory, so nothing is made through a
    link or in a directory others may write (unless sticky)."""
    try:
        return open_directory(path, owners, writable_last)
    except UnsafePath as err:
        if not err.missing:
            raise
    trusted = trusted_owners()
    parts = _components(path)
    fd = os.open("/", DIRECTORY_FLAGS)
    shown = "/"
    try:
        for index, part in enumerate(parts):
            _check_step(os.fstat(fd), shown, trusted)
            shown = "/" + "/".join(parts[:index + 1])
            try:
                os.mkdir(part, mode if index == len(parts) - 1 else 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            except OSError as err:
                raise UnsafePath(shown, err.strerror or str(err)) from None
            next_fd = _open_step(part, fd, shown)
            os.close(fd)
            fd = next_fd
    finally:
        os.close(fd)
    return open_directory(path, owners, writable_last)

"""The recipient verification cache in the spool (issue 14; DESIGN §12.2).

smapd's prober (smapd.prober) asks the mail hub whether a recipient exists
and writes the answer here; smap (smap.verify), jailed in the spool, reads
it at RCPT.  Layout under the spool:

    .verify          the prober's AF_UNIX datagram socket: one datagram is
                     one address to probe (nothing else), see smapd.prober
    verify/XX/HASH   one record per address: HASH is the SHA-256 of the
                     address in lower case (the cache key), XX its first
                     two hex digits

A record is one line of printable ASCII, written by the prober under a
temporary name and renamed over the old one (a reader sees the old record
or the new one, never half of one):

    MWV1 TAB kind TAB checked TAB expires TAB key TAB reply TAB crc32 LF

`kind` is `ok` (the hub accepted the recipient), `reject` (it refused it
with a 5xx; `reply` is its reply) or `unavailable` (the hub could not be
asked: unreachable, too slow, garbage; kept UNAVAILABLE_TTL seconds so
that a hub that is down is not asked again for every RCPT).  `checked`
and `expires` are whole epoch seconds.  A record is due for a refresh
half-way through its life: it is still used, and the reader asks for a
new probe, so that a recipient who gets mail stays cached.

What this module trusts: nothing it reads.  A record is used only when
all of this holds, and is otherwise damage (the reader asks for a new
probe, which overwrites it: a damaged cache is rebuilt, never trusted):
at most MAX_RECORD octets, the version, a known kind, plain decimal
times, a lifetime no longer than the configured one for its kind (so a
forged record cannot outlive that bound), a check time not in the future,
the key equal to the address asked about (a file copied to another
address's name is refused), the reply printable, and the CRC-32 of the
line right.  Files are opened without following a link at the last
component and without blocking (a FIFO planted there cannot hang smap).
The CRC catches accidental damage, not forgery: every process that can
write here runs as `userid`, see SECURITY.md.

Only `os`, `_sha256` and `binascii` are imported (all cheap, and
imported before smap's chroot): smap pays for this module only when
verify-recipients is on.
"""

import _sha256
import binascii
import os

DIRECTORY = "verify"
SOCKET = ".verify"
VERSION = "MWV1"
OK, REJECT, UNAVAILABLE = "ok", "reject", "unavailable"
KINDS = (OK, REJECT, UNAVAILABLE)
UNAVAILABLE_TTL = 30
MAX_RECORD = 1024
MAX_REPLY = 480         # a 512-octet reply line less "550 5.1.1 " and CRLF, with room
CLOCK_SLACK = 120       # seconds a check time may lie ahead of the reader's clock
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def key_of(address):
    """The cache key of an address: the whole address in lower case (the
    domain is case-blind anyway; mail hubs such as Postfix compare local
    parts case-blind too)."""
    return address.lower()


def name_of(key):
    """(subdirectory, file name) of a key."""
    digest = _sha256.sha256(key.encode("ascii", "replace")).hexdigest()
    return digest[:2], digest


def relative_path(key):
    sub, name = name_of(key)
    return "%s/%s/%s" % (DIRECTORY, sub, name)


def printable(text):
    return all(" " <= c <= "~" for c in text)


def clean_reply(text):
    """A reply as a record may hold it: printable ASCII, no tab, bounded."""
    text = "".join(c if " " <= c <= "~" else " " for c in text)
    return " ".join(text.split())[:MAX_REPLY]


class Record:
    __slots__ = ("kind", "checked", "expires", "reply")

    def __init__(self, kind, checked, expires, reply=""):
        self.kind, self.checked, self.expires, self.reply = kind, checked, expires, reply

    def expired(self, now):
        return now >= self.expires

    def due(self, now):
        """Past half its life: still used, but a new probe is asked for."""
        return now >= self.checked + (self.expires - self.checked) / 2

    def __repr__(self):
        return "Record(%r, %r, %r, %r)" % (self.kind, self.checked, self.expires, self.reply)


def lifetimes(positive, negative):
    """The longest lifetime of each kind, as the table sets them."""
    return {OK: positive, REJECT: negative, UNAVAILABLE: UNAVAILABLE_TTL}


def encode(key, record):
    line = "\t".join((VERSION, record.kind, "%d" % record.checked, "%d" % record.expires,
                      key, clean_reply(record.reply)))
    return ("%s\t%08x\n" % (line, binascii.crc32(line.encode("ascii")))).encode("ascii")


def _number(text):
    if not (text.isascii() and text.isdigit()) or len(text) > 12:
        raise ValueError("not a time")
    return int(text)


def decode(data, key, now, ttls):
    """The Record in data for key, or None when it is damaged (see the
    module's docstring for what is checked).  An expired record is
    returned; the caller decides."""
    if len(data) > MAX_RECORD or not data.endswith(b"\n"):
        return None
    try:
        text = data[:-1].decode("ascii")
    except UnicodeDecodeError:
        return None
    line, _, crc = text.rpartition("\t")
    fields = line.split("\t")
    if len(fields) != 6 or len(crc) != 8 or "\n" in line:
        return None
    version, kind, checked, expires, stored_key, reply = fields
    if version != VERSION or kind not in KINDS or stored_key != key or not printable(reply):
        return None
    try:
        if int(crc, 16) != binascii.crc32(line.encode("ascii")) or crc != crc.lower():
            return None
        checked, expires = _number(checked), _number(expires)
    except ValueError:
        return None
    if checked > now + CLOCK_SLACK or expires <= checked or expires - checked > ttls[kind]:
        return None
    if kind == REJECT and not reply:
        return None
    return Record(kind, checked, expires, reply)


def read(root, key, now, ttls):
    """(record, damaged) for key from the cache under the spool `root`
    (smap's side: "/" in its jail).  (None, False): no record, or an
    expired one; (None, True): a damaged one."""
    try:
        fd = os.open(os.path.join(root, relative_path(key)), READ_FLAGS)
    except OSError:
        return None, False
    try:
        data = os.read(fd, MAX_RECORD + 1)
    except OSError:
        return None, True       # a directory, say
    finally:
        os.close(fd)
    record = decode(data, key, now, ttls)
    if record is None:
        return None, True
    if record.expired(now):
        return None, False
    return record, False


class Store:
    """The prober's side: writes and sweeps the cache through descriptors
    (no link followed; the spool is `userid`'s, and so is the prober).  A
    cache directory that is not a directory is moved aside and made anew."""

    def __init__(self, spool_fd, log=None):
        self.spool_fd = spool_fd
        self.log = log
        self.top = self._directory(spool_fd, DIRECTORY)
        self.subs = {}

    def _directory(self, parent, name):
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        for attempt in (1, 2):
            try:
                os.mkdir(name, 0o700, dir_fd=parent)
            except FileExistsError:
                pass
            try:
                return os.open(name, flags, dir_fd=parent)
            except OSError as err:
                if attempt == 2:
                    raise
                # a link, a file, a FIFO where the directory should be: damage
                aside = "%s.damaged.%d" % (name, os.getpid())
                if self.log:
                    self.log.warning("verify-cache", reason="%s is not a directory (%s): "
                                     "moved aside as %s" % (name, err.strerror, aside))
                os.rename(name, aside, src_dir_fd=parent, dst_dir_fd=parent)
        raise OSError("unreachable")

    def sub(self, name):
        fd = self.subs.get(name)
        if fd is None:
            fd = self.subs[name] = self._directory(self.top, name)
        return fd

    def read(self, key, now, ttls):
        """Like read(), through the descriptors."""
        sub, name = name_of(key)
        try:
            fd = os.open(name, READ_FLAGS, dir_fd=self.sub(sub))
        except OSError:
            return None, False
        try:
            data = os.read(fd, MAX_RECORD + 1)
        except OSError:
            return None, True
        finally:
            os.close(fd)
        record = decode(data, key, now, ttls)
        if record is None:
            return None, True
        return (None, False) if record.expired(now) else (record, False)

    def write(self, key, record):
        """Replace key's record atomically (a temporary name, then rename)."""
        sub, name = name_of(key)
        directory = self.sub(sub)
        temporary = ".%s.%d.tmp" % (name, os.getpid())
        try:
            os.unlink(temporary, dir_fd=directory)
        except FileNotFoundError:
            pass
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=directory)
        try:
            os.write(fd, encode(key, record))
        finally:
            os.close(fd)
        try:
            os.rename(temporary, name, src_dir_fd=directory, dst_dir_fd=directory)
        except IsADirectoryError:
            # a directory planted at the record's name: damage, moved aside
            os.rename(name, name + ".damaged", src_dir_fd=directory, dst_dir_fd=directory)
            os.rename(temporary, name, src_dir_fd=directory, dst_dir_fd=directory)

    def sweep(self, now, ttls):
        """Remove expired and damaged records (and stale temporary files);
        returns (records kept, entries removed)."""
        kept = removed = 0
        for sub in os.listdir(self.top):
            if len(sub) != 2 or not all(c in "0123456789abcdef" for c in sub):
                continue
            try:
                directory = self.sub(sub)
            except OSError:
                continue
            for name in os.listdir(directory):
                if len(name) == 64 and name.startswith(sub):
                    try:
                        fd = os.open(name, READ_FLAGS, dir_fd=directory)
                        try:
                            data = os.read(fd, MAX_RECORD + 1)
                        finally:
                            os.close(fd)
                    except OSError:
                        data = b""
                    fields = data.split(b"\t")
                    key = fields[4].decode("ascii", "replace") if len(fields) > 5 else ""
                    record = decode(data, key, now, ttls) if key else None
                    if record is not None and name_of(key)[1] == name \
                            and not record.expired(now):
                        kept += 1
                        continue
                try:
                    os.unlink(name, dir_fd=directory)
                    removed += 1
                except IsADirectoryError:
                    try:
                        os.rmdir(name, dir_fd=directory)
                        removed += 1
                    except OSError:
                        pass
                except OSError:
                    pass
        return kept, removed

    def close(self):
        for fd in self.subs.values():
            os.close(fd)
        self.subs.clear()
        os.close(self.top)

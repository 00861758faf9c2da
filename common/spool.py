"""The spool: one file per message, crash-safe by the order of its operations.

Layout under the spool directory (smap's chroot):

    tmp/ID        a message being received; never looked at by smapd
    queue/ID      a complete message: only ever created by rename from tmp/
    state/ID      smapd's delivery state for queue/ID or hold/ID (written atomically)
    hold/ID       a message put on hold by `smapd --hold`: never delivered nor
                  expired until `smapd --release` renames it back to queue/
    bad/          the default quarantine (baddir)
    .trigger      a FIFO: smap writes a byte after each rename to wake smapd
    .smapd.lock   held by the running smapd

A message file is:

    MAILWALL-SPOOL 1\\n
    key value\\n ...          (id, arrival, client-addr, client-name, helo,
                              sender, rcpt (repeated), size, quarantine)
    \\n
    <message octets, CRLF lines, dot-unstuffed>
    \\nMAILWALL-END <message length>\\n

so a truncated file, or one without its end marker, is detected.  Envelope
values never contain a control character (smap checks them; `read_message`
checks again and trusts nothing; numbers must be plain decimal digits, in
range).  The writer says a message is safe only
after write, fsync, rename into queue/ and fsync of queue/.
"""

import errno
import os
import time

from common import fsguard

MAGIC = b"MAILWALL-SPOOL 1\n"
END = b"\nMAILWALL-END "
TMP, QUEUE, STATE, BAD = "tmp", "queue", "state", "bad"
HOLD = "hold"
TRIGGER = ".trigger"
LOCK = ".smapd.lock"
STALE_TMP_SECONDS = 36 * 3600
MAX_ENVELOPE = 1 << 20
MAX_RCPT_FIELDS = 100000
MAX_TIME = 1e10          # epoch seconds (the year 2286): a later time is damage
MAX_SIZE = 1 << 40       # octets; far above any maxbytes
ENVELOPE_KEYS = ("id", "arrival", "client-addr", "client-name", "helo", "sender", "rcpt", "size",
                 "quarantine")
# The reason of a quarantine mark, in characters (smap writes it, smapd
# moves the message to baddir with it at once).
MAX_QUARANTINE_REASON = 500
COPY_CHUNK = 1 << 20


class SpoolError(Exception):
    """A spool file is not a complete, well-formed message file."""


def make_dirs(root, uid=None, gid=None):
    """Create the spool (if missing: mode 0755, root's), its subdirectories
    (mode 0700) and the trigger FIFO, given to uid:gid (see open_spool)."""
    os.close(open_spool(root, uid, gid))


def open_spool(root, uid=None, gid=None, own_top=False, top_mode=0o755, set_modes=False):
    """The O_DIRECTORY descriptor of the spool, after making what is missing
    of it and giving its entries (and with own_top the spool itself) to
    uid:gid; set_modes also resets the modes (top_mode, 0700, FIFO 0600).

    The spool is uucp's, so root works in it only through descriptors and
    never follows a link (common.fsguard): the spool and every directory
    above it are reached without a link, those above are root's alone; the
    spool, tmp/, queue/, state/, bad/ and .trigger must be of their type and
    root's or uid's.  Anything else raises fsguard.UnsafePath, whose text is
    the one line `PATH: reason` the caller refuses with."""
    owners = (0,) + ((uid,) if uid is not None else ()) + fsguard.trusted_owners()
    top = fsguard.open_or_make_directory(root, top_mode, owners)
    try:
        if own_top and uid is not None:
            os.fchown(top, uid, gid if gid is not None else -1)
        if set_modes:
            os.fchmod(top, top_mode)
        for name in (TMP, QUEUE, STATE, BAD):
            fd = fsguard.ensure_directory(top, name, 0o700, uid, gid,
                                          shown=os.path.join(root, name))
            try:
                if set_modes:
                    os.fchmod(fd, 0o700)
            finally:
                os.close(fd)
        shown = os.path.join(root, TRIGGER)
        try:
            os.mkfifo(TRIGGER, 0o600, dir_fd=top)
        except FileExistsError:
            pass
        fd = fsguard.open_fifo(top, TRIGGER, os.O_RDONLY, owners, shown)
        try:
            if uid is not None:
                os.fchown(fd, uid, gid if gid is not None else -1)
            if set_modes:
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        return top
    except BaseException:
        os.close(top)
        raise


def install_spool(root, user):
    """`make install`'s spool: made or checked as open_spool does, mode 0700
    and FIFO 0600, all given to user when run by root.  Returns the exit
    status; a refusal is one line `make install: PATH: reason` on stderr."""
    import pwd
    import sys
    uid = gid = None
    if os.geteuid() == 0:
        entry = pwd.getpwnam(user)
        uid, gid = entry.pw_uid, entry.pw_gid
    try:
        os.close(open_spool(root, uid, gid, own_top=True, top_mode=0o700, set_modes=True))
    except (fsguard.UnsafePath, OSError) as err:
        sys.stderr.write("make install: %s\n" % err)
        return 1
    if uid is None:
        sys.stdout.write("make install: not root: %s is not chowned to %s\n" % (root, user))
    return 0


_counter = [0]


def new_id(now=None):
    """A queue id unique on this host: time, pid and a counter, in hex."""
    _counter[0] += 1
    now = time.time() if now is None else now
    micro = int(now * 1000000)
    return "%011X%05X%02X" % (micro & 0xFFFFFFFFFFF, os.getpid() & 0xFFFFF,
                              _counter[0] & 0xFF)


def valid_id(text):
    return 4 <= len(text) <= 64 and all(c in "0123456789ABCDEFabcdef" for c in text)


def encode_envelope(envelope):
    """The header block for an envelope dict (values already checked)."""
    lines = [MAGIC]
    for key in ENVELOPE_KEYS:
        values = envelope.get(key)
        if values is None:
            continue
        for value in values if isinstance(values, list) else [values]:
            text = str(value)
            if any(ord(c) < 32 or ord(c) == 127 for c in text):
                raise ValueError("control character in envelope %s" % key)
            lines.append(("%s %s\n" % (key, text)).encode("utf-8", "surrogateescape"))
    lines.append(b"\n")
    return b"".join(lines)


class MessageWriter:
    """Writes one message into tmp/, then commits it into queue/.

    Before the commit, edit_header() and quarantine() may ask for the
    changes a policy hook wants (smap.policy: header changes, a quarantine
    mark); commit() then writes the message again, changed, into a second
    temporary file that replaces the first, and commits that one.  The
    client hears "250" only after that commit, as for any message."""

    def __init__(self, root, message_id):
        self.root = root
        self.id = message_id
        self.tmp_path = os.path.join(root, TMP, message_id)
        self.fd = os.open(self.tmp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self.length = 0
        self.chunks = []
        self.buffered = 0
        self.envelope = None
        self.offset = 0             # where the message starts in the file
        self.changes = []
        self.quarantine_reason = None

    def start(self, envelope):
        self.envelope = dict(envelope)
        block = encode_envelope(envelope)
        self.offset = len(block)
        self._write(block)

    def edit_header(self, changes):
        """Apply these smap.policy.HeaderChange (checked by the caller) at the commit."""
        self.changes.extend(changes)

    def quarantine(self, reason):
        """Mark the message for the quarantine: smapd moves it to baddir
        with `reason` as soon as it sees it, and tells the postmaster."""
        text = "".join(c if " " <= c <= "~" else "?" for c in str(reason))
        self.quarantine_reason = text[:MAX_QUARANTINE_REASON] or "no reason given"

    def rewrite(self):
        """The message again with the header changes and the quarantine mark:
        written to tmp/ID.edit, renamed over tmp/ID (still uncommitted)."""
        self.flush()
        envelope = dict(self.envelope)
        if self.quarantine_reason is not None:
            envelope["quarantine"] = self.quarantine_reason
        header, body_offset = self.read_header()
        header = edit_header(header, self.changes)
        edit_path = self.tmp_path + ".edit"
        fd = os.open(edit_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            block = encode_envelope(envelope)
            data = block + header
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            length = len(header)
            position = self.offset + body_offset
            end = self.offset + self.length
            while position < end:
                chunk = os.pread(self.fd, min(COPY_CHUNK, end - position), position)
                if not chunk:
                    raise OSError(errno.EIO, "spool file shorter than written")
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
                position += len(chunk)
                length += len(chunk)
            os.rename(edit_path, self.tmp_path)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(edit_path)
            except OSError:
                pass
            raise
        os.close(self.fd)
        self.fd = fd
        self.length = length
        self.offset = len(block)

    def read_header(self):
        """(header bytes, offset of the body in the message): the header is
        everything up to and including the first empty line (the whole
        message when it has none)."""
        data = b""
        while len(data) < self.length:
            chunk = os.pread(self.fd, min(COPY_CHUNK, self.length - len(data)),
                             self.offset + len(data))
            if not chunk:
                raise OSError(errno.EIO, "spool file shorter than written")
            data += chunk
            if data.startswith(b"\r\n"):
                return b"\r\n", 2
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                return data[:end + 4], end + 4
        return data, len(data)

    def write(self, data):
        self.length += len(data)
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered >= 262144:
            self.flush()

    def flush(self):
        if self.chunks:
            self._write(b"".join(self.chunks))
            self.chunks = []
            self.buffered = 0

    def _write(self, data):
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def commit(self):
        """fsync, rename into queue/, fsync queue/: only then is the message safe."""
        if self.changes or self.quarantine_reason is not None:
            self.rewrite()
        self.flush()
        self._write(END + b"%d\n" % self.length)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        final = os.path.join(self.root, QUEUE, self.id)
        os.rename(self.tmp_path, final)
        try:
            fsync_dir(os.path.join(self.root, QUEUE))
        except OSError:
            # The rename may not survive a crash, and the client is about to
            # hear 4xx and send again: take the file back so that the retry
            # does not become a second copy.
            try:
                os.unlink(final)
            except OSError:
                pass
            raise

    def abort(self):
        """Remove the temporary file; nothing was promised for it."""
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        try:
            os.unlink(self.tmp_path)
        except OSError:
            pass


def split_fields(header):
    """The fields of a header (each with its folds and CRLF) and the rest:
    from the empty line that ends the header, or from the first line that
    is not a field (a message without an empty line), to the end."""
    fields = []
    position = 0
    while position < len(header):
        end = header.find(b"\r\n", position)
        end = len(header) if end < 0 else end + 2
        line = header[position:end]
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif line == b"\r\n" or field_name(line) is None:
            break
        else:
            fields.append(line)
        position = end
    return fields, header[position:]


def field_name(field):
    """The lower-case name of a header field line, or None if it is not one."""
    name, colon, _ = field.partition(b":")
    name = name.rstrip(b" \t")
    if not colon or not name or any(c < 33 or c > 126 for c in name):
        return None
    return name.lower()


def format_field(name, value):
    """`Name: value` CRLF; a value that starts with a space or a tab (a
    milter's with SMFIP_HDR_LEADSPC) is kept as it is after the colon."""
    data = value.encode("utf-8", "surrogateescape")
    separator = b":" if data[:1] in (b" ", b"\t") else b": "
    return name.encode("ascii") + separator + data + b"\r\n"


def edit_header(header, changes):
    """The header with smap.policy.HeaderChange applied in order, as the
    milter protocol has them: add appends; insert puts a field at position
    `index` (0: first); change replaces the index-th field of that name
    (1: the first) or, when there is none, appends it (Sendmail's rule);
    delete removes the index-th field of that name, if there is one."""
    fields, rest = split_fields(header)
    for change in changes:
        name = change.name.encode("ascii").lower()
        if change.action == "add":
            fields.append(format_field(change.name, change.value))
            continue
        if change.action == "insert":
            fields.insert(min(change.index, len(fields)), format_field(change.name, change.value))
            continue
        seen, where = 0, None
        for position, field in enumerate(fields):
            if field_name(field) == name:
                seen += 1
                if seen == change.index:
                    where = position
                    break
        if change.action == "change":
            if where is None:
                fields.append(format_field(change.name, change.value))
            else:
                fields[where] = format_field(change.name, change.value)
        elif where is not None:
            del fields[where]
    return b"".join(fields) + rest


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def poke(root):
    """Wake smapd through the trigger FIFO; harmless if nobody listens."""
    try:
        fd = os.open(os.path.join(root, TRIGGER), os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        os.write(fd, b"!")
    except OSError:
        pass
    finally:
        os.close(fd)
    return True


def decimal(text, fraction=True):
    """The number in `text` if it is plain ASCII decimal digits (with one
    optional fraction), else None: float() and int() would also take
    `nan`, `inf`, `1e309`, `1_0`, signs, spaces and other scripts' digits."""
    whole, dot, part = text.partition(".")
    if not (whole.isascii() and whole.isdigit() and len(whole) <= 20):
        return None
    if not dot:
        return int(whole)
    if not (fraction and part.isascii() and part.isdigit() and len(part) <= 20):
        return None
    return float(text)


def parse_envelope(block):
    """A dict from the header block (without MAGIC and the blank line)."""
    envelope = {"rcpt": []}
    if len(block) > MAX_ENVELOPE:
        raise SpoolError("envelope too large")
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        raise SpoolError("envelope is not UTF-8") from None
    for line in text.split("\n"):
        if not line:
            continue
        key, _, value = line.partition(" ")
        if key not in ENVELOPE_KEYS:
            raise SpoolError("unknown envelope field %r" % key[:40])
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise SpoolError("control character in envelope field %s" % key)
        if key == "rcpt":
            if len(envelope["rcpt"]) >= MAX_RCPT_FIELDS:
                raise SpoolError("too many recipients")
            envelope["rcpt"].append(value)
        elif key in envelope:
            raise SpoolError("envelope field %s given twice" % key)
        else:
            envelope[key] = value
    for key in ("id", "arrival", "sender"):
        if key not in envelope:
            raise SpoolError("envelope has no %s" % key)
    if not envelope["rcpt"]:
        raise SpoolError("envelope has no recipient")
    if not valid_id(envelope["id"]):
        raise SpoolError("bad queue id")
    # Numbers are checked for what they are used as: the arrival time is
    # aged, compared with maxage and printed in a bounce; a `nan` or an
    # `inf` there once made the scanner die on every start (issue 11).
    arrival = decimal(envelope["arrival"])
    if arrival is None or arrival > MAX_TIME:
        raise SpoolError("bad arrival time %r" % envelope["arrival"][:40])
    envelope["arrival"] = float(arrival)
    if "size" in envelope:
        size = decimal(envelope["size"], fraction=False)
        if size is None or size > MAX_SIZE:
            raise SpoolError("bad size %r" % envelope["size"][:40])
        envelope["size"] = size
    return envelope


def locate(fd):
    """(envelope, message offset, message length) of an open spool file."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, min(size, MAX_ENVELOPE + len(MAGIC) + 2), 0)
    if not head.startswith(MAGIC):
        raise SpoolError("no spool header (not a mailwall spool file)")
    split = head.find(b"\n\n", len(MAGIC) - 1)
    if split < 0:
        raise SpoolError("envelope not terminated")
    envelope = parse_envelope(head[len(MAGIC):split + 1])
    offset = split + 2
    tail = os.pread(fd, 64, max(offset, size - 64))
    mark = tail.rfind(END)
    if mark < 0 or not tail.endswith(b"\n"):
        raise SpoolError("no end marker (truncated)")
    try:
        length = int(tail[mark + len(END):-1])
    except ValueError:
        raise SpoolError("bad end marker") from None
    if offset + length + len(END) + len(b"%d\n" % length) != size:
        raise SpoolError("length does not match end marker (truncated or altered)")
    return envelope, offset, length


def read_message(path):
    """(envelope, message bytes) of a queue file; raises SpoolError."""
    fd = os.open(path, os.O_RDONLY)
    try:
        envelope, offset, length = locate(fd)
        return envelope, os.pread(fd, length, offset)
    finally:
        os.close(fd)


def sweep_tmp(root, now=None, max_age=STALE_TMP_SECONDS, failures=None):
    """Remove temporary files older than max_age; returns their names.  An
    entry that cannot be removed (a directory uucp left there, EIO) is
    skipped, so it cannot keep the others: failures, when given, gets
    (name, reason) for each."""
    now = time.time() if now is None else now
    removed = []
    directory = os.path.join(root, TMP)
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(directory, name)
        try:
            if now - os.lstat(path).st_mtime > max_age:
                os.unlink(path)
                removed.append(name)
        except OSError as err:
            if err.errno != errno.ENOENT and failures is not None:
                failures.append((name, err.strerror or str(err)))
    return removed


def queued(root, directory=QUEUE):
    """Names of the complete messages in queue/ (never anything else)."""
    try:
        return sorted(n for n in os.listdir(os.path.join(root, directory)) if valid_id(n))
    except OSError:
        return []


def held(root):
    """Names of the messages on hold (hold/, made by the first `smapd --hold`)."""
    return queued(root, HOLD)

"""Bounded CRLF framing and reads with deadlines.

`LineSplitter` is pure: it takes bytes and hands out complete lines.  Only
CRLF ends a line; a bare CR or bare LF is reported, never treated as an end
of line (SMTP smuggling).  A line longer than its limit is reported once and
then skipped up to its CRLF, so a client cannot make the buffer grow.
`Channel` is the plain transport of common.conversation: it reads and
writes a descriptor (socket or pipe, as inetd and `swaks --pipe` hand
them) with an idle deadline.
"""

import errno
import os
import select
import time

LINE, TOO_LONG, BARE = "line", "too-long", "bare"
READ_SIZE = 65536


class LineSplitter:
    """feed(bytes); then next() gives (kind, line) or None when a line is incomplete."""

    # Consumed bytes are dropped from the front of the buffer only now and
    # then, not after every line: deleting the head of a bytearray moves the
    # rest, and doing that per line made a 64 KiB read of short DATA lines
    # quadratic.
    COMPACT_AT = 65536

    def __init__(self, limit):
        self.limit = limit          # octets including the CRLF
        self.buffer = bytearray()
        self.start = 0              # first byte not yet handed out
        self.skipping = False

    def feed(self, data):
        self.buffer += data

    def pending(self):
        """Bytes received but not yet handed out."""
        return len(self.buffer) - self.start

    def _consume(self, upto):
        self.start = upto
        if self.start >= len(self.buffer):
            del self.buffer[:]
            self.start = 0
        elif self.start >= self.COMPACT_AT:
            del self.buffer[:self.start]
            self.start = 0

    def next(self):
        while True:
            buf, start = self.buffer, self.start
            end = buf.find(b"\r\n", start)
            stop = len(buf) if end < 0 else end
            # Within the current line any CR or LF is bare; a CR at the very
            # end of the buffer may still be followed by its LF.
            bare = _first_bare(buf, start, stop, complete=end >= 0)
            if bare is not None:
                return BARE, bytes(buf[start:bare + 1])
            if end < 0:
                if stop - start >= self.limit:
                    keep = b"\r" if buf.endswith(b"\r") else b""
                    del buf[:]
                    buf += keep
                    self.start = 0
                    if not self.skipping:
                        self.skipping = True
                        return TOO_LONG, b""
                return None
            line = bytes(buf[start:end + 2])
            self._consume(end + 2)
            if self.skipping:
                self.skipping = False    # the tail of a line already reported
                continue
            if len(line) > self.limit:
                return TOO_LONG, line[:self.limit]
            return LINE, line

    def complete_lines(self):
        """(start, end): the buffered bytes buf[start:end] that form complete
        lines (end just after the last CRLF); end == start when there is
        none.  Nothing is consumed and nothing is checked: see consume()."""
        end = self.buffer.rfind(b"\r\n", self.start)
        return self.start, (end + 2 if end >= 0 else self.start)

    def consume(self, upto):
        """Hand out everything before index `upto` (a line boundary found
        with complete_lines) without splitting it into lines."""
        if not self.start <= upto <= len(self.buffer):
            raise ValueError("consume() beyond the buffer")
        self._consume(upto)

    def set_limit(self, limit):
        """Lines from now on may be `limit` octets long, CRLF included
        (SMTP: 512 for a command, 1000 for a line of message text)."""
        self.limit = limit

    def lines_before(self, final):
        """The complete lines buffered ahead, up to (not including) the
        first one that is exactly `final` (a whole line, CRLF included), as
        one bytes object; b"" when there is none.  Nothing is consumed and
        nothing is checked: the caller checks, then hands them out with
        skip(len(block)).  (SMTP's DATA fast path: final is b".\\r\\n".)"""
        buffer = self.buffer
        start, end = self.complete_lines()
        if end == start or buffer.startswith(final, start):
            return b""
        found = buffer.find(b"\r\n" + final, start, end)
        if found >= 0:
            end = found + 2
        return bytes(buffer[start:end])

    def skip(self, count):
        """Hand out the next `count` buffered bytes without splitting them
        into lines (`count` from lines_before, so it ends a line)."""
        self.consume(self.start + count)

    def take_rest(self):
        rest = bytes(self.buffer[self.start:])
        del self.buffer[:]
        self.start = 0
        return rest


def _first_bare(buf, start, stop, complete):
    """Index of the first CR or LF in buf[start:stop], ignoring a final CR
    when the line is not complete yet; None if there is none."""
    lf = buf.find(b"\n", start, stop)
    cr = buf.find(b"\r", start, stop)
    if not complete and cr == stop - 1 and cr >= 0:
        cr = buf.find(b"\r", start, cr)
    found = [i for i in (lf, cr) if i >= 0]
    return min(found) if found else None


class Timeout(Exception):
    pass


class Closed(Exception):
    pass


class LineDeadline:
    """`timeout` bounds a whole line, not each read: a client dripping one
    byte at a time must not hold a session forever.  The clock restarts
    whenever a line is completed (the splitter's pending bytes shrink) and
    stops when nothing is pending.

        deadline = LineDeadline(timeout, session.splitter)
        data = deadline.read(channel)     # Timeout when the line is overdue
        reply = session.feed(data)
        deadline.fed()
    """

    def __init__(self, timeout, splitter, clock=time.monotonic):
        self.timeout, self.splitter, self.clock = timeout, splitter, clock
        self.deadline = None
        self.before = 0

    def remaining(self):
        """Seconds the next read may wait; raises Timeout when none are left."""
        if self.deadline is None:
            return self.timeout
        wait = self.deadline - self.clock()
        if wait <= 0:
            raise Timeout()
        return wait

    def read(self, channel):
        data = channel.read(self.remaining())
        self.before = self.splitter.pending() + len(data)
        return data

    def fed(self):
        """After the data of read() went into the splitter."""
        after = self.splitter.pending()
        if after == 0:
            self.deadline = None
        elif after < self.before or self.deadline is None:
            self.deadline = self.clock() + self.timeout


class Channel:
    """A client connection on two descriptors (they are the same socket
    under inetd): the plain transport (common.conversation)."""

    def __init__(self, read_fd=0, write_fd=1):
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.bytes_in = 0
        self.bytes_out = 0
        self.poller = select.poll()
        self.poller.register(read_fd, select.POLLIN | select.POLLPRI)

    def fileno(self):
        return self.read_fd

    def buffered(self):
        """Bytes read from the descriptor but not yet returned by read():
        none, read() returns all it reads (a TLS transport may hold some)."""
        return 0

    def readable_now(self):
        """Whether input is already waiting (used to catch talk before the banner)."""
        return bool(self.poller.poll(0))

    def read(self, timeout):
        """Up to READ_SIZE bytes; raises Timeout after `timeout` idle seconds, Closed at EOF."""
        if not self.poller.poll(int(timeout * 1000)):
            raise Timeout()
        try:
            data = os.read(self.read_fd, READ_SIZE)
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EINTR):
                return b""
            raise Closed() from None
        if not data:
            raise Closed()
        self.bytes_in += len(data)
        return data

    def discard_pending(self, limit=65536):
        """Read and drop input that is already waiting (at most limit bytes,
        never waiting): closing a socket with unread input makes the kernel
        send a reset, and the client may then lose the last reply."""
        dropped = 0
        while dropped < limit and self.poller.poll(0):
            try:
                data = os.read(self.read_fd, min(READ_SIZE, limit - dropped))
            except OSError:
                return
            if not data:
                return
            dropped += len(data)

    def write(self, data, timeout=60):
        """Write all of data; raises Closed if the client takes nothing for
        `timeout` seconds (a client that never reads must not hold a process).
        The descriptor is non-blocking while we write: a blocking write of
        more than the socket buffer holds would wait for the client forever."""
        view = memoryview(data)
        writable = select.poll()
        writable.register(self.write_fd, select.POLLOUT)
        was_blocking = os.get_blocking(self.write_fd)
        if was_blocking:
            os.set_blocking(self.write_fd, False)
        try:
            while view:
                if not writable.poll(int(timeout * 1000)):
                    raise Closed()
                try:
                    sent = os.write(self.write_fd, view)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    raise Closed() from None
                self.bytes_out += sent
                view = view[sent:]
        finally:
            if was_blocking:
                try:
                    os.set_blocking(self.write_fd, True)
                except OSError:
                    pass

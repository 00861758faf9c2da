"""One client's dialogue: read → feed → write, for smap and pop3-gw alike.

`Conversation` owns the loop between a transport (the client's bytes) and
a session (a state machine that takes bytes and returns its replies): the
greeting (or the refusal of a client that talks before it), the line
deadline (lineio.LineDeadline: `timeout` bounds a whole line, not each
read), the write timeout, one path for end of file, timeout and a failed
write, the byte counters, and at the end dropping what the client still
sent (so that closing does not reset the connection under the last reply).

It never touches a descriptor itself: it talks to a transport, which is
lineio.Channel for a plain socket or pipe today and will be a TLS layer
next.  A transport has read(timeout) (lineio.Timeout, lineio.Closed),
write(data, timeout) (lineio.Closed), readable_now(), discard_pending(),
fileno(), bytes_in / bytes_out, and buffered(): bytes it has read from the
socket but not yet returned by read() (0 for a plain socket).

The transport seam (STARTTLS, STLS): a session whose reply says "go
ahead, switch now" sets its `switch_request` (any true value; None or
absent means no switch) and stops taking lines from its splitter after
the line that asked.  The loop writes that reply, then switches only when
nothing at all was received after that line: neither in the session's
splitter nor in the transport's buffer.  Bytes that came after it were
sent in plaintext before the switch and must never be executed as if they
came over the new transport (CVE-2011-0411, STARTTLS command injection):
instead the session's `switch_refused()` gives the last reply (a protocol
error) and the conversation ends.  Otherwise `switch(transport)` (given
to the Conversation) returns the new transport, or raises lineio.Closed
when the switch failed, and the session's `switched()` resets what the
switch must reset.

What it trusts: the session's replies are sent as they are; nothing the
client sends is interpreted here.
"""

import time

from common import lineio

# How a conversation ended (run()'s result).
CLOSED = "closed"               # the session closed (QUIT, a refusal, too many errors)
DONE = "done"                   # the caller's `until` condition holds (pop3-gw: logged in)
TIMEOUT = "timeout"             # no complete line within `timeout`
EOF = "eof"                     # the client closed its side
WRITE_FAILED = "write failed"   # the client took nothing for `write_timeout` seconds, or went away
SWITCH_REFUSED = "switch refused"   # input came after the line that asked for a switch
SWITCH_FAILED = "switch failed"     # the new transport could not be set up

WRITE_TIMEOUT = 60


class Conversation:
    """The loop of one client: run() returns how it ended (one of the
    constants above); close() drops the client's unread input."""

    def __init__(self, transport, session, timeout, write_timeout=WRITE_TIMEOUT,
                 switch=None, detect_pregreet=False, clock=time.monotonic):
        self.transport = transport
        self.session = session
        self.timeout = timeout
        self.write_timeout = write_timeout
        self.switch = switch
        self.detect_pregreet = detect_pregreet
        self.clock = clock
        self.retired_in = self.retired_out = 0     # counted on transports switched away from

    @property
    def bytes_in(self):
        return self.retired_in + self.transport.bytes_in

    @property
    def bytes_out(self):
        return self.retired_out + self.transport.bytes_out

    def write(self, data):
        if data:
            self.transport.write(data, self.write_timeout)

    def run(self, until=None):
        """Greet, then read, feed and write until the session closes, the
        client goes away or `until()` holds; end of file, a timeout and a
        failed write all end here, the session told (eof() or timeout())."""
        session = self.session
        try:
            if self.detect_pregreet and self.transport.readable_now():
                self.write(session.pregreet())
            else:
                self.write(session.greeting())
            deadline = lineio.LineDeadline(self.timeout, session.splitter, self.clock)
            while True:
                if session.closed:
                    return CLOSED
                if until is not None and until():
                    return DONE
                try:
                    data = deadline.read(self.transport)
                except lineio.Timeout:
                    self.write(session.timeout())
                    return TIMEOUT
                except lineio.Closed:
                    session.eof()
                    return EOF
                reply = session.feed(data)
                deadline.fed()
                self.write(reply)
                if getattr(session, "switch_request", None):
                    ended = self.switch_transport()
                    if ended is not None:
                        return ended
        except lineio.Closed:
            session.eof()
            return WRITE_FAILED

    def switch_transport(self):
        """The session asked for a new transport and its reply is out: None
        when the conversation goes on over the new one, else how it ended."""
        session = self.session
        if session.splitter.pending() or self.transport.buffered() or self.switch is None:
            # Sent before the switch, in the clear: never executed.
            self.write(session.switch_refused())
            return SWITCH_REFUSED
        old = self.transport
        try:
            new = self.switch(old)
        except lineio.Closed:
            session.eof()
            return SWITCH_FAILED
        # the new transport counts its own bytes from zero
        self.retired_in += old.bytes_in
        self.retired_out += old.bytes_out
        self.transport = new
        session.switched()
        return None

    def close(self):
        """Read and drop what the client sent and nobody will read."""
        self.transport.discard_pending()

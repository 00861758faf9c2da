"""The server side of pop3-gw: log in to the internal POP3 server with APOP
on the user's behalf (DESIGN §8), in the manner of poplib's ladder.

connect (each address the monitor's rules passed in turn, `timeout` for
each step) → read the greeting → require a well-formed RFC 822 msg-id
timestamp in it (a server that may choose arbitrary challenges can recover
the secret) → ask the signer for `APOP user digest` with the same secret,
naming the address and port actually connected to (the signer signs only
for an address it routed this session to, and never a timestamp a pop3-gw
issued) → read the answer.  Only `+OK`
lets the session go on.  A `-ERR` from the server reaches the client as the
server wrote it, response code and text unchanged ([IN-USE],
[LOGIN-DELAY], [SYS/TEMP], ...).  Everything the server sends is bounded:
a response line is at most 512 octets (RFC 2449 §4).
"""

import socket
import time

from common import apop

# RFC 2449 §4: a response line is at most 512 octets, CRLF included.
RESPONSE_LIMIT = 512


class UpstreamError(Exception):
    """The login failed: `reply` goes to the client, `reason` to the log."""

    def __init__(self, reason, reply):
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


UNAVAILABLE = b"-ERR [SYS/TEMP] mail server unavailable, try again later\r\n"
NO_APOP = b"-ERR [SYS/PERM] mail server does not offer a valid APOP challenge\r\n"


class Connection:
    """A connected, logged-in upstream socket and the bytes read past the answer."""

    def __init__(self, sock, reply, rest):
        self.sock, self.reply, self.rest = sock, reply, rest


def connect(addresses, port, timeout):
    """(socket, address) for the first of addresses that answers."""
    last = "no address"
    for address in addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect((address, port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock, address
        except OSError as err:
            last = "%s:%d: %s" % (address, port, err.strerror or err)
            sock.close()
    raise UpstreamError("cannot connect: %s" % last, UNAVAILABLE)


class LineReader:
    """Bounded CRLF (or LF) lines from a socket with a per-read deadline."""

    def __init__(self, sock, timeout):
        self.sock, self.timeout, self.buffer = sock, timeout, bytearray()

    def line(self):
        deadline = time.monotonic() + self.timeout
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                if end + 1 > RESPONSE_LIMIT:
                    raise UpstreamError("response line too long", UNAVAILABLE)
                line = bytes(self.buffer[:end + 1])
                del self.buffer[:end + 1]
                return line
            if len(self.buffer) >= RESPONSE_LIMIT:
                raise UpstreamError("response line too long", UNAVAILABLE)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UpstreamError("no answer within %ds" % self.timeout, UNAVAILABLE)
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(RESPONSE_LIMIT)
            except socket.timeout:
                raise UpstreamError("no answer within %ds" % self.timeout, UNAVAILABLE) from None
            except OSError as err:
                raise UpstreamError("read failed: %s" % (err.strerror or err),
                                    UNAVAILABLE) from None
            if not data:
                raise UpstreamError("server closed the connection", UNAVAILABLE)
            self.buffer += data


def passed_through(line):
    """The server's -ERR line as the client gets it: unchanged, CRLF-ended."""
    return line.rstrip(b"\r\n") + b"\r\n"


def login(addresses, port, user, sign, timeout):
    """A Connection logged in as user, or UpstreamError (the socket closed).
    sign(timestamp, address, port) gives the APOP digest for the server at
    address:port, or None (the secret stays with the caller)."""
    sock, address = connect(addresses, port, timeout)
    try:
        reader = LineReader(sock, timeout)
        greeting = reader.line()
        if greeting.startswith(b"-ERR"):
            raise UpstreamError("server refused: %s" % greeting.strip().decode("ascii", "replace"),
                                passed_through(greeting))
        if not greeting.startswith(b"+OK"):
            raise UpstreamError("not a POP3 greeting", UNAVAILABLE)
        try:
            timestamp = apop.find_timestamp(greeting)
        except ValueError as err:
            raise UpstreamError(str(err), NO_APOP) from None
        signature = sign(timestamp, address, port)
        if signature is None:
            raise UpstreamError("no APOP digest for this timestamp", NO_APOP)
        command = b"APOP %s %s\r\n" % (user.encode("ascii"), signature.encode("ascii"))
        sock.settimeout(timeout)
        try:
            sock.sendall(command)
        except OSError as err:
            raise UpstreamError("write failed: %s" % (err.strerror or err), UNAVAILABLE) from None
        answer = reader.line()
        if answer.startswith(b"+OK"):
            sock.settimeout(None)
            return Connection(sock, passed_through(answer), bytes(reader.buffer))
        if answer.startswith(b"-ERR"):
            raise UpstreamError("server rejected APOP: %s"
                                % answer.strip().decode("ascii", "replace"),
                                passed_through(answer))
        raise UpstreamError("not a POP3 answer to APOP", UNAVAILABLE)
    except BaseException:
        # No QUIT: nothing was done there that an UPDATE state should commit.
        sock.close()
        raise

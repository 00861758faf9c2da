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

TLS to the server (`server-tls`, DESIGN §12.1): `implicit` makes the
handshake right after connect (POP3S, RFC 8314); `stls` reads the plain
greeting (its timestamp is the one APOP signs: no new greeting follows
STLS), asks CAPA, requires STLS in it (RFC 2595), sends STLS and, after its
+OK, makes the handshake; nothing the server sent before the handshake is
used after it (a read-ahead past the +OK is refused as an injection).  The
APOP command is only ever sent inside TLS.  With `server-tls-verify yes`
the certificate must chain to `server-ca` (or the system store) and name
the host the session was routed to (Login.host: the `server` attribute's
host or the user's %server, the very name the monitor resolved; the child
connects only to the addresses the monitor passed, the name serves only
the certificate check).  Any failure gets the client `-ERR [SYS/TEMP]`,
never a login; the context, and so the CA file, is made before the jail
(UpstreamTLS).  Inside TLS the relay is relay_tls (OpenSSL's buffer is
drained before each wait, so no decrypted byte is left behind a poll).
"""

import os
import select
import socket
import time

from common import apop
from pop3gw import relay

# RFC 2449 §4: a response line is at most 512 octets, CRLF included.
RESPONSE_LIMIT = 512


class UpstreamError(Exception):
    """The login failed: `reply` goes to the client, `reason` to the log
    (and `tls_error` when TLS was what failed)."""

    def __init__(self, reason, reply, tls_error=None):
        super().__init__(reason)
        self.reason = reason
        self.reply = reply
        self.tls_error = tls_error


UNAVAILABLE = b"-ERR [SYS/TEMP] mail server unavailable, try again later\r\n"
NO_APOP = b"-ERR [SYS/PERM] mail server does not offer a valid APOP challenge\r\n"


class Connection:
    """A connected, logged-in upstream socket and the bytes read past the
    answer; `tls_fields` are the log fields of a TLS session."""

    def __init__(self, sock, reply, rest, tls_fields=None):
        self.sock, self.reply, self.rest = sock, reply, rest
        self.tls_fields = dict(tls_fields or {})


# -- TLS to the inside server ------------------------------------------------

MAX_CAPA_LINES = 100


class UpstreamTLS:
    """`server-tls`, `server-ca`, `server-tls-verify`: the mode and the
    client context, made before the jail (the CA file and the system store
    cannot be read inside it).  A context that could not be made leaves
    `error` set, and every login through it then fails with that reason."""

    def __init__(self, mode="none", verify=True, cafile=None):
        self.mode, self.verify = mode, verify
        self.context = self.error = self.tls = None
        if mode == "none":
            return
        from common import tls      # ssl only where TLS is configured
        self.tls = tls
        try:
            tls.warm_up()
            self.context = tls.client_context(verify, cafile)
        except tls.TLSFileError as err:
            self.error = str(err)

    @classmethod
    def from_config(cls, config):
        return cls(config.get("server-tls") or "none", config.get("server-tls-verify"),
                   config.get("server-ca"))


def start_tls(sock, server_tls, host, timeout):
    """The SSLSocket of a handshake with the server (named host), or
    UpstreamError (the connection closed)."""
    tls = server_tls.tls
    try:
        return tls.handshake(sock, server_tls.context, host, timeout)
    except (OSError, ValueError) as err:        # ssl.SSLError is an OSError
        text = tls.describe_error(err)
        raise UpstreamError("TLS handshake with the server failed: %s" % text, UNAVAILABLE,
                            tls_error=text) from None


def stls(sock, reader, server_tls, host, timeout):
    """CAPA, STLS and the handshake after the plain greeting (RFC 2595 §4);
    the SSLSocket, or UpstreamError."""
    send_line(sock, b"CAPA\r\n", timeout)
    first = reader.line()
    if not first.startswith(b"+OK"):
        raise UpstreamError("server-tls stls: the server does not answer CAPA, so no STLS",
                            UNAVAILABLE, tls_error="STLS not offered")
    offered = False
    for _ in range(MAX_CAPA_LINES):
        line = reader.line()
        if line.rstrip(b"\r\n") == b".":
            break
        words = line.split()
        offered = offered or (bool(words) and words[0].upper() == b"STLS")
    else:
        raise UpstreamError("CAPA answer longer than %d lines" % MAX_CAPA_LINES, UNAVAILABLE)
    if not offered:
        raise UpstreamError("server-tls stls: the server does not offer STLS in CAPA",
                            UNAVAILABLE, tls_error="STLS not offered")
    send_line(sock, b"STLS\r\n", timeout)
    answer = reader.line()
    if not answer.startswith(b"+OK"):
        raise UpstreamError("server refused STLS: %s"
                            % answer.strip().decode("ascii", "replace")[:100],
                            UNAVAILABLE, tls_error="STLS refused")
    # The STLS injection rule: what came after the +OK, before the
    # handshake, is the plaintext an attacker put there.
    if reader.buffer:
        raise UpstreamError("server sent data after its +OK to STLS, before the handshake",
                            UNAVAILABLE, tls_error="plaintext after +OK to STLS")
    return start_tls(sock, server_tls, host, timeout)


def send_line(sock, data, timeout):
    sock.settimeout(timeout)
    try:
        sock.sendall(data)
    except OSError as err:
        raise UpstreamError("write failed: %s" % (err.strerror or err), UNAVAILABLE) from None


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


def login(addresses, port, user, sign, timeout, server_tls=None, host=None):
    """A Connection logged in as user, or UpstreamError (the socket closed).
    sign(timestamp, address, port) gives the APOP digest for the server at
    address:port, or None (the secret stays with the caller).  server_tls
    (an UpstreamTLS) and host (the name its certificate must show) make
    the login go over TLS."""
    mode = server_tls.mode if server_tls is not None else "none"
    if mode != "none" and server_tls.error is not None:
        raise UpstreamError("server-tls %s: %s" % (mode, server_tls.error), UNAVAILABLE,
                            tls_error=server_tls.error)
    sock, address = connect(addresses, port, timeout)
    tls_fields = {}
    try:
        if mode == "implicit":
            sock = start_tls(sock, server_tls, host or address, timeout)
            tls_fields = server_tls.tls.session_fields(sock)
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
        if mode == "stls":
            sock = stls(sock, reader, server_tls, host or address, timeout)
            tls_fields = server_tls.tls.session_fields(sock)
            reader = LineReader(sock, timeout)      # nothing from before the handshake
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
            return Connection(sock, passed_through(answer), bytes(reader.buffer),
                              {"upstream_" + key: value for key, value in tls_fields.items()})
        if answer.startswith(b"-ERR"):
            raise UpstreamError("server rejected APOP: %s"
                                % answer.strip().decode("ascii", "replace"),
                                passed_through(answer))
        raise UpstreamError("not a POP3 answer to APOP", UNAVAILABLE)
    except BaseException:
        # No QUIT: nothing was done there that an UPDATE state should commit.
        sock.close()
        raise


# -- relaying inside TLS ------------------------------------------------------

def relay_session(server, client_in, client_out, timeout, to_server=b""):
    """relay.relay for a plain server, relay_tls for one inside TLS."""
    if server.tls_fields:
        return relay_tls(client_in, client_out, server.sock, timeout, to_server, server.rest)
    return relay.relay(client_in, client_out, server.sock, timeout, to_server, server.rest)


def relay_tls(client_in, client_out, server, timeout, to_server=b"", to_client=b""):
    """relay.relay's contract with an SSLSocket as the server: unchanged,
    unparsed bytes both ways until the server closes, the client has gone
    and the server has finished, or `timeout` idle seconds; no QUIT is
    invented (the client's EOF becomes a TCP half-close towards the
    server).  Returns a relay.Result."""
    import ssl      # imported before the jail with common.tls
    result = relay.Result()
    for fd in {client_in, client_out}:
        os.set_blocking(fd, False)
        relay.nodelay(fd)
    server.setblocking(False)
    upward = bytearray(to_server)           # client -> server, not yet taken by TLS
    client_open = True
    try:
        relay.write_all(client_out, to_client, timeout)
    except (relay.Stalled, OSError):
        result.ended = "write failed"
        return result
    result.server_bytes = len(to_client)
    poller = select.poll()
    server_fd = server.fileno()
    idle_since = time.monotonic()
    want_write = False
    try:
        while True:
            # server -> client: drain OpenSSL's buffer before any wait
            while True:
                try:
                    data = server.recv(relay.CHUNK)
                except (ssl.SSLWantReadError, BlockingIOError):
                    break
                except ssl.SSLWantWriteError:
                    want_write = True
                    break
                except (ssl.SSLError, OSError) as err:
                    result.ended = "server read failed: %s" % (getattr(err, "reason", None)
                                                               or err.strerror or err)
                    return result
                if not data:
                    result.ended = "server closed"
                    return result
                relay.write_all(client_out, data, timeout)
                result.server_bytes += len(data)
                idle_since = time.monotonic()
            # client -> server
            while upward:
                try:
                    sent = server.send(upward[:relay.CHUNK])
                except (ssl.SSLWantWriteError, BlockingIOError):
                    want_write = True
                    break
                except ssl.SSLWantReadError:
                    break
                except (ssl.SSLError, OSError) as err:
                    result.ended = "write failed: %s" % (getattr(err, "reason", None)
                                                         or err.strerror or err)
                    return result
                del upward[:sent]
                result.client_bytes += sent
                want_write = False
            wait = timeout - (time.monotonic() - idle_since)
            if wait <= 0:
                result.ended = "timeout"
                return result
            for fd in (client_in, server_fd):
                try:
                    poller.unregister(fd)
                except KeyError:
                    pass
            events = select.POLLIN | (select.POLLOUT if (upward and want_write) else 0)
            poller.register(server_fd, events)
            if client_open and not upward:
                poller.register(client_in, select.POLLIN)
            try:
                ready = poller.poll(int(wait * 1000) + 1)
            except InterruptedError:
                continue
            if not ready:
                continue
            idle_since = time.monotonic()
            want_write = False
            for fd, _ in ready:
                if fd != client_in:
                    continue
                try:
                    data = os.read(client_in, relay.CHUNK)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    upward += data
                    continue
                # The client is gone: tell the server by EOF, never by QUIT
                # (socket.socket.shutdown: SSLSocket's own would drop TLS).
                client_open = False
                try:
                    socket.socket.shutdown(server, socket.SHUT_WR)
                except OSError:
                    result.ended = "client closed"
                    return result
    except relay.Stalled:
        result.ended = "write stalled"
    except OSError as err:
        result.ended = "write failed: %s" % (err.strerror or err)
    return result

"""Relay bytes between a client and the POP3 server when either side speaks
TLS (pop3-gw over STLS or POP3S): unchanged and unparsed, like pop3gw.relay,
with the same endings and the same rule that the client's going away only
shuts the server's side for writing (never a QUIT: RFC 1939 §6).

pop3gw.relay moves bytes with splice(), which cannot see through TLS; here
each side is an `Endpoint` over a socket or an ssl.SSLSocket, both
non-blocking under one poll loop.  What an SSLSocket has already decrypted
(pending()) is moved before the loop waits on its descriptor, so no bytes
sit unseen.  A write waits at most `timeout` for the peer to take data,
and the loop ends after `timeout` seconds in which nothing moved.  It
trusts neither side: nothing either sends is interpreted, and a TLS error
from the client ends the relay as the client's going away.
"""

import errno
import select
import socket
import ssl
import time

from pop3gw.relay import Result, Stalled

CHUNK = 1 << 18
_GONE = (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT)


class Endpoint:
    """One side: a connected socket or SSLSocket, made non-blocking."""

    def __init__(self, sock, timeout):
        self.sock, self.timeout = sock, timeout
        self.secure = isinstance(sock, ssl.SSLSocket)
        self.open = True
        sock.setblocking(False)
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def fileno(self):
        return self.sock.fileno()

    def pending(self):
        return self.secure and self.sock.pending() > 0

    def recv(self):
        """Bytes now, b"" at end of input, None when nothing is there yet."""
        try:
            return self.sock.recv(CHUNK)
        except (BlockingIOError, ssl.SSLWantReadError):
            return None
        except ssl.SSLWantWriteError:
            self.wait(select.POLLOUT)
            return None
        except ssl.SSLZeroReturnError:
            return b""
        except ssl.SSLError:
            return b""              # a broken record: the peer is gone as far as we care
        except OSError as err:
            if err.errno in _GONE:
                return b""
            raise

    def send_all(self, data):
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view):]
            except (BlockingIOError, ssl.SSLWantWriteError):
                self.wait(select.POLLOUT)
            except ssl.SSLWantReadError:
                self.wait(select.POLLIN)

    def wait(self, event):
        poller = select.poll()
        poller.register(self.sock.fileno(), event)
        if not poller.poll(int(self.timeout * 1000)):
            raise Stalled()

    def shutdown_write(self):
        """No more from the client: a plain server sees end of file.  A TLS
        server gets close_notify where it can (TLS has no half-close)."""
        try:
            if self.secure:
                self.sock.setblocking(True)
                self.sock.settimeout(0.5)
                self.sock.unwrap()
            else:
                self.sock.shutdown(socket.SHUT_WR)
        except (OSError, ValueError):
            pass


def relay(client, server, timeout, to_server=b"", to_client=b""):
    """Relay until the server closes, the client has gone and the server has
    finished, or `timeout` idle seconds; a pop3gw.relay.Result."""
    result = Result()
    near, far = Endpoint(client, timeout), Endpoint(server, timeout)
    try:
        far.send_all(to_server)
        near.send_all(to_client)
    except (Stalled, OSError):
        result.ended = "write failed"
        return result
    result.client_bytes, result.server_bytes = len(to_server), len(to_client)
    counts = {near: 0, far: 0}
    try:
        result.ended = _loop(near, far, timeout, counts)
    finally:
        result.client_bytes += counts[near]
        result.server_bytes += counts[far]
    return result


def _loop(near, far, timeout, counts):
    poller = select.poll()
    flags = select.POLLIN | select.POLLPRI
    poller.register(near.fileno(), flags)
    poller.register(far.fileno(), flags)
    by_fd = {near.fileno(): near, far.fileno(): far}
    idle_since = time.monotonic()
    while True:
        ready = [side for side in (near, far) if side.open and side.pending()]
        if not ready:
            wait = timeout - (time.monotonic() - idle_since)
            if wait <= 0:
                return "timeout"
            try:
                events = poller.poll(int(wait * 1000) + 1)
            except InterruptedError:
                continue
            ready = [by_fd[fd] for fd, _ in events if by_fd[fd].open]
            if not ready:
                continue
        idle_since = time.monotonic()
        for side in ready:
            other = far if side is near else near
            data = side.recv()
            if data is None:
                continue
            if data:
                try:
                    other.send_all(data)
                except Stalled:
                    return "write stalled"
                except ssl.SSLError as err:
                    return "write failed: %s" % (err.reason or err)
                except OSError as err:
                    return "write failed: %s" % (err.strerror or err)
                counts[side] += len(data)
                continue
            if side is far:
                return "server closed"
            # The client is gone: tell the server by end of file, never by QUIT.
            near.open = False
            poller.unregister(near.fileno())
            far.shutdown_write()

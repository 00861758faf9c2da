"""Relay bytes between the client and the POP3 server, unchanged and unparsed
(DESIGN §8), until either side closes or nothing moves for `timeout`.

The bytes never enter Python where the kernel can move them: each
direction splices from its source into a pipe and from the pipe into its
destination (os.splice); where a descriptor cannot be spliced it falls
back to one large read buffer reused for every read.  Both directions use
non-blocking descriptors under one poll loop, so a slow reader on one side
never stalls the other and every wait is bounded by `timeout`.

When the client goes away (with or without QUIT), the server's side is only
shut down for writing: no QUIT is ever invented, so a server that did not
get one from the client skips its UPDATE state and deletes nothing
(RFC 1939 §6); what it still sends is passed on until it closes.  It
trusts neither side: nothing they send is interpreted.
"""

import errno
import fcntl
import os
import select
import socket
import time

CHUNK = 1 << 20                       # bytes moved per splice or read
PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_GONE = (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT)


class Stalled(Exception):
    """The destination took nothing for `timeout` seconds."""


class Direction:
    """One way: source fd → destination fd, counting bytes."""

    def __init__(self, source, destination, timeout):
        self.source, self.destination, self.timeout = source, destination, timeout
        self.count = 0
        self.open = True
        self.pipe = None
        self.buffer = None
        try:
            self.pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                fcntl.fcntl(self.pipe[1], _F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass        # the default size still works, only slower
        except (OSError, AttributeError):
            self.pipe = None

    def close(self):
        if self.pipe:
            for fd in self.pipe:
                os.close(fd)
            self.pipe = None

    def move(self):
        """Move what the source has now; False at end of input."""
        if self.pipe is not None:
            try:
                moved = os.splice(self.source, self.pipe[1], CHUNK)
            except BlockingIOError:
                return True
            except OSError as err:
                if err.errno in (errno.EINVAL, errno.ENOSYS):
                    self.close()                    # not spliceable: copy instead
                    return self.move()
                if err.errno in _GONE:
                    return False
                raise
            if moved == 0:
                return False
            self.drain_pipe(moved)
            return True
        if self.buffer is None:
            self.buffer = bytearray(CHUNK)
        try:
            got = os.readv(self.source, [self.buffer])
        except BlockingIOError:
            return True
        except OSError as err:
            if err.errno in _GONE:
                return False
            raise
        if got == 0:
            return False
        write_all(self.destination, memoryview(self.buffer)[:got], self.timeout)
        self.count += got
        return True

    def drain_pipe(self, amount):
        while amount:
            try:
                moved = os.splice(self.pipe[0], self.destination, amount)
            except BlockingIOError:
                wait_writable(self.destination, self.timeout)
                continue
            amount -= moved
            self.count += moved


def wait_writable(fd, timeout):
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if not poller.poll(int(timeout * 1000)):
        raise Stalled()


def write_all(fd, data, timeout):
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            wait_writable(fd, timeout)


def nodelay(fd):
    """TCP_NODELAY: a POP3 answer's last segment must not wait for an ACK
    (Nagle with delayed ACK stalls every RETR by ~40 ms)."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    finally:
        sock.close()


class Result:
    def __init__(self):
        self.client_bytes = 0          # client → server
        self.server_bytes = 0          # server → client
        self.ended = "unknown"


def relay(client_in, client_out, server, timeout, to_server=b"", to_client=b""):
    """Relay until the server closes, the client has gone and the server has
    finished, or `timeout` idle seconds; returns a Result.  `server` is a
    connected socket; to_server/to_client are bytes already read ahead."""
    result = Result()
    server_fd = server.fileno()
    for fd in {client_in, client_out, server_fd}:
        os.set_blocking(fd, False)
        nodelay(fd)
    upward = Direction(client_in, server_fd, timeout)
    downward = Direction(server_fd, client_out, timeout)
    try:
        try:
            write_all(server_fd, to_server, timeout)
            write_all(client_out, to_client, timeout)
        except (Stalled, OSError):
            result.ended = "write failed"
            return result
        result.client_bytes, result.server_bytes = len(to_server), len(to_client)
        result.ended = loop(upward, downward, server, timeout)
    finally:
        result.client_bytes += upward.count
        result.server_bytes += downward.count
        upward.close()
        downward.close()
    return result


def loop(upward, downward, server, timeout):
    poller = select.poll()
    flags = select.POLLIN | select.POLLPRI
    poller.register(upward.source, flags)
    poller.register(downward.source, flags)
    idle_since = time.monotonic()
    while True:
        wait = timeout - (time.monotonic() - idle_since)
        if wait <= 0:
            return "timeout"
        try:
            events = poller.poll(int(wait * 1000) + 1)
        except InterruptedError:
            continue
        if not events:
            continue
        idle_since = time.monotonic()
        for fd, _ in events:
            direction = upward if fd == upward.source and upward.open else downward
            try:
                more = direction.move()
            except Stalled:
                return "write stalled"
            except OSError as err:
                return "write failed: %s" % (err.strerror or err)
            if more:
                continue
            if direction is downward:
                return "server closed"
            # The client is gone: tell the server by EOF, never by QUIT.
            upward.open = False
            poller.unregister(upward.source)
            try:
                server.shutdown(socket.SHUT_WR)
            except OSError:
                return "client closed"

"""A peer-name lookup that works from inside a chroot.

smap --daemon's session processes serve many connections after they have
jailed themselves in the spool, where the resolver's /etc files are not.
Each such process starts a Lookup first: a helper process, forked before
the chroot, that drops to the same unprivileged user without a chroot and
answers one question on a socketpair: the forward-confirmed name of an IP
address (common.hostmatch.confirmed_name, exactly what inetd mode asks the
resolver in-process).  The helper trusts nothing it is sent: a request is
one bounded datagram that must be the canonical text of an IP address; it
holds no other descriptor and no privilege.  The asking side bounds its
wait; a helper that does not answer in time is given up, and the process
that owns it serves no further connections.

It has a second question for smap's milters (smap.milter): "milter N"
connects to the N-th of the milter SPECs it was given at its start (the
netperm-table's, never a path or an address the jailed process sends)
and passes the connected socket back with SCM_RIGHTS, so that a jailed
session process reaches a unix: milter socket outside its chroot with
the rights of its user and nothing more.
"""

import os
import select
import signal
import socket

from common import hostmatch, privs, skeleton

MAX_REQUEST = 64                # an IPv6 address text is at most 45 octets
MAX_REPLY = 1024
WAIT = 60.0                     # two resolver lookups with the usual retries fit


class Lookup:
    """The asking side; `confirmed_name(addr)` answers like hostmatch's."""

    def __init__(self, uid, gid, drop=True, title="lookup", milters=(), milter_timeout=30):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        milters = list(milters)
        pid = os.fork()
        if pid == 0:
            ours.close()
            skeleton.run_child(lambda: _serve(theirs, uid, gid, drop, title, milters,
                                              milter_timeout))
        theirs.close()
        self.sock, self.pid = ours, pid
        self.broken = False
        self.milter_timeout = milter_timeout

    def milter_socket(self, index):
        """(connected socket, None) to milter number `index`, or (None, reason)."""
        if self.broken:
            return None, "peer-name helper gone"
        fds = []
        try:
            self.sock.send(b"milter %d" % index)
            ready, _, _ = select.select([self.sock], [], [], self.milter_timeout + WAIT)
            if ready:
                reply, fds, _, _ = socket.recv_fds(self.sock, MAX_REPLY, 1)
            else:
                reply = b""
        except OSError:
            reply = b""
        if not reply:
            for fd in fds:
                os.close(fd)
            self.broken = True
            return None, "peer-name helper gone"
        # exactly one descriptor with "ok", none otherwise: trust no other shape
        if reply != b"ok" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            text = reply.decode("ascii", "replace")
            return None, text[6:] if text.startswith("error ") else "bad helper reply"
        try:
            sock = socket.socket(fileno=fds[0])
        except OSError as err:
            os.close(fds[0])
            return None, "helper passed no socket: %s" % err.strerror
        if sock.type != socket.SOCK_STREAM or sock.family not in (
                socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):
            sock.close()
            return None, "helper passed a socket of the wrong kind"
        return sock, None

    def confirmed_name(self, addr):
        """(name, spoofed); (None, False) and `broken` set when the helper fails."""
        if not addr or self.broken:
            return None, False
        try:
            self.sock.send(addr.encode("ascii"))
            ready, _, _ = select.select([self.sock], [], [], WAIT)
            reply = self.sock.recv(MAX_REPLY) if ready else b""
        except OSError:
            reply = b""
        if not reply:
            self.broken = True
            return None, False
        spoofed, _, name = reply.decode("ascii", "replace").partition(" ")
        return (name or None), spoofed == "1"

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            self.broken = True
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)   # it may be waiting on a slow resolver
            except OSError:
                pass
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self.pid = 0


def _max_fd():
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (OSError, ValueError):
        return 1 << 16


def _milter(request, milters, timeout):
    """The answer to "milter N": (reply, [fd]); the socket is the helper's
    to close once it is sent."""
    from common import endpoint
    number = request[len(b"milter "):]
    if not (number.isdigit() and len(number) <= 3 and int(number) < len(milters)):
        return b"error no such milter", None
    try:
        return b"ok", endpoint.connect(milters[int(number)], timeout)
    except (OSError, ValueError) as err:
        text = "error connect: %s" % (getattr(err, "strerror", None) or err)
        return text.encode("ascii", "replace")[:MAX_REPLY], None


def _serve(sock, uid, gid, drop, title, milters=(), milter_timeout=30):
    """The helper: no chroot, the session's user, nothing open but its socket."""
    skeleton.reset_child_signals()
    keep = sock.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, _max_fd())
    if drop:
        privs.drop("/", uid, gid, chroot=False)
    skeleton.set_title(title)
    while True:
        try:
            request = sock.recv(MAX_REQUEST + 1)
        except OSError:
            return 1
        if not request:
            return 0
        if request.startswith(b"milter "):
            answer, connected = _milter(request, milters, milter_timeout)
            if connected is None:
                sock.send(answer)
            else:
                try:
                    socket.send_fds(sock, [answer], [connected.fileno()])
                finally:
                    connected.close()
            continue
        try:
            text = request.decode("ascii")
        except UnicodeError:
            text = ""
        if len(request) > MAX_REQUEST or hostmatch.normalize_address(text) != text:
            answer = b"0 "
        else:
            name, spoofed = hostmatch.confirmed_name(text)
            answer = ("%d %s" % (spoofed, name or "")).encode("ascii", "replace")[:MAX_REPLY]
        sock.send(answer)

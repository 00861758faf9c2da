"""Milter endpoints: the SPEC of `smap: milters SPEC...` and its connection.

A SPEC is Postfix's spelling, `unix:/absolute/path` or `inet:HOST:PORT`.
HOST must be an IP address literal (`127.0.0.1`, `[::1]`): smap connects
to inet: milters from its jail and from its --daemon peer-name helper,
and neither asks the resolver for a milter's address, so what the table
names is exactly what is connected to (no DNS answer can move a content
scanner elsewhere).  parse() is pure and imports nothing that costs
start-up time: the netperm-table reader checks SPECs with it.  connect()
is called outside the jail only (inetd mode before the chroot, and the
--daemon helper of common.lookup), with the SPECs fixed by the table at
start; it never takes a path from a jailed process.
"""

from common import hostmatch

MAX_SPEC = 200
UNIX, INET, INET6 = "unix", "inet", "inet6"


def parse(text):
    """(kind, address) for a SPEC: (UNIX, path) or (INET|INET6, (host, port));
    raises ValueError with the reason."""
    if len(text) > MAX_SPEC or not text.isascii() or not text.isprintable() or " " in text:
        raise ValueError("%r is not a milter SPEC" % text[:MAX_SPEC])
    transport, colon, rest = text.partition(":")
    if not colon or not rest:
        raise ValueError("%r: a SPEC is unix:PATH or inet:HOST:PORT" % text)
    if transport == "unix":
        if not rest.startswith("/") or "\0" in rest or len(rest.encode()) > 107:
            raise ValueError("%r: unix: needs an absolute path of at most 107 octets" % text)
        return UNIX, rest
    if transport != "inet":
        raise ValueError("%r: unknown transport %r (unix or inet)" % (text, transport))
    host, colon, port = rest.rpartition(":")
    if not colon or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError("%r: inet: needs HOST:PORT with a port 1..65535" % text)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise ValueError("%r: [...] is for an IPv6 address" % text)
    elif ":" in host:
        raise ValueError("%r: write an IPv6 address in brackets: inet:[::1]:PORT" % text)
    address = hostmatch.normalize_address(host) if host else None
    if address is None or "%" in host:
        raise ValueError("%r: HOST must be an IP address literal (no DNS for milters)" % text)
    return (INET6 if ":" in address else INET), (address, int(port))


def canonical(text):
    """The SPEC as parse() reads it, for the netperm-table reader."""
    parse(text)
    return text


def connect(text, timeout):
    """A connected, blocking stream socket to the milter of SPEC `text`;
    raises OSError (ValueError for a bad SPEC).  Connecting waits at most
    `timeout` seconds."""
    import socket   # only where a milter is configured
    kind, address = parse(text)
    family = {UNIX: socket.AF_UNIX, INET: socket.AF_INET, INET6: socket.AF_INET6}[kind]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
        if kind != UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        return sock
    except BaseException:
        sock.close()
        raise

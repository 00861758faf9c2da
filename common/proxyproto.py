"""HAProxy's PROXY protocol, versions 1 and 2: the header a load balancer
puts before a client's bytes to say who the client is.

`parse(data)` is pure: bytes in; out a `Header`, or None while more bytes
are needed, or `ProxyError` with a reason.  It is strict and bounded:

* v1: `PROXY TCP4|TCP6 SRC DST SRCPORT DSTPORT` CRLF, at most 107 octets
  with the CRLF (the specification's limit), single spaces, only CRLF ends
  it; addresses in their one canonical spelling (a dotted quad without
  leading zeros, IPv6 in RFC 5952 text, IPv4-mapped as ::ffff:a.b.c.d),
  ports decimal 0..65535 without leading zeros.  `PROXY UNKNOWN ...`: the
  connection's own address is used.
* v2: the 12-octet signature, version 2, command LOCAL (the connection's
  own address: a health check) or PROXY with family UNSPEC (the same),
  TCP over IPv4 or TCP over IPv6; anything else is refused.  The length
  is at most V2_PAYLOAD_LIMIT; TLVs are walked (they must fit exactly, at
  most MAX_TLVS) and skipped.

A header's client address is normalised as a peer's is
(common.hostmatch.normalize_address: IPv4-mapped becomes IPv4), so the
host rules judge the address that is used, however it was carried.

`read_header(sock, wait)` reads one header from a connected socket within
`wait` seconds and never takes a byte past it: the bytes after the header
are the client's own and stay in the socket for the session (smap's check
for talk before the banner sees them; the header is not such talk).
`peer_behind(sock, patterns, confirm)` is the policy: only a connection
from an address in `proxy-hosts` may (and must) send a header.

What this module trusts: nothing in the bytes.  Who may send a header is
the caller's table (`proxy-hosts`, addresses only, see netperm's kind
`addresses`); whoever is listed there can claim any client address.
"""

import _socket

from common import hostmatch

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"      # v2, 12 octets
V1_PREFIX = b"PROXY "
V1_LIMIT = 107                  # the specification's longest v1 line, CRLF included
V2_FIXED = 16                   # signature, version/command, family, length
V2_PAYLOAD_LIMIT = 1024         # addresses (36 for TCP6) and TLVs; HAProxy sends far less
MAX_TLVS = 64
LIMIT = V2_FIXED + V2_PAYLOAD_LIMIT     # the most octets a header may take
HEADER_WAIT = 5.0               # seconds for the whole header (Postfix's smtpd_upstream_proxy_timeout)

LOCAL, PROXY = 0, 1
TCP4, TCP6 = 0x11, 0x21


class ProxyError(ValueError):
    """A header that is refused; `reason` says why (for the log)."""

    def __init__(self, reason, proxy=None):
        super().__init__(reason)
        self.reason = reason
        self.proxy = proxy      # set by peer_behind: the connecting address


class Header:
    """A parsed header: `length` octets long; `client`/`client_port` the
    client's address (normalised) and port, `server`/`server_port` the
    address it connected to on the load balancer; `client` None when the
    connection's own address is to be used (v1 UNKNOWN, v2 LOCAL or UNSPEC)."""

    __slots__ = ("version", "length", "client", "client_port", "server", "server_port")

    def __init__(self, version, length, client=None, client_port=None, server=None,
                 server_port=None):
        self.version, self.length = version, length
        self.client, self.client_port = client, client_port
        self.server, self.server_port = server, server_port

    @property
    def local(self):
        return self.client is None

    def __repr__(self):
        return "Header(v%d, %d, %r, %r, %r, %r)" % (
            self.version, self.length, self.client, self.client_port, self.server,
            self.server_port)


def looks_like_header(data):
    """Whether client bytes start like a PROXY header (for the refusal's reason
    where no header is accepted)."""
    return data.startswith(V1_PREFIX) or data.startswith(SIGNATURE)


def parse(data):
    """A Header, None when `data` is a correct beginning that needs more
    bytes, or ProxyError.  Bytes after the header are ignored (Header.length
    says where it ends)."""
    data = bytes(data[:LIMIT])
    if data[:1] == b"P":
        if not V1_PREFIX.startswith(data[:len(V1_PREFIX)]):
            raise ProxyError("not a PROXY protocol header")
        return _parse_v1(data)
    if data[:1] == b"\r":
        if not SIGNATURE.startswith(data[:len(SIGNATURE)]):
            raise ProxyError("not a PROXY protocol v2 signature")
        return _parse_v2(data)
    if not data:
        return None
    raise ProxyError("not a PROXY protocol header")


# -- version 1 ---------------------------------------------------------------
def _parse_v1(data):
    window = data[:V1_LIMIT]
    end = window.find(b"\r\n")
    line = window if end < 0 else window[:end]
    for index, byte in enumerate(line):
        # a CR may only be the last octet seen so far, its LF still to come
        if byte == 0x0d and (end >= 0 or index + 1 < len(line)):
            raise ProxyError("v1 header: bare CR")
        if byte == 0x0a:
            raise ProxyError("v1 header: bare LF (only CRLF ends it)")
        if (byte < 0x20 or byte > 0x7e) and byte != 0x0d:
            raise ProxyError("v1 header: control or 8-bit character")
    if end < 0:
        if len(window) >= V1_LIMIT:
            raise ProxyError("v1 header longer than %d octets" % V1_LIMIT)
        return None
    words = line.decode("ascii").split(" ")
    if len(words) < 2 or words[0] != "PROXY":
        raise ProxyError("v1 header: no protocol")
    length = end + 2
    if words[1] == "UNKNOWN":
        # the specification: the rest of the line is to be ignored
        return Header(1, length)
    if words[1] not in ("TCP4", "TCP6"):
        raise ProxyError("v1 header: unknown protocol %r" % words[1][:8])
    if len(words) != 6:
        raise ProxyError("v1 header: %d fields, not 6 (one space between fields)" % len(words))
    check = _ipv4_text if words[1] == "TCP4" else _ipv6_text
    client, server = check(words[2]), check(words[3])
    return Header(1, length, hostmatch.normalize_address(client), _port(words[4]),
                  hostmatch.normalize_address(server), _port(words[5]))


def _ipv4_text(text):
    if hostmatch.normalize_address(text) != text or ":" in text:
        raise ProxyError("v1 header: %r is not a dotted quad in canonical form" % text[:40])
    return text


def _ipv6_text(text):
    if ":" not in text or "%" in text:
        raise ProxyError("v1 header: %r is not an IPv6 address" % text[:40])
    try:
        packed = _socket.inet_pton(_socket.AF_INET6, text)
    except (OSError, ValueError):
        raise ProxyError("v1 header: %r is not an IPv6 address" % text[:40]) from None
    if text != canonical_ipv6(packed):
        raise ProxyError("v1 header: %r is not in RFC 5952 form (%s)"
                         % (text[:40], canonical_ipv6(packed)))
    return text


def canonical_ipv6(packed):
    """RFC 5952 text of 16 octets, IPv4-mapped ones as ::ffff:a.b.c.d (§5)."""
    if packed[:12] == b"\0" * 10 + b"\xff\xff":
        return "::ffff:%d.%d.%d.%d" % tuple(packed[12:])
    return hostmatch._ipv6_text(packed)


def _port(text):
    if not text or not text.isascii() or not text.isdigit() \
            or (len(text) > 1 and text[0] == "0") or len(text) > 5 or int(text) > 65535:
        raise ProxyError("v1 header: bad port %r" % text[:8])
    return int(text)


# -- version 2 ---------------------------------------------------------------
def _parse_v2(data):
    if len(data) < V2_FIXED:
        return None
    version, command = data[12] >> 4, data[12] & 0x0f
    if version != 2:
        raise ProxyError("v2 header: version %d" % version)
    if command not in (LOCAL, PROXY):
        raise ProxyError("v2 header: unknown command %d" % command)
    family = data[13]
    payload_length = data[14] << 8 | data[15]
    if payload_length > V2_PAYLOAD_LIMIT:
        raise ProxyError("v2 header: length %d over %d" % (payload_length, V2_PAYLOAD_LIMIT))
    length = V2_FIXED + payload_length
    if len(data) < length:
        return None
    payload = data[V2_FIXED:length]
    if command == LOCAL:
        # the specification: use the connection's own addresses, ignore the block
        return Header(2, length)
    if family == 0x00:
        return Header(2, length)
    if family == TCP4:
        size = 12
        if payload_length < size:
            raise ProxyError("v2 header: TCP4 block of %d octets" % payload_length)
        client = "%d.%d.%d.%d" % tuple(payload[0:4])
        server = "%d.%d.%d.%d" % tuple(payload[4:8])
        ports = payload[8:12]
    elif family == TCP6:
        size = 36
        if payload_length < size:
            raise ProxyError("v2 header: TCP6 block of %d octets" % payload_length)
        client = hostmatch.normalize_address(canonical_ipv6(payload[0:16]))
        server = hostmatch.normalize_address(canonical_ipv6(payload[16:32]))
        ports = payload[32:36]
    else:
        raise ProxyError("v2 header: family 0x%02x is not TCP over IPv4 or IPv6" % family)
    _check_tlvs(payload[size:])
    return Header(2, length, client, ports[0] << 8 | ports[1], server, ports[2] << 8 | ports[3])


def _check_tlvs(block):
    """TLVs are skipped, but they must fit the block exactly."""
    offset = count = 0
    while offset < len(block):
        count += 1
        if count > MAX_TLVS:
            raise ProxyError("v2 header: more than %d TLVs" % MAX_TLVS)
        if offset + 3 > len(block):
            raise ProxyError("v2 header: truncated TLV")
        offset += 3 + (block[offset + 1] << 8 | block[offset + 2])
        if offset > len(block):
            raise ProxyError("v2 header: TLV longer than the header")


# -- reading and policy ---------------------------------------------------------
def read_header(sock, wait=HEADER_WAIT, clock=None):
    """One header from the connected socket `sock` within `wait` seconds,
    taking no byte after it.  It peeks, and takes only what the parser has
    seen to belong to the header: an incomplete header's bytes all belong
    to it.  ProxyError on a bad header, a timeout or end of file."""
    import select       # the daemons have it already; inetd mode never comes here
    import time
    clock = clock or time.monotonic
    deadline = clock() + wait
    taken = b""
    while True:
        left = deadline - clock()
        if left <= 0:
            raise ProxyError("no complete PROXY header within %g seconds" % wait)
        try:
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                continue
            seen = sock.recv(LIMIT - len(taken), _socket.MSG_PEEK)
        except InterruptedError:
            continue
        except OSError as err:
            raise ProxyError("reading the PROXY header: %s" % (err.strerror or err)) from None
        if not seen:
            raise ProxyError("connection closed %s the PROXY header"
                             % ("inside" if taken else "before"))
        header = parse(taken + seen)
        want = len(seen) if header is None else header.length - len(taken)
        taken += _take(sock, want)
        if header is not None:
            return header


def _take(sock, count):
    """Exactly `count` octets that a peek has shown are there."""
    parts, have = [], 0
    while have < count:
        chunk = sock.recv(count - have)
        if not chunk:
            raise ProxyError("connection closed inside the PROXY header")
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts)


def socket_address(sock):
    """The normalised peer address of an IP socket, or None."""
    try:
        if sock.family not in (_socket.AF_INET, _socket.AF_INET6):
            return None
        return hostmatch.normalize_address(sock.getpeername()[0])
    except OSError:
        return None


def peer_behind(sock, patterns, confirm=None, wait=HEADER_WAIT):
    """(Peer, proxy address) of a connection from a load balancer.

    A connection whose own address is not in `patterns` (proxy-hosts,
    matched on the address alone: no name) gives (None, None): the caller
    treats it as a direct client, and a header it sends is client talk.  From
    a listed address a valid header is required (ProxyError otherwise, with
    `proxy` set); the Peer is then the header's client, its name
    forward-confirmed by `confirm(addr)` exactly as a direct client's, or
    the load balancer itself for LOCAL/UNKNOWN (its health checks)."""
    proxy = socket_address(sock)
    if proxy is None or not hostmatch.list_matches(patterns, proxy, None):
        return None, None
    try:
        header = read_header(sock, wait)
    except ProxyError as err:
        err.proxy = proxy
        raise
    addr = proxy if header.local else header.client
    name, spoofed = (confirm or hostmatch.confirmed_name)(addr)
    return hostmatch.Peer(addr, name, spoofed), proxy


class TaggedLog:
    """A log whose every line also says `proxy=LB` (the client's own address
    stays in addr=); everything else is the wrapped log's."""

    def __init__(self, log, proxy):
        self._log, self.proxy = log, proxy

    def __getattr__(self, name):
        return getattr(self._log, name)

    def _with(self, fields):
        fields.setdefault("proxy", self.proxy)
        return fields

    def event(self, priority, event, **fields):
        self._log.event(priority, event, **self._with(fields))

    def info(self, event, **fields):
        self._log.info(event, **self._with(fields))

    def notice(self, event, **fields):
        self._log.notice(event, **self._with(fields))

    def warning(self, event, **fields):
        self._log.warning(event, **self._with(fields))

    def error(self, event, **fields):
        self._log.error(event, **self._with(fields))


def tagged(log, proxy):
    """`log` itself when there is no proxy, else a TaggedLog."""
    return log if proxy is None else TaggedLog(log, proxy)

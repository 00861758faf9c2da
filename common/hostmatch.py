"""Host patterns and host rules of the netperm-table (DESIGN §4).

A pattern is `*`-glob over an address or a host name, ADDR/PREFIX, ADDR:MASK
or a literal address; a leading `!` negates it.  A peer's name takes part in
matching only when it was forward-confirmed (the reverse name resolves back
to the peer's address); otherwise the name is None and only address
patterns can match.  A peer that is not an IP socket has no address: only
the pattern `*` matches it.  A `-dest` list is matched against a
`Destination`: the address actually connected to, the name the user typed
and the names the resolver gave (see `dest_matches`).  `literal_problem`
says why a typed host may not name a destination (a number that is not a
plain dotted quad or RFC 5952 IPv6 text).  This module does no I/O except
in `confirmed_name`, which asks the resolver.
"""

import _socket
import sys

# ipaddress and fnmatch are imported where a pattern needs them: smap under
# inetd starts a fresh interpreter per connection, and a table without host
# rules (the default for smap) should not pay for them.


class Peer:
    """The other end of a connection: address (None if not IP) and confirmed name."""

    __slots__ = ("addr", "name", "spoofed")

    def __init__(self, addr=None, name=None, spoofed=False):
        self.addr = normalize_address(addr) if addr else None
        self.name = name.lower().rstrip(".") if name else None
        self.spoofed = spoofed

    @property
    def addr_text(self):
        return self.addr or "unknown"

    @property
    def name_text(self):
        return self.name or "unknown"

    def __repr__(self):
        return "Peer(%r, %r)" % (self.addr, self.name)


_MAPPED_PREFIX = b"\0" * 10 + b"\xff\xff"      # ::ffff:a.b.c.d


def normalize_address(text):
    """Canonical text of an IP address; IPv4-mapped IPv6 becomes IPv4."""
    text = text.split("%", 1)[0]
    if _plain_ipv4(text):
        return text
    if ":" not in text:
        return None
    try:
        packed = _socket.inet_pton(_socket.AF_INET6, text)
    except (OSError, ValueError):
        return None
    if packed[:12] == _MAPPED_PREFIX:
        return "%d.%d.%d.%d" % tuple(packed[12:])
    return _ipv6_text(packed)


def _ipv6_text(packed):
    """RFC 5952 text of 16 octets, exactly as ipaddress writes it: hextets
    without leading zeros, the first longest run of two or more zero
    hextets written as `::`."""
    hextets = ["%x" % (packed[i] << 8 | packed[i + 1]) for i in range(0, 16, 2)]
    best_start, best_len, start, length = -1, 0, -1, 0
    for index, hextet in enumerate(hextets):
        if hextet == "0":
            length += 1
            if start == -1:
                start = index
            if length > best_len:
                best_start, best_len = start, length
        else:
            start, length = -1, 0
    if best_len > 1:
        end = best_start + best_len
        if end == len(hextets):
            hextets += [""]
        hextets[best_start:end] = [""]
        if best_start == 0:
            hextets = [""] + hextets
    return ":".join(hextets)


def literal_problem(host):
    """Why `host`, as typed, may not name a destination; None when it is a
    host name, a plain dotted quad or an IPv6 address in RFC 5952 text.
    The C library reads `127.1`, `2130706433`, `0x7f.1` or `0177.0.0.1` as
    127.0.0.1 too; a rule cannot be expected to know every spelling, so
    every spelling but the canonical one is refused."""
    if ":" in host:
        if "%" in host:
            return "IPv6 zone index in a destination"
        try:
            packed = _socket.inet_pton(_socket.AF_INET6, host)
        except (OSError, ValueError):
            return "bad IPv6 address"
        if packed[:12] == _MAPPED_PREFIX:
            return "IPv4-mapped IPv6 address: write the dotted quad"
        if _ipv6_text(packed) != host.lower():
            return "IPv6 address not in RFC 5952 form (%s)" % _ipv6_text(packed)
        return None
    if _plain_ipv4(host):
        return None
    last = host.rstrip(".").rpartition(".")[2]
    if last.isdigit() and last.isascii():
        return "numeric host name that is not a dotted quad"
    try:
        _socket.inet_aton(host)
    except (OSError, ValueError):
        return None
    return "IPv4 address not written as a dotted quad"


def _plain_ipv4(text):
    """True for canonical dotted-quad text (what getpeername gives), which
    ipaddress would return unchanged."""
    parts = text.split(".")
    if len(parts) != 4:
        return False
    for part in parts:
        if not part.isdigit() or not part.isascii() or len(part) > 3 \
                or (len(part) > 1 and part[0] == "0") or int(part) > 255:
            return False
    return True


def _resolver():
    """`socket` when something already imported it (its gethostbyaddr is
    _socket's, its getaddrinfo a thin wrapper), else _socket: importing
    `socket` only for these two calls costs smap milliseconds per start."""
    return sys.modules.get("socket") or _socket


def confirmed_name(addr):
    """(name, spoofed) for addr: the reverse name if it resolves back to addr."""
    if not addr:
        return None, False
    try:
        # bytes, not str: a str host makes _socket import encodings.idna
        # (and re, stringprep, unicodedata), several ms per connection
        name = _resolver().gethostbyaddr(addr.encode("ascii"))[0]
    except (OSError, UnicodeError):
        return None, False
    try:
        infos = _resolver().getaddrinfo(name.encode("ascii"), None,
                                        proto=_socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return None, True
    if any(normalize_address(info[4][0]) == addr for info in infos):
        return name, False
    return None, True


def peer_of_socket(sock, confirm=None):
    """The Peer behind a connected socket, with a forward-confirmed name
    (`confirm(addr)` gives it: confirmed_name, or a helper that asks it
    outside a chroot)."""
    try:
        if sock.family not in (_socket.AF_INET, _socket.AF_INET6):
            return Peer()
        addr = normalize_address(sock.getpeername()[0])
    except OSError:
        return Peer()
    name, spoofed = (confirm or confirmed_name)(addr)
    return Peer(addr, name, spoofed)


def _ipaddress():
    """ipaddress, imported by the first pattern that needs it (at parse time,
    before any chroot; afterwards this is a sys.modules lookup)."""
    import ipaddress
    return ipaddress


_fnmatchcase = None


def _globs():
    """fnmatchcase, imported by the first glob parsed (before any chroot)."""
    global _fnmatchcase
    if _fnmatchcase is None:
        from fnmatch import fnmatchcase
        _fnmatchcase = fnmatchcase
    return _fnmatchcase


class PatternError(ValueError):
    pass


class Pattern:
    """One host pattern; `matches(addr, name)` with either possibly None."""

    __slots__ = ("text", "negated", "network", "glob", "address_only")

    def __init__(self, text):
        self.text = text
        self.negated = text.startswith("!")
        body = text[1:] if self.negated else text
        if not body:
            raise PatternError("empty host pattern")
        self.network = None
        self.glob = None
        if "/" in body:
            try:
                self.network = _ipaddress().ip_network(body, strict=False)
            except ValueError:
                raise PatternError("bad CIDR pattern %r" % body) from None
        elif body.count(":") == 1 and _is_ipv4(body.split(":")[0]):
            address, mask = body.split(":")
            if not _is_ipv4(mask):
                raise PatternError("bad ADDR:MASK pattern %r" % body)
            try:
                self.network = _ipaddress().ip_network("%s/%s" % (address, mask), strict=False)
            except ValueError:
                raise PatternError("bad mask in %r" % body) from None
        elif normalize_address(body):
            self.network = _ipaddress().ip_network(normalize_address(body))
        else:
            if any(c.isspace() or ord(c) < 32 for c in body):
                raise PatternError("bad host pattern %r" % body)
            # `127.1` would be a glob that no address text ever equals: a
            # `!127.1` meant to deny 127.0.0.1 would deny nothing.
            if not any(c in "*?[" for c in body) and literal_problem(body):
                raise PatternError("%s: %r" % (literal_problem(body), body))
            self.glob = body.lower()
            if self.glob != "*":
                _globs()        # now, before any chroot: hits() needs it
        # A glob made of address characters (`10.1.*`, `fe80::*`) is meant
        # for addresses: matching it against names too would let anyone who
        # controls the reverse and forward DNS of their own addresses pick a
        # name like `10.1.evil.example` and pass as an inside host.
        self.address_only = self.glob is not None and (
            ":" in self.glob or all(c in "0123456789.*?[]" for c in self.glob))

    def hits(self, addr, name):
        """True when the pattern (ignoring its `!`) matches."""
        if self.glob == "*":
            return True
        if addr is None:
            # No address: a peer that is not an IP socket (name None too), or
            # a -dest given by name, which only a name glob can match.
            return (name is not None and self.glob is not None and not self.address_only
                    and _globs()(name, self.glob))
        if self.network is not None:
            try:
                return _ipaddress().ip_address(addr) in self.network
            except ValueError:
                return False
        if _globs()(addr, self.glob):
            return True
        if self.address_only:
            return False
        return name is not None and _globs()(name, self.glob)


def _is_ipv4(text):
    try:
        return _ipaddress().ip_address(text).version == 4
    except ValueError:
        return False


def first_hit(patterns, addr, name):
    """True or False as the first pattern that hits says; None: none hits."""
    for pattern in patterns:
        if pattern.hits(addr, name):
            return not pattern.negated
    return None


def list_matches(patterns, addr, name):
    """The first pattern that hits decides; none hits: true only if all are negated."""
    verdict = first_hit(patterns, addr, name)
    if verdict is not None:
        return verdict
    return bool(patterns) and all(p.negated for p in patterns)


class Destination:
    """Where a session goes: `addr`, the address connected to; `name`, the
    host name the user (or the table's `server`) gave, None for an address
    literal; `learned`, names the resolver gave for it (its canonical name);
    `user_named`, whether the user chose it (`user%server`) rather than the
    table."""

    __slots__ = ("addr", "name", "learned", "user_named")

    def __init__(self, addr, name=None, learned=(), user_named=False):
        self.addr = addr
        self.name = name.lower().rstrip(".") if name else None
        self.learned = [n.lower().rstrip(".") for n in learned if n]
        self.user_named = user_named

    @classmethod
    def of_text(cls, text):
        """A destination known only by its spelling (an address or a name)."""
        addr = normalize_address(text)
        return cls(addr, None if addr else text)


def dest_matches(patterns, dest):
    """Whether a -dest list speaks for `dest`.  Each form of the destination
    (its address, the typed name, each learned name) is tried on its own,
    first hit deciding: a `!` pattern that decides for any form refuses (so
    a denied address is denied whatever the name, and a denied name whatever
    the address); otherwise a pattern must hit the address or the typed
    name.  A learned name can only refuse: it comes from the DNS, and who
    controls a name's DNS must not be able to earn it a permit.

    For the same reason a name the user typed (`user%name`) earns a permit
    only for a global address: whoever controls the DNS of a permitted
    domain (`-dest *.partner.example`) could otherwise point it at a
    loopback, private or link-local address and reach the site's inside
    servers through the gateway.  Such an address is reached only when an
    address pattern of the list permits it (`-dest 10.1.2.0/24`)."""
    address_verdict = first_hit(patterns, dest.addr, None) if dest.addr else None
    verdicts = [address_verdict] if dest.addr else []
    if dest.name:
        verdicts.append(first_hit(patterns, None, dest.name))
    learned = [first_hit(patterns, None, name) for name in dest.learned]
    if False in verdicts or False in learned:
        return False
    if address_verdict is None and dest.user_named and dest.addr and not is_global(dest.addr):
        return False
    if True in verdicts:
        return True
    return bool(patterns) and all(p.negated for p in patterns)


def is_global(addr):
    """Whether an address (canonical text) is a global unicast one: not
    loopback, private (RFC 1918, fc00::/7), shared (100.64.0.0/10),
    link-local, multicast, documentation or otherwise reserved."""
    import ipaddress    # pop3-gw's monitor only: smap under inetd never judges a -dest
    try:
        address = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return address.is_global and not address.is_multicast


def words_match(words, value):
    """Like list_matches for plain words (user names), case-sensitive globs."""
    for word in words:
        negated = word.startswith("!")
        body = word[1:] if negated else word
        if _globs()(value, body):
            return not negated
    return bool(words) and all(w.startswith("!") for w in words)


class Rule:
    """permit-hosts / deny-hosts PATTERN... [-dest PATTERN...] [-user NAME...]"""

    __slots__ = ("permit", "sources", "dests", "users", "line")

    def __init__(self, permit, sources, dests=None, users=None, line=0):
        self.permit = permit
        self.sources = sources
        self.dests = dests
        self.users = users
        self.line = line

    def applies(self, peer, dest=None, user=None):
        """Whether this rule speaks for the peer (and dest/user when given)."""
        if not list_matches(self.sources, peer.addr, peer.name):
            return False
        if self.dests is not None and dest is not None:
            if not isinstance(dest, Destination):
                dest = Destination.of_text(dest)
            if not dest_matches(self.dests, dest):
                return False
        if self.users is not None and user is not None:
            if not words_match(self.users, user):
                return False
        return True


def parse_rule(attribute, args, line=0, options=("-dest", "-user")):
    """A Rule from the words after permit-hosts/deny-hosts; raises PatternError."""
    permit = attribute == "permit-hosts"
    sources, dests, users = [], None, None
    current = sources
    for word in args:
        if word.startswith("-") and len(word) > 1:
            if word not in options:
                raise PatternError("unknown option %s" % word)
            if not permit:
                raise PatternError("%s takes no options" % attribute)
            if word == "-dest":
                dests = dests if dests is not None else []
                current = dests
            else:
                users = users if users is not None else []
                current = users
            continue
        current.append(word if current is users else Pattern(word))
    if users:
        _globs()                # words_match() runs later, maybe in a chroot
    if not sources:
        raise PatternError("%s needs at least one host pattern" % attribute)
    if dests == [] or users == []:
        raise PatternError("an option needs at least one argument")
    return Rule(permit, sources, dests, users, line)


def decide(rules, peer, dest=None, user=None, default=False):
    """(permitted, rule): the first rule that applies decides; no rules: default."""
    if not rules:
        return default, None
    for rule in rules:
        if rule.applies(peer, dest, user):
            return rule.permit, rule
    return False, None


def may_connect(rules, peer, default=False):
    """Before dest and user are known: is there a permit rule for this source
    that is not preceded by a deny rule for it?"""
    if not rules:
        return default
    for rule in rules:
        if list_matches(rule.sources, peer.addr, peer.name):
            if not rule.permit:
                return False
            return True
    return False

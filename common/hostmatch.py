"""Host patterns and host rules of the netperm-table (DESIGN §4).

A pattern is `*`-glob over an address or a host name, ADDR/PREFIX, ADDR:MASK
or a literal address; a leading `!` negates it.  A peer's name takes part in
matching only when it was forward-confirmed (the reverse name resolves back
to the peer's address); otherwise the name is None and only address
patterns can match.  A peer that is not an IP socket has no address: only
the pattern `*` matches it.  This module does no I/O except in
`confirmed_name`, which asks the resolver.
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
    if packed[:12] == b"\0" * 10 + b"\xff\xff":
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


def list_matches(patterns, addr, name):
    """The first pattern that hits decides; none hits: true only if all are negated."""
    for pattern in patterns:
        if pattern.hits(addr, name):
            return not pattern.negated
    return bool(patterns) and all(p.negated for p in patterns)


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
            dest_addr = normalize_address(dest)
            dest_name = None if dest_addr else dest.lower().rstrip(".")
            if not list_matches(self.dests, dest_addr, dest_name):
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

"""Host patterns and host rules of the netperm-table (DESIGN §4).

A pattern is `*`-glob over an address or a host name, ADDR/PREFIX, ADDR:MASK
or a literal address; a leading `!` negates it.  A peer's name takes part in
matching only when it was forward-confirmed (the reverse name resolves back
to the peer's address); otherwise the name is None and only address
patterns can match.  A peer that is not an IP socket has no address: only
the pattern `*` matches it.  This module does no I/O except in
`confirmed_name`, which asks the resolver.
"""

import fnmatch
import ipaddress
import socket


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
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip)


def confirmed_name(addr):
    """(name, spoofed) for addr: the reverse name if it resolves back to addr."""
    if not addr:
        return None, False
    try:
        name = socket.gethostbyaddr(addr)[0]
    except (OSError, UnicodeError):
        return None, False
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return None, True
    if any(normalize_address(info[4][0]) == addr for info in infos):
        return name, False
    return None, True


def peer_of_socket(sock):
    """The Peer behind a connected socket, with a forward-confirmed name."""
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return Peer()
        addr = normalize_address(sock.getpeername()[0])
    except OSError:
        return Peer()
    name, spoofed = confirmed_name(addr)
    return Peer(addr, name, spoofed)


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
                self.network = ipaddress.ip_network(body, strict=False)
            except ValueError:
                raise PatternError("bad CIDR pattern %r" % body) from None
        elif body.count(":") == 1 and _is_ipv4(body.split(":")[0]):
            address, mask = body.split(":")
            if not _is_ipv4(mask):
                raise PatternError("bad ADDR:MASK pattern %r" % body)
            try:
                self.network = ipaddress.ip_network("%s/%s" % (address, mask), strict=False)
            except ValueError:
                raise PatternError("bad mask in %r" % body) from None
        elif normalize_address(body):
            self.network = ipaddress.ip_network(normalize_address(body))
        else:
            if any(c.isspace() or ord(c) < 32 for c in body):
                raise PatternError("bad host pattern %r" % body)
            self.glob = body.lower()
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
                    and fnmatch.fnmatchcase(name, self.glob))
        if self.network is not None:
            try:
                return ipaddress.ip_address(addr) in self.network
            except ValueError:
                return False
        if fnmatch.fnmatchcase(addr, self.glob):
            return True
        if self.address_only:
            return False
        return name is not None and fnmatch.fnmatchcase(name, self.glob)


def _is_ipv4(text):
    try:
        return ipaddress.ip_address(text).version == 4
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
        if fnmatch.fnmatchcase(value, body):
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

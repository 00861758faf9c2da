"""Mail address syntax checks shared by smap (at the door) and smapd (again).

Only plain `local@domain` addresses pass: dot-atom or a quoted local part of
harmless characters, a host name or an address literal.  Refused, whatever
an RFC may allow: control characters and spaces, a leading `-` (it would be
an MTA option), `|` or `/` (a program or a file), source routes, `%` and `!`
relaying, and more than one `@`.  "Programs and files are not addresses."
"""

import _socket

ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                  "#$&'*+-/=?^_`{|}~")
LABEL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
QUOTED_FORBIDDEN = frozenset('"\\@%!')
MAX_ADDRESS = 254  # RFC 5321 §4.5.3.1.3: a path is at most 256 octets with <>
MAX_LOCAL = 64
MAX_DOMAIN = 253


def problem(address, allow_bare_postmaster=False):
    """None when address is acceptable, else a short reason."""
    if not address:
        return "empty address"
    if len(address) > MAX_ADDRESS:
        return "address too long"
    if any(ord(c) <= 32 or ord(c) >= 127 for c in address if c != " ") or \
            (" " in address and not address.startswith('"')):
        return "control character or space in address"
    if address[0] in "-|/":
        return "address starts with %s" % address[0]
    if address[0] == "@":
        return "source route"
    if allow_bare_postmaster and address.lower() == "postmaster":
        return None
    if address.startswith('"'):
        close = address.find('"', 1)
        if close < 0:
            return "unterminated quoted local part"
        local, rest = address[1:close], address[close + 1:]
        if not rest.startswith("@"):
            return "no domain"
        domain = rest[1:]
        if any(c in QUOTED_FORBIDDEN or ord(c) < 32 for c in local) or not local:
            return "quoted local part with a forbidden character"
        if local[0] in "-|/":
            return "local part starts with %s" % local[0]
    else:
        if address.count("@") != 1:
            return "source route or not exactly one @" if address.count("@") > 1 else "no domain"
        local, domain = address.split("@")
        if "%" in local or "!" in local:
            return "%/! relaying is not allowed"
        if not local or local.startswith(".") or local.endswith(".") or ".." in local:
            return "bad local part"
        if any(c not in ATEXT and c != "." for c in local):
            return "bad character in local part"
    if len(local) > MAX_LOCAL:
        return "local part too long"
    return domain_problem(domain)


def _ip_literal(text):
    """An IPv4 or IPv6 address?  inet_pton, not ipaddress: this runs after
    the chroot, and smap's start-up should not pay for ipaddress.  It agrees
    with ipaddress.ip_address except that a scope (`%eth0`) is refused."""
    for family in (_socket.AF_INET, _socket.AF_INET6):
        try:
            _socket.inet_pton(family, text)
            return True
        except (OSError, ValueError):
            pass
    return False


def domain_problem(domain):
    if not domain:
        return "no domain"
    if domain.startswith("["):
        if not domain.endswith("]"):
            return "bad address literal"
        inner = domain[1:-1]
        if inner.lower().startswith("ipv6:"):
            inner = inner[5:]
        if not _ip_literal(inner):
            return "bad address literal"
        return None
    if len(domain) > MAX_DOMAIN:
        return "domain too long"
    for label in domain.rstrip(".").split("."):
        if not label or len(label) > 63 or label[0] == "-" or label[-1] == "-":
            return "bad domain"
        if any(c not in LABEL for c in label):
            return "bad character in domain"
    return None


def domain_of(address):
    return address.rpartition("@")[2].lower().rstrip(".") if "@" in address else ""


def in_domains(address, domains):
    """Whether the address's domain is one of domains or below one."""
    domain = domain_of(address)
    if not domain or domain.startswith("["):
        return False
    return any(domain == d or domain.endswith("." + d) for d in domains)

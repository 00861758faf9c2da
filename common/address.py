"""Mail address syntax checks shared by smap (at the door) and smapd (again).

Only plain `local@domain` addresses pass: dot-atom or a quoted local part of
harmless characters, a host name or an address literal.  Refused, whatever
an RFC may allow: control characters and spaces, source routes, `%` and `!`
relaying, more than one `@`, a domain with an empty label (`a..b`, `.a`,
and the trailing dot of `a.b.`, which RFC 5321's Domain has no room for),
and a local part that names an option, a program or a file.  "Programs and
files are not addresses."

What counts is the local part as a delivery agent reads it, not as it is
spelled: `unquoted_local_part` takes the quotes and quoted pairs away and
strips white space, and `names_option_program_or_file` asks whether what is
left starts with `-` (an MTA option), `|` (a program) or `/` (a file).  smap
at MAIL/RCPT, smapd's scanner (envelope and address headers) and smapd's
agent all ask these two functions, so no spelling is caught by one and
passed by another.  An address is untrusted text: nothing here changes it.
"""

import _socket

ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                  "#$&'*+-/=?^_`{|}~")
LABEL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
QUOTED_FORBIDDEN = frozenset('"\\@%!')
OPTION_PROGRAM_FILE = ("-", "|", "/")
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
        if any(c in QUOTED_FORBIDDEN or ord(c) < 32 for c in local):
            return "quoted local part with a forbidden character"
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
    bare = unquoted_local_part(local)
    if not bare:
        return "empty local part"
    if names_option_program_or_file(bare):
        return "local part starts with %s" % bare[0]
    if len(local) > MAX_LOCAL:
        return "local part too long"
    return domain_problem(domain)


def unquoted_local_part(local):
    """The local part as a delivery agent reads it: every quote of a quoted
    string and every backslash of a quoted pair taken away, then white space
    stripped from both ends (str.strip: tabs, CR, LF and the Unicode spaces).

    Quoted pairs are undone outside quotes too, and all quotes go, not only
    an outer pair: this is used to refuse, so it reads `\\-x` and `"" "-x"`
    the way the most lenient parser would."""
    text = local.strip()
    out = []
    index = 0
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text):
            out.append(text[index + 1])
            index += 2
            continue
        if char != '"':
            out.append(char)
        index += 1
    return "".join(out).strip()


def names_option_program_or_file(local):
    """Whether the local part, however it is spelled, starts with `-` (an
    MTA option), `|` (a program) or `/` (a file)."""
    return unquoted_local_part(local).startswith(OPTION_PROGRAM_FILE)


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
    """None when domain is a host name or an address literal, else a reason.
    A trailing dot is an empty label too: one spelling per domain, so the
    relay check and the MTA can never read two different ones."""
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
    for label in domain.split("."):
        if not label:
            return "empty label in domain"
        if len(label) > 63 or label[0] == "-" or label[-1] == "-":
            return "bad domain"
        if any(c not in LABEL for c in label):
            return "bad character in domain"
    return None


def domain_of(address):
    """The domain after the last @, in lower case, spelled as it is."""
    return address.rpartition("@")[2].lower() if "@" in address else ""


def in_domains(address, domains):
    """Whether the address's domain is one of domains or below one.  The
    domains come from the table as written (any case, perhaps a trailing
    dot); the address's domain must be one problem() accepts, so a spelling
    it refuses (`a.b.`, `a..b`) never counts as one of ours either."""
    domain = domain_of(address)
    if not domain or domain.startswith("[") or domain_problem(domain):
        return False
    wanted = [d.lower().rstrip(".") for d in domains]
    return any(d and (domain == d or domain.endswith("." + d)) for d in wanted)

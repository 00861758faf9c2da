"""Every tunable of mailwall, declared once.

A tunable has a name, the programs that read it, a type, a default, bounds and
a one-line doc.  The netperm-table reader converts and checks values with these
declarations; the man pages and conf/netperm-table are tested against them, so
none of the three can drift from the others.  Nothing here reads a file.
"""



class Param:
    """One declaration: name programs kind default low high doc.

    It behaves like the namedtuple it was (fields, iteration, equality,
    _replace) without importing `collections`, which smap would otherwise pay
    for at every start under inetd."""

    __slots__ = ("name", "programs", "kind", "default", "low", "high", "doc", "choices")
    _fields = __slots__

    def __init__(self, name, programs, kind, default, low, high, doc, choices=None):
        self.name, self.programs, self.kind = name, programs, kind
        self.default, self.low, self.high, self.doc = default, low, high, doc
        self.choices = choices          # kind "choice": the allowed words, in order

    def __iter__(self):
        return iter(tuple(getattr(self, field) for field in self._fields))

    def __eq__(self, other):
        return isinstance(other, Param) and tuple(self) == tuple(other)

    def __hash__(self):
        return hash(tuple(self))

    def __repr__(self):
        return "Param(%s)" % ", ".join("%s=%r" % (f, getattr(self, f)) for f in self._fields)

    def _replace(self, **changes):
        values = {field: getattr(self, field) for field in self._fields}
        values.update(changes)
        return Param(**values)

SMAP, SMAPD, POP3GW, AUTHMGR = "smap", "smapd", "pop3-gw", "authmgr"
ALL = (SMAP, SMAPD, POP3GW, AUTHMGR)

# kind: how the arguments are read
#   int      one whole number within [low, high]
#   user     a user name or uid;  group  a group name or gid
#   path     one absolute path;   name  one word
#   words    one or more words;   hostport  HOST[:PORT]
#   command  an absolute path and its fixed arguments
#   rules    host rules (permit-hosts / deny-hosts), see common.hostmatch
#   patterns one or more host patterns
#   bool     yes/no, on/off, true/false
#   facility a syslog facility name
#   choice   one of the words in `choices` (case-insensitive; the value as declared)
_DECLARED = [
    Param("userid", (SMAP, SMAPD), "user", "uucp", None, None,
          "user the program runs as after start-up"),
    Param("userid", (POP3GW,), "user", "nobody", None, None,
          "user the session children run as"),
    Param("groupid", (SMAP, SMAPD, POP3GW), "group", None, None, None,
          "group to run as (default: the user's group); supplementary groups are always cleared"),
    Param("directory", (SMAP, SMAPD), "path", "/var/spool/smap", None, None,
          "the spool; smap and the smapd scanner chroot here"),
    Param("directory", (POP3GW,), "path", "/var/empty", None, None,
          "chroot of the session children"),
    Param("hostname", (SMAP,), "name", None, None, None,
          "name in the banner and the Received: line (default: the host's FQDN)"),
    Param("timeout", (SMAP,), "int", 300, 1, 86400,
          "idle limit in seconds for a command or a DATA line"),
    # TLS (issue 13, DESIGN §12.1): the server side of smap and pop3-gw.
    Param("tls-cert", (SMAP, POP3GW), "path", None, None, None,
          "PEM certificate, the chain may follow it; with tls-key: smap offers STARTTLS, pop3-gw STLS"),
    Param("tls-key", (SMAP, POP3GW), "path", None, None, None,
          "PEM private key, read as root before the jail; refused unless root's alone (0600)"),
    Param("tls-min-version", (SMAP, POP3GW), "choice", "TLSv1.2", None, None,
          "lowest TLS version accepted from clients", choices=("TLSv1.2", "TLSv1.3")),
    Param("require-tls", (SMAP,), "patterns", None, None, None,
          "client hosts that must STARTTLS before MAIL (530 5.7.0); never for an MX's public side"),
    Param("require-tls", (POP3GW,), "bool", "no", None, None,
          "refuse APOP and USER before STLS on a plain connection"),
    Param("maxbytes", (SMAP,), "int", 10485760, 1024, 1073741824,
          "message size limit in octets, advertised with ESMTP SIZE"),
    Param("maxrecip", (SMAP,), "int", 100, 1, 10000,
          "recipients per message (452 beyond)"),
    Param("maxchildren", (SMAP,), "int", 200, 1, 10000,
          "concurrent connections in --daemon mode (421 beyond)"),
    Param("maxuse", (SMAP,), "int", 100, 1, 100000,
          "connections a --daemon session process serves before it exits (1: one each)"),
    Param("permit-hosts", (SMAP, POP3GW), "rules", None, None, None,
          "host rule: who may connect (smap: everyone when no rule is given)"),
    Param("deny-hosts", (SMAP, POP3GW), "rules", None, None, None,
          "host rule: who may not connect"),
    Param("accept-domains", (SMAP, SMAPD), "words", None, None, None,
          "the site's own mail domains, subdomains included"),
    Param("permit-relay", (SMAP,), "patterns", None, None, None,
          "inside hosts that may send to any domain"),
    Param("sendmail", (SMAPD,), "command", "/usr/sbin/sendmail -bm", None, None,
          "the MTA; smapd appends -oi -f SENDER -- RCPT..."),
    Param("mailhub", (SMAPD,), "hostport", "None", None, None,
          "internal mail hub for the accept-domains, reached by SMTP (None: everything through sendmail)"),
    Param("baddir", (SMAPD,), "path", None, None, None,
          "quarantine for spool files that fail the checks (default: directory/bad)"),
    Param("wakeup", (SMAPD,), "int", 60, 1, 86400,
          "scan interval in seconds"),
    Param("maxchildren", (SMAPD,), "int", 6, 1, 256,
          "concurrent deliveries"),
    Param("retry", (SMAPD,), "int", 600, 1, 604800,
          "seconds between delivery attempts after a temporary failure"),
    Param("maxage", (SMAPD,), "int", 432000, 60, 31536000,
          "seconds after which undeliverable mail is bounced"),
    Param("deliver-timeout", (SMAPD,), "int", 600, 1, 86400,
          "time limit in seconds of one MTA run or mail hub transaction"),
    # TLS to the mail hub (issue 13, DESIGN §12.1), Postfix's smtp_tls_security_level.
    Param("mailhub-tls", (SMAPD,), "choice", "may", None, None,
          "TLS to the mail hub: none, may (opportunistic), encrypt (required), verify (required, name checked)",
          choices=("none", "may", "encrypt", "verify")),
    Param("mailhub-ca", (SMAPD,), "path", None, None, None,
          "PEM CA certificates for mailhub-tls verify (default: the system store)"),
    Param("postmaster", (SMAPD,), "name", "postmaster", None, None,
          "who hears about quarantined mail and double bounces"),
    Param("shorten-domain", (SMAPD,), "words", None, None, None,
          "rewrite user@host.DOMAIN to user@DOMAIN in From/Sender/Reply-To/Cc"),
    Param("server", (POP3GW,), "hostport", None, None, None,
          "POP3 server used when the user gives no %server"),
    # TLS to the inside POP3 server (issue 13, DESIGN §12.1).
    Param("server-tls", (POP3GW,), "choice", "none", None, None,
          "TLS to the inside POP3 server: none, stls (STARTTLS on its port) or implicit (POP3S)",
          choices=("none", "stls", "implicit")),
    Param("server-ca", (POP3GW,), "path", None, None, None,
          "PEM CA certificates the inside server's certificate must chain to (default: the system store)"),
    Param("server-tls-verify", (POP3GW,), "bool", "yes", None, None,
          "verify the inside server's certificate and that it names the server's host"),
    Param("authfile", (POP3GW, AUTHMGR), "path", "/etc/mailwall/pop3-auth", None, None,
          "the APOP user database"),
    Param("timeout", (POP3GW,), "int", 600, 1, 86400,
          "idle limit in seconds (RFC 1939 asks for at least 10 minutes)"),
    # Bad logins are counted per source address, never per user
    # (pop3gw.penalty): a user cannot be locked out from someone else's address.
    Param("badsleep", (POP3GW,), "int", 300, 0, 86400,
          "seconds a source address's bad logins are remembered, and a source "
          "past maxbad is refused"),
    Param("maxbad", (POP3GW,), "int", 5, 1, 1000,
          "bad logins from one source address (IPv6: its /64) before it is refused"),
    Param("maxchildren", (POP3GW,), "int", 200, 1, 10000,
          "concurrent sessions in --daemon mode"),
    Param("userpass", (POP3GW,), "bool", "no", None, None,
          "also accept USER/PASS from clients (the secret then crosses the network)"),
    Param("logfacility", ALL, "facility", "mail", None, None,
          "syslog facility"),
    Param("logsocket", ALL, "path", "/dev/log", None, None,
          "syslog socket, opened before any chroot"),
]


def declared():
    """All declarations, in the order above."""
    return list(_DECLARED)


def for_program(program):
    """The declarations a program reads, keyed by attribute name."""
    return {p.name: p for p in _DECLARED if program in p.programs}


def attribute_names():
    """Every attribute name any program knows."""
    return sorted({p.name for p in _DECLARED})


FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5,
    "lpr": 6, "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11,
    "local0": 16, "local1": 17, "local2": 18, "local3": 19, "local4": 20,
    "local5": 21, "local6": 22, "local7": 23,
}

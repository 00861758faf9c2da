"""The client side of pop3-gw: a POP3 AUTHORIZATION-state machine, bytes in,
bytes out (DESIGN §8, RFC 1939, RFC 2449).

Before login it knows CAPA, APOP and QUIT, and USER/PASS only when the table
says `userpass yes`; everything else is `-ERR`.  It trusts nothing the
client sends: a command is at most 255 octets with its CRLF (RFC 2449 §4),
only CRLF ends a line (a bare CR or LF ends the session), NUL and other
control or 8-bit characters are refused, errors and failed logins are
counted and end the session.  `APOP name digest` with name `user` or
`user%server[:port]` is checked by an authority (pop3gw.authority: the root
monitor, which alone holds the secrets); an unknown, disabled, secret-less
or locked user gets the same answer as a wrong digest.  A `%server` must be
a host name, a plain dotted quad or `[IPv6]` in RFC 5952 text: any other
number the C library would read as an address (`127.1`, `0x7f.1`, ...) is
refused here.  Where the session may go is decided by the same authority,
not here: it resolves the destination once, applies the host rules (source
host, every address, the names, user) and answers with the addresses that
passed, the only ones the session may connect to.  A destination the
client names with `%` must be permitted by a rule that has a `-dest` list
(a rule without one permits only the configured `server`), so a client can
never aim the proxy, and a digest of its secret, at a server of its choosing.

On success `login` holds who and where (with those addresses), and `rest`
any bytes the client sent after its login line; the caller then talks to
the server.
"""

import re

from common import apop, authdb, hostmatch, lineio

# RFC 2449 §4: a command line is at most 255 octets, CRLF included.
COMMAND_LIMIT = 255
MAX_ERRORS = 10            # unknown or malformed commands before we hang up
MAX_AUTH_FAILURES = 3      # failed logins in one session before we hang up
DEFAULT_PORT = 110

AUTHORIZATION, LOGGED_IN, CLOSED = "authorization", "logged-in", "closed"

_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")

AUTH_FAILED = b"-ERR [AUTH] Authentication failed\r\n"
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"     # common.proxyproto.SIGNATURE


class Settings:
    """What the netperm-table says for pop3-gw sessions."""

    def __init__(self, server=None, userpass=False, rules=(), hostname="localhost",
                 tls_configured=False, require_tls=False):
        self.server = server            # (host, port) or None
        self.userpass = userpass
        self.rules = list(rules)
        self.hostname = hostname
        # tls-cert and tls-key are set: USER/PASS only inside TLS
        self.tls_configured = tls_configured
        self.require_tls = require_tls  # APOP and USER only inside TLS (require-tls yes)


class Login:
    """Who logged in and where the session goes."""

    __slots__ = ("user", "host", "port", "explicit", "addresses")

    def __init__(self, user, host, port, explicit, addresses=()):
        self.user, self.host, self.port = user, host, port
        self.explicit = explicit        # named by the client with user%server
        self.addresses = list(addresses)    # the authority's: the only ones to connect to


def server_text_of(host, port):
    """HOST:PORT as parse_server reads it back ([IPv6]:PORT)."""
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def parse_server(text):
    """(host, port) from the client's `server[:port]`; ValueError if odd.
    Host: a DNS name of letters, digits and hyphens whose last label is not
    all digits, a plain dotted quad, or [IPv6] in RFC 5952 text (not
    IPv4-mapped, no zone); port: 1..65535 in decimal digits."""
    host, port_text = text, None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("unclosed [")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError("junk after ]")
            port_text = rest[1:]
        if ":" not in host:
            raise ValueError("bad IPv6 address")
    else:
        if ":" in text:
            host, port_text = text.rsplit(":", 1)
        if not host or len(host) > 253:
            raise ValueError("bad host name")
        if _IPV4.fullmatch(host):
            if hostmatch.normalize_address(host) is None:
                raise ValueError("bad IPv4 address")
        elif not all(_HOST_LABEL.fullmatch(label) for label in host.rstrip(".").split(".")):
            raise ValueError("bad host name")
    problem = hostmatch.literal_problem(host)
    if problem:
        raise ValueError(problem)
    port = DEFAULT_PORT
    if port_text is not None:
        if not port_text.isdigit() or not port_text.isascii() or len(port_text) > 5:
            raise ValueError("bad port")
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise ValueError("port out of range")
    return host.lower(), port


def split_name(name):
    """(user, server-text or None) from `user` or `user%server[:port]`."""
    if "%" in name:
        user, server = name.split("%", 1)
        return user, server
    return name, None


class Session:
    """greeting(), then feed(bytes) -> reply bytes until `closed` or `login`."""

    def __init__(self, settings, peer, authority, timestamp, log, stls=False, tls=None):
        self.settings = settings
        # STLS (RFC 2595), the Conversation's transport seam: `stls` when a
        # server context is there and the connection is plain; `tls` the
        # log fields of the TLS session ({"tls":, "cipher":}), from the
        # start under POP3S, or set by the caller's switch after STLS.
        self.stls = stls
        self.tls = tls
        self.switch_request = None
        self.peer = peer
        self.authority = authority      # verify(user, digest) -> ("ok"|"refused", reason)
        self.timestamp = timestamp      # the authority checks digests against this one
        self.log = log
        self.splitter = lineio.LineSplitter(COMMAND_LIMIT)
        self.state = AUTHORIZATION
        self.errors = 0
        self.auth_failures = 0
        self.pending_user = None
        self.login = None
        self.rest = b""
        self.commands = {
            b"CAPA": self.do_capa, b"APOP": self.do_apop, b"QUIT": self.do_quit,
            b"USER": self.do_user, b"PASS": self.do_pass, b"STLS": self.do_stls,
        }

    @property
    def closed(self):
        return self.state == CLOSED

    def greeting(self):
        return b"+OK mailwall pop3-gw ready %s\r\n" % self.timestamp.encode("ascii")

    def timeout(self):
        """RFC 1939 §3: the autologout timer closes without a response."""
        self.log.notice("timeout", addr=self.peer.addr_text, reason="idle client")
        self.state = CLOSED
        return b""

    def eof(self):
        """The client went away (or took no reply): nothing more to say."""
        self.state = CLOSED

    def feed(self, data):
        if data.startswith(PROXY_V2_SIGNATURE) and not self.splitter.pending() \
                and self.state == AUTHORIZATION and not self.errors:
            return self.proxy_header()
        self.splitter.feed(data)
        replies = []
        while self.state == AUTHORIZATION:
            item = self.splitter.next()
            if item is None:
                break
            kind, line = item
            if kind == lineio.BARE:
                self.log.notice("refuse", addr=self.peer.addr_text, reason="bare CR or LF")
                replies.append(self.close(b"-ERR lines must end with CRLF\r\n"))
            elif kind == lineio.TOO_LONG:
                replies.append(self.error(b"-ERR command line too long\r\n", "line too long"))
            else:
                replies.append(self.command(line[:-2]))
                if self.switch_request:
                    # Nothing after the STLS line is taken: it came in the
                    # clear, and the Conversation refuses it (switch_refused).
                    break
        if self.state == LOGGED_IN:
            self.rest = self.splitter.take_rest()
        return b"".join(replies)

    def close(self, reply):
        self.state = CLOSED
        return reply

    def error(self, reply, reason):
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            self.log.notice("refuse", addr=self.peer.addr_text, reason="too many errors")
            return self.close(b"-ERR too many errors, closing\r\n")
        self.log.info("bad-command", addr=self.peer.addr_text, reason=reason)
        return reply

    def proxy_header(self):
        """A PROXY protocol header from a host that may not send one (not in
        proxy-hosts, or inetd mode): refused, never read."""
        self.log.notice("refuse", addr=self.peer.addr_text,
                        reason="PROXY protocol header from a host not in proxy-hosts "
                               "(or in inetd mode)")
        return self.close(b"-ERR PROXY protocol header not accepted from this host\r\n")

    def command(self, line):
        if any(byte < 32 or byte > 126 for byte in line):
            return self.error(b"-ERR command has bad characters\r\n", "bad characters")
        verb, _, argument = line.partition(b" ")
        if verb == b"PROXY" and self.pending_user is None:
            return self.proxy_header()
        handler = self.commands.get(verb.upper())
        if handler is None:
            return self.error(b"-ERR unknown command; log in with APOP first\r\n",
                              "unknown command before login")
        return handler(argument.decode("ascii"))

    # -- commands -----------------------------------------------------------
    def do_capa(self, argument):
        lines = [b"+OK Capability list follows", b"IMPLEMENTATION mailwall-pop3-gw",
                 b"RESP-CODES", b"AUTH-RESP-CODE"]
        if self.offers_stls():
            lines.append(b"STLS")
        if self.userpass_allowed():
            lines.append(b"USER")
        return b"\r\n".join(lines + [b".", b""])

    def offers_stls(self):
        return self.stls and self.tls is None

    def userpass_allowed(self):
        """USER/PASS: only with `userpass yes`, and only inside TLS when
        the gateway has a certificate (a password never crosses in the clear
        where it need not)."""
        return self.settings.userpass and (self.tls is not None
                                           or not self.settings.tls_configured)

    def tls_refusal(self, what):
        """None, or the answer to a login attempt that must wait for STLS."""
        if self.tls is not None:
            return None
        if self.settings.require_tls or (what == "USER" and self.settings.tls_configured
                                         and self.settings.userpass):
            return self.error(b"-ERR [AUTH] TLS required: send STLS first\r\n",
                              "%s before STLS" % what)
        return None

    def do_stls(self, argument):
        if not self.stls:
            return self.error(b"-ERR unknown command; log in with APOP first\r\n",
                              "STLS without tls-cert")
        if self.tls is not None:
            return self.error(b"-ERR TLS already active\r\n", "second STLS")
        if argument:
            return self.error(b"-ERR usage: STLS\r\n", "argument to STLS")
        self.pending_user = None
        self.switch_request = True
        return b"+OK Begin TLS negotiation\r\n"

    def switch_refused(self):
        """The client sent more after its STLS line, in the clear, before
        the handshake: never executed (CVE-2011-0411); the session ends."""
        self.switch_request = None
        self.log.notice("refuse", addr=self.peer.addr_text,
                        reason="input after STLS before the TLS handshake"
                               " (command injection); nothing executed")
        return self.close(b"-ERR input after STLS before the TLS handshake\r\n")

    def switched(self):
        """The handshake is done (self.tls set by the caller's switch):
        RFC 2595 §4, what was said before counts for nothing."""
        self.switch_request = None
        self.pending_user = None
        self.log.info("stls", addr=self.peer.addr_text, **(self.tls or {}))

    def do_quit(self, argument):
        return self.close(b"+OK mailwall pop3-gw signing off\r\n")

    def do_user(self, argument):
        if not self.settings.userpass:
            return self.error(b"-ERR USER/PASS not allowed here; use APOP\r\n",
                              "USER without userpass")
        refused = self.tls_refusal("USER")
        if refused is not None:
            return refused
        if not argument or " " in argument:
            return self.error(b"-ERR usage: USER name\r\n", "malformed USER")
        self.pending_user = argument
        return b"+OK send PASS\r\n"

    def do_pass(self, argument):
        if not self.settings.userpass:
            return self.error(b"-ERR USER/PASS not allowed here; use APOP\r\n",
                              "PASS without userpass")
        if self.pending_user is None or not self.userpass_allowed():
            return self.error(b"-ERR USER first\r\n", "PASS before USER")
        name, self.pending_user = self.pending_user, None
        # the password never leaves this process: the monitor checks its digest
        return self.authenticate(name, apop.digest(self.timestamp, argument), "PASS")

    def do_apop(self, argument):
        refused = self.tls_refusal("APOP")
        if refused is not None:
            return refused
        words = argument.split(" ")
        if len(words) != 2 or not words[0]:
            return self.error(b"-ERR usage: APOP name digest\r\n", "malformed APOP")
        name, offered = words
        if not apop.well_formed_digest(offered):
            return self.error(b"-ERR APOP digest must be 32 lowercase hex digits\r\n",
                              "malformed APOP digest")
        return self.authenticate(name, offered, "APOP")

    # -- the decision -------------------------------------------------------
    def authenticate(self, name, offered, method):
        """offered: the APOP digest (for PASS, the digest of the password)."""
        user_name, server_text = split_name(name)
        peer = self.peer
        if not authdb.valid_name(user_name):
            return self.fail(user_name, "bad user name")
        if server_text is not None:
            try:
                host, port = parse_server(server_text)
            except ValueError as err:
                self.log.notice("refuse", addr=peer.addr_text, user=user_name,
                                dest=server_text, reason="bad %%server: %s" % err)
                return self.error(b"-ERR [AUTH] bad server in user%server[:port]\r\n",
                                  "bad %server")
        elif self.settings.server is not None:
            host, port = self.settings.server
        else:
            self.log.error("refuse", addr=peer.addr_text, user=user_name,
                           reason="no server configured and none named")
            return self.close(b"-ERR [SYS/PERM] no POP3 server configured\r\n")
        verdict, reason = self.authority.verify(user_name, offered)
        if verdict != "ok":
            # reason None: the monitor refused and logged why itself
            return self.fail(user_name, None if reason is None else "%s (%s)" % (reason, method),
                             method)
        # The authority resolves, applies the host rules and logs the
        # decision; `-` asks for the configured server, which it knows itself.
        verdict, found = self.authority.route(
            server_text_of(host, port) if server_text is not None else "-")
        if verdict == "ok":
            self.login = Login(user_name, host, port, server_text is not None, found)
            self.state = LOGGED_IN
            return b""
        if verdict == "unavailable":
            self.log.notice("upstream-fail", host=peer.name_text, addr=peer.addr_text,
                            user=user_name, dest=server_text_of(host, port), reason=found)
            return self.close(b"-ERR [SYS/TEMP] mail server unavailable, try again later\r\n")
        return self.close(b"-ERR [SYS/PERM] permission denied for %s to %s\r\n"
                          % (user_name.encode(), host.encode()))

    def fail(self, user_name, reason, method=None):
        self.auth_failures += 1
        if reason is None:
            self.log.info("refused", host=self.peer.name_text, addr=self.peer.addr_text,
                          user=user_name, method=method)
        else:
            self.log.notice("auth-fail", host=self.peer.name_text, addr=self.peer.addr_text,
                            user=user_name, reason=reason)
        if self.auth_failures >= MAX_AUTH_FAILURES:
            return self.close(AUTH_FAILED)
        return AUTH_FAILED

"""The SMTP state machine of smap: bytes in, bytes out (DESIGN §5).

It speaks the minimum of RFC 5321 a gateway needs and nothing more:
HELO/EHLO (SIZE, 8BITMIME, ENHANCEDSTATUSCODES; no PIPELINING), MAIL, RCPT,
DATA, RSET, NOOP, QUIT, HELP, VRFY (252) and EXPN (502).  It trusts nothing
the client sends: only CRLF ends a line, a bare CR or LF anywhere ends the
session with nothing spooled, input that arrives before a reply (pipelining
without the extension) is refused, every line and count is bounded.  A
message is answered "250" only after common.spool has fsync'ed it, renamed
it into the queue and fsync'ed the queue directory.

Its shape is OpenSMTPD's smtp_session.c and aiosmtpd's: the states are
`State`; `COMMANDS` says for each verb its handler and in which states it
is allowed (and what every other state answers); every change of state
goes through `Session.enter`; the transaction (`Envelope`) is an object of
its own, made new after HELO, RSET and every DATA, while the `Session` is
the connection.  The protocol checks syntax and its own limits; what a
site decides (which addresses, who may relay, and later recipient
verification and content scanning) is policy, asked of hooks at fixed
stages (smap.policy): connect, HELO, MAIL, RCPT and end of data, just
before the commit.  The spool writer is a parameter so that tests can
break it.
"""

import errno
import time

from common import lineio, spool
from smap import policy

# RFC 5321 §4.5.3.1.4 and §4.5.3.1.6: a command line and a text line,
# CRLF included.
COMMAND_LIMIT = 512
TEXT_LIMIT = 1000
MAX_ERRORS = 10
# HAProxy's PROXY protocol v2 signature (common.proxyproto.SIGNATURE; not
# imported: inetd mode must not pay for that module)
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


class State:
    """The session's states (an int-constant class: the `enum` module
    costs start-up time under inetd)."""

    GREETING = 0    # connected, no banner yet
    CONNECTED = 1   # banner sent, no HELO/EHLO yet
    HELLO = 2       # HELO/EHLO given, no transaction
    MAIL = 3        # MAIL accepted, no recipient yet
    RCPT = 4        # at least one recipient accepted
    DATA = 5        # receiving message text, up to the final dot
    CLOSED = 6      # the last reply is out; nothing more is read
    NAMES = ("greeting", "connected", "hello", "mail", "rcpt", "data", "closed")


# The states in which a command line is read.
COMMAND_STATES = (State.CONNECTED, State.HELLO, State.MAIL, State.RCPT)


class Settings:
    """What the netperm-table says for this connection that is not policy:
    the name smap gives itself and the protocol's limits."""

    def __init__(self, hostname, maxbytes=10485760, maxrecip=100, starttls=False,
                 require_tls=False):
        self.hostname = hostname
        self.maxbytes = maxbytes
        self.maxrecip = maxrecip
        self.starttls = starttls        # a server context is loaded: EHLO offers STARTTLS
        self.require_tls = require_tls  # this client must STARTTLS before MAIL (require-tls)


class Envelope:
    """One mail transaction, from MAIL to the end of DATA (or RSET, HELO,
    an error, the end of the session).  Never reused: the session makes a
    new one each time."""

    __slots__ = ("id", "sender", "parameters", "recipients", "writer", "size",
                 "data_error", "notes")

    def __init__(self):
        self.id = None              # the queue id, given at MAIL
        self.sender = None          # None: no MAIL yet; "" is the null sender <>
        self.parameters = {}        # MAIL's ESMTP parameters, keys upper case
        self.recipients = []
        self.writer = None          # the spool file, from DATA to the commit
        self.size = 0               # message text octets so far
        self.data_error = None      # (reply, reason) given at the final dot
        self.notes = {}             # hooks' own state for this transaction


class Session:
    """One SMTP connection.  greeting(), then feed(bytes) -> reply bytes.
    `hooks`: policy hook objects (smap.policy), asked in order."""

    def __init__(self, settings, hooks, peer, spool_root, log,
                 writer_factory=spool.MessageWriter, clock=time.time):
        self.settings = settings
        self.hooks = policy.Hooks(hooks)
        self.peer = peer
        self.spool_root = spool_root
        self.log = log
        self.writer_factory = writer_factory
        self.clock = clock
        self.state = State.GREETING
        self.splitter = lineio.LineSplitter(COMMAND_LIMIT)
        self.errors = 0
        self.helo = None
        self.esmtp = False
        self.messages = 0
        self.notes = {}             # hooks' own state for this connection
        self.explain_pregreet = None    # () -> why talk before the banner is refused, or None
        self.envelope = Envelope()
        # STARTTLS (RFC 3207): the Conversation's transport seam.
        self.switch_request = None  # set by STARTTLS's 220: switch the transport now
        self.tls = None             # after the handshake: {"tls": VERSION, "cipher": NAME}

    # -- state and transaction ----------------------------------------------
    def enter(self, state):
        """Every change of state goes through here; a trace of the session
        is one line: self.log.info("state", old=State.NAMES[self.state], new=...)."""
        self.state = state

    def new_envelope(self, committed=False):
        """End the transaction: throw its spool file away (nothing was
        promised for it), tell the hooks when one had begun and ends
        without a commit, start afresh."""
        envelope = self.envelope
        if envelope.writer is not None:
            envelope.writer.abort()
            envelope.writer = None
        if envelope.sender is not None and not committed and self.hooks.reset:
            self.hooks.tell(self.hooks.reset, (self, envelope))
        self.envelope = Envelope()

    @property
    def closed(self):
        return self.state == State.CLOSED

    def close(self, reply):
        """The last reply: the transaction is thrown away, the hooks told."""
        if self.state != State.CLOSED:
            self.new_envelope()
            self.enter(State.CLOSED)
            if self.hooks.close:
                self.hooks.tell(self.hooks.close, (self,))
        return reply

    # -- entry points -----------------------------------------------------
    def greeting(self):
        """The banner, or the refusal of a connect hook (then the session ends)."""
        if self.state != State.GREETING:
            return b""
        if self.hooks.connect:
            answer = self.ask(policy.CONNECT, self.hooks.connect, (self,))
            if answer is not None:
                return self.close(answer)
        self.enter(State.CONNECTED)
        return b"220 %s ESMTP mailwall smap\r\n" % self.settings.hostname.encode()

    def pregreet(self, reason=None):
        """The client talked before the banner: refuse, spool nothing."""
        if reason is None and self.explain_pregreet is not None:
            reason = self.explain_pregreet()
        self.log.notice("reject", addr=self.peer.addr_text,
                        reason=reason or "talked before the banner")
        return self.close(b"554 5.5.0 Protocol error: talked before the greeting\r\n")

    def proxy_header(self):
        """A PROXY protocol header after the banner: a host that may not send
        one (not in proxy-hosts, or inetd mode) sent it; refused, never read."""
        self.log.notice("reject", addr=self.peer.addr_text,
                        reason="PROXY protocol header from a host not in proxy-hosts "
                               "(or in inetd mode)")
        return self.close(b"554 5.7.1 Error: PROXY protocol header not accepted from this host\r\n")

    def timeout(self):
        self.log.notice("timeout", id=self.envelope.id, addr=self.peer.addr_text,
                        reason="idle past timeout")
        return self.close(b"421 4.4.2 %s Error: timeout exceeded\r\n"
                          % self.settings.hostname.encode())

    def eof(self):
        """The client went away: whatever is half received is thrown away."""
        if self.envelope.writer is not None:
            self.log.notice("lost", id=self.envelope.id, addr=self.peer.addr_text,
                            reason="connection closed during DATA")
        self.close(b"")

    def feed(self, data):
        """Consume client bytes; return everything smap answers to them."""
        if self.state == State.CLOSED:
            return b""
        if self.state == State.GREETING:
            return self.pregreet()
        if self.helo is None and self.state == State.CONNECTED and \
                data[:12] == PROXY_V2_SIGNATURE and not self.splitter.pending():
            return self.proxy_header()
        splitter = self.splitter
        splitter.feed(data)
        replies = []
        while self.state != State.CLOSED:
            if self.state == State.DATA and not splitter.skipping:
                self.data_block()
            item = splitter.next()
            if item is None:
                break
            kind, line = item
            if kind == lineio.BARE:
                replies.append(self.bare_line())
                break
            if self.state == State.DATA:
                # end_of_data() checks for input sent ahead of its reply itself
                replies.append(self.data_line(kind, line))
                continue
            replies.append(self.command_line(kind, line))
            if self.switch_request:
                # Not one more line from the splitter: whatever follows the
                # STARTTLS line came in the clear, and the Conversation
                # refuses it (switch_refused) instead of switching.
                break
            # The kept tail of an over-long line is not a second command.
            if self.state != State.CLOSED and splitter.pending() and not splitter.skipping:
                replies.append(self.improper_pipelining())
        return b"".join(replies)

    # -- framing faults ---------------------------------------------------
    def bare_line(self):
        self.log.notice("reject", id=self.envelope.id, addr=self.peer.addr_text,
                        reason="bare CR or LF (only CRLF ends a line)")
        return self.close(b"554 5.5.2 Error: bare CR or LF received; only CRLF ends a line\r\n")

    def improper_pipelining(self):
        self.log.notice("reject", id=self.envelope.id, addr=self.peer.addr_text,
                        reason="improper pipelining (input before the reply)")
        return self.close(b"554 5.5.0 Error: improper pipelining: wait for each reply\r\n")

    def error(self, reply, reason, **fields):
        """A client error: count it; the tenth ends the session."""
        self.errors += 1
        self.log.notice("reject", id=self.envelope.id, addr=self.peer.addr_text, reason=reason,
                        **fields)
        if self.errors >= MAX_ERRORS:
            return reply + self.close(b"421 4.7.0 %s Error: too many errors\r\n"
                                      % self.settings.hostname.encode())
        return reply

    # -- policy -------------------------------------------------------------
    def ask(self, stage, calls, arguments):
        """Ask the hooks of a stage (not the end of data: end_of_data).
        None when they all accept, else the reply to send."""
        name, verdict = self.hooks.ask(stage, calls, arguments)
        if verdict.action == policy.ACCEPT:
            return None
        return self.refusal(stage, name, verdict)

    def refusal(self, stage, name, verdict):
        """The reply to a hook's reject or tempfail, as smap.policy checked
        it; logged, and counted as a client error after the banner."""
        reply, problem = policy.reply_of(verdict, stage, self.settings.hostname)
        if problem:
            self.log.warning("policy", id=self.envelope.id, hook=name, stage=stage,
                             reason="refused reply: %s" % problem)
        reason = verdict.reason or reply[:-2].decode("ascii", "replace")
        if stage == policy.CONNECT:
            self.log.notice("reject", addr=self.peer.addr_text, reason=reason,
                            hook=name, stage=stage)
            return reply
        # a hook's own log fields (smap.verify: the hub's reply), never the reply itself
        return self.error(reply, reason, hook=name, stage=stage,
                          **getattr(verdict, "fields", None) or {})

    # -- commands ---------------------------------------------------------
    def command_line(self, kind, line):
        if kind == lineio.TOO_LONG:
            return self.error(b"500 5.5.2 Error: command line too long\r\n",
                              "command line over %d octets" % COMMAND_LIMIT)
        body = line[:-2]
        if b"\0" in body:
            return self.error(b"500 5.5.2 Error: NUL in command\r\n", "NUL byte in command")
        try:
            text = body.decode("ascii")
        except UnicodeDecodeError:
            return self.error(b"500 5.5.2 Error: 8-bit characters in command\r\n",
                              "8-bit command")
        verb, _, argument = text.partition(" ")
        if verb == "PROXY" and self.state == State.CONNECTED:
            return self.proxy_header()
        command = COMMANDS.get(verb.upper())
        if command is None:
            return self.error(b"500 5.5.2 Error: command not recognized\r\n",
                              "unknown command %s" % verb[:20])
        if self.state not in command.allowed:
            return self.error(*command.refusals[self.state])
        return command.handler(self, argument.strip(" "))

    def cmd_helo(self, argument, extended=False):
        if not argument or " " in argument or len(argument) > 255 or \
                not argument.isprintable():
            return self.error(b"501 5.5.4 Syntax: %s hostname\r\n"
                              % (b"EHLO" if extended else b"HELO"), "bad HELO argument")
        if self.hooks.helo:
            answer = self.ask(policy.HELO, self.hooks.helo, (self, argument))
            if answer is not None:
                return answer
        # RFC 5321 §4.1.4: a HELO/EHLO ends any transaction, like RSET.
        self.new_envelope()
        self.helo = argument
        self.esmtp = extended
        self.enter(State.HELLO)
        host = self.settings.hostname.encode()
        if not extended:
            return b"250 %s\r\n" % host
        starttls = b"250-STARTTLS\r\n" if self.settings.starttls and self.tls is None else b""
        return (b"250-%s\r\n250-SIZE %d\r\n250-8BITMIME\r\n%s250 ENHANCEDSTATUSCODES\r\n"
                % (host, self.settings.maxbytes, starttls))

    def cmd_ehlo(self, argument):
        return self.cmd_helo(argument, extended=True)

    def cmd_mail(self, argument):
        if self.settings.require_tls and self.tls is None:
            return self.error(b"530 5.7.0 Must issue a STARTTLS command first\r\n",
                              "MAIL before STARTTLS (require-tls)")
        path, params, problem = split_path(argument, "FROM:")
        if problem:
            return self.error(b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n", problem)
        parameters = {}
        for param in params:
            key, _, value = param.partition("=")
            key = key.upper()
            if not self.esmtp:
                return self.error(b"555 5.5.4 Error: parameters need EHLO\r\n",
                                  "MAIL parameter after HELO")
            if key == "SIZE":
                if not (value.isascii() and value.isdigit()):
                    return self.error(b"501 5.5.4 Syntax: SIZE=octets\r\n", "bad SIZE parameter")
                # a 20-digit size is over any maxbytes; no need to convert it
                if len(value) >= 20 or int(value) > self.settings.maxbytes:
                    return self.error(b"552 5.3.4 Error: message size exceeds fixed limit\r\n",
                                      "SIZE=%s over maxbytes" % value[:20])
            elif key == "BODY" and value.upper() in ("7BIT", "8BITMIME"):
                value = value.upper()
            else:
                return self.error(b"555 5.5.4 Error: unsupported parameter %s\r\n"
                                  % key.encode()[:40], "unsupported MAIL parameter")
            parameters[key] = value
        envelope = self.envelope
        envelope.parameters = parameters
        if self.hooks.mail:
            answer = self.ask(policy.MAIL, self.hooks.mail, (self, envelope, path))
            if answer is not None:
                envelope.parameters = {}
                return answer
        envelope.id = spool.new_id(self.clock())
        envelope.sender = path
        self.enter(State.MAIL)
        return b"250 2.1.0 Ok\r\n"

    def cmd_rcpt(self, argument):
        path, params, problem = split_path(argument, "TO:")
        if problem or not path:
            return self.error(b"501 5.5.4 Syntax: RCPT TO:<address>\r\n",
                              problem or "empty recipient")
        if params:
            return self.error(b"555 5.5.4 Error: unsupported RCPT parameter\r\n",
                              "RCPT parameter")
        envelope = self.envelope
        if len(envelope.recipients) >= self.settings.maxrecip:
            return self.error(b"452 4.5.3 Error: too many recipients\r\n",
                              "more than maxrecip recipients")
        if self.hooks.rcpt:
            answer = self.ask(policy.RCPT, self.hooks.rcpt, (self, envelope, path))
            if answer is not None:
                return answer
        envelope.recipients.append(path)
        self.enter(State.RCPT)
        return b"250 2.1.5 Ok\r\n"

    def cmd_data(self, argument):
        if argument:
            return self.error(b"501 5.5.4 Syntax: DATA\r\n", "argument to DATA")
        envelope = self.envelope
        try:
            envelope.writer = self.writer_factory(self.spool_root, envelope.id)
            envelope.writer.start({
                "id": envelope.id, "arrival": "%.6f" % self.clock(),
                "client-addr": self.peer.addr_text, "client-name": self.peer.name_text,
                "helo": self.helo, "sender": envelope.sender, "rcpt": envelope.recipients,
            })
            received = self.received_header()
            envelope.writer.write(received)
        except (OSError, ValueError) as err:
            # ValueError: the envelope refused a value (a control character
            # in a resolver's answer); answer 451 rather than crash.
            self.log.error("spool", id=envelope.id,
                           reason=getattr(err, "strerror", None) or str(err))
            self.new_envelope()
            self.enter(State.HELLO)
            return storage_reply(err)
        if self.hooks.text:
            self.tell_text(envelope, received)
        self.enter(State.DATA)
        self.splitter.set_limit(TEXT_LIMIT)
        return b"354 End data with <CR><LF>.<CR><LF>\r\n"

    def received_header(self):
        when = time.strftime("%a, %d %b %Y %H:%M:%S %z", time.localtime(self.clock()))
        peer, envelope = self.peer, self.envelope
        # RFC 5321 §4.1.3: an IPv6 address literal is written [IPv6:...]
        literal = ("IPv6:" if ":" in peer.addr_text else "") + peer.addr_text
        if self.tls is None:
            using, protocol = "", "ESMTP" if self.esmtp else "SMTP"
        else:
            # RFC 3848: ESMTPS; the protocol and cipher in a comment, as Postfix does
            using = "\r\n\t(using %s with cipher %s)" % (self.tls["tls"], self.tls["cipher"])
            protocol = "ESMTPS"
        header = ("Received: from %s (%s [%s])%s\r\n\tby %s (mailwall smap) with %s id %s"
                  % (self.helo, peer.name_text, literal, using, self.settings.hostname,
                     protocol, envelope.id))
        if len(envelope.recipients) == 1:
            header += "\r\n\tfor <%s>" % envelope.recipients[0]
        return ("%s; %s\r\n" % (header, when)).encode("ascii", "replace")

    # -- STARTTLS (RFC 3207) ------------------------------------------------
    def cmd_starttls(self, argument):
        if not self.settings.starttls:
            return self.cmd_unimplemented(argument)
        if self.tls is not None:
            return self.error(b"554 5.5.1 Error: TLS already active\r\n", "second STARTTLS")
        if argument:
            return self.error(b"501 5.5.4 Syntax: STARTTLS\r\n", "argument to STARTTLS")
        if self.state == State.CONNECTED:
            return self.error(b"503 5.5.1 Error: send EHLO first\r\n", "STARTTLS before EHLO")
        if self.state != State.HELLO:
            return self.error(b"503 5.5.1 Error: MAIL transaction in progress\r\n",
                              "STARTTLS in a transaction")
        self.switch_request = True
        return b"220 2.0.0 Ready to start TLS\r\n"

    def switch_refused(self):
        """The client sent more after its STARTTLS line, in the clear, before
        the handshake: never executed (CVE-2011-0411); the session ends."""
        self.switch_request = None
        self.log.notice("reject", addr=self.peer.addr_text,
                        reason="input after STARTTLS before the TLS handshake"
                               " (command injection); nothing executed")
        return self.close(b"554 5.5.0 Error: input after STARTTLS before the TLS handshake\r\n")

    def switched(self):
        """The handshake is done (self.tls set by the caller's switch): the
        session starts over (RFC 3207 §4.2), EHLO again, no STARTTLS."""
        self.switch_request = None
        self.new_envelope()
        self.helo = None
        self.esmtp = False
        self.enter(State.CONNECTED)
        self.log.info("starttls", addr=self.peer.addr_text, **(self.tls or {}))

    def cmd_rset(self, argument):
        self.new_envelope()
        if self.state != State.CONNECTED:
            self.enter(State.HELLO)
        return b"250 2.0.0 Ok\r\n"

    def cmd_noop(self, argument):
        return b"250 2.0.0 Ok\r\n"

    def cmd_quit(self, argument):
        return self.close(b"221 2.0.0 Bye\r\n")

    def cmd_help(self, argument):
        return (b"214-2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY\r\n"
                b"214 2.0.0 End of HELP info\r\n")

    def cmd_vrfy(self, argument):
        return b"252 2.5.2 Cannot VRFY user; send some mail and find out\r\n"

    def cmd_expn(self, argument):
        return self.error(b"502 5.5.1 Error: EXPN not available\r\n", "EXPN")

    def cmd_unimplemented(self, argument):
        return self.error(b"502 5.5.1 Error: command not implemented\r\n",
                          "unimplemented command")

    # -- message text -----------------------------------------------------
    def data_block(self):
        """DATA's fast path: the complete lines now buffered, up to (not
        including) the end-of-data line, checked and written at once.  It
        consumes nothing when anything is unusual (a bare CR or LF, a NUL, an
        over-long line): data_line() then takes those lines one by one and
        gives the exact answer.  What it writes is what data_line() would
        write line by line: each line without its first `.`, if any."""
        block = self.splitter.lines_before(b".\r\n")
        if not block:
            return
        lines = block.count(b"\r\n")
        if block.count(b"\r") != lines or block.count(b"\n") != lines or b"\0" in block:
            return
        if max(map(len, block.split(b"\r\n"))) + 2 > TEXT_LIMIT:
            return
        self.splitter.skip(len(block))
        data = block.replace(b"\r\n.", b"\r\n")
        if data.startswith(b"."):
            data = data[1:]
        self.take_text(data)

    def take_text(self, data):
        """Count message text against maxbytes and write it, unless the
        message is already refused (its answer comes at the final dot)."""
        envelope = self.envelope
        envelope.size += len(data)
        if envelope.size > self.settings.maxbytes:
            envelope.data_error = envelope.data_error or (
                b"552 5.3.4 Error: message size exceeds fixed limit\r\n",
                "message over maxbytes")
        if envelope.data_error is None:
            try:
                envelope.writer.write(data)
            except OSError as err:
                envelope.data_error = (storage_reply(err), "spool write: %s" % err.strerror)
                return
            if self.hooks.text:
                self.tell_text(envelope, data)

    def tell_text(self, envelope, data):
        """Show message text to the on_text hooks; one that fails makes the
        message a temporary failure at the final dot."""
        failed = self.hooks.tell(self.hooks.text, (self, envelope, data))
        if failed and envelope.data_error is None:
            reply, _ = policy.reply_of(policy.tempfail(), policy.DATA, self.settings.hostname)
            envelope.data_error = (reply, failed)

    def data_line(self, kind, line):
        envelope = self.envelope
        if kind == lineio.TOO_LONG:
            envelope.data_error = envelope.data_error or (
                b"500 5.5.2 Error: message line over 1000 octets\r\n",
                "text line over %d octets" % TEXT_LIMIT)
            return b""
        if line == b".\r\n":
            return self.end_of_data()
        if line.startswith(b"."):
            line = line[1:]
        if b"\0" in line:
            envelope.data_error = envelope.data_error or (
                b"554 5.6.0 Error: NUL in message\r\n", "NUL byte in message")
        self.take_text(line)
        return b""

    def end_of_data(self):
        """The final dot: the hooks' verdict, then the commit, then "250"."""
        self.splitter.set_limit(COMMAND_LIMIT)
        self.enter(State.HELLO)
        if self.splitter.pending():
            return self.improper_pipelining()   # nothing spooled
        envelope = self.envelope
        if envelope.data_error is not None:
            reply, reason = envelope.data_error
            self.new_envelope()
            return self.error(reply, reason)
        changes, quarantine = (), None
        if self.hooks.data:
            name, verdict = self.hooks.ask(policy.DATA, self.hooks.data, (self, envelope))
            if verdict.action in (policy.REJECT, policy.TEMPFAIL):
                reply = self.refusal(policy.DATA, name, verdict)
                self.new_envelope()
                return reply
            if verdict.action == policy.DISCARD:
                return self.discard(name, verdict)
            changes = verdict.changes
            if verdict.action == policy.QUARANTINE:
                quarantine = (name, verdict.reason or "no reason given")
        writer = envelope.writer
        try:
            if changes:
                self.apply(writer, "edit_header", changes)
            if quarantine:
                self.apply(writer, "quarantine", "%s: %s" % quarantine)
            writer.commit()
        except OSError as err:
            self.log.error("spool", id=envelope.id, reason=err.strerror or str(err))
            self.new_envelope()
            return storage_reply(err)
        envelope.writer = None
        message_id = envelope.id
        self.log.info("message", **{"id": message_id, "from": "<%s>" % envelope.sender,
                                    "nrcpt": len(envelope.recipients), "size": envelope.size,
                                    "to": ",".join("<%s>" % r for r in envelope.recipients),
                                    **(self.tls or {})})
        if quarantine:
            self.log.notice("quarantine", id=message_id, hook=quarantine[0], stage=policy.DATA,
                            reason=quarantine[1])
        self.messages += 1
        spool.poke(self.spool_root)
        self.new_envelope(committed=True)
        return b"250 2.0.0 Ok: queued as %s\r\n" % message_id.encode()

    def discard(self, name, verdict):
        """A hook said discard: "250" as if queued (Postfix does the same,
        so a sender learns nothing), nothing spooled, a log line."""
        message_id = self.envelope.id
        self.log.notice("discard", id=message_id, addr=self.peer.addr_text, hook=name,
                        stage=policy.DATA, reason=verdict.reason or "no reason given")
        self.new_envelope()
        return b"250 2.0.0 Ok: queued as %s\r\n" % message_id.encode()

    def apply(self, writer, method, argument):
        """Ask the spool writer to apply a verdict before its commit.  A
        writer that cannot is a temporary failure (OSError): smap never
        commits a message unchanged or unmarked that a hook wanted changed
        or quarantined."""
        call = getattr(writer, method, None)
        if call is None:
            raise OSError(errno.ENOTSUP, "the spool writer cannot %s" % method.replace("_", " "))
        call(argument)


def storage_reply(err):
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return b"452 4.3.1 Error: insufficient system storage\r\n"
    return b"451 4.3.0 Error: local error in processing\r\n"


def split_path(argument, keyword):
    """(address, [params], problem) from 'FROM:<a> P=V ...'."""
    if argument[:len(keyword)].upper() != keyword:
        return None, [], "missing %s" % keyword
    rest = argument[len(keyword):].lstrip(" ")
    if not rest.startswith("<"):
        return None, [], "address not in <>"
    end = rest.find(">")
    if end < 0:
        return None, [], "unclosed <"
    path = rest[1:end]
    tail = rest[end + 1:]
    if tail and not tail.startswith(" "):
        return None, [], "junk after address"
    if "<" in path:
        return None, [], "nested <"
    return path, tail.split(), None


# -- the command table ---------------------------------------------------------

class Command:
    """A verb: its handler, the states it is allowed in, and for every
    other state where commands are read the (reply, logged reason) it gets."""

    __slots__ = ("handler", "allowed", "refusals")

    def __init__(self, handler, allowed=COMMAND_STATES, refusals=None):
        self.handler = handler
        self.allowed = frozenset(allowed)
        self.refusals = refusals or {}
        missing = set(COMMAND_STATES) - self.allowed - set(self.refusals)
        if missing:
            raise ValueError("%s: no answer in states %s" % (handler.__name__, sorted(missing)))


NO_HELO = (b"503 5.5.1 Error: send HELO/EHLO first\r\n", "MAIL before HELO")
NESTED_MAIL = (b"503 5.5.1 Error: nested MAIL command\r\n", "nested MAIL")
NEED_MAIL = (b"503 5.5.1 Error: need MAIL command\r\n", "RCPT before MAIL")
NEED_RCPT = (b"503 5.5.1 Error: need RCPT command\r\n", "DATA before RCPT")
NO_RECIPIENTS = (b"554 5.5.1 Error: no valid recipients\r\n", "DATA without RCPT")

COMMANDS = {
    "HELO": Command(Session.cmd_helo),
    "EHLO": Command(Session.cmd_ehlo),
    "MAIL": Command(Session.cmd_mail, [State.HELLO],
                    {State.CONNECTED: NO_HELO, State.MAIL: NESTED_MAIL,
                     State.RCPT: NESTED_MAIL}),
    "RCPT": Command(Session.cmd_rcpt, [State.MAIL, State.RCPT],
                    {State.CONNECTED: NEED_MAIL, State.HELLO: NEED_MAIL}),
    "DATA": Command(Session.cmd_data, [State.RCPT],
                    {State.CONNECTED: NEED_RCPT, State.HELLO: NEED_RCPT,
                     State.MAIL: NO_RECIPIENTS}),
    "RSET": Command(Session.cmd_rset),
    "NOOP": Command(Session.cmd_noop),
    "QUIT": Command(Session.cmd_quit),
    "HELP": Command(Session.cmd_help),
    "VRFY": Command(Session.cmd_vrfy),
    "EXPN": Command(Session.cmd_expn),
}
COMMANDS["STARTTLS"] = Command(Session.cmd_starttls)
for _verb in ("TURN", "ETRN", "BDAT", "AUTH", "ATRN", "SEND", "SAML", "SOML"):
    COMMANDS[_verb] = Command(Session.cmd_unimplemented)

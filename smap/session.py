"""The SMTP state machine of smap: bytes in, bytes out (DESIGN §5).

It speaks the minimum of RFC 5321 a gateway needs and nothing more:
HELO/EHLO (SIZE, 8BITMIME, ENHANCEDSTATUSCODES; no PIPELINING), MAIL, RCPT,
DATA, RSET, NOOP, QUIT, HELP, VRFY (252) and EXPN (502).  It trusts nothing
the client sends: only CRLF ends a line, a bare CR or LF anywhere ends the
session with nothing spooled, input that arrives before a reply (pipelining
without the extension) is refused, every line and count is bounded.  A
message is answered "250" only after common.spool has fsync'ed it, renamed
it into the queue and fsync'ed the queue directory.

The policy it applies (who may relay, which domains are ours) comes in a
Policy; the spool writer is a parameter so that tests can break it.
"""

import errno
import time

from common import address, lineio, spool

# RFC 5321 §4.5.3.1.4 and §4.5.3.1.6: a command line and a text line,
# CRLF included.
COMMAND_LIMIT = 512
TEXT_LIMIT = 1000
MAX_ERRORS = 10

GREETING, READY, MAIL, RCPT, DATA, CLOSED = range(6)


class Policy:
    """What the netperm-table says for this connection."""

    def __init__(self, hostname, maxbytes=10485760, maxrecip=100, accept_domains=(),
                 relay_ok=False):
        self.hostname = hostname
        self.maxbytes = maxbytes
        self.maxrecip = maxrecip
        self.accept_domains = [d.lower().rstrip(".") for d in accept_domains]
        self.relay_ok = relay_ok


class Session:
    """One SMTP connection.  greeting(), then feed(bytes) -> reply bytes."""

    def __init__(self, policy, peer, spool_root, log, writer_factory=spool.MessageWriter,
                 clock=time.time):
        self.policy = policy
        self.peer = peer
        self.spool_root = spool_root
        self.log = log
        self.writer_factory = writer_factory
        self.clock = clock
        self.state = GREETING
        self.splitter = lineio.LineSplitter(COMMAND_LIMIT)
        self.errors = 0
        self.helo = None
        self.esmtp = False
        self.messages = 0
        self.reset()

    # -- transaction state ------------------------------------------------
    def reset(self):
        self.id = None
        self.sender = None
        self.recipients = []
        self.writer = None
        self.size = 0
        self.data_error = None
        self.line_start = True

    @property
    def closed(self):
        return self.state == CLOSED

    # -- entry points -----------------------------------------------------
    def greeting(self):
        self.state = READY if self.state == GREETING else self.state
        return b"220 %s ESMTP mailwall smap\r\n" % self.policy.hostname.encode()

    def pregreet(self):
        """The client talked before the banner: refuse, spool nothing."""
        self.log.notice("reject", addr=self.peer.addr_text, reason="talked before the banner")
        return self.close(b"554 5.5.0 Protocol error: talked before the greeting\r\n")

    def timeout(self):
        self.log.notice("timeout", id=self.id, addr=self.peer.addr_text,
                        reason="idle past timeout")
        self.abort_message()
        return self.close(b"421 4.4.2 %s Error: timeout exceeded\r\n"
                          % self.policy.hostname.encode())

    def eof(self):
        """The client went away: whatever is half received is thrown away."""
        if self.writer is not None:
            self.log.notice("lost", id=self.id, addr=self.peer.addr_text,
                            reason="connection closed during DATA")
        self.abort_message()
        self.state = CLOSED

    def feed(self, data):
        """Consume client bytes; return everything smap answers to them."""
        if self.state == CLOSED:
            return b""
        if self.state == GREETING:
            return self.pregreet()
        self.splitter.feed(data)
        replies = []
        while self.state != CLOSED:
            if self.state == DATA and not self.splitter.skipping:
                self.data_block()
            item = self.splitter.next()
            if item is None:
                break
            kind, line = item
            if kind == lineio.BARE:
                replies.append(self.bare_line())
                break
            if self.state == DATA:
                # end_of_data() checks for input sent ahead of its reply itself
                replies.append(self.data_line(kind, line))
                continue
            replies.append(self.command_line(kind, line))
            # The kept tail of an over-long line is not a second command.
            if self.state != CLOSED and self.splitter.pending() and not self.splitter.skipping:
                replies.append(self.improper_pipelining())
        return b"".join(replies)

    # -- framing faults ---------------------------------------------------
    def bare_line(self):
        self.log.notice("reject", id=self.id, addr=self.peer.addr_text,
                        reason="bare CR or LF (only CRLF ends a line)")
        self.abort_message()
        return self.close(b"554 5.5.2 Error: bare CR or LF received; only CRLF ends a line\r\n")

    def improper_pipelining(self):
        self.log.notice("reject", id=self.id, addr=self.peer.addr_text,
                        reason="improper pipelining (input before the reply)")
        self.abort_message()
        return self.close(b"554 5.5.0 Error: improper pipelining: wait for each reply\r\n")

    def close(self, reply):
        self.state = CLOSED
        return reply

    def error(self, reply, reason):
        """A client error: count it; the tenth ends the session."""
        self.errors += 1
        self.log.notice("reject", id=self.id, addr=self.peer.addr_text, reason=reason)
        if self.errors >= MAX_ERRORS:
            self.abort_message()
            return reply + self.close(b"421 4.7.0 %s Error: too many errors\r\n"
                                      % self.policy.hostname.encode())
        return reply

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
        handler = COMMANDS.get(verb.upper())
        if handler is None:
            return self.error(b"500 5.5.2 Error: command not recognized\r\n",
                              "unknown command %s" % verb[:20])
        return handler(self, argument.strip(" "))

    def cmd_helo(self, argument, extended=False):
        if not argument or " " in argument or len(argument) > 255 or \
                not argument.isprintable():
            return self.error(b"501 5.5.4 Syntax: %s hostname\r\n"
                              % (b"EHLO" if extended else b"HELO"), "bad HELO argument")
        self.abort_message()
        self.reset()
        self.helo = argument
        self.esmtp = extended
        self.state = READY
        host = self.policy.hostname.encode()
        if not extended:
            return b"250 %s\r\n" % host
        return (b"250-%s\r\n250-SIZE %d\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
                % (host, self.policy.maxbytes))

    def cmd_ehlo(self, argument):
        return self.cmd_helo(argument, extended=True)

    def cmd_mail(self, argument):
        if self.helo is None:
            return self.error(b"503 5.5.1 Error: send HELO/EHLO first\r\n", "MAIL before HELO")
        if self.state != READY:
            return self.error(b"503 5.5.1 Error: nested MAIL command\r\n", "nested MAIL")
        path, params, problem = split_path(argument, "FROM:")
        if problem:
            return self.error(b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n", problem)
        if path:
            reason = address.problem(path)
            if reason:
                return self.error(b"553 5.1.7 Error: bad sender address: %s\r\n"
                                  % reason.encode(), "sender %s" % reason)
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
                if len(value) >= 20 or int(value) > self.policy.maxbytes:
                    return self.error(b"552 5.3.4 Error: message size exceeds fixed limit\r\n",
                                      "SIZE=%s over maxbytes" % value[:20])
            elif key == "BODY" and value.upper() in ("7BIT", "8BITMIME"):
                pass
            else:
                return self.error(b"555 5.5.4 Error: unsupported parameter %s\r\n"
                                  % key.encode()[:40], "unsupported MAIL parameter")
        self.id = spool.new_id(self.clock())
        self.sender = path
        self.state = MAIL
        return b"250 2.1.0 Ok\r\n"

    def cmd_rcpt(self, argument):
        if self.state not in (MAIL, RCPT):
            return self.error(b"503 5.5.1 Error: need MAIL command\r\n", "RCPT before MAIL")
        path, params, problem = split_path(argument, "TO:")
        if problem or not path:
            return self.error(b"501 5.5.4 Syntax: RCPT TO:<address>\r\n",
                              problem or "empty recipient")
        if params:
            return self.error(b"555 5.5.4 Error: unsupported RCPT parameter\r\n",
                              "RCPT parameter")
        reason = address.problem(path, allow_bare_postmaster=True)
        if reason:
            return self.error(b"553 5.1.3 Error: bad recipient address: %s\r\n"
                              % reason.encode(), "recipient %s" % reason)
        if len(self.recipients) >= self.policy.maxrecip:
            return self.error(b"452 4.5.3 Error: too many recipients\r\n",
                              "more than maxrecip recipients")
        is_postmaster = "@" not in path
        if not (is_postmaster or self.policy.relay_ok or
                address.in_domains(path, self.policy.accept_domains)):
            return self.error(b"554 5.7.1 <%s>: Relay access denied\r\n" % path.encode(),
                              "relay denied to=<%s>" % path)
        self.recipients.append(path)
        self.state = RCPT
        return b"250 2.1.5 Ok\r\n"

    def cmd_data(self, argument):
        if self.state == MAIL:
            return self.error(b"554 5.5.1 Error: no valid recipients\r\n", "DATA without RCPT")
        if self.state != RCPT:
            return self.error(b"503 5.5.1 Error: need RCPT command\r\n", "DATA before RCPT")
        if argument:
            return self.error(b"501 5.5.4 Syntax: DATA\r\n", "argument to DATA")
        try:
            self.writer = self.writer_factory(self.spool_root, self.id)
            self.writer.start({
                "id": self.id, "arrival": "%.6f" % self.clock(),
                "client-addr": self.peer.addr_text, "client-name": self.peer.name_text,
                "helo": self.helo, "sender": self.sender, "rcpt": self.recipients,
            })
            self.writer.write(self.received_header())
        except (OSError, ValueError) as err:
            # ValueError: the envelope refused a value (a control character
            # in a resolver's answer); answer 451 rather than crash.
            self.log.error("spool", id=self.id, reason=getattr(err, "strerror", None) or str(err))
            self.abort_message()
            self.reset()
            self.state = READY
            return storage_reply(err)
        self.state = DATA
        self.splitter.limit = TEXT_LIMIT
        return b"354 End data with <CR><LF>.<CR><LF>\r\n"

    def received_header(self):
        when = time.strftime("%a, %d %b %Y %H:%M:%S %z", time.localtime(self.clock()))
        peer = self.peer
        header = ("Received: from %s (%s [%s])\r\n\tby %s (mailwall smap) with %s id %s"
                  % (self.helo, peer.name_text, peer.addr_text, self.policy.hostname,
                     "ESMTP" if self.esmtp else "SMTP", self.id))
        if len(self.recipients) == 1:
            header += "\r\n\tfor <%s>" % self.recipients[0]
        return ("%s; %s\r\n" % (header, when)).encode("ascii", "replace")

    def cmd_rset(self, argument):
        self.abort_message()
        self.reset()
        if self.state != GREETING:
            self.state = READY
        return b"250 2.0.0 Ok\r\n"

    def cmd_noop(self, argument):
        return b"250 2.0.0 Ok\r\n"

    def cmd_quit(self, argument):
        self.abort_message()
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
        splitter = self.splitter
        buffer = splitter.buffer
        start, end = splitter.complete_lines()
        if end == start or buffer.startswith(b".\r\n", start):
            return
        final = buffer.find(b"\r\n.\r\n", start, end)
        if final >= 0:
            end = final + 2
        block = bytes(buffer[start:end])
        lines = block.count(b"\r\n")
        if block.count(b"\r") != lines or block.count(b"\n") != lines or b"\0" in block:
            return
        if max(map(len, block.split(b"\r\n"))) + 2 > splitter.limit:
            return
        splitter.consume(end)
        data = block.replace(b"\r\n.", b"\r\n")
        if data.startswith(b"."):
            data = data[1:]
        self.take_text(data)

    def take_text(self, data):
        """Count message text against maxbytes and write it, unless the
        message is already refused (its answer comes at the final dot)."""
        self.size += len(data)
        if self.size > self.policy.maxbytes:
            self.data_error = self.data_error or (
                b"552 5.3.4 Error: message size exceeds fixed limit\r\n",
                "message over maxbytes")
        if self.data_error is None:
            try:
                self.writer.write(data)
            except OSError as err:
                self.data_error = (storage_reply(err), "spool write: %s" % err.strerror)

    def data_line(self, kind, line):
        if kind == lineio.TOO_LONG:
            self.data_error = self.data_error or (
                b"500 5.5.2 Error: message line over 1000 octets\r\n",
                "text line over %d octets" % TEXT_LIMIT)
            return b""
        if line == b".\r\n":
            return self.end_of_data()
        if line.startswith(b"."):
            line = line[1:]
        if b"\0" in line:
            self.data_error = self.data_error or (b"554 5.6.0 Error: NUL in message\r\n",
                                                  "NUL byte in message")
        self.take_text(line)
        return b""

    def end_of_data(self):
        self.splitter.limit = COMMAND_LIMIT
        self.state = READY
        if self.splitter.pending():
            return self.improper_pipelining()   # nothing spooled
        if self.data_error is not None:
            reply, reason = self.data_error
            self.abort_message()
            self.reset()
            return self.error(reply, reason)
        try:
            self.writer.commit()
        except OSError as err:
            self.log.error("spool", id=self.id, reason=err.strerror or str(err))
            self.abort_message()
            self.reset()
            return storage_reply(err)
        message_id = self.id
        self.log.info("message", **{"id": message_id, "from": "<%s>" % self.sender,
                                    "nrcpt": len(self.recipients), "size": self.size,
                                    "to": ",".join("<%s>" % r for r in self.recipients)})
        self.writer = None
        self.messages += 1
        spool.poke(self.spool_root)
        self.reset()
        return b"250 2.0.0 Ok: queued as %s\r\n" % message_id.encode()

    def abort_message(self):
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


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


COMMANDS = {
    "HELO": Session.cmd_helo, "EHLO": Session.cmd_ehlo, "MAIL": Session.cmd_mail,
    "RCPT": Session.cmd_rcpt, "DATA": Session.cmd_data, "RSET": Session.cmd_rset,
    "NOOP": Session.cmd_noop, "QUIT": Session.cmd_quit, "HELP": Session.cmd_help,
    "VRFY": Session.cmd_vrfy, "EXPN": Session.cmd_expn,
}
for _verb in ("TURN", "ETRN", "BDAT", "STARTTLS", "AUTH", "ATRN", "SEND", "SAML", "SOML"):
    COMMANDS[_verb] = Session.cmd_unimplemented

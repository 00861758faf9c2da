"""smap's milter client: content scanning before "250" (issue 15, DESIGN §12.3).

The Sendmail milter protocol, version 6, the MTA side, as Postfix's
src/milter/milter8.c speaks it (constants from libmilter's mfdef.h), so
that clamav-milter, rspamd's proxy, opendkim and the others judge a
message while its sender is still connected.  `smap: milters SPEC...`
names them (common.endpoint); MilterHook asks each in order at the
policy stages of smap.policy: connect, HELO, MAIL, RCPT, the message text
as it is received (header fields, end of header, body chunks of at most
65,535 octets) and the end of the message, just before the spool commit.

Three layers, each testable alone:
- the codec (`packet`, `*_event`, PacketReader, decode_optneg,
  decode_reply): pure functions on bytes, no sockets;
- Connection: one milter's socket, every exchange (a command and its
  whole reply) bounded by `milter-timeout`, every read bounded in size;
- Milter (one milter's state in one SMTP session) and MilterHook (all of
  them, as one smap.policy hook).

What it trusts: nothing a milter sends.  A packet's length must be 1 to
MAX_PACKET; each reply type has an exact shape (no data where none is
due, NUL-terminated strings exactly where they are due, nothing left
over), and must be one this stage allows and the negotiation granted.
smap offers the milter header changes (add, insert, change, delete) and
quarantine, and nothing else: no body replacement (SMFIF_CHGBODY), no
sender or recipient changes.  A milter asking for more at negotiation is
granted only what was offered, and one that uses an action it was not
granted breaks the protocol.  A custom reply must be a 4xx or 5xx
(smap.policy.reply_problem then checks the rest: class, enhanced code,
one printable line; a bad one is replaced by the stage's default reply of
the same kind); a header change must pass smap.policy.change_problem (a
field name, folds only: a milter's LF not followed by a space or a tab
is a forged header line).  Anything else is a protocol error: the milter
is dropped for the session and `milter-default-action` stands for its
answer, as when it is down or slow.  A milter can therefore refuse,
defer, discard or quarantine mail, and add or change header fields; it
cannot make smap answer "250" for a message that was not committed, send
a reply line of its own making, or store a header line that is not one.
"""

import re
import select
import socket
import struct
import time

from common import endpoint
from smap import policy

VERSION = 6

# Commands, MTA to milter.
ABORT, BODY, CONNECT, MACRO, BODYEOB, HELO, HEADER, MAIL, EOH, OPTNEG, QUIT, RCPT, DATA = (
    b"A"[0], b"B"[0], b"C"[0], b"D"[0], b"E"[0], b"H"[0], b"L"[0], b"M"[0], b"N"[0],
    b"O"[0], b"Q"[0], b"R"[0], b"T"[0])

# Replies, milter to MTA.
R_ADDRCPT, R_DELRCPT, R_ACCEPT, R_REPLBODY, R_CONTINUE, R_DISCARD = b"+-abcd"
R_CONN_FAIL, R_CHGHEADER, R_PROGRESS, R_REJECT, R_TEMPFAIL, R_SHUTDOWN = b"fmprt4"
R_ADDHEADER, R_INSHEADER, R_REPLYCODE, R_QUARANTINE, R_SKIP, R_CHGFROM = b"hiyqse"
R_ADDRCPT_PAR, R_SETSYMLIST = b"2l"

# Actions (SMFIF_*): what a milter may do at the end of the message.
F_ADDHDRS, F_CHGBODY, F_ADDRCPT, F_DELRCPT, F_CHGHDRS = 0x01, 0x02, 0x04, 0x08, 0x10
F_QUARANTINE, F_CHGFROM, F_ADDRCPT_PAR, F_SETSYMLIST = 0x20, 0x40, 0x80, 0x100
OFFERED_ACTIONS = F_ADDHDRS | F_CHGHDRS | F_QUARANTINE | F_SETSYMLIST

# Protocol flags (SMFIP_*): events the milter does not want, replies it will not send.
P_NOCONNECT, P_NOHELO, P_NOMAIL, P_NORCPT, P_NOBODY, P_NOHDRS, P_NOEOH = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40)
P_NR_HDR, P_NOUNKNOWN, P_NODATA, P_SKIP, P_RCPT_REJ = 0x80, 0x100, 0x200, 0x400, 0x800
P_NR_CONN, P_NR_HELO, P_NR_MAIL, P_NR_RCPT, P_NR_DATA, P_NR_UNKN, P_NR_EOH, P_NR_BODY = (
    0x1000, 0x2000, 0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000)
P_HDR_LEADSPC = 0x100000
# What Postfix offers (0x1FFFFF; clamav-milter drops a client that offers
# nothing), less SMFIP_RCPT_REJ: smap never shows a milter a refused recipient.
OFFERED_PROTOCOL = 0x1FFFFF & ~P_RCPT_REJ

# Address families of the connect event.
FAMILY_UNKNOWN, FAMILY_INET, FAMILY_INET6 = b"U", b"4", b"6"

# Macro classes of SMFIC_MACRO are the command they precede.
CHUNK = 65535                   # MILTER_CHUNK_SIZE: a body chunk's limit
# A reply packet's limit: a header change carries a name of at most 256
# and a value of at most 65,536 octets (smap.policy); nothing needs more.
MAX_PACKET = 1 << 17
# Replies to one event: every header change allowed, quarantine, progress.
MAX_REPLIES = policy.MAX_HEADER_CHANGES + 100
MAX_REASON = 300                # octets of a quarantine reason kept

# Stages of the log lines (DESIGN §12.3); the events of the message text
# (DATA, header, end of header, body) are logged as stage=eom, with step=.
LOG_STAGES = {"connect": "connect", "helo": "helo", "mail": "mail", "rcpt": "rcpt",
              "data": "eom", "header": "eom", "eoh": "eom", "body": "eom", "eom": "eom"}
POLICY_STAGES = {"connect": policy.CONNECT, "helo": policy.HELO, "mail": policy.MAIL,
                 "rcpt": policy.RCPT}


class ProtocolError(Exception):
    """The milter is down, slow, or sent something the protocol does not allow."""


# -- the codec: bytes only ------------------------------------------------

def packet(command, payload=b""):
    """One packet: 32-bit length (command octet + payload), command, payload."""
    return struct.pack(">IB", len(payload) + 1, command) + payload


def c_string(value):
    """A NUL-terminated string; smap's own values never hold a NUL (the
    session refuses them), so one here is a bug, not data."""
    data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)
    if b"\0" in data:
        raise ValueError("NUL in a milter string")
    return data + b"\0"


def optneg(version=VERSION, actions=OFFERED_ACTIONS, protocol=OFFERED_PROTOCOL):
    return packet(OPTNEG, struct.pack(">III", version, actions, protocol))


def macros(command, pairs):
    """SMFIC_MACRO for the event `command`: name, value, name, value..."""
    return packet(MACRO, bytes([command]) + b"".join(
        c_string(name) + c_string(value) for name, value in pairs if value is not None))


def connect_event(hostname, addr, port=0):
    """The client: its name ("[addr]" when unconfirmed), family, port, address."""
    if addr is None:
        return packet(CONNECT, c_string(hostname) + FAMILY_UNKNOWN)
    family = FAMILY_INET6 if ":" in addr else FAMILY_INET
    return packet(CONNECT, c_string(hostname) + family + struct.pack(">H", port) + c_string(addr))


def helo_event(name):
    return packet(HELO, c_string(name))


def mail_event(sender, parameters=()):
    return packet(MAIL, c_string("<%s>" % sender) + b"".join(map(c_string, parameters)))


def rcpt_event(recipient):
    return packet(RCPT, c_string("<%s>" % recipient))


def header_event(name, value):
    return packet(HEADER, c_string(name) + c_string(value))


def body_event(chunk):
    if len(chunk) > CHUNK:
        raise ValueError("body chunk over %d octets" % CHUNK)
    return packet(BODY, bytes(chunk))


class PacketReader:
    """Splits the milter's byte stream into packets, checking each length
    before anything of the packet is used."""

    def __init__(self):
        self.buffer = b""

    def feed(self, data):
        self.buffer += data

    def next(self):
        """(command, payload) of the next whole packet, or None for more bytes."""
        if len(self.buffer) < 4:
            return None
        (length,) = struct.unpack(">I", self.buffer[:4])
        if length < 1:
            raise ProtocolError("packet of length 0")
        if length > MAX_PACKET:
            raise ProtocolError("packet of %d octets (limit %d)" % (length, MAX_PACKET))
        if len(self.buffer) < 4 + length:
            return None
        command, payload = self.buffer[4], self.buffer[5:4 + length]
        self.buffer = self.buffer[4 + length:]
        return command, payload

    def wanted(self):
        """How many more octets the packet being read needs (at least 1)."""
        if len(self.buffer) < 4:
            return 4 - len(self.buffer)
        (length,) = struct.unpack(">I", self.buffer[:4])
        return max(1, 4 + min(length, MAX_PACKET) - len(self.buffer))


class Negotiated:
    """What a milter agreed to: its version, the actions granted (what it
    asked for and smap offered), and the protocol flags smap honours."""

    __slots__ = ("version", "actions", "protocol", "asked_actions")

    def __init__(self, version, actions, protocol, asked_actions=0):
        self.version, self.actions, self.protocol = version, actions, protocol
        self.asked_actions = asked_actions


def decode_optneg(command, payload):
    """The milter's answer to SMFIC_OPTNEG; raises ProtocolError."""
    if command != OPTNEG:
        raise ProtocolError("answered the negotiation with %s" % kind_name(command))
    if len(payload) < 12:
        raise ProtocolError("negotiation answer of %d octets (12 needed)" % len(payload))
    version, actions, protocol = struct.unpack(">III", payload[:12])
    if not 2 <= version <= VERSION:
        raise ProtocolError("protocol version %d (smap speaks 2 to %d)" % (version, VERSION))
    rest = payload[12:]
    # SMFIF_SETSYMLIST's lists of wanted macros: checked for shape, not used
    # (smap sends the same few macros to every milter).
    while rest:
        if len(rest) < 5 or b"\0" not in rest[4:]:
            raise ProtocolError("malformed macro list in the negotiation")
        (where,) = struct.unpack(">I", rest[:4])
        if where > 6:
            raise ProtocolError("macro list for unknown stage %d" % where)
        rest = rest[4:].split(b"\0", 1)[1]
    if version < 4:
        protocol |= P_NODATA
    if version < 6:
        # flags that came with version 6 mean nothing from an older milter
        protocol &= P_NOCONNECT | P_NOHELO | P_NOMAIL | P_NORCPT | P_NOBODY | P_NOHDRS | \
            P_NOEOH | P_NR_HDR | P_NOUNKNOWN | P_NODATA
    return Negotiated(version, actions & OFFERED_ACTIONS, protocol & OFFERED_PROTOCOL, actions)


class Reply:
    """One decoded reply: `kind` is the reply octet; code/status/text for
    SMFIR_REPLYCODE, reason for quarantine, change for a header change."""

    __slots__ = ("kind", "code", "status", "text", "reason", "change")

    def __init__(self, kind, code=None, status=None, text=None, reason=None, change=None):
        self.kind, self.code, self.status, self.text = kind, code, status, text
        self.reason, self.change = reason, change

    def __repr__(self):
        return "Reply(%r, %r, %r, %r)" % (kind_name(self.kind), self.code, self.status, self.text)


NAMES = {R_ACCEPT: "accept", R_CONTINUE: "continue", R_REJECT: "reject", R_TEMPFAIL: "tempfail",
         R_DISCARD: "discard", R_REPLYCODE: "replycode", R_QUARANTINE: "quarantine",
         R_PROGRESS: "progress", R_SKIP: "skip", R_SHUTDOWN: "shutdown",
         R_CONN_FAIL: "connfail", R_ADDHEADER: "addheader", R_INSHEADER: "insheader",
         R_CHGHEADER: "chgheader", R_REPLBODY: "replbody", R_ADDRCPT: "addrcpt",
         R_DELRCPT: "delrcpt", R_CHGFROM: "chgfrom", R_ADDRCPT_PAR: "addrcpt_par",
         R_SETSYMLIST: "setsymlist", OPTNEG: "optneg"}
EMPTY_REPLIES = (R_ACCEPT, R_CONTINUE, R_REJECT, R_TEMPFAIL, R_DISCARD, R_PROGRESS, R_SKIP,
                 R_SHUTDOWN, R_CONN_FAIL)
NOT_OFFERED = (R_REPLBODY, R_ADDRCPT, R_DELRCPT, R_CHGFROM, R_ADDRCPT_PAR)
CHANGES = {R_ADDHEADER: F_ADDHDRS, R_INSHEADER: F_ADDHDRS, R_CHGHEADER: F_CHGHDRS}
REPLY_LINE = re.compile(r"([45][0-9][0-9])(?:[ -]|$)(?:([45]\.[0-9]{1,3}\.[0-9]{1,3})(?: |$))?(.*)",
                        re.S)
FOLD = re.compile("\r?\n(?=[ \t])")


def kind_name(kind):
    return NAMES.get(kind, "unknown reply type 0x%02x" % kind)


def strings(payload, count):
    """Exactly `count` NUL-terminated strings and nothing more, as text."""
    parts = payload.split(b"\0")
    if len(parts) != count + 1 or parts[-1] != b"":
        raise ProtocolError("expected %d NUL-terminated strings" % count)
    return [part.decode("utf-8", "surrogateescape") for part in parts[:-1]]


def header_value(value, negotiated):
    """A milter's header value as smap.policy and the spool want it: folds
    as CRLF + space/tab (libmilter writes a fold as LF + space/tab); any
    other line break stays, and change_problem refuses it."""
    return FOLD.sub("\r\n", value)


def decode_reply(command, payload, event, negotiated):
    """A Reply for `event` (connect, helo, mail, rcpt, data, header, eoh,
    body, eom); raises ProtocolError for anything the protocol, the stage
    or the negotiation does not allow."""
    name = kind_name(command)
    if command in EMPTY_REPLIES:
        if payload:
            raise ProtocolError("%s reply with %d octets of data" % (name, len(payload)))
        if command == R_DISCARD and event in ("connect", "helo"):
            raise ProtocolError("discard at %s" % event)
        # SMFIP_SKIP is smap's offer (always made): a skip is fine for a body chunk
        if command == R_SKIP and event != "body":
            raise ProtocolError("skip at %s" % event)
        return Reply(command)
    if command == R_REPLYCODE:
        return decode_replycode(payload)
    if command in NOT_OFFERED:
        raise ProtocolError("%s was not offered at negotiation (smap lets no milter change "
                            "the body, the sender or the recipients)" % name)
    if command in CHANGES or command == R_QUARANTINE:
        if event != "eom":
            raise ProtocolError("%s at %s (only at the end of the message)" % (name, event))
        wanted = CHANGES.get(command, F_QUARANTINE)
        if not negotiated.actions & wanted:
            raise ProtocolError("%s without the action granted at negotiation" % name)
        if command == R_QUARANTINE:
            (reason,) = strings(payload, 1)
            reason = "".join(c if " " <= c <= "~" else "?" for c in reason)[:MAX_REASON]
            return Reply(command, reason=reason or "no reason given")
        return Reply(command, change=decode_change(command, payload, negotiated))
    raise ProtocolError("%s at %s" % (name, event))


def decode_replycode(payload):
    """SMFIR_REPLYCODE: "NNN X.Y.Z text" NUL.  Only 4xx and 5xx; the first
    line of a multi-line reply is used (one reply line: smap.policy)."""
    (text,) = strings(payload, 1)
    if not text.isascii():
        raise ProtocolError("reply is not ASCII")
    # Sendmail takes the reply as a format: a literal % is written %%.
    text = text.replace("%%", "%")
    line = text.split("\r\n", 1)[0]
    match = REPLY_LINE.fullmatch(line)
    if not match:
        raise ProtocolError("reply %r is not a 4xx or 5xx SMTP reply" % line[:40])
    code, status, rest = match.groups()
    return Reply(R_REPLYCODE, int(code), status, rest or None)


def decode_change(command, payload, negotiated):
    """A HeaderChange from SMFIR_ADDHEADER, SMFIR_INSHEADER or SMFIR_CHGHEADER,
    checked by smap.policy.change_problem."""
    index = None
    if command != R_ADDHEADER:
        if len(payload) < 4:
            raise ProtocolError("header change without its index")
        (index,) = struct.unpack(">I", payload[:4])
        payload = payload[4:]
    name, value = strings(payload, 2)
    value = header_value(value, negotiated)
    if command == R_ADDHEADER:
        change = policy.add_header(name, value)
    elif command == R_INSHEADER:
        change = policy.insert_header(index, name, value)    # 0: the first field
    elif value:
        change = policy.change_header(name, value, index or 1)    # 0 means 1 (Sendmail)
    else:
        change = policy.delete_header(name, index or 1)      # an empty value deletes
    problem = policy.change_problem(change)
    if problem:
        raise ProtocolError("header change refused: %s" % problem)
    return change


# -- one milter's socket --------------------------------------------------

class Connection:
    """The socket to one milter.  exchange-level deadlines: the caller
    gives the time by which a send or a read must be done."""

    def __init__(self, sock):
        self.sock = sock
        self.reader = PacketReader()

    def send(self, data, deadline):
        view = memoryview(data)
        while view:
            self.wait(deadline, write=True)
            try:
                sent = self.sock.send(view, socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as err:
                raise ProtocolError("send failed: %s" % (err.strerror or err)) from None
            view = view[sent:]

    def read(self, deadline):
        """The next whole packet (command, payload)."""
        while True:
            item = self.reader.next()
            if item is not None:
                return item
            self.wait(deadline)
            try:
                data = self.sock.recv(max(self.reader.wanted(), 65536), socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as err:
                raise ProtocolError("read failed: %s" % (err.strerror or err)) from None
            if not data:
                raise ProtocolError("the milter closed the connection")
            self.reader.feed(data)

    def wait(self, deadline, write=False):
        left = deadline - time.monotonic()
        if left <= 0:
            raise ProtocolError("no answer within milter-timeout")
        try:
            ready = select.select([], [self.sock], [], left) if write else \
                select.select([self.sock], [], [], left)
        except (OSError, ValueError) as err:
            raise ProtocolError("wait failed: %s" % err) from None
        if not any(ready):
            raise ProtocolError("no answer within milter-timeout")

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None


# -- one milter in one SMTP session ---------------------------------------

class Milter:
    """One configured milter for the length of an SMTP session: its
    negotiation, its state, and what each of its answers means for smap.

    The methods return a policy.Verdict (ACCEPTED: go on) and log every
    verdict that is not "continue" (and every end-of-message verdict) as
    `milter SPEC stage verdict reply`."""

    def __init__(self, spec, sock, timeout, default_action, log, error=None):
        self.spec, self.timeout, self.default_action, self.log = spec, timeout, default_action, log
        self.connection = Connection(sock) if sock is not None else None
        self.negotiated = None
        self.broken = error if sock is None else None   # why the milter is gone
        self.done = False           # accepted the whole connection: ask nothing more
        self.sticky = None          # a refusal at HELO stands for the whole connection
        self.in_transaction = False
        self.message_id = None
        self.start_message()

    def start_message(self):
        self.message = None         # None | "accept" | "discard" | a refusing Verdict
        self.skip_body = False

    # -- logging and failure
    def note(self, event, verdict, reply=None, reason=None, level="notice"):
        getattr(self.log, level)("milter", id=self.message_id, milter=self.spec,
                                 stage=LOG_STAGES[event],
                                 step=None if LOG_STAGES[event] == event else event,
                                 verdict=verdict, reply=reply, reason=reason)

    def fail(self, event, reason):
        """The milter is gone for this session: the default action answers."""
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        self.broken = reason
        self.log.warning("milter", id=self.message_id, milter=self.spec,
                         stage=LOG_STAGES[event],
                         step=None if LOG_STAGES[event] == event else event,
                         verdict="error", action=self.default_action, reason=reason)
        return self.default_verdict()

    def default_verdict(self):
        reason = "milter %s unavailable (%s): milter-default-action %s" % (
            self.spec, self.broken, self.default_action)
        if self.default_action == "accept":
            return policy.ACCEPTED
        if self.default_action == "reject":
            return policy.reject(reason=reason)
        return policy.tempfail(reason=reason)

    @property
    def silent(self):
        """True when this milter is to be asked nothing more in this session."""
        return self.done or (self.broken is not None and self.default_action == "accept")

    # -- the exchange
    def flag(self, bit):
        return bool(self.negotiated.protocol & bit)

    def exchange(self, event, data, reply_expected=True):
        """Send `data` (macros and the event's packet); the final Reply, or
        None when the milter negotiated no reply for this event.  The
        deadline covers the send and every packet of the reply."""
        deadline = time.monotonic() + self.timeout
        self.connection.send(data, deadline)
        if not reply_expected:
            return None
        changes, quarantine = [], None
        for _ in range(MAX_REPLIES):
            reply = decode_reply(*self.connection.read(deadline), event, self.negotiated)
            if reply.kind == R_PROGRESS:
                continue            # no new time: milter-timeout bounds the exchange
            if reply.change is not None:
                changes.append(reply.change)
                continue
            if reply.kind == R_QUARANTINE:
                quarantine = quarantine or reply.reason
                continue
            reply.change, reply.reason = changes, quarantine
            return reply
        raise ProtocolError("more than %d replies to one event" % MAX_REPLIES)

    def negotiate(self):
        deadline = time.monotonic() + self.timeout
        self.connection.send(optneg(), deadline)
        self.negotiated = decode_optneg(*self.connection.read(deadline))
        if self.negotiated.asked_actions & ~OFFERED_ACTIONS:
            self.log.event(7, "milter", milter=self.spec, stage="connect", verdict="negotiated",
                          reason="asked for actions 0x%x, granted 0x%x (no body, sender or "
                                 "recipient changes)" % (self.negotiated.asked_actions,
                                                        self.negotiated.actions))

    def verdict(self, event, reply):
        """What a final reply before the end of the message means."""
        kind = reply.kind
        if kind == R_CONTINUE:
            return policy.ACCEPTED
        if kind == R_ACCEPT:
            self.note(event, "accept")
            if event in ("connect", "helo"):
                self.quit()
                self.done = True
            else:
                self.message = "accept"
            return policy.ACCEPTED
        if kind == R_DISCARD:
            self.note(event, "discard")
            self.message = "discard"
            return policy.ACCEPTED
        reason = "milter %s" % self.spec
        if kind == R_REPLYCODE:
            text = "%d%s%s" % (reply.code, " %s" % reply.status if reply.status else "",
                               " %s" % reply.text if reply.text else "")
            make = policy.reject if reply.code >= 500 else policy.tempfail
            verdict = make(reply.code, reply.status, reply.text, reason="%s: %s" % (reason, text))
            self.note(event, make.__name__, reply=text)
        elif kind == R_REJECT:
            verdict = policy.reject(reason=reason + ": reject")
            self.note(event, "reject")
        else:       # tempfail, shutdown, connfail
            verdict = policy.tempfail(reason="%s: %s" % (reason, kind_name(kind)))
            self.note(event, kind_name(kind))
            if kind != R_TEMPFAIL:
                self.quit()
                self.done, self.sticky = True, verdict
        if event == "helo":
            self.sticky = verdict
        if event in ("data", "header", "eoh", "body"):
            self.message = verdict      # answered at the final dot
            return policy.ACCEPTED
        return verdict

    def ask(self, event, data, skip_flag, no_reply_flag):
        """One event before the end of the message, with the usual checks."""
        if self.sticky is not None:
            return self.sticky
        if self.broken is not None:
            return self.default_verdict()
        if self.done or self.flag(skip_flag):
            return policy.ACCEPTED
        try:
            reply = self.exchange(event, data, not self.flag(no_reply_flag))
        except ProtocolError as err:
            return self.fail(event, str(err))
        if reply is None:
            return policy.ACCEPTED
        if reply.kind == R_SKIP:        # decode_reply allows it for body chunks only
            self.skip_body = True
            return policy.ACCEPTED
        return self.verdict(event, reply)

    # -- the stages
    def connect(self, session):
        if self.broken is not None:
            return self.fail("connect", self.broken)
        try:
            self.negotiate()
        except ProtocolError as err:
            return self.fail("connect", "negotiation: %s" % err)
        peer, settings = session.peer, session.settings
        name = peer.name or ("[%s]" % peer.addr if peer.addr else "unknown")
        data = macros(CONNECT, [("j", settings.hostname), ("{daemon_name}", "smap"),
                                ("_", "%s [%s]" % (peer.name_text, peer.addr_text)),
                                ("{client_addr}", peer.addr), ("{client_name}", name)])
        data += connect_event(name, peer.addr)
        return self.ask("connect", data, P_NOCONNECT, P_NR_CONN)

    def helo(self, session, name):
        data = self.abort() + helo_event(name)
        return self.ask("helo", data, P_NOHELO, P_NR_HELO)

    def mail(self, session, envelope, sender):
        if self.silent or self.sticky is not None or self.broken is not None:
            return self.ask("mail", b"", P_NOMAIL, P_NR_MAIL)
        data = self.abort()
        self.start_message()
        self.in_transaction = True
        parameters = ["%s=%s" % item for item in sorted(envelope.parameters.items())]
        data += macros(MAIL, [("{mail_addr}", sender)]) + mail_event(sender, parameters)
        return self.ask("mail", data, P_NOMAIL, P_NR_MAIL)

    def rcpt(self, session, envelope, recipient):
        if self.message is not None:
            return policy.ACCEPTED      # this message is decided already
        data = macros(RCPT, [("{rcpt_addr}", recipient)]) + rcpt_event(recipient)
        return self.ask("rcpt", data, P_NORCPT, P_NR_RCPT)

    def text_event(self, event, data, skip_flag, no_reply_flag):
        """DATA, a header field, the end of the header or a body chunk: a
        refusal is kept for the final dot (the client is sending text)."""
        if self.message is not None or self.silent or self.sticky is not None:
            return
        if self.broken is not None:
            self.message = self.default_verdict()
            return
        if event == "body" and self.skip_body:
            return
        verdict = self.ask(event, data, skip_flag, no_reply_flag)
        if verdict.action != policy.ACCEPT:
            self.message = verdict      # the default action of a failure

    def end_of_message(self, envelope):
        """The verdict on the message: ACCEPTED, accept(changes),
        quarantine(reason, changes), reject, tempfail or discard."""
        self.message_id = envelope.id
        if self.sticky is not None:
            return self.sticky
        if self.broken is not None:
            return self.default_verdict()
        if self.done or self.message == "accept":
            return policy.ACCEPTED
        if self.message == "discard":
            return policy.discard("milter %s: discard" % self.spec)
        if self.message is not None:
            return self.message
        try:
            reply = self.exchange("eom", macros(BODYEOB, [("{i}", envelope.id)]) +
                                  packet(BODYEOB))
        except ProtocolError as err:
            return self.fail("eom", str(err))
        changes, quarantine = reply.change, reply.reason
        self.message = "accept"         # the message is decided
        if reply.kind in (R_ACCEPT, R_CONTINUE):
            if quarantine:
                self.note("eom", "quarantine", reason=quarantine)
                return policy.quarantine("milter %s: %s" % (self.spec, quarantine), changes)
            self.note("eom", "accept", reason="%d header changes" % len(changes)
                      if changes else None, level="info")
            return policy.accept(changes)
        if reply.kind == R_DISCARD:
            self.note("eom", "discard")
            return policy.discard("milter %s: discard" % self.spec)
        if reply.kind == R_SKIP:
            return self.fail("eom", "skip at eom")
        return self.verdict("eom", reply)

    def abort(self):
        """SMFIC_ABORT when the milter is inside a transaction (no reply)."""
        if not self.in_transaction or self.connection is None or self.silent:
            return b""
        self.in_transaction = False
        return packet(ABORT)

    def quit(self):
        if self.connection is not None:
            try:
                self.connection.send(packet(QUIT), time.monotonic() + min(self.timeout, 5))
            except ProtocolError:
                pass
            self.connection.close()
            self.connection = None


# -- the message text as milter events -------------------------------------

class MessageText:
    """The message text of one transaction as milter events: header fields
    (name, value as the milter protocol wants it), the end of the header,
    and the body in chunks of at most CHUNK octets."""

    def __init__(self):
        self.in_header = True
        self.field = []             # the lines of the field being read
        self.body = bytearray()
        self.started = False

    def feed(self, data):
        """Events for `data` (complete CRLF lines): ("header", name, raw
        value), ("eoh",), and ("body", chunk) for each full chunk."""
        events = []
        if self.in_header:
            position = 0
            while self.in_header and position < len(data):
                end = data.find(b"\r\n", position)
                end = len(data) if end < 0 else end + 2
                line = data[position:end]
                position = end
                if line[:1] in (b" ", b"\t") and self.field:
                    self.field.append(line)
                    continue
                events.extend(self.flush_field())
                if line == b"\r\n":
                    self.in_header = False
                    events.append(("eoh",))
                elif field_name(line) is None:
                    # not a header field: the body starts here, without a blank line
                    self.in_header = False
                    events.append(("eoh",))
                    self.body += line
                else:
                    self.field.append(line)
            data = data[position:]
        if not self.in_header:
            self.body += data
            while len(self.body) >= CHUNK:
                events.append(("body", bytes(self.body[:CHUNK])))
                del self.body[:CHUNK]
        return events

    def flush_field(self):
        if not self.field:
            return []
        raw = b"".join(self.field)[:-2]
        self.field = []
        name, _, value = raw.partition(b":")
        return [("header", name.rstrip(b" \t").decode("utf-8", "surrogateescape"),
                 value.replace(b"\r\n", b"\n").decode("utf-8", "surrogateescape"))]

    def finish(self):
        """The events still due at the final dot."""
        events = []
        if self.in_header:
            events.extend(self.flush_field())
            self.in_header = False
            events.append(("eoh",))
        while self.body:
            events.append(("body", bytes(self.body[:CHUNK])))
            del self.body[:CHUNK]
        return events


FIELD_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")


def field_name(line):
    match = FIELD_NAME.match(line)
    return match.group(1) if match else None


# -- the hook ---------------------------------------------------------------

class MilterHook:
    """Every configured milter, asked in order at each stage (smap.policy's
    hook interface).  The first that does not accept answers the command;
    at the end of the message a reject, tempfail or discard of any milter
    decides, a quarantine of any is kept, and the header changes of all are
    applied in milter order (each milter sees the message as received)."""

    name = "milter"

    def __init__(self, milters):
        self.milters = list(milters)

    def first_refusal(self, call, *arguments):
        for milter in self.milters:
            verdict = call(milter, *arguments)
            if verdict.action != policy.ACCEPT:
                return verdict
        return policy.ACCEPTED

    def on_connect(self, session):
        return self.first_refusal(Milter.connect, session)

    def on_helo(self, session, name):
        return self.first_refusal(Milter.helo, session, name)

    def on_mail(self, session, envelope, sender):
        envelope.notes[self.name] = MessageText()
        return self.first_refusal(Milter.mail, session, envelope, sender)

    def on_rcpt(self, session, envelope, recipient):
        return self.first_refusal(Milter.rcpt, session, envelope, recipient)

    def on_text(self, session, envelope, data):
        text = envelope.notes.get(self.name)
        if text is None:
            text = envelope.notes[self.name] = MessageText()
        events = []
        if not text.started:
            text.started = True
            events.append(("data",))
        events.extend(text.feed(data))
        self.send_text(envelope, events)

    def send_text(self, envelope, events):
        for milter in self.milters:
            milter.message_id = envelope.id
            for event in events:
                if event[0] == "data":
                    milter.text_event("data", packet(DATA), P_NODATA, P_NR_DATA)
                elif event[0] == "header":
                    name, value = event[1], event[2]
                    if milter.negotiated is not None and not milter.flag(P_HDR_LEADSPC):
                        value = value.lstrip(" \t")
                    milter.text_event("header", header_event(name, value), P_NOHDRS, P_NR_HDR)
                elif event[0] == "eoh":
                    milter.text_event("eoh", packet(EOH), P_NOEOH, P_NR_EOH)
                else:
                    milter.text_event("body", body_event(event[1]), P_NOBODY, P_NR_BODY)

    def on_data(self, session, envelope):
        text = envelope.notes.get(self.name)
        if text is not None:
            self.send_text(envelope, text.finish())
        changes, quarantine = [], None
        for milter in self.milters:
            verdict = milter.end_of_message(envelope)
            if verdict.action in (policy.REJECT, policy.TEMPFAIL, policy.DISCARD):
                return verdict
            changes.extend(verdict.changes)
            if verdict.action == policy.QUARANTINE and quarantine is None:
                quarantine = verdict.reason
        if quarantine is not None:
            return policy.quarantine(quarantine, changes)
        return policy.accept(changes)

    def on_reset(self, session, envelope):
        pass                # SMFIC_ABORT goes out before the next MAIL or HELO

    def on_close(self, session):
        for milter in self.milters:
            milter.quit()


# -- making the hook ------------------------------------------------------

def open_sockets(specs, timeout, uid=None, gid=None):
    """[(socket or None, error or None)] for each SPEC, connected before the
    jail in inetd mode.  As root, the connect runs with uid/gid as the
    effective ids: a socket path is reached with the session user's rights,
    never root's, like the --daemon helper (common.lookup)."""
    import os
    results = []
    switched = uid is not None and os.geteuid() == 0
    if switched:
        os.setgroups([])
        os.setegid(gid)
        os.seteuid(uid)
    try:
        for spec in specs:
            try:
                results.append((endpoint.connect(spec, timeout), None))
            except (OSError, ValueError) as err:
                results.append((None, "connect: %s" % (getattr(err, "strerror", None) or err)))
    finally:
        if switched:
            os.seteuid(0)
            os.setegid(0)
    return results


def hook(config, log, lookup=None):
    """The MilterHook of one session.  inetd mode (lookup None): connect
    now, before the jail.  --daemon: the jailed process asks its helper
    (common.lookup) for a connected socket to milter number N."""
    specs = config.get("milters") or []
    timeout = config.get("milter-timeout")
    default_action = config.get("milter-default-action")
    if lookup is None:
        from common import privs
        uid, gid, _ = privs.user_and_group(config)
        sockets = open_sockets(specs, timeout, uid, gid)
    else:
        sockets = [lookup.milter_socket(index) for index in range(len(specs))]
    return MilterHook(Milter(spec, sock, timeout, default_action, log, error)
                      for spec, (sock, error) in zip(specs, sockets))

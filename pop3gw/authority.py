"""Who holds the APOP secrets: only the root monitor of a pop3-gw session.

`Authority` lives in the root process that stays outside the jail.  It
keeps the auth db (a common.authdb.Cache, refreshed before each decision)
and answers two questions for the jailed session child:

* `verify(user, digest)`: is this the right APOP digest for the session's
  own timestamp?  It compares in constant time, gives an unknown, disabled
  or secret-less user the same "no" as a wrong digest (only the log reason
  differs), and does the same work for each: bad logins are counted per
  source address in pop3gw.penalty's file (each answer delayed by the
  source's penalty, a source past `maxbad` refused for `badsleep`), never
  in the user's entry, so no one can lock a user out and the answer's
  time does not tell whether the name exists.  Counting survives the
  session's processes and cannot be skipped by the child.  A good login
  notes the last login in the auth db, unless that would change nothing.
* `route` (in `answer`): where may the verified user go?  The monitor's
  router (pop3gw.gateway.Router) resolves the destination once and applies
  the host rules to every address; the addresses that passed are the
  answer, and the only ones `sign` will sign for.  Once a session.
* `sign(timestamp, address, port)`: the digest of the upstream server's
  timestamp, for the one user verified in this session only, for a
  well-formed msg-id only, never for one a pop3-gw issued (apop's mark: a
  hostile upstream could offer the timestamp of a gateway session of its
  own and replay our digest there), only for an address:port this session
  was routed to, and a bounded number of times.

So the jailed child never holds a secret: a compromised session can learn
nothing about other users, nor make the monitor sign for them or for a
server it was not routed to.  `MonitorLink` is the child's end: the same
calls as bounded text lines over a socketpair, each answer checked exactly;
`serve` is the monitor's loop that answers them, and `answer` checks each
request exactly (word count, every field) before it acts on it.
"""

import time

from common import apop, authdb, hostmatch
from pop3gw import penalty

MAX_REQUEST = 512
MAX_REQUESTS = 32
MAX_SIGNATURES = 2
MAX_ADDRESSES = 8          # addresses a route may name (one line, well under MAX_REQUEST)
MAX_REASON = 200
REFUSED = "refused"


class Authority:
    def __init__(self, database, timestamp, maxbad, badsleep, log, clock=time.time,
                 source=None, sleep=time.sleep, ledger=None):
        self.database = database            # authdb.Cache
        self.timestamp = timestamp          # the one this session's banner shows
        self.maxbad, self.badsleep = maxbad, badsleep
        self.log = log
        self.clock = clock
        self.sleep = sleep
        # Bad logins are counted per source, never per user (pop3gw.penalty).
        self.address = source or "unknown"
        self.source = penalty.source_key(source)
        if ledger is None:
            ledger = penalty.Ledger(database.path, maxbad, badsleep) \
                if database.path is not None else penalty.NoLedger()
        self.ledger = ledger
        self.verified = None
        self.signatures = 0
        self.approved = None                # {(address, port)} once routed (answer)
        self.deferred = None

    def verify(self, name, offered, defer=False):
        """("ok", "") or ("refused", reason for the log).

        Every well-formed attempt does the same work whatever the name: one
        digest computed and compared in constant time (with a stand-in
        secret for an unknown or secret-less user), then one penalty
        transaction for this session's source (pop3gw.penalty), and for a
        bad one a wait of the source's penalty before the answer.  The auth
        db is never written for a bad login, so an existing user's "no"
        costs what an unknown user's does.  A source past `maxbad` is
        refused even with the right digest.  With defer, a good login is
        written to the db (last login) only by finish(): serve() answers
        first; one that would change nothing in the entry is not written."""
        if not authdb.valid_name(name) or not apop.well_formed_digest(offered):
            return REFUSED, "malformed request"
        if self.database.refresh() and self.database.error:
            self.log.error("authfile", reason=self.database.error)
        record = self.database.users.get(name)
        secret = record.secret if record is not None and record.secret else None
        matches = apop.check(self.timestamp,
                             secret if secret is not None else "\0unknown user\0", offered)
        now = self.clock()
        reason = None
        if record is None:
            reason = "unknown user"
        elif secret is None:
            reason = "no secret set"
        elif not record.enabled:
            reason = "account disabled"
        elif not matches:
            reason = "wrong secret"
        verdict = self.settle(reason is None, now)
        if verdict.outcome == penalty.REFUSED:
            reason = "source refused until %d: %d bad logins from %s" % (
                verdict.until, verdict.count, self.source)
        if self.tally is not None:     # pop3gw.logins: the same work for every name
            self.tally.count("good" if reason is None else
                             "refused" if verdict.outcome == penalty.REFUSED else "bad")
        elif verdict.outcome == penalty.BAD and verdict.count == self.maxbad:
            self.log.warning("penalty", addr=self.source, bad=verdict.count,
                             until=verdict.until,
                             reason="source refused for %ds" % self.badsleep)
        if reason is not None:
            # Before the answer: the child (and the client) wait it out.
            self.sleep(verdict.delay)
            return REFUSED, reason
        if unchanged_by_good_login(record, now):
            pass        # the file already says what this login would write
        elif defer:
            self.deferred = name
        else:
            self.record(name)
        self.verified = name
        return "ok", ""

    def settle(self, good, now):
        """The penalty verdict for this attempt from this session's source.
        When the state cannot be used, the attempt is not counted; a good one
        goes on, a bad one waits the longest penalty."""
        try:
            return self.ledger.settle(self.source, good, now)
        except (OSError, penalty.PenaltyError) as err:
            self.log.error("penalty", addr=self.source, reason=str(err))
            return penalty.Verdict(penalty.GOOD if good else penalty.BAD, 0,
                                   0 if good else penalty.MAX_DELAY)

    def finish(self):
        """Write the good login verify(defer=True) left for after the answer."""
        name, self.deferred = self.deferred, None
        if name is not None:
            self.record(name)

    def record(self, name):
        """Note a good login of `name` in the auth db (bad ones never are)."""
        if self.database.path is None:
            return
        try:
            authdb.record_login(self.database.path, name, self.clock())
        except (OSError, authdb.AuthDbError) as err:
            self.log.error("authfile", path=self.database.path, reason=str(err))

    router = None       # router(user, word): pop3gw.gateway.Router, set by the monitor
    tally = None        # pop3gw.logins.Tally with `metrics-file`, set by the monitor

    def route(self, word):
        """("ok", addresses) or ("denied" | "unavailable", reason): where the
        verified user may go, asked once a session.  The router resolves and
        applies the host rules; what it passes is all `sign` will sign for."""
        if self.router is None:
            return "denied", "no router"
        if self.verified is None:
            return "denied", "not logged in"
        if self.approved is not None:
            return "denied", "already routed"
        self.approved = frozenset()         # one route a session, whatever it says
        verdict, found = self.router(self.verified, word)
        if verdict != "ok":
            return (verdict if verdict == "unavailable" else "denied"), clean_reason(found)
        port, found = found
        addresses = [address for address in found[:MAX_ADDRESSES]
                     if hostmatch.normalize_address(address) == address]
        if not addresses or not 1 <= port <= 65535:
            return "denied", "no usable address"
        self.approved = frozenset((address, port) for address in addresses)
        return "ok", addresses

    def sign(self, timestamp, address, port):
        """The upstream APOP digest, or None when it must not be given."""
        if self.verified is None or self.signatures >= MAX_SIGNATURES \
                or not apop.valid_timestamp(timestamp):
            return None
        fields = dict(user=self.verified,
                      dest=("[%s]:%d" if ":" in address else "%s:%d") % (address, port))
        if apop.issued_by_gateway(timestamp):
            self.log.warning("sign-refused", **fields, reason="timestamp issued by a pop3-gw:"
                             " the upstream relays a gateway session")
            return None
        if self.approved is None or (address, port) not in self.approved:
            self.log.warning("sign-refused", **fields,
                             reason="not a server this session was routed to")
            return None
        record = self.database.users.get(self.verified)
        if record is None or not record.secret:
            return None
        self.signatures += 1
        return apop.digest(timestamp, record.secret)


def unchanged_by_good_login(record, now):
    """True when a good login would rewrite the entry as it is: nothing left
    from the old per-user count or lock (a good login clears them) and the
    last login already this second (the db keeps whole seconds)."""
    return record.bad == 0 and record.locked_until == 0 and record.last_login == int(now)


def answer(authority, line):
    """The monitor's answer line to one request line from the child.
    Requests (each word checked before use):
      verify USER DIGEST          -> ok | refused   (the reason is logged here, never told)
      route -  |  route HOST:PORT -> ok ADDRESS... | denied REASON | unavailable REASON
      sign TIMESTAMP ADDRESS PORT -> ok DIGEST | refused
    """
    words = line.split(" ")
    if len(words) == 3 and words[0] == "verify":
        verdict, reason = authority.verify(words[1], words[2], defer=True)
        if verdict == "ok":
            return "ok"
        # The reason stays here: told to the child, it would tell a taken-over
        # child which names exist (unknown user, disabled, wrong secret).
        authority.log.notice("auth-fail", addr=authority.address, user=words[1][:64],
                             reason=reason)
        return REFUSED
    if len(words) == 2 and words[0] == "route":
        verdict, found = authority.route(words[1])
        return "%s %s" % (verdict, " ".join(found) if verdict == "ok" else found)
    if len(words) == 4 and words[0] == "sign":
        _, timestamp, address, port_text = words
        if hostmatch.normalize_address(address) != address or not valid_port(port_text):
            return "refused bad request"
        signature = authority.sign(timestamp, address, int(port_text))
        return "ok %s" % signature if signature else "refused"
    return "refused bad request"


def valid_port(text):
    return text.isascii() and text.isdigit() and len(text) <= 5 and 1 <= int(text) <= 65535


def clean_reason(text):
    """A reason as one line of printable ASCII, bounded."""
    text = "".join(c if " " <= c <= "~" else "?" for c in str(text))
    return text[:MAX_REASON]


def serve(channel, authority, router, log):
    """Answer the child until it closes the channel (bounded in size and
    number); `router` decides its route (Authority.route)."""
    authority.router = router
    reader = channel.makefile("rb")
    for _ in range(MAX_REQUESTS):
        line = reader.readline(MAX_REQUEST + 1)
        if not line:
            return
        if len(line) > MAX_REQUEST or not line.endswith(b"\n"):
            log.error("monitor", reason="oversized request from the session child")
            return
        try:
            text = line[:-1].decode("ascii")
        except UnicodeDecodeError:
            text = ""                           # not a request: "refused bad request"
        reply = answer(authority, text)
        try:
            channel.sendall(reply.encode("ascii", "replace") + b"\n")
        except OSError:
            return
        finally:
            authority.finish()
    log.error("monitor", reason="too many requests from the session child")


class MonitorLink:
    """The jailed child's end of the socketpair: the Authority's calls,
    remotely; every answer is checked exactly before it is believed."""

    def __init__(self, sock):
        self.sock = sock
        self.reader = sock.makefile("rb")

    def ask(self, request):
        try:
            self.sock.sendall(request.encode("ascii") + b"\n")
            line = self.reader.readline(MAX_REQUEST + 1)
        except OSError:
            return [REFUSED, "monitor gone"]
        if len(line) > MAX_REQUEST or not line.endswith(b"\n"):
            return [REFUSED, "bad answer from the monitor"]
        return line[:-1].decode("ascii", "replace").split(" ", 1)

    def verify(self, name, offered):
        """("ok", "") or (REFUSED, None): the monitor logs why, and tells no one."""
        answer_words = self.ask("verify %s %s" % (name, offered))
        return ("ok", "") if answer_words == ["ok"] else (REFUSED, None)

    def route(self, server):
        """("ok", addresses) for `-` (the configured server) or HOST:PORT,
        or ("denied" | "unavailable", reason)."""
        answer_words = self.ask("route %s" % server)
        verdict = answer_words[0]
        rest = answer_words[1] if len(answer_words) > 1 else ""
        if verdict == "ok":
            addresses = rest.split(" ")
            if 1 <= len(addresses) <= MAX_ADDRESSES and all(
                    hostmatch.normalize_address(address) == address for address in addresses):
                return "ok", addresses
            return "unavailable", "bad answer from the monitor"
        if verdict in ("denied", "unavailable"):
            return verdict, rest or verdict
        return "unavailable", rest or "bad answer from the monitor"

    def sign(self, timestamp, address, port):
        answer_words = self.ask("sign %s %s %d" % (timestamp, address, port))
        if answer_words[0] == "ok" and len(answer_words) == 2 \
                and apop.well_formed_digest(answer_words[1]):
            return answer_words[1]
        return None

"""pop3-gw's client-side state machine, fed bytes without sockets:
transcripts of what a client sends and what it must get back."""

import pytest

from common import apop, authdb, hostmatch
from pop3gw import authority, gateway, penalty, session

STAMP = "<1.2.abc@gw.test>"
SERVER = ("mail.inside", 110)


class RecordingLog:
    def __init__(self):
        self.events = []

    def _add(self, event, **fields):
        self.events.append((event, fields))

    info = notice = warning = error = _add

    def named(self, event):
        return [fields for name, fields in self.events if name == event]


def rules(*lines):
    parsed = []
    for number, line in enumerate(lines, 1):
        attribute, *args = line.split()
        parsed.append(hostmatch.parse_rule(attribute, args, number))
    return parsed


def users():
    return {
        "alice": authdb.User("alice", True, "alicesecret"),
        "off": authdb.User("off", False, "offsecret"),
        "locked": authdb.User("locked", True, "lockedsecret", locked_until=2000),
        "empty": authdb.User("empty", True, ""),
    }


class MemoryDb:
    """An authdb.Cache stand-in that never touches a file."""

    def __init__(self, users):
        self.users, self.path, self.error = users, None, None

    def refresh(self):
        return False


class RecordingLedger:
    """The penalty state, recorded: ("bad", source) for each counted bad
    login; with refuse, the source is past maxbad."""

    def __init__(self, reports, refuse=False):
        self.reports, self.refuse = reports, refuse

    def settle(self, key, good, now):
        if self.refuse:
            return penalty.Verdict(penalty.REFUSED, 5, 0, now + 300)
        if good:
            return penalty.Verdict(penalty.GOOD, 0, 0)
        self.reports.append(("bad", key))
        return penalty.Verdict(penalty.BAD, 1, 0)


class RecordingAuthority(authority.Authority):
    """The real Authority, with the db writes, the penalty and its wait
    recorded instead of done."""

    def __init__(self, log, now, peer, refuse=False):
        self.reports = []
        super().__init__(MemoryDb(users()), STAMP, 5, 300, log, clock=lambda: now,
                         source=peer, sleep=lambda seconds: None,
                         ledger=RecordingLedger(self.reports, refuse))

    def record(self, name):
        self.reports.append((True, name))


NAMES = {"mail.inside": ["192.0.2.110"], "localhost": ["127.0.0.1", "::1"]}


def stand_in_resolver(host, port):
    """The DNS of these tests: NAMES, and an address literal is itself."""
    if hostmatch.normalize_address(host):
        return [host], []
    if host not in NAMES:
        raise LookupError("Name or service not known")
    return list(NAMES[host]), []


def make(table=("permit-hosts 127.0.0.0/8",), peer="127.0.0.1", userpass=False,
         server=SERVER, now=1000, refuse=False):
    log = RecordingLog()
    keeper = RecordingAuthority(log, now, peer, refuse)
    settings = session.Settings(server, userpass, rules(*table), "gw.test")
    keeper.router = gateway.Router(settings.rules, server, hostmatch.Peer(peer), log,
                                   stand_in_resolver)
    pop = session.Session(settings, hostmatch.Peer(peer), keeper, STAMP, log)
    return pop, log, keeper.reports


def apop_line(name, secret="alicesecret"):
    return b"APOP %s %s\r\n" % (name.encode(), apop.digest(STAMP, secret).encode())


def test_greeting_carries_the_timestamp():
    pop, _, _ = make()
    assert pop.greeting() == b"+OK mailwall pop3-gw ready <1.2.abc@gw.test>\r\n"


def test_capa_lists_only_what_the_gateway_handles():
    pop, _, _ = make()
    reply = pop.feed(b"CAPA\r\n")
    assert reply.startswith(b"+OK") and reply.endswith(b"\r\n.\r\n")
    assert b"USER" not in reply and b"UIDL" not in reply and b"TOP" not in reply
    assert b"RESP-CODES" in reply
    pop, _, _ = make(userpass=True)
    assert b"\r\nUSER\r\n" in pop.feed(b"CAPA\r\n")


def test_good_apop_logs_in_to_the_configured_server():
    pop, log, reports = make()
    assert pop.feed(apop_line("alice")) == b""
    assert pop.state == session.LOGGED_IN
    login = pop.login
    assert (login.user, login.host, login.port, login.explicit) == \
        ("alice", "mail.inside", 110, False)
    assert reports == [(True, "alice")]
    assert log.named("permit")[0]["dest"] == "mail.inside:110"


def test_bytes_after_the_login_line_are_kept_for_the_server():
    pop, _, _ = make()
    pop.feed(apop_line("alice") + b"STAT\r\nLIST")
    assert pop.rest == b"STAT\r\nLIST"


@pytest.mark.parametrize("name, secret, reason", [
    ("alice", "wrong", "wrong secret (APOP)"),
    ("nosuch", "alicesecret", "unknown user"),
    ("off", "offsecret", "account disabled"),
    ("empty", "", "no secret set"),
    ("alice", "alicesecret", "source refused"),        # this source is past maxbad
])
def test_every_auth_failure_looks_the_same(name, secret, reason):
    pop, log, _ = make(refuse=reason == "source refused")
    assert pop.feed(apop_line(name, secret)) == b"-ERR [AUTH] Authentication failed\r\n"
    assert pop.login is None and not pop.closed
    assert log.named("auth-fail")[0]["reason"].startswith(reason)


def test_every_failure_counts_against_the_source_alike_never_the_user():
    pop, _, reports = make(peer="192.0.2.7")
    pop.feed(apop_line("alice", "wrong"))
    pop.feed(apop_line("nosuch", "x"))
    pop.feed(apop_line("off", "offsecret"))
    assert reports == [("bad", "192.0.2.7")] * 3      # and no write to the db


def test_three_failures_end_the_session():
    pop, _, _ = make()
    for _ in range(3):
        reply = pop.feed(apop_line("alice", "wrong"))
    assert reply.startswith(b"-ERR [AUTH]") and pop.closed


@pytest.mark.parametrize("digest", [
    apop.digest(STAMP, "alicesecret").upper(),        # wrong case
    apop.digest(STAMP, "alicesecret")[:-1],           # wrong length
    apop.digest(STAMP, "alicesecret") + "0",
    "z" * 32,
])
def test_malformed_digest_is_refused_before_any_lookup(digest):
    pop, log, reports = make()
    reply = pop.feed(b"APOP alice %s\r\n" % digest.encode())
    assert reply.startswith(b"-ERR") and b"32 lowercase hex" in reply
    assert pop.login is None and reports == []


@pytest.mark.parametrize("line", [b"APOP\r\n", b"APOP alice\r\n", b"APOP  alice x\r\n",
                                  b"APOP alice a b\r\n"])
def test_malformed_apop(line):
    pop, _, _ = make()
    assert pop.feed(line).startswith(b"-ERR")
    assert pop.login is None


@pytest.mark.parametrize("command", [b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"UIDL",
                                     b"TOP 1 0", b"LAST", b"NOOP", b"RSET", b"STLS",
                                     b"AUTH PLAIN", b"USER alice", b"PASS alicesecret"])
def test_commands_before_login_are_refused(command):
    pop, _, _ = make()
    reply = pop.feed(command + b"\r\n")
    assert reply.startswith(b"-ERR") and pop.login is None and not pop.closed


def test_quit_before_login():
    pop, _, _ = make()
    assert pop.feed(b"QUIT\r\n").startswith(b"+OK") and pop.closed


def test_user_pass_only_when_enabled():
    pop, _, reports = make(userpass=True)
    assert pop.feed(b"USER alice\r\n").startswith(b"+OK")
    assert pop.feed(b"PASS alicesecret\r\n") == b""
    assert pop.login.user == "alice" and reports == [(True, "alice")]
    pop, _, _ = make(userpass=True)
    pop.feed(b"USER nosuch\r\n")
    assert pop.feed(b"PASS x\r\n") == session.AUTH_FAILED
    assert pop.feed(b"PASS x\r\n").startswith(b"-ERR USER first")


def test_command_limit_is_255_octets_with_crlf():
    pop, _, _ = make()
    ok = b"CAPA " + b"x" * (255 - 7) + b"\r\n"
    assert len(ok) == 255 and pop.feed(ok).startswith(b"+OK")
    reply = pop.feed(b"CAPA " + b"x" * 300 + b"\r\nCAPA\r\n")
    assert reply.startswith(b"-ERR command line too long\r\n+OK")


def test_bare_lf_ends_the_session():
    pop, log, _ = make()
    assert pop.feed(b"CAPA\n").startswith(b"-ERR") and pop.closed
    assert log.named("refuse")[0]["reason"] == "bare CR or LF"


def test_binary_garbage_is_refused_and_counted():
    pop, _, _ = make()
    replies = [pop.feed(b"\x00\xff\xfe junk\r\n") for _ in range(10)]
    assert all(r.startswith(b"-ERR") for r in replies)
    assert pop.closed and b"too many errors" in replies[-1]


def test_explicit_server_needs_a_rule_with_dest():
    table = ("permit-hosts 127.0.0.1 -dest 127.0.0.2 -user alice",
             "permit-hosts 127.0.0.0/8")
    pop, _, _ = make(table)
    assert pop.feed(apop_line("alice%127.0.0.2:1234")) == b""
    assert (pop.login.host, pop.login.port, pop.login.explicit) == ("127.0.0.2", 1234, True)
    # the second rule (no -dest) covers only the configured server
    pop, log, _ = make(table)
    reply = pop.feed(apop_line("alice%127.0.0.3"))
    assert reply.startswith(b"-ERR [SYS/PERM] permission denied") and pop.closed
    assert log.named("deny")[0]["dest"] == "127.0.0.3:110"
    # and it speaks for the source host 127.0.0.1 only
    pop, _, _ = make(table, peer="127.0.0.5")
    assert pop.feed(apop_line("alice%127.0.0.2:1234")).startswith(b"-ERR [SYS/PERM]")


def test_rules_by_user_and_negation():
    table = ("permit-hosts 127.0.0.0/8 -user !alice *",)
    pop, _, _ = make(table)
    assert pop.feed(apop_line("alice")).startswith(b"-ERR [SYS/PERM]")
    table = ("deny-hosts 127.0.0.9", "permit-hosts * -user alice")
    pop, _, _ = make(table, peer="127.0.0.9")
    assert pop.feed(apop_line("alice")).startswith(b"-ERR [SYS/PERM]")
    pop, _, _ = make(table, peer="127.0.0.8")
    assert pop.feed(apop_line("alice")) == b""


def test_no_rules_lets_nobody_in():
    pop, _, _ = make(table=())
    assert pop.feed(apop_line("alice")).startswith(b"-ERR [SYS/PERM]")


@pytest.mark.parametrize("server", ["host:0", "host:65536", "host:99999999", "host:-1",
                                    "host:", "ho_st", "host;rm", "-host", "host..x",
                                    "[::1", "[zz]", "1.2.3.999", "h\u00e9st", "host:1x",
                                    "a" * 300])
def test_odd_server_names_are_refused(server):
    with pytest.raises(ValueError):
        session.parse_server(server)
    pop, log, _ = make()
    reply = pop.feed(apop_line("alice%" + server)) if server.isascii() else b"-ERR"
    assert reply.startswith(b"-ERR") and pop.login is None


@pytest.mark.parametrize("text, expected", [
    ("mail.inside", ("mail.inside", 110)), ("MAIL.Inside:995", ("mail.inside", 995)),
    ("127.0.0.2:65535", ("127.0.0.2", 65535)), ("[::1]:110", ("::1", 110)),
    ("localhost:1", ("localhost", 1))])
def test_good_server_names(text, expected):
    assert session.parse_server(text) == expected


def test_timeout_closes_without_a_reply():
    pop, log, _ = make()
    assert pop.timeout() == b"" and pop.closed
    assert log.named("timeout")

"""Fuzzing with hypothesis: properties, not just "does not crash".

Each property runs with the profile of tests/security/fuzzing.py: 200
derandomized examples in CI, FUZZ_EXAMPLES (default 200000) in `make fuzz`.

* netperm reader: never raises on any text or bytes; every problem is
  `FILE:LINE: message` with a line that exists in the file.
* host matcher: CIDR, ADDR:MASK, address globs and literal addresses agree
  with the standard library's ipaddress; `!` inverts exactly.
* spool reader: a valid file reads back exactly; any truncation or
  extension raises SpoolError; a changed byte never makes it raise anything
  else, nor move the message's framing.
* smap session: nothing is spooled unless a well-formed CRLF.CRLF follows an
  accepted DATA (the issue-2 property, run here with the fuzz profile).
* pop3-gw client session: no session authenticates without the right digest
  for the banner's timestamp.
* smapd checks and the agent's request check: no recipient or sender whose
  local part, past any white space, quotes and backslashes, starts with
  `-`, `|` or `/`, and none with an empty domain label, ever passes, so
  none reaches the MTA argv; a
  header section that passes has no NUL, no bare CR/LF, no line over 998,
  and the stdlib's strict RFC 5322 parser finds no such address in it.
* smapd scanner (issue 11, finding 4): over generated spool files (numbers
  that are no numbers, hostile addresses, 8-bit headers, our notice
  header, damaged delivery state), MTA outcomes (exit codes × any stderr
  bytes) and mail hub replies (codes × any text), with a drawn fault in one
  of the scanner's own steps: the real Scanner never raises, and every
  message ends delivered, waiting for retry, bounced or quarantined; every
  bounce and notice it makes is 7-bit.

Pure: no sockets, no root; the spool properties use the real writer in a
private temporary directory.
"""

import email.policy
import ipaddress
import os
import shutil
import socket
import tempfile
import time

from email.parser import BytesHeaderParser

from hypothesis import event, given, strategies as st

from common import apop, authdb, hostmatch, netperm, spool
from pop3gw import authority as pop3_authority
from pop3gw import gateway as pop3_gateway
from pop3gw import session as pop3_session
from smapd import agent, checks, state
from tests.security.fuzzing import FUZZ
from tests.unit import test_smap_properties as smap_properties
from tests.unit.smap_fixtures import RecordingLog

# -- netperm reader ------------------------------------------------------------

TABLE_WORDS = ["smap", "smapd", "pop3-gw", "authmgr", "*", ",", ":", " ", "\t", "#", "\\",
               "'", '"', "permit-hosts", "deny-hosts", "-dest", "-user", "!", "userid",
               "groupid", "directory", "/var/spool/smap", "timeout", "300", "-1", "99999999999",
               "maxbytes", "1_000", "+5", "\u0663", "accept-domains", "example.com",
               "permit-relay", "10.0.0.0/8", "10.0.0.1:255.0.0.0", "::1/129", "*.example.com",
               "sendmail", "/usr/sbin/sendmail", "mailhub", "None", "[::1]:25", "host:99999",
               "server", "logfacility", "mail", "local9", "userpass", "yes", "maybe", "\n",
               "\r\n", "\0", "\x0b", "nosuchattribute", "uucp", "nosuchuser", "65534"]
table_text = st.lists(st.one_of(st.sampled_from(TABLE_WORDS), st.text(max_size=8)),
                      max_size=60).map("".join)


def check_problems(config, path, text):
    lines = max(1, text.count("\n") + 1)
    for problem in config.problems:
        shown = str(problem)
        assert shown.startswith(path + ":"), shown
        number = shown[len(path) + 1:].split(":", 1)[0]
        assert number.isdigit() and 0 <= int(number) <= lines, shown
        assert shown.split(":", 2)[2].strip(), shown


@FUZZ
@given(table_text, st.sampled_from(["smap", "smapd", "pop3-gw", "authmgr"]))
def test_fuzz_netperm_reader_never_raises_and_reports_file_line(text, program):
    config = netperm.parse(text, "/etc/table", program)
    check_problems(config, "/etc/table", text)
    for name in config.declared:
        config.get(name)            # every attribute has a usable value or None


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_netperm_load_of_any_bytes(data):
    directory = tempfile.mkdtemp(prefix="mwfuzz-")
    try:
        path = os.path.join(directory, "table")
        with open(path, "wb") as out:
            out.write(data)
        config = netperm.load(path, "smap")
        check_problems(config, path, data.decode("utf-8", "replace"))
    finally:
        shutil.rmtree(directory)


# -- host matcher ---------------------------------------------------------------

ipv4 = st.integers(0, 2 ** 32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
ipv6 = st.integers(0, 2 ** 128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))


@FUZZ
@given(st.data())
def test_fuzz_host_patterns_agree_with_ipaddress(data):
    version = data.draw(st.sampled_from([4, 6]))
    base = data.draw(ipv4 if version == 4 else ipv6)
    prefix = data.draw(st.integers(0, 32 if version == 4 else 128))
    network = ipaddress.ip_network("%s/%d" % (base, prefix), strict=False)
    # an address near the network half the time, anywhere otherwise
    if data.draw(st.booleans()):
        offset = data.draw(st.integers(-3, 3))
        value = int(network.network_address) + offset + \
            data.draw(st.integers(0, max(0, network.num_addresses - 1)))
        value %= 2 ** (32 if version == 4 else 128)
        addr = str(ipaddress.ip_address(value) if version == 4 else ipaddress.IPv6Address(value))
    else:
        addr = data.draw(ipv4 if version == 4 else ipv6)
    inside = ipaddress.ip_address(addr) in network
    cidr = hostmatch.Pattern("%s/%d" % (base, prefix))
    peer = hostmatch.Peer(addr)
    assert cidr.hits(peer.addr, None) == inside or (
        # IPv4-mapped IPv6 addresses are normalised to IPv4 and cannot hit a v6 net
        version == 6 and ipaddress.IPv6Address(addr).ipv4_mapped is not None)
    negated = hostmatch.Pattern("!%s/%d" % (base, prefix))
    assert hostmatch.list_matches([negated], peer.addr, None) != \
        hostmatch.list_matches([cidr], peer.addr, None)
    if version == 4:
        mask = hostmatch.Pattern("%s:%s" % (base, network.netmask))
        assert mask.hits(addr, None) == inside
        octets = base.split(".")
        keep = data.draw(st.integers(1, 3))
        glob = hostmatch.Pattern(".".join(octets[:keep]) + ".*")
        glob_net = ipaddress.ip_network("%s/%d" % (".".join(octets[:keep] + ["0"] * (4 - keep)),
                                                   8 * keep))
        assert glob.hits(addr, None) == (ipaddress.ip_address(addr) in glob_net)
        # an address glob never matches a host name made to look like it
        assert not glob.hits("192.0.2.1", ".".join(octets[:keep]) + ".evil.example") or \
            ipaddress.ip_address("192.0.2.1") in glob_net
    literal = hostmatch.Pattern(base)
    assert literal.hits(peer.addr, None) == (ipaddress.ip_address(addr) ==
                                             ipaddress.ip_address(base)) or peer.addr != addr


# -- spool reader -----------------------------------------------------------------

addr_text = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30)
envelopes = st.fixed_dictionaries({
    "sender": st.one_of(st.just(""), addr_text),
    "rcpt": st.lists(addr_text, min_size=1, max_size=4),
    "helo": addr_text, "client-addr": addr_text,
})
bodies = st.binary(max_size=400).filter(lambda b: b"MAILWALL-END" not in b)


def write_valid(root, envelope, body):
    message_id = spool.new_id()
    writer = spool.MessageWriter(root, message_id)
    writer.start(dict(envelope, id=message_id, arrival="1700000000.5"))
    writer.write(body)
    writer.commit()
    return os.path.join(root, spool.QUEUE, message_id)


def fresh_spool():
    root = tempfile.mkdtemp(prefix="mwfuzz-")
    spool.make_dirs(root)
    return root


@FUZZ
@given(envelopes, bodies, st.data())
def test_fuzz_spool_truncation_or_extension_is_always_detected(envelope, body, data):
    root = fresh_spool()
    try:
        path = write_valid(root, envelope, body)
        got_envelope, message = spool.read_message(path)
        assert message == body and got_envelope["rcpt"] == envelope["rcpt"]
        with open(path, "rb") as whole:
            original = whole.read()
        if data.draw(st.booleans()):
            cut = data.draw(st.integers(0, len(original) - 1))
            damaged = original[:cut]
        else:
            damaged = original + data.draw(st.binary(min_size=1, max_size=80))
        with open(path, "wb") as out:
            out.write(damaged)
        try:
            result = spool.read_message(path)
        except spool.SpoolError:
            return
        raise AssertionError("damaged file read as %r" % (result,))
    finally:
        shutil.rmtree(root)


@FUZZ
@given(envelopes, bodies, st.data())
def test_fuzz_spool_changed_byte_never_moves_the_framing(envelope, body, data):
    # The format has no checksum: a changed byte inside the message text
    # cannot be seen.  What must hold: the reader raises nothing but
    # SpoolError, and whatever it accepts has the original message length
    # and differs from the original in at most that one byte.
    root = fresh_spool()
    try:
        path = write_valid(root, envelope, body)
        with open(path, "rb") as whole:
            original = bytearray(whole.read())
        position = data.draw(st.integers(0, len(original) - 1))
        original[position] ^= data.draw(st.integers(1, 255))
        with open(path, "wb") as out:
            out.write(original)
        try:
            got_envelope, message = spool.read_message(path)
        except spool.SpoolError:
            event("change detected")
            return
        event("change not detected")
        assert len(message) == len(body)
        assert sum(a != b for a, b in zip(message, body)) <= 1
        assert got_envelope["rcpt"] and spool.valid_id(got_envelope["id"])
        for value in [got_envelope["sender"]] + got_envelope["rcpt"]:
            assert not any(ord(c) < 32 or ord(c) == 127 for c in value)
    finally:
        shutil.rmtree(root)


# -- smap session (the issue-2 property under the fuzz profile) ---------------------

test_fuzz_smap_session_spools_only_after_crlf_dot_crlf = FUZZ(given(smap_properties.transcripts)(
    smap_properties.test_only_well_formed_messages_are_spooled_and_unchanged.hypothesis.inner_test))


# -- pop3-gw client session -----------------------------------------------------------

STAMP = "<4242.1700000000.00112233@gw.example.org>"
USERS = {"alice": authdb.User("alice", True, "alicesecret"),
         "bob": authdb.User("bob", False, "bobsecret")}
RIGHT = apop.digest(STAMP, "alicesecret").encode()
pop3_pieces = st.one_of(
    st.sampled_from([b"APOP alice " + RIGHT, b"APOP alice " + RIGHT.upper(),
                     b"APOP alice " + RIGHT[:-1], b"APOP alice " + RIGHT + b"0",
                     b"APOP alice  " + RIGHT, b"APOP ALICE " + RIGHT,
                     b"APOP alice " + apop.digest("<1.2@other>", "alicesecret").encode(),
                     b"APOP bob " + apop.digest(STAMP, "bobsecret").encode(),
                     b"APOP bob " + RIGHT, b"APOP mallory " + RIGHT,
                     b"APOP alice%127.0.0.1 " + RIGHT, b"USER alice", b"PASS alicesecret",
                     b"CAPA", b"STAT", b"RETR 1", b"QUIT", b"\0", b"APOP"]),
    st.binary(max_size=40),
    st.text(st.sampled_from("0123456789abcdef"), min_size=32, max_size=32).map(
        lambda d: b"APOP alice " + d.encode()))
class FixedDatabase:
    """The user table as authdb.Cache shows it, without a file (nothing to record)."""
    path, error, users = None, None, USERS

    def refresh(self):
        return False


pop3_line = st.tuples(pop3_pieces, st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r",
                                                    b""])).map(b"".join)


@FUZZ
@given(st.lists(pop3_line, max_size=12), st.lists(st.integers(1, 30), max_size=6))
def test_fuzz_pop3_session_never_authenticates_without_the_right_digest(lines, cuts):
    settings = pop3_session.Settings(server=("127.0.0.1", 110), rules=[
        hostmatch.parse_rule("permit-hosts", ["*"])], hostname="gw.example.org")
    log = RecordingLog()
    authority = pop3_authority.Authority(FixedDatabase(), STAMP, 5, 300, log)
    authority.router = pop3_gateway.Router(settings.rules, settings.server,
                                           hostmatch.Peer("192.0.2.9"), log)
    pop = pop3_session.Session(settings, hostmatch.Peer("192.0.2.9"), authority, STAMP, log)
    transcript = b"".join(lines)
    position = 0
    for cut in cuts + [len(transcript)]:
        if pop.closed or pop.login is not None:
            break
        pop.feed(transcript[position:position + cut])
        position += cut
    event("authenticated" if pop.login is not None else "not authenticated")
    if pop.login is not None:
        assert pop.login.user == "alice" and authority.verified == "alice"
        assert authority.sign("<1.2@server>", "127.0.0.1", 110) == \
            apop.digest("<1.2@server>", "alicesecret")
        consumed = transcript[:len(transcript) - len(pop.rest)] if pop.rest else transcript
        # the login line, CRLF-framed, is in what the session consumed
        assert b"APOP alice " + RIGHT + b"\r\n" in consumed
        assert (pop.login.host, pop.login.port) == ("127.0.0.1", 110)


# -- smapd checks and the agent's request check ----------------------------------------

hostile_address = st.lists(st.one_of(st.sampled_from(["-", "|", "/", '"', "@", "%", "!", " ",
                                                      "\t", "\r", "\n", "\0", ".", "<", ">",
                                                      "example.org", "o", "Q", "be", ":",
                                                      "[", "]", "\\", ",",
                                                      # issue 11 finding 8: behind a quote,
                                                      # white space, an empty label
                                                      '" ', '"  -', '" |', '"\t/', "\u00a0",
                                                      "\u2003", "..", "example.org.", "@x.",
                                                      "@.x"]),
                                     st.text(max_size=3)), min_size=1, max_size=10).map("".join)

# Well-formed but for one trick: an optional quote, white space (ASCII or
# Unicode), then -, | or / or a harmless start, and a domain that may have
# an empty label.  Random pieces alone rarely build `" -x"@example.org`.
spelled_address = st.tuples(
    st.sampled_from(['"', ""]), st.text(alphabet=" \t\u00a0\u2003", max_size=3),
    st.sampled_from(["-", "|", "/", "\\-", "a", ""]),
    st.sampled_from(["oQ/tmp", "bin/sh", "x", ""]),
    st.text(alphabet=" ", max_size=2), st.sampled_from(['"', ""]),
    st.sampled_from(["@example.org", "@Example.ORG.", "@example.org..", "@x..org", "@.x.org",
                     "@[127.0.0.1]", "@[IPv6:::1]", ""])).map("".join)
any_address = st.one_of(hostile_address, spelled_address)


def delivery_agent_sees_option_program_or_file(word):
    """An independent reading, stricter than common.address's: skip every
    white space, quote and backslash at the start of the local part; what is
    left must not start with -, | or /."""
    local = word.rpartition("@")[0] if "@" in word else word
    return local.lstrip(' \t\r\n\v\f"\\\u00a0\u2003\u3000').startswith(("-", "|", "/"))


def has_empty_label(word):
    domain = word.rpartition("@")[2] if "@" in word else None
    return domain is not None and not domain.startswith("[") and "" in domain.split(".")


@FUZZ
@given(st.one_of(st.just(""), any_address), st.lists(any_address, min_size=1, max_size=3))
def test_fuzz_no_option_program_or_file_reaches_the_mta_argv(sender, recipients):
    check_what_reaches_the_mta(sender, recipients)


@FUZZ
@given(spelled_address, st.booleans())
def test_fuzz_no_spelling_hides_an_option_program_or_file(spelled, as_sender):
    # one trick at a time, next to an ordinary address, so that most
    # examples reach the checks that matter instead of failing elsewhere
    if as_sender:
        check_what_reaches_the_mta(spelled, ["v@example.org"])
    else:
        check_what_reaches_the_mta("a@example.org", [spelled])


def check_what_reaches_the_mta(sender, recipients):
    envelope = {"sender": sender, "rcpt": recipients}
    passed_scanner = checks.envelope_problem(envelope) is None
    with tempfile.TemporaryFile() as message:
        message.write(b"Subject: x\r\n\r\nbody\r\n")
        message.flush()
        try:
            request = agent.decode_request(
                agent.encode_request("ABCDEF0123", sender, [], recipients, 0, 10),
                message.fileno(), hub_enabled=False)
        except agent.BadRequest:
            request = None
    event("agent accepted" if request is not None else "agent refused")
    event("scanner accepted" if passed_scanner else "scanner refused")
    if request is not None:
        argv = ["/usr/sbin/sendmail", "-bm", "-oi", "-f", request["sender"], "--"] + \
            request["mta"]
        for word in argv[argv.index("--") + 1:] + [request["sender"]]:
            assert not word.startswith(("-", "|", "/")), argv
            assert not any(ord(c) < 32 for c in word), argv
            assert not delivery_agent_sees_option_program_or_file(word), argv
            assert not has_empty_label(word), argv
    if passed_scanner:
        for word in recipients + ([sender] if sender else []):
            assert not word.startswith(("-", "|", "/")), envelope
            assert not any(ord(c) < 32 or ord(c) == 127 for c in word), envelope
            assert not delivery_agent_sees_option_program_or_file(word), envelope
            assert not has_empty_label(word), envelope


header_piece = st.one_of(
    st.sampled_from([b"From: a@example.org", b"To: ", b"Cc: ", b"Bcc: ", b"Reply-To: ",
                     b"Subject: x", b" folded", b"\tfolded", b"-oQ/tmp", b"|cmd", b"/etc/passwd",
                     b'"-be"@x.org', b"<|cmd@x.org>", b'" -be"@x.org', b'"\t|cmd"@x.org',
                     b"\\-be@x.org", b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r",
                     b"\0", b":", b"x" * 999, b"\r\n\r\n", b"body"]),
    st.binary(max_size=10))


@FUZZ
@given(st.lists(header_piece, max_size=20).map(b"".join))
def test_fuzz_header_checks_pass_only_clean_header_sections(data):
    if checks.header_problem(data) is not None:
        event("header refused")
        return
    event("header passed")
    assert b"\0" not in data
    assert data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")
    header, _ = checks.split_message(data)
    for line in header.split(b"\r\n"):
        assert len(line) <= 998
    # A second, independent reading: the stdlib's strict RFC 5322 parser
    # (email.headerregistry), not the one smapd uses.  No address it finds
    # may name an option, a program or a file (a parser differential would).
    # A group's display name (`-x: a@b;`) is not an address.
    parsed = BytesHeaderParser(policy=email.policy.default).parsebytes(header)
    for name in ("to", "cc", "bcc", "from", "reply-to", "sender"):
        try:
            addresses = [a for value in parsed.get_all(name, []) for a in value.addresses]
        except Exception:       # noqa: BLE001 - the stdlib parser itself fails on some input
            event("strict parser failed")
            continue
        for found in addresses:
            assert not found.username.lstrip().startswith(("-", "|", "/")), (name, found)


# -- the scanner: one message never stops the queue (issue 11, finding 4) -------
#
# The real Scanner runs in-process, unprivileged, on a private spool; the test
# plays the delivery agent on the other end of a real SOCK_SEQPACKET pair and
# answers each request with outcomes made by the agent's own functions from
# generated MTA exit codes and stderr bytes, and mail hub reply codes and text.
# Spool files carry generated envelope values (numbers that are not numbers,
# any recipients), headers with 8-bit bytes and our notice header, and
# generated delivery state; a drawn fault makes one of the scanner's own steps
# raise.  Invariant: no exception leaves the scanner, and every message ends
# delivered, waiting for retry, bounced or quarantined, never lost.

SCAN_RECIPIENTS = ["b@example.org", "c@example.com", "postmaster", "d@hub.example.org",
                   "e@example.org", "f@hub.example.org", "-oQ/tmp@example.org"]
SCAN_SENDERS = ["a@example.net", "", "f@example.org", "|cmd@example.net"]
SCAN_HEADERS = [b"From: a@example.net\r\nSubject: x\r\n\r\n",
                b"From: a@example.net\r\nSubject: x\r\n\r\n",
                b"From: a@example.net\r\nSubject: caf\xc3\xa9 \xe9t\xe9 \xff\r\n\r\n",
                b"From: MAILER-DAEMON@gw\r\nX-Mailwall-Notice: bounce\r\n\r\n",
                b"From: a@example.net\r\nno colon\r\n\r\n", b"\r\n"]
SCAN_NUMBERS = ["1700000000.5", "1", "0", "nan", "inf", "-inf", "-1e309", "1e309", "-5",
                "9" * 400, "1_0", "\u0663", "", "9999999999"]
SCAN_STATES = [b"", b"attempts 1\nnext-try 0.000\n", b"attempts 2\nnext-try nan\n",
               b"attempts 1\nnext-try inf\n", b"attempts 1\nnext-try 1e309\n",
               b"attempts x\n", b"\xff\xfe", b"attempts 1\nnext-try 0\nfailed b@example.org\t"
               b"MTA exit 67 \xc3\xa4\ndone e@example.org\n",
               b"attempts 3\nnext-try 9999999999.000\n"]
STDERRS = ["Empfänger unbekannt".encode(), b"Empf\xe4nger unbekannt", b"", b"\xff" * 3000,
           b"\x00\x1b[31m\r\n.\r\nQUIT\r\n", "\U0001f4a5 \u2028".encode()]
MTA_EXITS = [0, 0, 64, 65, 67, 68, 69, 70, 71, 73, 74, 75, 76, 77, 78, 1, 255, -9, -15]
HUB_CODES = [250, 250, 421, 450, 451, 452, 500, 550, 551, 552, 554, 199, 600, 999]
SCAN_FAULTS = [None, None, None, "state.save", "bounce.build_bounce", "bounce.build_notice",
               "spool.MessageWriter.commit", "checks.problem_of", "decide.settle"]
MAXAGES = [0, 1, 5 * 86400]
SCAN_ROUNDS = 5

RECENT = "%.6f" % (time.time() - 60)
scan_message = st.tuples(
    st.one_of(st.just("a@example.net"), st.sampled_from(SCAN_SENDERS)),
    st.lists(st.sampled_from(SCAN_RECIPIENTS), min_size=1, max_size=4, unique=True),
    st.one_of(st.just(RECENT), st.just("1700000000.5"), st.sampled_from(SCAN_NUMBERS),
              st.text(max_size=12)),                                    # arrival
    st.one_of(st.none(), st.none(), st.just("123"), st.sampled_from(SCAN_NUMBERS)),  # size
    st.sampled_from(SCAN_HEADERS),
    st.one_of(st.sampled_from(SCAN_STATES), st.binary(max_size=60)))


class ScanConfig:
    def __init__(self, maxage):
        self.values = {"wakeup": 60, "retry": 0, "maxage": maxage, "maxchildren": 3,
                       "deliver-timeout": 30, "postmaster": "postmaster@gw.example.org",
                       "mailhub": ("127.0.0.1", 25), "accept-domains": ["hub.example.org"],
                       "shorten-domain": []}

    def get(self, name):
        return self.values[name]


def write_scan_message(root, sender, recipients, arrival, size, header, saved):
    message_id = spool.new_id()
    lines = ["id %s" % message_id, "arrival %s" % arrival, "client-addr 192.0.2.1",
             "client-name unknown", "helo x", "sender %s" % sender]
    lines += ["rcpt %s" % r for r in recipients]
    if size is not None:
        lines.append("size %s" % size)
    data = header + b"body\r\n"
    raw = (spool.MAGIC + ("\n".join(lines) + "\n\n").encode("utf-8", "surrogatepass")
           + data + spool.END + b"%d\n" % len(data))
    with open(os.path.join(root, spool.QUEUE, message_id), "wb") as out:
        out.write(raw)
    if saved:
        with open(os.path.join(root, spool.STATE, message_id), "wb") as out:
            out.write(saved)
    return message_id


def agent_answer(data, request, recipients):
    """Outcomes for one request, made by the agent's own functions."""
    outcomes = []
    if request["hub"]:
        code = data.draw(st.sampled_from(HUB_CODES), label="hub code")
        reply = data.draw(st.one_of(st.sampled_from(STDERRS), st.binary(max_size=120)),
                          label="hub reply")
        kind, text = agent.hub_outcome(code, reply)
        outcomes += [(r, kind, text) for r in request["hub"]]
    if request["mta"]:
        status = data.draw(st.sampled_from(MTA_EXITS), label="MTA exit")
        errors = data.draw(st.one_of(st.sampled_from(STDERRS), st.binary(max_size=120)),
                           label="MTA stderr")
        kind, text = agent.mta_outcome(status, errors)
        outcomes += [(r, kind, text) for r in request["mta"]]
    if outcomes and data.draw(st.booleans(), label="drop one outcome"):
        outcomes.pop()
    return outcomes


class Clock:
    """The scanner's `time`, 10 ms further at each look: a run does not depend
    on how fast the machine is (next-try is kept to the millisecond)."""

    def __init__(self, start):
        self.now = start

    def time(self):
        self.now += 0.01
        return self.now

    def monotonic(self):
        return self.time()

    def __getattr__(self, name):
        return getattr(time, name)


class Fault:
    """Makes `where` (module.attribute[.attribute]) raise on a drawn call."""

    def __init__(self, where, data):
        self.where, self.data = where, data
        self.calls = 0

    def __enter__(self):
        if self.where is None:
            return self
        from smapd import scan as scan_module
        owner_name, *path, name = self.where.split(".")
        owner = getattr(scan_module, owner_name)
        for part in path:
            owner = getattr(owner, part)
        self.owner, self.name = owner, name
        self.original = original = getattr(owner, name)
        error = self.data.draw(st.sampled_from([OSError(28, "No space left on device"),
                                                RuntimeError("a bug"), ValueError("bad"),
                                                UnicodeEncodeError("ascii", "\xe4", 0, 1,
                                                                   "no"),
                                                MemoryError()]), label="fault")
        when = self.data.draw(st.integers(0, 3), label="fault at call")
        fault = self

        def failing(*args, **kwargs):
            fault.calls += 1
            if fault.calls - 1 == when:
                raise error
            return original(*args, **kwargs)
        setattr(owner, name, failing)
        return self

    def __exit__(self, *exc):
        if self.where is not None:
            setattr(self.owner, self.name, self.original)


def run_scanner(scanner, agent_end, data):
    """The scanner's loop without select: scan, answer every request, settle.

    Returns the names the last scan saw (a message made after it, such as a
    bounce, has not been looked at yet)."""
    for _ in range(SCAN_ROUNDS):
        scanner.rescan = False
        listed = set(spool.queued(scanner.base))
        handed = scanner.scan()
        while scanner.inflight:
            received, fds, _, _ = socket.recv_fds(agent_end, agent.MAX_REQUEST + 1, 4)
            request = agent.decode_request(received, fds[0], True)
            for fd in fds:
                os.close(fd)
            answer = agent_answer(data, request, request["hub"] + request["mta"])
            agent_end.send(agent.encode_result(request["id"], answer))
            assert scanner.receive()
            if scanner.todo:
                handed += scanner.dispatch()
        scanner.sync_removals()
        if not handed and not scanner.rescan and not scanner.todo:
            break
    return listed


def spool_ids(root, directory):
    return {n.split(".")[0] for n in os.listdir(os.path.join(root, directory))
            if n.split(".")[0] and spool.valid_id(n.split(".")[0])}


@FUZZ
@given(st.lists(scan_message, min_size=1, max_size=4), st.sampled_from(MAXAGES),
       st.sampled_from(SCAN_FAULTS), st.data())
def test_fuzz_one_message_never_stops_the_queue(messages, maxage, fault, data):
    from smapd import scan as scan_module
    root = tempfile.mkdtemp(prefix="mwfuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm")
                            else None)
    scanner_end, agent_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        spool.make_dirs(root)
        ids = [write_scan_message(root, *message) for message in messages]
        log = RecordingLog()
        scanner = scan_module.Scanner(root, ScanConfig(maxage), log, scanner_end, None,
                                      "gw.example.org", os.path.join(root, spool.BAD))
        real_time, scan_module.time = scan_module.time, Clock(float(RECENT) + 60)
        try:
            with Fault(fault, data):
                listed = run_scanner(scanner, agent_end, data)
        finally:
            scan_module.time = real_time
        queued = set(spool.queued(root))
        quarantined = spool_ids(root, spool.BAD)
        finished = {f["id"] for _, e, f in log.events if e == "done"}
        bounced = {f["id"] for _, e, f in log.events if e == "bounce"}
        # every message the scanner injected (bounces, notices) must be 7-bit
        injected = {f.get("bounce_id") or f.get("notice_id") for _, e, f in log.events
                    if e in ("bounce", "notice") and (f.get("bounce_id") or f.get("notice_id"))}
        for message_id in ids + sorted(injected):
            places = [message_id in queued, message_id in quarantined, message_id in finished]
            assert sum(places) == 1, (message_id, places, log.events)
            if message_id in queued and message_id in listed:
                # waiting for retry: a state saved, or a pause after a failure
                record = state.load(root, message_id)
                assert record.attempts >= 1 or record.next_try > 0 or \
                    message_id in scanner.troubles, (message_id, log.events)
            if message_id in quarantined:
                with open(os.path.join(root, spool.BAD, message_id + ".reason")) as reason:
                    assert "reason: " in reason.read()
            if message_id in finished:
                [done] = [f for _, e, f in log.events if e == "done" and f["id"] == message_id]
                assert not done["failed"] or message_id in bounced, (message_id, log.events)
        for message_id in injected & queued:
            with open(os.path.join(root, spool.QUEUE, message_id), "rb") as source:
                assert all(byte < 128 for byte in source.read()), message_id
        event("faults fired" if fault and scanner.troubles else "no fault left a trouble")
        for kind in ("done", "bounce", "quarantine", "defer", "failure"):
            if any(e == kind for _, e, _ in log.events):
                event("saw " + kind)
    finally:
        scanner_end.close()
        agent_end.close()
        shutil.rmtree(root, ignore_errors=True)

"""smap.milter's codec and the hook's state machine, without sockets (issue 15).

Encoding is checked against the bytes of the protocol (libmilter's
mfdef.h, Postfix's milter8.c); decoding must refuse every reply whose
size, type, stage or negotiated action is wrong; the hook is driven with
a scripted milter over a socketpair-free fake connection.
"""

import struct

import pytest
from hypothesis import given, settings, strategies as st

from common import endpoint, spool
from smap import milter, policy
from tests.security.hostile_milter import pkt
from tests.unit.smap_fixtures import RecordingLog

GRANTED = milter.Negotiated(6, milter.OFFERED_ACTIONS, milter.OFFERED_PROTOCOL)


# -- encoding ---------------------------------------------------------------

def test_packets_are_length_command_payload():
    assert milter.packet(milter.ABORT) == b"\0\0\0\x01A"
    assert milter.optneg() == b"\0\0\0\x0dO" + struct.pack(">III", 6, 0x131, 0x1FF7FF)
    assert milter.helo_event("client.example") == b"\0\0\0\x10Hclient.example\0"
    assert milter.mail_event("a@b", ["SIZE=10"]) == b"\0\0\0\x0fM<a@b>\0SIZE=10\0"
    assert milter.rcpt_event("u@d") == b"\0\0\0\x07R<u@d>\0"
    assert milter.header_event("Subject", "hi") == b"\0\0\0\x0cLSubject\0hi\0"
    assert milter.macros(milter.BODYEOB, [("{i}", "ABC"), ("j", None)]) == \
        b"\0\0\0\x0aDE{i}\0ABC\0"


def test_connect_event_by_family():
    assert milter.connect_event("[192.0.2.1]", "192.0.2.1", 25) == \
        pkt(b"C", b"[192.0.2.1]\x004\x00\x19192.0.2.1\0")
    assert milter.connect_event("h", "::1") == pkt(b"C", b"h\x006\0\0::1\0")
    assert milter.connect_event("unknown", None) == pkt(b"C", b"unknown\0U")


def test_body_chunk_limit_and_no_nul_strings():
    assert len(milter.body_event(b"x" * 65535)) == 65540
    with pytest.raises(ValueError):
        milter.body_event(b"x" * 65536)
    with pytest.raises(ValueError):
        milter.helo_event("a\0b")


# -- reading packets ----------------------------------------------------------

def test_reader_checks_the_length_before_use():
    reader = milter.PacketReader()
    reader.feed(b"\0\0\0\x02y")
    assert reader.next() is None            # one octet of the payload is missing
    reader.feed(b"Xrest")
    assert reader.next() == (ord("y"), b"X")
    assert reader.buffer == b"rest"
    for bad in (b"\0\0\0\0", struct.pack(">I", milter.MAX_PACKET + 1)):
        reader = milter.PacketReader()
        reader.feed(bad)
        with pytest.raises(milter.ProtocolError):
            reader.next()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.sampled_from(
    ["connect", "helo", "mail", "rcpt", "data", "header", "eoh", "body", "eom"]))
def test_any_bytes_decode_or_raise_protocol_error(data, event):
    reader = milter.PacketReader()
    reader.feed(data)
    try:
        while True:
            item = reader.next()
            if item is None:
                break
            reply = milter.decode_reply(*item, event, GRANTED)
            if reply.change is not None:
                assert policy.change_problem(reply.change) is None
            if reply.kind == milter.R_REPLYCODE:
                assert 400 <= reply.code < 600
    except milter.ProtocolError:
        pass


# -- the negotiation -------------------------------------------------------------

def test_negotiation_grants_only_what_was_offered():
    answer = struct.pack(">III", 6, 0x1FF, 0x1FFFFF)
    agreed = milter.decode_optneg(ord("O"), answer)
    assert agreed.actions == milter.F_ADDHDRS | milter.F_CHGHDRS | milter.F_QUARANTINE | \
        milter.F_SETSYMLIST
    assert not agreed.actions & milter.F_CHGBODY
    assert not agreed.protocol & milter.P_RCPT_REJ
    assert agreed.asked_actions == 0x1FF


@pytest.mark.parametrize("command, payload, why", [
    (ord("c"), b"", "answered the negotiation"),
    (ord("O"), b"\0" * 11, "12 needed"),
    (ord("O"), struct.pack(">III", 7, 0, 0), "version 7"),
    (ord("O"), struct.pack(">III", 1, 0, 0), "version 1"),
    (ord("O"), struct.pack(">III", 6, 0, 0) + b"\0\0\0\x01{i}", "macro list"),
    (ord("O"), struct.pack(">III", 6, 0, 0) + b"\0\0\0\x09{i}\0", "unknown stage"),
])
def test_bad_negotiations(command, payload, why):
    with pytest.raises(milter.ProtocolError, match=why):
        milter.decode_optneg(command, payload)


def test_old_versions_get_no_data_event_and_no_version_6_flags():
    agreed = milter.decode_optneg(ord("O"), struct.pack(">III", 2, 1, milter.P_NR_BODY))
    assert agreed.protocol & milter.P_NODATA and not agreed.protocol & milter.P_NR_BODY
    milter.decode_optneg(ord("O"), struct.pack(">III", 6, 0, 0) + b"\0\0\0\x05{i} j\0")


# -- replies ---------------------------------------------------------------------

def decode(raw, event="eom", negotiated=GRANTED):
    reader = milter.PacketReader()
    reader.feed(raw)
    return milter.decode_reply(*reader.next(), event, negotiated)


@pytest.mark.parametrize("raw, event, why", [
    (pkt(b"a", b"x"), "eom", "1 octets of data"),
    (pkt(b"d"), "connect", "discard at connect"),
    (pkt(b"s"), "eom", "skip at eom"),
    (pkt(b"Z"), "eom", "unknown reply type 0x5a"),
    (pkt(b"b", b"body"), "eom", "was not offered"),
    (pkt(b"+", b"<x@y>\0"), "eom", "was not offered"),
    (pkt(b"h", b"X\0y\0"), "rcpt", "only at the end of the message"),
    (pkt(b"q", b"why\0"), "body", "only at the end of the message"),
    (pkt(b"h", b"X\0y"), "eom", "NUL-terminated"),
    (pkt(b"h", b"X\0y\0z\0"), "eom", "NUL-terminated"),
    (pkt(b"i", b"\0\0"), "eom", "without its index"),
    (pkt(b"h", b"X\0a\nB: c\0"), "eom", "not a fold"),
    (pkt(b"h", b"X\0a\n\0"), "eom", "not a fold"),
    (pkt(b"h", b"X\0a\rb\0"), "eom", "not a fold"),
    (pkt(b"h", b"X:Y\0v\0"), "eom", "bad field name"),
    (pkt(b"h", b"\0v\0"), "eom", "bad field name"),
    (pkt(b"i", b"\xff\xff\xff\xffX\0v\0"), "eom", "bad index"),
    (pkt(b"y", b"250 2.0.0 ok\0"), "eom", "not a 4xx or 5xx"),
    (pkt(b"y", b"55\0"), "eom", "not a 4xx or 5xx"),
    (pkt(b"y", b"550 5.7.1 caf\xc3\xa9\0"), "eom", "not ASCII"),
    (pkt(b"y", b"550 no nul"), "eom", "NUL-terminated"),
    (pkt(b"l", b"\0\0\0\0{i}\0"), "eom", "setsymlist at eom"),
])
def test_bad_replies(raw, event, why):
    with pytest.raises(milter.ProtocolError, match=why):
        decode(raw, event)


def test_actions_not_granted_are_protocol_errors():
    nothing = milter.Negotiated(6, 0, 0)
    for raw in (pkt(b"h", b"X\0y\0"), pkt(b"m", b"\0\0\0\x01X\0y\0"), pkt(b"q", b"r\0")):
        with pytest.raises(milter.ProtocolError, match="without the action granted"):
            decode(raw, "eom", nothing)
    assert decode(pkt(b"s"), "body", nothing).kind == milter.R_SKIP   # smap offers SKIP


def test_good_replies():
    reply = decode(pkt(b"y", b"550 5.7.1 Infected: 100%% EICAR\0"))
    assert (reply.code, reply.status, reply.text) == (550, "5.7.1", "Infected: 100% EICAR")
    reply = decode(pkt(b"y", b"451 try later\r\n451 really\0"))
    assert (reply.code, reply.status, reply.text) == (451, None, "try later")
    assert decode(pkt(b"h", b"X-Spam\0yes\n\tfolded\0")).change == \
        policy.add_header("X-Spam", "yes\r\n\tfolded")
    assert decode(pkt(b"i", b"\0\0\0\0AR\0 v\0")).change == policy.insert_header(0, "AR", " v")
    assert decode(pkt(b"m", b"\0\0\0\0Subject\0new\0")).change == \
        policy.change_header("Subject", "new", 1)
    assert decode(pkt(b"m", b"\0\0\0\x02Subject\0\0")).change == \
        policy.delete_header("Subject", 2)
    assert decode(pkt(b"q", b"bad\x01stuff\0")).reason == "bad?stuff"
    assert decode(pkt(b"s"), "body").kind == milter.R_SKIP


# -- the message text as events ---------------------------------------------------

def test_message_text_events():
    text = milter.MessageText()
    events = text.feed(b"Received: from x\r\n\tby y\r\nSubject:  hi\r\n")
    assert events == [("header", "Received", " from x\n\tby y")]
    events = text.feed(b"\r\nbody\r\n")
    assert events == [("header", "Subject", "  hi"), ("eoh",)]
    assert text.finish() == [("body", b"body\r\n")]


def test_message_without_an_empty_line():
    text = milter.MessageText()
    assert text.feed(b"Subject: x\r\nnot a header\r\n") == [("header", "Subject", " x"), ("eoh",)]
    assert text.finish() == [("body", b"not a header\r\n")]
    text = milter.MessageText()
    text.feed(b"Subject: x\r\n")
    assert text.finish() == [("header", "Subject", " x"), ("eoh",)]


def test_body_is_cut_in_chunks():
    text = milter.MessageText()
    text.feed(b"\r\n")
    events = text.feed(b"y" * (milter.CHUNK * 2 + 10))
    assert [len(e[1]) for e in events] == [milter.CHUNK, milter.CHUNK]
    assert [len(e[1]) for e in text.finish()] == [10]


# -- endpoints ----------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("unix:/run/clamav/milter.sock", ("unix", "/run/clamav/milter.sock")),
    ("inet:127.0.0.1:7357", ("inet", ("127.0.0.1", 7357))),
    ("inet:[::1]:11332", ("inet6", ("::1", 11332))),
])
def test_endpoints(spec, expected):
    assert endpoint.parse(spec) == expected


@pytest.mark.parametrize("spec", [
    "unix:relative", "inet:localhost:25", "inet:mx.example.org:25", "inet:127.0.0.1",
    "inet:127.0.0.1:0", "inet:127.0.0.1:65536", "inet:[127.0.0.1]:25", "local:/x",
    "inet::25", "unix:", "inet:::1:25", "unix:/" + "x" * 120, "inet:127.0.0.1:+25",
])
def test_bad_endpoints(spec):
    with pytest.raises(ValueError):
        endpoint.parse(spec)


# -- header edits in the spool -------------------------------------------------------

def test_spool_header_edits():
    header = b"Received: a\r\n\tb\r\nSubject: x\r\nX-A: 1\r\nX-A: 2\r\n\r\n"
    edited = spool.edit_header(header, [
        policy.add_header("X-New", "v"), policy.insert_header(0, "Top", "t"),
        policy.change_header("x-a", "9", 2), policy.delete_header("Subject"),
        policy.change_header("Missing", " lead"), policy.delete_header("Absent", 3)])
    assert edited == (b"Top: t\r\nReceived: a\r\n\tb\r\nX-A: 1\r\nx-a: 9\r\nX-New: v\r\n"
                      b"Missing: lead\r\n\r\n")
    assert spool.edit_header(b"X: 1\r\nbody line\r\n", [policy.add_header("Y", "z")]) == \
        b"X: 1\r\nY: z\r\nbody line\r\n"
    assert spool.edit_header(b"\r\n", [policy.insert_header(5, "Y", "z")]) == b"Y: z\r\n\r\n"


def test_spool_writer_applies_edits_and_the_quarantine_mark(tmp_path):
    spool.make_dirs(str(tmp_path))
    writer = spool.MessageWriter(str(tmp_path), "ABCDEF01")
    writer.start({"id": "ABCDEF01", "arrival": "1.0", "sender": "a@b", "rcpt": ["u@d"]})
    writer.write(b"Subject: x\r\n\r\n")
    writer.write(b"body\r\n" * 100000)          # past the 256 KiB buffer: partly on disk
    writer.edit_header([policy.add_header("X-Virus-Status", "Clean")])
    writer.quarantine("milter unix:/x: found\nsomething")
    writer.commit()
    envelope, data = spool.read_message(str(tmp_path / "queue" / "ABCDEF01"))
    assert envelope["quarantine"] == "milter unix:/x: found?something"
    assert data == b"Subject: x\r\nX-Virus-Status: Clean\r\n\r\n" + b"body\r\n" * 100000
    assert sorted((tmp_path / "tmp").iterdir()) == []


# -- the hook, with a scripted milter -------------------------------------------------

class FakeConnection:
    """Stands for milter.Connection: records what is sent, answers from a script."""

    def __init__(self, replies):
        self.sent = []
        self.reader = milter.PacketReader()
        self.reader.feed(b"".join(replies))

    def send(self, data, deadline):
        self.sent.append(data)

    def read(self, deadline):
        item = self.reader.next()
        if item is None:
            raise milter.ProtocolError("no answer within milter-timeout")
        return item

    def close(self):
        pass


class Peer:
    addr, name, addr_text, name_text = "192.0.2.7", None, "192.0.2.7", "unknown"


class Settings:
    hostname = "mx.example.org"


class Session:
    peer, settings = Peer(), Settings()


class Envelope:
    def __init__(self):
        self.id, self.parameters, self.notes = "ABC", {}, {}


def scripted(replies, default="tempfail"):
    log = RecordingLog()
    one = milter.Milter("inet:127.0.0.1:1", None, 5, default, log, error="unused")
    one.broken = None
    one.connection = FakeConnection(replies)
    return milter.MilterHook([one]), one, log


def test_a_rejected_recipient_and_an_accepted_message():
    hook, one, log = scripted([
        pkt(b"O", struct.pack(">III", 6, 1, milter.P_NR_HDR)), pkt(b"c"), pkt(b"c"), pkt(b"c"),
        pkt(b"y", b"550 5.1.1 unknown\0"), pkt(b"c"), pkt(b"c"), pkt(b"c"), pkt(b"c"),
        pkt(b"h", b"X-Seen\0yes\0"), pkt(b"a")])
    session, envelope = Session(), Envelope()
    assert hook.on_connect(session) is policy.ACCEPTED
    assert hook.on_helo(session, "client") is policy.ACCEPTED
    assert hook.on_mail(session, envelope, "a@b") is policy.ACCEPTED
    refused = hook.on_rcpt(session, envelope, "x@d")
    assert (refused.action, refused.code, refused.text) == (policy.REJECT, 550, "unknown")
    assert hook.on_rcpt(session, envelope, "u@d") is policy.ACCEPTED
    hook.on_text(session, envelope, b"Received: r\r\nSubject: s\r\n\r\nbody\r\n")
    verdict = hook.on_data(session, envelope)
    assert verdict.action == policy.ACCEPT
    assert verdict.changes == (policy.add_header("X-Seen", "yes"),)
    sent = b"".join(one.connection.sent)
    assert sent.count(b"Subject\0") == 1 and b"\0\0\0\x07Bbody\r\n" in sent
    assert [f["verdict"] for _, e, f in log.events if e == "milter"] == ["reject", "accept"]


def test_a_refusal_during_the_text_waits_for_the_final_dot():
    hook, one, log = scripted([pkt(b"O", struct.pack(">III", 6, 0, 0)), pkt(b"c"), pkt(b"c"),
                               pkt(b"c"), pkt(b"c"), pkt(b"c"), pkt(b"r")])
    session, envelope = Session(), Envelope()
    hook.on_connect(session)
    hook.on_helo(session, "client")
    hook.on_mail(session, envelope, "a@b")
    hook.on_rcpt(session, envelope, "u@d")
    hook.on_text(session, envelope, b"Received: r\r\n")     # DATA: c
    hook.on_text(session, envelope, b"Subject: s\r\n\r\nbody\r\n")   # Received: r
    sent = b"".join(one.connection.sent)
    assert b"Received\0" in sent and b"Subject\0" not in sent and b"Bbody" not in sent
    assert hook.on_data(session, envelope).action == policy.REJECT


def test_no_reply_flags_and_skip():
    flags = milter.P_NR_CONN | milter.P_NR_HELO | milter.P_NR_MAIL | milter.P_NR_RCPT | \
        milter.P_NR_DATA | milter.P_NR_HDR | milter.P_NR_EOH
    hook, one, log = scripted([pkt(b"O", struct.pack(">III", 6, 0, flags)), pkt(b"s"),
                               pkt(b"a")])
    session, envelope = Session(), Envelope()
    hook.on_connect(session)
    hook.on_helo(session, "client")
    hook.on_mail(session, envelope, "a@b")
    hook.on_rcpt(session, envelope, "u@d")
    hook.on_text(session, envelope, b"Received: r\r\n\r\n" + b"z" * (milter.CHUNK * 3))
    assert hook.on_data(session, envelope) is policy.ACCEPTED
    bodies = [d for d in one.connection.sent if d[4:5] == b"B"]
    assert len(bodies) == 1         # skipped after the first chunk


def test_a_broken_milter_with_default_accept_is_asked_nothing_more():
    hook, one, log = scripted([pkt(b"O", struct.pack(">III", 6, 0, 0)), pkt(b"Z")], "accept")
    session, envelope = Session(), Envelope()
    assert hook.on_connect(session) is policy.ACCEPTED
    sent = len(one.connection.sent) if one.connection else 0
    assert hook.on_mail(session, envelope, "a@b") is policy.ACCEPTED
    hook.on_text(session, envelope, b"Received: r\r\n\r\nbody\r\n")
    assert hook.on_data(session, envelope) is policy.ACCEPTED
    assert one.connection is None and sent == 0
    (fields,) = [f for _, e, f in log.events if e == "milter"]
    assert fields["verdict"] == "error" and fields["action"] == "accept"


# -- the table's attributes -------------------------------------------------------

def test_the_table_checks_milter_attributes():
    from common import netperm, params
    declared = params.for_program(params.SMAP)
    assert netperm.convert(declared["milters"], ["unix:/Run/Milter.sock", "inet:[::1]:99"]) == \
        ["unix:/Run/Milter.sock", "inet:[::1]:99"]         # not lower-cased
    for bad in (["inet:localhost:25"], ["unix:x"], ["unix:/m"] * 21):
        with pytest.raises(ValueError):
            netperm.convert(declared["milters"], bad)
    assert netperm.convert(declared["milter-default-action"], ["Accept"]) == "accept"
    with pytest.raises(ValueError):
        netperm.convert(declared["milter-default-action"], ["quarantine"])
    with pytest.raises(ValueError):
        netperm.convert(declared["milter-timeout"], ["0"])

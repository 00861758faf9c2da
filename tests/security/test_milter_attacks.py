"""A hostile milter against the real smap (issue 15).

The stand-in (hostile_milter.py) sends one malformed or unwelcome packet
at a chosen event.  Whatever it sends, smap must end in
milter-default-action (tempfail unless the test says otherwise), spool
nothing when that action is tempfail or reject, answer only SMTP of its
own making, and log the verdict with the milter's SPEC and the stage.
"""

import struct
import time

import pytest

from tests.security.harness import SmapSetup
from tests.security.hostile_milter import CLOSE, HANG, HostileMilter, optneg_reply, pkt

BODY = b"From: a@example.net\r\nSubject: milter test\r\n\r\nhello\r\n"


def dialogue(client, body=BODY, rcpt="user@example.com"):
    """The replies to a whole transaction, stopping at the first refusal."""
    replies = {"banner": client.reply()}
    if replies["banner"][0] != 220:
        return replies
    for name, line in (("ehlo", "EHLO client.example.org"), ("mail", "MAIL FROM:<a@example.net>"),
                       ("rcpt", "RCPT TO:<%s>" % rcpt), ("data", "DATA")):
        replies[name] = client.cmd(line)
        if replies[name][0] >= 400:
            replies["quit"] = client.cmd("QUIT")
            return replies
    client.send(body + b".\r\n")
    replies["dot"] = client.reply()
    replies["quit"] = client.cmd("QUIT")
    return replies


@pytest.fixture
def attack(tmp_path):
    """attack(script, default=None, negotiation=None, body=BODY) ->
    (replies, setup, milter); everything is stopped at the end."""
    started = []

    def run(script, default=None, negotiation=None, body=BODY, timeout=2, rcpt="user@example.com"):
        milter = HostileMilter(script, negotiation)
        lines = ["smap: milters %s" % milter.spec, "smap: milter-timeout %d" % timeout]
        if default:
            lines.append("smap: milter-default-action %s" % default)
        setup = SmapSetup(tmp_path / ("run%d" % len(started)), lines)
        started.append((setup, milter))
        client = setup.inetd(timeout=20)
        replies = dialogue(client, body, rcpt)
        setup.wait_exit(client, 20)
        return replies, setup, milter

    yield run
    for setup, milter in started:
        setup.stop()
        milter.close()


def nothing_spooled(setup):
    assert setup.queued() == []
    assert setup.tmp_files() == []


# -- malformed packets at the end of the message -> tempfail, nothing spooled --

MALFORMED = {
    "length zero": struct.pack(">I", 0),
    "huge length": struct.pack(">I", 0x7FFFFFFF) + b"a",
    "unknown reply type": pkt(b"Z"),
    "accept with data": pkt(b"a", b"junk"),
    "replycode without NUL": pkt(b"y", b"550 5.7.1 no nul"),
    "replycode 250": pkt(b"y", b"250 2.0.0 fine, take it\0"),
    "replycode 3xx": pkt(b"y", b"354 go on\0"),
    "body replacement": pkt(b"b", b"new body\r\n") + pkt(b"a"),
    "add recipient": pkt(b"+", b"<evil@example.net>\0") + pkt(b"a"),
    "change sender": pkt(b"e", b"<evil@example.net>\0") + pkt(b"a"),
    "header with bare LF": pkt(b"h", b"X-Scan\0ok\nX-Injected: yes\0") + pkt(b"a"),
    "header with bare CR": pkt(b"h", b"X-Scan\0ok\rX-Injected: yes\0") + pkt(b"a"),
    "header with trailing LF": pkt(b"h", b"X-Scan\0ok\n\0") + pkt(b"a"),
    "header name with colon": pkt(b"h", b"X-Scan: evil\0ok\0") + pkt(b"a"),
    "header with three strings": pkt(b"h", b"X-Scan\0ok\0more\0") + pkt(b"a"),
    "insert without index": pkt(b"i", b"\0\0") + pkt(b"a"),
    "negotiation packet again": optneg_reply(),
    "skip at end of message": pkt(b"s"),
    "closes": CLOSE,
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_reply_at_end_of_message_is_tempfail(attack, name):
    replies, setup, milter = attack({b"E": MALFORMED[name]})
    code, text = replies["dot"]
    assert code == 451, (name, replies)
    assert "250" not in text and "354" not in text
    nothing_spooled(setup)
    line = setup.logs.wait_for("verdict=error")
    assert "milter=%s" % milter.spec in line and "stage=eom" in line
    assert "action=tempfail" in line


def test_hanging_milter_times_out_into_tempfail(attack):
    started = time.monotonic()
    replies, setup, milter = attack({b"E": HANG}, timeout=2)
    assert replies["dot"][0] == 451
    assert 1.5 < time.monotonic() - started < 15
    nothing_spooled(setup)
    assert "within milter-timeout" in setup.logs.wait_for("verdict=error")


def test_milter_closing_mid_message(attack):
    replies, setup, milter = attack({b"B": CLOSE})
    assert replies["dot"][0] == 451
    nothing_spooled(setup)
    line = setup.logs.wait_for("verdict=error")
    assert "stage=eom" in line and "step=body" in line and "closed" in line


def test_milter_down_is_tempfail_at_the_banner(tmp_path):
    milter = HostileMilter()
    milter.close()          # its port: nothing listens there now
    setup2 = SmapSetup(tmp_path / "down", ["smap: milters %s" % milter.spec])
    try:
        client = setup2.inetd()
        code, text = client.reply()
        assert code == 421
        assert client.closed_by_server()
        assert setup2.queued() == []
        line = setup2.logs.wait_for("verdict=error")
        assert "stage=connect" in line and "connect:" in line
    finally:
        setup2.stop()


def test_reply_at_the_wrong_stage(attack):
    """A header change in answer to RCPT breaks the protocol: 450 at RCPT."""
    replies, setup, milter = attack({b"R": pkt(b"h", b"X-Early\0yes\0")})
    assert replies["rcpt"][0] == 450
    nothing_spooled(setup)
    line = setup.logs.wait_for("verdict=error")
    assert "stage=rcpt" in line and "only at the end of the message" in line


def test_replycode_421_does_not_close_the_session(attack):
    replies, setup, milter = attack({b"E": pkt(b"y", b"421 4.7.0 go away\0")})
    code, text = replies["dot"]
    assert code == 451 and replies["quit"][0] == 221
    nothing_spooled(setup)
    assert "421 would close the session" in setup.logs.wait_for("refused reply")


def test_reply_text_cannot_add_a_second_reply_line(attack):
    replies, setup, milter = attack(
        {b"E": pkt(b"y", b"550 5.7.1 Rejected\r\n250 2.0.0 Ok: queued as FAKE\0")})
    code, text = replies["dot"]
    assert (code, text) == (550, "550 5.7.1 Rejected")
    assert replies["quit"][0] == 221
    nothing_spooled(setup)


def test_custom_reject_and_tempfail_at_rcpt(attack):
    replies, setup, milter = attack({b"R": pkt(b"y", b"550 5.1.1 <user@example.com>: no such user\0")})
    assert replies["rcpt"] == (550, "550 5.1.1 <user@example.com>: no such user")
    line = setup.logs.wait_for("verdict=reject")
    assert "stage=rcpt" in line and 'reply="550 5.1.1' in line
    replies, setup, milter = attack({b"M": pkt(b"t")})
    assert replies["mail"][0] == 450
    assert "stage=mail" in setup.logs.wait_for("verdict=tempfail")


def test_default_accept_lets_the_message_through_unchanged(attack):
    replies, setup, milter = attack(
        {b"E": pkt(b"h", b"X-Evil\0a\nInjected: yes\0") + pkt(b"a")}, default="accept")
    assert replies["dot"][0] == 250
    (queue_id,) = setup.queued()
    _, data = setup.message(queue_id)
    assert b"X-Evil" not in data and b"Injected" not in data
    assert "action=accept" in setup.logs.wait_for("verdict=error")


def test_default_reject(attack):
    replies, setup, milter = attack({b"E": pkt(b"Z")}, default="reject")
    assert replies["dot"][0] == 554
    nothing_spooled(setup)


def test_discard_answers_250_and_spools_nothing(attack):
    replies, setup, milter = attack({b"E": pkt(b"d")})
    assert replies["dot"][0] == 250
    nothing_spooled(setup)
    assert "stage=eom" in setup.logs.wait_for("verdict=discard")
    assert setup.logs.wait_for("discard id=")


def test_quarantine_marks_the_spooled_message(attack):
    replies, setup, milter = attack({b"E": pkt(b"q", b"looks like malware\0") + pkt(b"a")})
    assert replies["dot"][0] == 250
    (queue_id,) = setup.queued()
    envelope, _ = setup.message(queue_id)
    assert "looks like malware" in envelope["quarantine"]
    assert "stage=eom" in setup.logs.wait_for("verdict=quarantine")


def test_header_changes_reach_the_spooled_copy(attack):
    edits = (pkt(b"h", b"X-Scanned\0by stand-in\0") +
             pkt(b"i", struct.pack(">I", 0) + b"X-First\0top\0") +
             pkt(b"m", struct.pack(">I", 1) + b"Subject\0changed\n\tfolded\0") +
             pkt(b"m", struct.pack(">I", 1) + b"From\0\0") + pkt(b"a"))
    replies, setup, milter = attack({b"E": edits})
    assert replies["dot"][0] == 250
    (queue_id,) = setup.queued()
    _, data = setup.message(queue_id)
    header = data.split(b"\r\n\r\n", 1)[0]
    assert header.startswith(b"X-First: top\r\nReceived: ")
    assert b"Subject: changed\r\n\tfolded\r\n" in header
    assert b"From:" not in header
    assert header.endswith(b"X-Scanned: by stand-in")
    assert data.endswith(b"\r\n\r\nhello\r\n")


def test_skipped_steps_are_not_sent(attack):
    """SMFIP_NOHELO|NOMAIL|NORCPT|NOHDRS: only connect, body and eom arrive."""
    flags = 0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x200
    replies, setup, milter = attack({}, negotiation=optneg_reply(protocol=flags))
    assert replies["dot"][0] == 250
    commands = set(milter.commands())
    assert {b"O", b"C", b"B", b"E"} <= commands
    assert not commands & {b"H", b"M", b"R", b"L", b"N", b"T"}


def test_body_chunks_are_at_most_65535_octets(attack):
    body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 200
    replies, setup, milter = attack({}, body=body)
    assert replies["dot"][0] == 250
    chunks = milter.payloads(b"B")
    assert chunks and max(map(len, chunks)) <= 65535
    assert b"".join(chunks) == (b"x" * 998 + b"\r\n") * 200


def test_bad_negotiation(attack):
    replies, setup, milter = attack({}, negotiation=pkt(b"O", b"\0\0\0\x07" + b"\0" * 8))
    assert replies["banner"][0] == 421
    nothing_spooled(setup)
    assert "protocol version 7" in setup.logs.wait_for("verdict=error")

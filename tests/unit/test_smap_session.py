"""Golden transcripts for smap's SMTP state machine: client bytes in, replies
out, no sockets.  Every "bad input" of issue 2 is here with the reply it
must get, a logged reason, and the spool left without a partial or ready
file.  The spool is a real directory under tmp_path; a "full disk" is a
MessageWriter that raises ENOSPC where the disk would.
"""

import errno
import os
import re

import pytest

from common import hostmatch, spool
from smap import session
from tests.unit.smap_fixtures import (HOSTNAME, full_disk_writer, make_session,
                                      spooled, unstuff)

QUEUED = re.compile(rb"^250 2\.0\.0 Ok: queued as ([0-9A-F]+)\r\n$")


def transcript(smtp, steps):
    """Feed each client write; assert each reply equals (bytes) or matches (regex)."""
    for sent, expected in steps:
        reply = smtp.feed(sent)
        if isinstance(expected, re.Pattern):
            assert expected.match(reply), (sent, reply)
        else:
            assert reply == expected, (sent, reply)


def open_data(smtp, rcpt=b"user@example.org", ehlo=True):
    transcript(smtp, [
        (b"EHLO client.example.net\r\n" if ehlo else b"HELO client.example.net\r\n",
         re.compile(rb"^250[ -]")),
        (b"MAIL FROM:<sender@example.net>\r\n", b"250 2.1.0 Ok\r\n"),
        (b"RCPT TO:<" + rcpt + b">\r\n", b"250 2.1.5 Ok\r\n"),
        (b"DATA\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
    ])


def nothing_spooled(root):
    assert spooled(root) == ([], [])


# -- the good path --------------------------------------------------------

def test_banner_and_ehlo_advertise_exactly_the_extensions(tmp_path):
    smtp, _ = make_session(tmp_path, maxbytes=5000, greet=False)
    assert smtp.greeting() == b"220 mx.example.org ESMTP mailwall smap\r\n"
    assert smtp.feed(b"EHLO client.example.net\r\n") == (
        b"250-mx.example.org\r\n250-SIZE 5000\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n")
    assert b"PIPELINING" not in smtp.feed(b"EHLO again.example.net\r\n")


def test_a_message_is_spooled_with_received_header_and_queue_id(tmp_path):
    smtp, log = make_session(tmp_path)
    open_data(smtp)
    body = (b"Subject: hello\r\n\r\n..leading dot\r\n.\r\nnot the end\r\n"
            b"last line\r\n")
    reply = smtp.feed(body.replace(b"\r\n.\r\n", b"\r\n..\r\n", 1) + b".\r\n")
    match = QUEUED.match(reply)
    assert match, reply
    queue_id = match.group(1).decode()
    queue, tmp = spooled(tmp_path)
    assert queue == [queue_id] and tmp == []
    envelope, message = spool.read_message(os.path.join(tmp_path, spool.QUEUE, queue_id))
    assert envelope["id"] == queue_id
    assert envelope["sender"] == "sender@example.net"
    assert envelope["rcpt"] == ["user@example.org"]
    assert envelope["client-addr"] == "192.0.2.7"
    assert envelope["helo"] == "client.example.net"
    header, _, text = message.partition(b"Subject:")
    assert header.startswith(b"Received: from client.example.net "
                             b"(client.example.net [192.0.2.7])\r\n\tby mx.example.org")
    assert b"with ESMTP id " + queue_id.encode() in header
    assert b"for <user@example.org>;" in header
    assert re.search(rb"; \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}\r\n$", header)
    # dot-unstuffed: "..x" is ".x", a stuffed lone "." is a line ".", not the end
    assert b"Subject:" + text == (b"Subject: hello\r\n\r\n.leading dot\r\n.\r\n"
                                  b"not the end\r\nlast line\r\n")
    events = [(event, fields) for _, event, fields in log.events if event == "message"]
    assert events and events[0][1]["id"] == queue_id
    assert events[0][1]["from"] == "<sender@example.net>" and events[0][1]["nrcpt"] == 1
    assert smtp.feed(b"QUIT\r\n") == b"221 2.0.0 Bye\r\n" and smtp.closed


def test_two_messages_in_one_session_get_two_ids(tmp_path):
    smtp, _ = make_session(tmp_path)
    ids = []
    for _ in range(2):
        open_data(smtp)
        ids.append(QUEUED.match(smtp.feed(b"hi\r\n.\r\n")).group(1))
    assert ids[0] != ids[1]
    assert len(spooled(tmp_path)[0]) == 2


def test_empty_message_and_helo_session(tmp_path):
    smtp, _ = make_session(tmp_path)
    open_data(smtp, ehlo=False)
    assert QUEUED.match(smtp.feed(b".\r\n"))
    name = spooled(tmp_path)[0][0]
    _, message = spool.read_message(os.path.join(tmp_path, spool.QUEUE, name))
    assert message.startswith(b"Received: ") and b"with SMTP id" in message


def test_message_id_is_in_the_reply_only_after_the_file_is_in_queue(tmp_path, monkeypatch):
    order = []
    real_fsync_dir = spool.fsync_dir
    monkeypatch.setattr(spool, "fsync_dir",
                        lambda path: (order.append(("fsync_dir", sorted(os.listdir(path)))),
                                      real_fsync_dir(path)))
    smtp, _ = make_session(tmp_path)
    open_data(smtp)
    reply = smtp.feed(b"x\r\n.\r\n")
    queue_id = QUEUED.match(reply).group(1).decode()
    assert order == [("fsync_dir", [queue_id])]


@pytest.mark.parametrize("verb,expected", [
    (b"NOOP", b"250 2.0.0 Ok\r\n"),
    (b"RSET", b"250 2.0.0 Ok\r\n"),
    (b"VRFY root", b"252 2.5.2 Cannot VRFY user; send some mail and find out\r\n"),
    (b"EXPN staff", b"502 5.5.1 Error: EXPN not available\r\n"),
    (b"HELP", b"214-2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY\r\n"
              b"214 2.0.0 End of HELP info\r\n"),
    (b"STARTTLS", b"502 5.5.1 Error: command not implemented\r\n"),
    (b"XYZZY", b"500 5.5.2 Error: command not recognized\r\n"),
])
def test_small_commands(tmp_path, verb, expected):
    smtp, _ = make_session(tmp_path)
    assert smtp.feed(verb + b"\r\n") == expected


def test_sequence_errors(tmp_path):
    smtp, _ = make_session(tmp_path)
    transcript(smtp, [
        (b"MAIL FROM:<a@example.net>\r\n", b"503 5.5.1 Error: send HELO/EHLO first\r\n"),
        (b"RCPT TO:<a@example.org>\r\n", b"503 5.5.1 Error: need MAIL command\r\n"),
        (b"DATA\r\n", b"503 5.5.1 Error: need RCPT command\r\n"),
        (b"HELO\r\n", b"501 5.5.4 Syntax: HELO hostname\r\n"),
        (b"EHLO a.example\r\n", re.compile(rb"^250-")),
        (b"MAIL FROM:<a@example.net>\r\n", b"250 2.1.0 Ok\r\n"),
        (b"MAIL FROM:<a@example.net>\r\n", b"503 5.5.1 Error: nested MAIL command\r\n"),
        (b"DATA\r\n", b"554 5.5.1 Error: no valid recipients\r\n"),
        (b"RSET\r\n", b"250 2.0.0 Ok\r\n"),
        (b"RCPT TO:<a@example.org>\r\n", b"503 5.5.1 Error: need MAIL command\r\n"),
    ])
    nothing_spooled(tmp_path)


# -- framing: only CRLF ends a line -----------------------------------------

@pytest.mark.parametrize("sent", [
    b"HELO a.example\n",
    b"HELO a.example\rMAIL FROM:<a@b.example>\r\n",
    b"HELO a\nexample\r\n",
    b"\n",
    b"\r\r\n",
])
def test_bare_lf_or_cr_in_a_command_closes_the_session(tmp_path, sent):
    smtp, log = make_session(tmp_path)
    assert smtp.feed(sent) == b"554 5.5.2 Error: bare CR or LF received; only CRLF ends a line\r\n"
    assert smtp.closed and smtp.feed(b"QUIT\r\n") == b""
    assert any("bare CR or LF" in r for r in log.reasons())


SMUGGLING = [
    b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\n", b"\n.\r",
    b"\r.\r\n", b"\r\n.\r\r\n", b"\n\n.\n\n", b"\r\n.\n\r\n", b"\r\n\n.\r\n",
]


@pytest.mark.parametrize("marker", SMUGGLING, ids=lambda m: repr(m)[2:-1])
@pytest.mark.parametrize("bytewise", [False, True], ids=["one-write", "byte-by-byte"])
def test_smuggled_end_of_data_spools_nothing(tmp_path, marker, bytewise):
    smtp, log = make_session(tmp_path)
    open_data(smtp)
    attack = (b"Subject: innocent\r\n\r\nhello" + marker +
              b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<victim@example.org>\r\n"
              b"DATA\r\nSubject: forged\r\n\r\nforged\r\n.\r\n")
    if bytewise:
        replies = b"".join(smtp.feed(attack[i:i + 1]) for i in range(len(attack)))
    else:
        replies = smtp.feed(attack)
    assert replies == b"554 5.5.2 Error: bare CR or LF received; only CRLF ends a line\r\n"
    assert smtp.closed
    nothing_spooled(tmp_path)
    assert any("bare CR or LF" in r for r in log.reasons())


def test_bare_cr_or_lf_inside_message_text_spools_nothing(tmp_path):
    for text in (b"a\rb\r\n.\r\n", b"a\nb\r\n.\r\n", b"ok\r\n\n.\r\n"):
        root = tmp_path / repr(text)[2:12].replace("\\", "_")
        smtp, _ = make_session(root)
        open_data(smtp)
        assert smtp.feed(text).startswith(b"554 5.5.2 ")
        nothing_spooled(root)


def test_crlf_dot_crlf_split_across_writes_still_ends_the_message(tmp_path):
    smtp, _ = make_session(tmp_path)
    open_data(smtp)
    for piece in (b"line\r", b"\n.", b"\r", b"\n"):
        reply = smtp.feed(piece)
    assert QUEUED.match(reply)


# -- NUL and length limits --------------------------------------------------

def test_nul_in_command_is_refused(tmp_path):
    smtp, log = make_session(tmp_path)
    assert smtp.feed(b"HELO a\0b.example\r\n") == b"500 5.5.2 Error: NUL in command\r\n"
    assert "NUL byte in command" in log.reasons()


def test_nul_in_message_refuses_the_message(tmp_path):
    smtp, log = make_session(tmp_path)
    open_data(smtp)
    assert smtp.feed(b"a\0b\r\n") == b""
    assert smtp.feed(b".\r\n") == b"554 5.6.0 Error: NUL in message\r\n"
    nothing_spooled(tmp_path)
    assert "NUL byte in message" in log.reasons()
    assert not smtp.closed and smtp.feed(b"NOOP\r\n") == b"250 2.0.0 Ok\r\n"


def test_command_of_512_octets_passes_and_513_is_refused(tmp_path):
    smtp, log = make_session(tmp_path)
    exact = b"NOOP " + b"x" * (512 - 7) + b"\r\n"
    assert len(exact) == 512 and smtp.feed(exact) == b"250 2.0.0 Ok\r\n"
    over = b"NOOP " + b"x" * (513 - 7) + b"\r\n"
    assert len(over) == 513
    assert smtp.feed(over) == b"500 5.5.2 Error: command line too long\r\n"
    assert not smtp.closed and smtp.feed(b"NOOP\r\n") == b"250 2.0.0 Ok\r\n"
    assert any("command line over 512" in r for r in log.reasons())


def test_huge_command_in_pieces_is_refused_once_and_memory_stays_bounded(tmp_path):
    smtp, _ = make_session(tmp_path)
    replies = b"".join(smtp.feed(b"x" * 4096) for _ in range(64))
    assert replies == b"500 5.5.2 Error: command line too long\r\n"
    assert smtp.splitter.pending() < session.COMMAND_LIMIT
    assert smtp.feed(b"\r\n") == b""            # the tail of the long line
    assert smtp.feed(b"NOOP\r\n") == b"250 2.0.0 Ok\r\n"


def test_text_line_of_1000_octets_passes_and_1001_is_refused(tmp_path):
    smtp, _ = make_session(tmp_path)
    open_data(smtp)
    line = b"y" * 998 + b"\r\n"
    assert QUEUED.match(smtp.feed(line + b".\r\n"))
    assert len(spooled(tmp_path)[0]) == 1
    open_data(smtp)
    long_line = b"z" * 999 + b"\r\n"
    assert len(long_line) == 1001
    assert smtp.feed(long_line + b".\r\n") == b"500 5.5.2 Error: message line over 1000 octets\r\n"
    queue, tmp = spooled(tmp_path)
    assert len(queue) == 1 and tmp == []


# -- pipelining and talking out of turn -----------------------------------

def test_talk_before_the_banner_is_refused(tmp_path):
    smtp, log = make_session(tmp_path, greet=False)
    assert smtp.feed(b"EHLO early.example\r\n") == (
        b"554 5.5.0 Protocol error: talked before the greeting\r\n")
    assert smtp.closed
    assert "talked before the banner" in log.reasons()
    smtp, _ = make_session(tmp_path / "b", greet=False)
    assert smtp.pregreet().startswith(b"554 ") and smtp.closed


def test_pipelined_commands_without_the_extension_are_refused(tmp_path):
    smtp, log = make_session(tmp_path)
    assert smtp.feed(b"EHLO a.example\r\n")[:4] == b"250-"
    reply = smtp.feed(b"MAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\n")
    assert reply == (b"250 2.1.0 Ok\r\n"
                     b"554 5.5.0 Error: improper pipelining: wait for each reply\r\n")
    assert smtp.closed
    assert any("improper pipelining" in r for r in log.reasons())


def test_message_text_sent_with_data_command_is_refused(tmp_path):
    smtp, _ = make_session(tmp_path)
    transcript(smtp, [(b"EHLO a.example\r\n", re.compile(rb"^250-")),
                      (b"MAIL FROM:<a@example.net>\r\n", b"250 2.1.0 Ok\r\n"),
                      (b"RCPT TO:<b@example.org>\r\n", b"250 2.1.5 Ok\r\n")])
    reply = smtp.feed(b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
    assert reply.endswith(b"554 5.5.0 Error: improper pipelining: wait for each reply\r\n")
    nothing_spooled(tmp_path)


def test_command_sent_with_the_end_of_data_spools_nothing(tmp_path):
    smtp, _ = make_session(tmp_path)
    open_data(smtp)
    assert smtp.feed(b"body\r\n.\r\nQUIT\r\n") == (
        b"554 5.5.0 Error: improper pipelining: wait for each reply\r\n")
    nothing_spooled(tmp_path)


# -- limits ---------------------------------------------------------------

def test_more_than_maxrecip_recipients_get_452(tmp_path):
    smtp, log = make_session(tmp_path, maxrecip=3)
    transcript(smtp, [(b"EHLO a.example\r\n", re.compile(rb"^250-")),
                      (b"MAIL FROM:<a@example.net>\r\n", b"250 2.1.0 Ok\r\n")]
               + [(b"RCPT TO:<u%d@example.org>\r\n" % n, b"250 2.1.5 Ok\r\n") for n in range(3)]
               + [(b"RCPT TO:<u9@example.org>\r\n", b"452 4.5.3 Error: too many recipients\r\n"),
                  (b"DATA\r\n", re.compile(rb"^354 ")),
                  (b"x\r\n.\r\n", QUEUED)])
    name = spooled(tmp_path)[0][0]
    envelope, _ = spool.read_message(os.path.join(tmp_path, spool.QUEUE, name))
    assert envelope["rcpt"] == ["u0@example.org", "u1@example.org", "u2@example.org"]
    assert "more than maxrecip recipients" in log.reasons()


def test_size_parameter_over_maxbytes_gets_552(tmp_path):
    smtp, log = make_session(tmp_path, maxbytes=2000)
    transcript(smtp, [
        (b"EHLO a.example\r\n", re.compile(rb"^250-")),
        (b"MAIL FROM:<a@example.net> SIZE=2001\r\n",
         b"552 5.3.4 Error: message size exceeds fixed limit\r\n"),
        (b"MAIL FROM:<a@example.net> SIZE=99999999999999999999999\r\n",
         b"552 5.3.4 Error: message size exceeds fixed limit\r\n"),
        (b"MAIL FROM:<a@example.net> SIZE=lots\r\n", b"501 5.5.4 Syntax: SIZE=octets\r\n"),
        (b"MAIL FROM:<a@example.net> SIZE=2000 BODY=8BITMIME\r\n", b"250 2.1.0 Ok\r\n"),
    ])
    assert any("over maxbytes" in r for r in log.reasons())


def test_mail_parameters_need_ehlo(tmp_path):
    smtp, _ = make_session(tmp_path)
    transcript(smtp, [(b"HELO a.example\r\n", b"250 mx.example.org\r\n"),
                      (b"MAIL FROM:<a@example.net> SIZE=10\r\n",
                       b"555 5.5.4 Error: parameters need EHLO\r\n")])


def test_real_size_over_maxbytes_gets_552_and_spools_nothing(tmp_path):
    smtp, log = make_session(tmp_path, maxbytes=2000)
    open_data(smtp)
    for _ in range(30):
        assert smtp.feed(b"x" * 98 + b"\r\n") == b""
    assert smtp.feed(b".\r\n") == b"552 5.3.4 Error: message size exceeds fixed limit\r\n"
    nothing_spooled(tmp_path)
    assert "message over maxbytes" in log.reasons()


def test_ten_bad_commands_end_the_session_with_421(tmp_path):
    smtp, log = make_session(tmp_path)
    for _ in range(9):
        assert smtp.feed(b"BOGUS\r\n") == b"500 5.5.2 Error: command not recognized\r\n"
    assert smtp.feed(b"BOGUS\r\n") == (b"500 5.5.2 Error: command not recognized\r\n"
                                      b"421 4.7.0 mx.example.org Error: too many errors\r\n")
    assert smtp.closed


def test_idle_timeout_gives_421_and_throws_away_half_a_message(tmp_path):
    smtp, log = make_session(tmp_path)
    open_data(smtp)
    smtp.feed(b"half a message\r\n")
    assert spooled(tmp_path)[1] != []        # it lives in tmp/ only
    assert smtp.timeout() == b"421 4.4.2 mx.example.org Error: timeout exceeded\r\n"
    assert smtp.closed
    nothing_spooled(tmp_path)
    assert "idle past timeout" in log.reasons()


def test_client_gone_mid_data_leaves_nothing(tmp_path):
    smtp, log = make_session(tmp_path)
    open_data(smtp)
    smtp.feed(b"half\r\n")
    smtp.eof()
    nothing_spooled(tmp_path)
    assert "connection closed during DATA" in log.reasons()


# -- addresses and relaying -----------------------------------------------

@pytest.mark.parametrize("command,reply_start", [
    (b"MAIL FROM:<-oQ/tmp/x@example.net>", b"553 5.1.7 "),
    (b"MAIL FROM:<|/bin/sh@example.net>", b"553 5.1.7 "),
    (b"MAIL FROM:</etc/passwd>", b"553 5.1.7 "),
    (b"MAIL FROM:<@hop.example:a@example.net>", b"553 5.1.7 "),
    (b"MAIL FROM:<a%b@example.net>", b"553 5.1.7 "),
    (b"MAIL FROM:<host!a@example.net>", b"553 5.1.7 "),
    (b'MAIL FROM:<" -oQ/tmp"@b.org>',
     b"553 5.1.7 Error: bad sender address: local part starts with -"),
    (b'MAIL FROM:<" "@b.org>', b"553 5.1.7 Error: bad sender address: empty local part"),
    (b"MAIL FROM:<u@b.org..>", b"553 5.1.7 Error: bad sender address: empty label in domain"),
    (b"MAIL FROM:a@example.net", b"501 5.5.4 "),
])
def test_bad_sender_addresses(tmp_path, command, reply_start):
    smtp, log = make_session(tmp_path)
    smtp.feed(b"EHLO a.example\r\n")
    assert smtp.feed(command + b"\r\n").startswith(reply_start)
    assert log.reasons()


@pytest.mark.parametrize("rcpt", [
    b"-oQ/tmp@example.org", b"|/bin/sh@example.org", b"/etc/passwd@example.org",
    b"\"|/bin/sh\"@example.org", b"\"-X/tmp/log\"@example.org",
    b"@hop.example,@other.example:user@example.org", b"user%elsewhere.example@example.org",
    b"elsewhere!user@example.org", b"user@example.org@elsewhere.example",
    b"user\x01@example.org",
    b'" |/bin/sh"@example.org', b'"  -oQ/tmp"@example.org', b'" "@example.org',
    b"u@example.org..", b"u@example..org", b"u@.example.org", b"u@example.org.",
])
def test_bad_recipient_addresses_get_553(tmp_path, rcpt):
    smtp, log = make_session(tmp_path, relay_ok=True)
    smtp.feed(b"EHLO a.example\r\n")
    smtp.feed(b"MAIL FROM:<a@example.net>\r\n")
    assert smtp.feed(b"RCPT TO:<" + rcpt + b">\r\n").startswith(b"553 5.1.3 Error: bad recipient")
    assert any(r.startswith("recipient ") for r in log.reasons())


def test_outside_host_may_only_send_to_the_accepted_domains(tmp_path):
    smtp, log = make_session(tmp_path, relay_ok=False)
    transcript(smtp, [
        (b"EHLO a.example\r\n", re.compile(rb"^250-")),
        (b"MAIL FROM:<a@example.net>\r\n", b"250 2.1.0 Ok\r\n"),
        (b"RCPT TO:<victim@foreign.example>\r\n",
         b"554 5.7.1 <victim@foreign.example>: Relay access denied\r\n"),
        (b"RCPT TO:<user@example.org>\r\n", b"250 2.1.5 Ok\r\n"),
        (b"RCPT TO:<user@Sales.EXAMPLE.org>\r\n", b"250 2.1.5 Ok\r\n"),
        (b"RCPT TO:<user@notexample.org>\r\n",
         b"554 5.7.1 <user@notexample.org>: Relay access denied\r\n"),
        (b"RCPT TO:<user@[192.0.2.1]>\r\n",
         b"554 5.7.1 <user@[192.0.2.1]>: Relay access denied\r\n"),
    ])
    assert "relay denied to=<victim@foreign.example>" in log.reasons()


def test_permit_relay_host_may_send_anywhere(tmp_path):
    smtp, _ = make_session(tmp_path, relay_ok=True, accept_domains=())
    open_data(smtp, rcpt=b"friend@foreign.example")
    assert QUEUED.match(smtp.feed(b"hi\r\n.\r\n"))


def test_postmaster_without_domain_is_always_accepted(tmp_path):
    smtp, _ = make_session(tmp_path, relay_ok=False, accept_domains=())
    transcript(smtp, [
        (b"EHLO a.example\r\n", re.compile(rb"^250-")),
        (b"MAIL FROM:<>\r\n", b"250 2.1.0 Ok\r\n"),
        (b"RCPT TO:<Postmaster>\r\n", b"250 2.1.5 Ok\r\n"),
        (b"RCPT TO:<postmaster@foreign.example>\r\n",
         b"554 5.7.1 <postmaster@foreign.example>: Relay access denied\r\n"),
        (b"DATA\r\n", re.compile(rb"^354 ")),
        (b"bounce\r\n.\r\n", QUEUED),
    ])
    name = spooled(tmp_path)[0][0]
    envelope, _ = spool.read_message(os.path.join(tmp_path, spool.QUEUE, name))
    assert envelope["rcpt"] == ["Postmaster"] and envelope["sender"] == ""


def test_unknown_peer_is_named_unknown_in_received_header(tmp_path):
    smtp, _ = make_session(tmp_path, peer=hostmatch.Peer())
    open_data(smtp)
    assert QUEUED.match(smtp.feed(b"x\r\n.\r\n"))
    name = spooled(tmp_path)[0][0]
    envelope, message = spool.read_message(os.path.join(tmp_path, spool.QUEUE, name))
    assert message.startswith(b"Received: from client.example.net (unknown [unknown])")
    assert envelope["client-addr"] == "unknown"


# -- the full disk ----------------------------------------------------------

@pytest.mark.parametrize("where", ["write", "commit"])
def test_full_disk_gives_452_and_leaves_nothing(tmp_path, where):
    smtp, log = make_session(tmp_path, writer_factory=full_disk_writer(where))
    open_data(smtp)
    reply = smtp.feed(b"Subject: x\r\n\r\n" + b"text\r\n" * 50 + b".\r\n")
    assert reply == b"452 4.3.1 Error: insufficient system storage\r\n"
    nothing_spooled(tmp_path)
    assert any("No space left" in (r or "") for r in log.reasons())
    assert not smtp.closed and smtp.feed(b"NOOP\r\n") == b"250 2.0.0 Ok\r\n"


def test_full_disk_at_data_gives_452(tmp_path):
    smtp, _ = make_session(tmp_path, writer_factory=full_disk_writer("open"))
    transcript(smtp, [(b"EHLO a.example\r\n", re.compile(rb"^250-")),
                      (b"MAIL FROM:<a@example.net>\r\n", b"250 2.1.0 Ok\r\n"),
                      (b"RCPT TO:<b@example.org>\r\n", b"250 2.1.5 Ok\r\n"),
                      (b"DATA\r\n", b"452 4.3.1 Error: insufficient system storage\r\n")])
    nothing_spooled(tmp_path)


def test_failed_directory_fsync_gives_451_and_takes_the_file_back(tmp_path, monkeypatch):
    def broken(path):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    monkeypatch.setattr(spool, "fsync_dir", broken)
    smtp, _ = make_session(tmp_path)
    open_data(smtp)
    assert smtp.feed(b"x\r\n.\r\n") == b"451 4.3.0 Error: local error in processing\r\n"
    nothing_spooled(tmp_path)


def test_unstuff_helper_matches_rfc_5321_section_4_5_2():
    assert unstuff(b"..a\r\n.\r\nb\r\n") == b".a\r\n\r\nb\r\n"
    assert HOSTNAME == "mx.example.org"

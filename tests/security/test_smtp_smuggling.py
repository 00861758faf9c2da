"""SMTP smuggling (CVE-2023-51764/51765/51766 and the SEC Consult advisory
of December 2023) against the real smap, as inetd hands it a socket.

An attacker ends the DATA of message 1 with a non-standard end-of-data
sequence and follows it with the commands of a second, forged message.  A
receiver that takes the odd sequence for the end of the data spools two
messages; one that does not (but forwards the odd sequence) lets the next
hop split them.  smap must do neither: the first bare CR or LF anywhere
ends the session with a 5xx, and nothing at all reaches queue/ (nor stays
in tmp/).  Each variant is tried with the smuggled commands pipelined in the
same write and sent after a pause, and each is also tried at the start of
the message (no preceding text line).
"""

import time

import pytest

from tests.security.harness import SmapSetup, queue_id_of, send_message

# The end-of-data variants of the 2023 advisories (and their mirror images).
VARIANTS = {
    "LF.LF": b"\n.\n",
    "CR.CR": b"\r.\r",
    "LF.CRLF": b"\n.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "CRLF.CR": b"\r\n.\r",
    "CR.LF": b"\r.\n",
    "LF.CR": b"\n.\r",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.CR-then-text": b"\r\n.\rX",
}

SMUGGLED = (b"MAIL FROM:<admin@example.com>\r\n"
            b"RCPT TO:<victim@example.com>\r\n"
            b"DATA\r\n"
            b"From: admin@example.com\r\nSubject: smuggled\r\n\r\nsmuggled\r\n"
            b".\r\n")


@pytest.fixture
def smap(tmp_path):
    setup = SmapSetup(tmp_path)
    yield setup
    setup.stop()


def open_data(client):
    assert client.reply()[0] == 220
    assert client.cmd("EHLO attacker.example.org")[0] == 250
    assert client.cmd("MAIL FROM:<attacker@example.org>")[0] == 250
    assert client.cmd("RCPT TO:<victim@example.com>")[0] == 250
    assert client.cmd("DATA")[0] == 354


def assert_refused_and_closed(smap, client):
    code, text = client.reply()
    assert 500 <= code < 600, text
    assert client.closed_by_server(10), "smap kept the connection open"
    assert smap.wait_exit(client) == 0
    assert smap.queued() == [], "a smuggled message reached the queue"
    assert smap.tmp_files() == [], "a partial message stayed in tmp/"
    smap.logs.wait_for("bare CR or LF")


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "paused"])
def test_smuggled_end_of_data_is_refused(smap, name, pipelined):
    client = smap.inetd()
    open_data(client)
    first = b"From: attacker@example.org\r\nSubject: one\r\n\r\nbody line"
    if pipelined:
        client.send(first + VARIANTS[name] + SMUGGLED)
    else:
        client.send(first + VARIANTS[name])
        time.sleep(0.2)
        try:
            client.send(SMUGGLED)
        except OSError:
            pass                # smap may already have closed: that is fine
    assert_refused_and_closed(smap, client)


@pytest.mark.parametrize("name", ["LF.LF", "CR.CR", "CR.LF", "LF.CR"])
def test_smuggled_end_of_data_as_first_data_line(smap, name):
    # The sequence right after the 354 (the message starts with it).
    client = smap.inetd()
    open_data(client)
    client.send(VARIANTS[name][1:] + SMUGGLED)
    assert_refused_and_closed(smap, client)


def test_bare_lf_in_a_command_is_refused(smap):
    client = smap.inetd()
    assert client.reply()[0] == 220
    client.send(b"EHLO a\nMAIL FROM:<x@example.org>\r\n")
    assert_refused_and_closed(smap, client)


def test_nul_before_end_of_data_spools_nothing(smap):
    # ".\0" is not an end of data; the final CRLF.CRLF then ends a message
    # that holds a NUL: refused with a 5xx, nothing queued.
    client = smap.inetd()
    open_data(client)
    client.send(b"Subject: x\r\n\r\nbody\r\n.\0\r\n" + b"more\r\n.\r\n")
    code, text = client.reply()
    assert code == 554, text
    assert smap.queued() == []
    assert client.cmd("QUIT")[0] == 221
    assert smap.wait_exit(client) == 0
    assert smap.tmp_files() == []


def test_pipelined_commands_after_a_good_end_of_data_spool_nothing(smap):
    # No PIPELINING extension: a second transaction sent behind CRLF.CRLF
    # in the same write is refused and the first message is not spooled.
    client = smap.inetd()
    open_data(client)
    client.send(b"Subject: one\r\n\r\nbody\r\n.\r\n" + SMUGGLED)
    code, text = client.reply()
    assert code == 554 and "pipelining" in text, text
    assert client.closed_by_server(10)
    assert smap.wait_exit(client) == 0
    assert smap.queued() == [] and smap.tmp_files() == []


def test_pipelined_data_before_354_is_refused(smap):
    client = smap.inetd()
    assert client.reply()[0] == 220
    assert client.cmd("EHLO a.example.org")[0] == 250
    client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<v@example.com>\r\nDATA\r\n"
                b"Subject: x\r\n\r\nbody\r\n.\r\n")
    codes = []
    while not codes or codes[-1] < 500:
        codes.append(client.reply()[0])
    # MAIL may be answered before smap sees the rest; DATA never is.
    assert codes[-1] == 554 and 354 not in codes, codes
    assert client.closed_by_server(10)
    assert smap.queued() == []


def test_control_a_proper_message_with_dot_lines_is_spooled_whole(smap):
    # The positive control: the same client and the standard sequence spool
    # exactly one message, dot-unstuffed, so the refusals above are real.
    client = smap.inetd()
    body = (b"From: a@example.org\r\nSubject: dots\r\n\r\n"
            b"..\r\n...\r\n. x\r\nlast\r\n")
    code, text = send_message(client, "a@example.org", ["v@example.com"], body)
    assert code == 250, text
    queue_id = queue_id_of(text)
    assert smap.queued() == [queue_id]
    envelope, message = smap.message(queue_id)
    assert envelope["rcpt"] == ["v@example.com"]
    assert message.endswith(b"\r\n\r\n.\r\n..\r\n x\r\nlast\r\n")
    assert client.cmd("QUIT")[0] == 221


def test_every_variant_through_smap_daemon(smap):
    # The same attack through `smap --daemon`: its children run the inetd path.
    _, port = smap.daemon()
    for name, variant in sorted(VARIANTS.items()):
        client = smap.connect(port)
        open_data(client)
        client.send(b"Subject: one\r\n\r\nbody" + variant + SMUGGLED)
        code, text = client.reply()
        assert 500 <= code < 600, (name, text)
        assert client.closed_by_server(10), name
    assert smap.queued() == [] and smap.tmp_files() == []

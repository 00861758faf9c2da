"""Real delivery: the real smap spools, smapd hands over to Debian's Postfix
(a private instance, loopback only), Postfix relays to smtp-sink.

What smap accepted must arrive byte-identical apart from the added
Received: headers: lines "." and "..", an 8-bit body, a 5 MB message and
a message to 100 recipients.  `grep id=ID` follows each message from smap
through smapd in the real syslog daemon's file.
"""

import pytest

from common import spool
from tests.integration import smapd_helpers as helpers

pytestmark = pytest.mark.integration


def message(subject, body, message_id):
    return (b"From: Alice <alice@example.net>\r\nTo: list@example.org\r\n"
            b"Subject: " + subject + b"\r\nDate: Sat, 28 Nov 2026 09:00:00 +0000\r\n"
            b"Message-ID: <" + message_id + b">\r\n\r\n" + body)


def only_received_headers(prefix):
    """Whether prefix (LF lines) is nothing but Received: fields."""
    for line in prefix.split(b"\n"):
        if line and not line.startswith(b"Received: ") and line[:1] not in (b" ", b"\t"):
            return False
    return True


def test_real_delivery_through_postfix(tmp_path, postfix, smtp_sink, rsyslog):
    directory = helpers.make_spool(tmp_path / "spool")
    table = helpers.write_table(tmp_path / "table", directory,
                                sendmail=postfix.sendmail_argv() + ["-bm"],
                                logsocket=rsyslog.socket)
    dots = message(b"dots and 8 bits", b"first\r\n.\r\n..\r\n...\r\n.x\r\n"
                   b"caf\xc3\xa9 \xe9t\xe9 \xff\x80\r\n\r\n \r\nlast\r\n", b"dots@example.net")
    line = b"0123456789" * 7 + b"abcdef\r\n"
    big = message(b"five megabytes", line * (5 * 1024 * 1024 // len(line) + 1), b"big@example.net")
    many = message(b"a hundred recipients", b"hello all\r\n", b"many@example.net")
    recipients = ["r%03d@example.org" % n for n in range(100)]
    sent = {
        b"dots@example.net": (["bob@example.org"], dots),
        b"big@example.net": (["carol@example.org"], big),
        b"many@example.net": (recipients, many),
    }
    ids = {}
    for key, (rcpts, data) in sent.items():
        ids[key] = helpers.smap_submit(table, "alice@example.net", rcpts, data)
    assert len(spool.queued(str(directory))) == 3

    result = helpers.run_once(table, timeout=180)
    assert result.returncode == 0, result.stderr
    assert spool.queued(str(directory)) == []
    postfix.wait_queue_empty(120)

    # Postfix splits 100 recipients into transactions of at most 50
    dumps = smtp_sink.wait_count(4, timeout=120)
    by_message = {}
    for dump in dumps:
        [message_id] = dump.header("Message-ID")
        by_message.setdefault(message_id.strip(b"<>"), []).append(dump)
    assert set(by_message) == set(sent)
    for key, (rcpts, data) in sent.items():
        got = by_message[key]
        assert sorted(r for dump in got for r in dump.rcpt_to) == sorted(rcpts)
        original = data.replace(b"\r\n", b"\n")
        for dump in got:
            assert dump.mail_from == "alice@example.net"
            assert dump.data.endswith(original), key
            prefix = dump.data[:-len(original)]
            assert only_received_headers(prefix), prefix
            # smap's Received: (naming the queue id) and Postfix's own
            assert ids[key].encode() in prefix and prefix.count(b"Received: ") == 2

    # grep id=ID follows every message from smap through smapd
    log = rsyslog.read().splitlines()
    for message_id in ids.values():
        mine = [entry for entry in log if "id=%s" % message_id in entry]
        assert any(" smap[" in entry and " message " in entry for entry in mine), mine
        assert any(" smapd[" in entry and " delivered " in entry for entry in mine), mine
        assert any(" smapd[" in entry and " done " in entry for entry in mine), mine

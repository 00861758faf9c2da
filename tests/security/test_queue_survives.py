"""One message can never stop the queue (issue 11, finding 4).

The attack: an MTA that fails with a non-ASCII byte on stderr
(`Empfänger unbekannt`, in UTF-8 or as a raw Latin-1 0xE4), or a spool
file whose arrival time is `nan`, made the scanner die while it built the
bounce; the message kept no state, so every restart ran the MTA again and
died again, and nothing behind it was delivered.  Here the real smapd runs
as root (chrooted scanner, agent as uucp) with a stand-in MTA, and each
test asserts what the MTA received and what is left in the spool:

* a failure whose diagnostic carries any bytes is bounced, the bounce is a
  readable 7-bit message that carries the diagnostic, bounded, and a good
  message in the same queue is delivered in the same run;
* a spool file with a number that is not finite or out of range (`arrival
  nan`, `inf`, `-1e309`, a huge `size`) is quarantined with its reason, and
  the good message is delivered in the same run;
* a delivery state whose next try is not a finite time is taken as no
  state: the message is delivered, not parked for ever.
"""

import email
import email.policy
import os
import re
import sys
import time
from pathlib import Path

import pytest

from common import spool
from tests.integration import realpeers
from tests.integration import smapd_helpers as helpers

pytestmark = pytest.mark.integration

DIAGNOSTIC_MTA = str(Path(__file__).with_name("diagnostic_mta.py"))
MESSAGE = (b"From: Alice <alice@example.net>\r\nTo: someone@example.org\r\n"
           b"Subject: caf\xc3\xa9 \xe9t\xe9\r\nMessage-ID: <m@example.net>\r\n\r\nbody\r\n")
GOOD = b"From: a@example.net\r\nTo: good@example.org\r\nSubject: good\r\n\r\nbody\r\n"


def setup_smapd(tmp_path, rsyslog, sendmail):
    realpeers.require_root()
    directory = helpers.make_spool(tmp_path / "spool")
    recorder = helpers.recorder_dir(tmp_path / "mta")
    table = helpers.write_table(tmp_path / "table", directory, sendmail=sendmail(recorder),
                                logsocket=rsyslog.socket,
                                lines=["smapd: retry 1", "smapd: deliver-timeout 20"])
    return directory, recorder, table


def runs_to(recorder, recipient):
    return [(argv, data) for argv, data, _ in helpers.recorded_runs(recorder)
            if argv[argv.index("--") + 1:] == [recipient]]


def queued(directory):
    return spool.queued(str(directory))


def parts_of(data):
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    return message, list(message.iter_parts())


@pytest.fixture
def diagnostic_env(tmp_path, rsyslog):
    return setup_smapd(tmp_path, rsyslog,
                       lambda recorder: [sys.executable, DIAGNOSTIC_MTA, str(recorder)])


def test_any_bytes_on_mta_stderr_are_bounced_and_the_queue_goes_on(diagnostic_env):
    directory, recorder, table = diagnostic_env
    failing = {}
    for local in ("unknown-utf8", "unknown-latin1", "unknown-binary"):
        failing[local] = helpers.spool_message(directory, "alice@example.net",
                                               ["%s@example.org" % local], MESSAGE)
    good = helpers.spool_message(directory, "a@example.net", ["good@example.org"], GOOD)
    result = helpers.run_once(table)
    assert result.returncode == 0, result.stderr
    assert b"Traceback" not in result.stderr
    # the good message went out in the same run and is gone from the queue
    [(argv, data)] = runs_to(recorder, "good@example.org")
    assert argv == ["-oi", "-f", "a@example.net", "--", "good@example.org"]
    assert good not in queued(directory)
    # every failing one was settled: not in the queue, not quarantined, no state left
    for local, message_id in failing.items():
        assert message_id not in queued(directory), local
        assert not (directory / spool.BAD / message_id).exists(), local
        assert not (directory / spool.STATE / message_id).exists(), local
    # ... and bounced to the sender, each bounce a readable 7-bit report
    bounces = runs_to(recorder, "alice@example.net")
    assert len(bounces) == 3
    texts = {}
    for argv, data in bounces:
        assert argv[:4] == ["-oi", "-f", "", "--"]
        assert all(byte < 128 for byte in data), "bounce is not 7-bit"
        assert max(len(line) for line in data.split(b"\n")) <= 998
        message, parts = parts_of(data)
        assert message["X-Mailwall-Notice"] == "bounce"
        text = parts[0].get_content()
        status = parts[1].get_payload()[1]
        assert status["Action"] == "failed" and status["Status"] == "5.1.1"
        recipient = status["Final-Recipient"].split("; ", 1)[1]
        texts[recipient.split("@")[0]] = (text, str(status["Diagnostic-Code"]))
        assert "Message-ID: <m@example.net>" in parts[2].get_content()
    text, code = texts["unknown-utf8"]
    assert "Empfänger unbekannt" in text, text
    assert "EX_NOUSER" in code and "nger unbekannt" in code, code
    text, code = texts["unknown-latin1"]
    # the raw byte is kept, visibly, not dropped or turned into an error
    assert re.search(r"Empf\\xe4nger unbekannt", text), text
    assert "nger unbekannt" in code, code
    text, code = texts["unknown-binary"]
    assert "\x1b" not in text and "\x00" not in text and "\x7f" not in text
    assert len(text) < 2000 and len(code) < 600          # bounded, whatever the MTA wrote
    assert "Empf" in text


def write_raw(directory, recipients, arrival="1", extra=()):
    """A spool file in the real format with chosen envelope values, past smap."""
    message_id = spool.new_id()
    envelope = ["MAILWALL-SPOOL 1", "id %s" % message_id, "arrival %s" % arrival,
                "client-addr 192.0.2.1", "client-name unknown", "helo x",
                "sender a@example.net"]
    envelope += ["rcpt %s" % r for r in recipients] + list(extra)
    raw = ("\n".join(envelope) + "\n\n").encode() + MESSAGE + b"\nMAILWALL-END %d\n" % len(MESSAGE)
    return helpers.spool_message(directory, None, None, None, message_id, raw=raw)


@pytest.fixture
def recording_env(tmp_path, rsyslog):
    return setup_smapd(tmp_path, rsyslog, helpers.recording_sendmail)


NUMBERS = {
    "arrival nan": ("nan", ()), "arrival inf": ("inf", ()), "arrival -inf": ("-inf", ()),
    "arrival -1e309": ("-1e309", ()), "arrival 1e309": ("1e309", ()),
    "arrival negative": ("-5", ()), "arrival far future": ("1e300", ()),
    "size huge": ("1", ("size " + "9" * 400,)), "size nan": ("1", ("size nan",)),
    "size negative": ("1", ("size -1",)), "size 1e309": ("1", ("size 1e309",)),
}


def test_spool_numbers_that_are_not_finite_or_in_range_are_quarantined(recording_env):
    directory, recorder, table = recording_env
    hostile = {}
    for name, (arrival, extra) in NUMBERS.items():
        # a permanent and a temporary failure: both paths read the arrival time
        hostile[write_raw(directory, ["exit67@example.org"], arrival, extra)] = name
        hostile[write_raw(directory, ["exit75@example.org"], arrival, extra)] = name
    good = helpers.spool_message(directory, "a@example.net", ["good@example.org"], GOOD)
    result = helpers.run_once(table)
    assert result.returncode == 0, result.stderr
    assert b"Traceback" not in result.stderr
    assert runs_to(recorder, "good@example.org") and good not in queued(directory)
    for message_id, name in hostile.items():
        assert message_id not in queued(directory), name
        assert (directory / spool.BAD / message_id).exists(), "%s not quarantined" % name
        reason = (directory / spool.BAD / (message_id + ".reason")).read_text()
        assert name.split()[0] in reason, (name, reason)
    # nothing hostile reached the MTA; the postmaster heard of each one
    everyone = [argv[argv.index("--") + 1:] for argv, _, _ in helpers.recorded_runs(recorder)]
    assert sorted(map(tuple, everyone)) == sorted(
        [("good@example.org",)] + [("postmaster",)] * len(hostile))


@pytest.mark.parametrize("next_try", ["inf", "nan", "1e309", "-inf"])
def test_state_with_a_next_try_that_is_no_time_is_no_state(recording_env, next_try):
    directory, recorder, table = recording_env
    message_id = helpers.spool_message(directory, "a@example.net", ["good@example.org"], GOOD)
    path = directory / spool.STATE / message_id
    path.write_text("attempts 1\nnext-try %s\n" % next_try)
    uid, gid = helpers.uucp_ids()
    os.chown(path, uid, gid)
    result = helpers.run_once(table)
    assert result.returncode == 0, result.stderr
    assert runs_to(recorder, "good@example.org"), "parked by next-try %s" % next_try
    assert message_id not in queued(directory)


def test_a_fifo_as_delivery_state_does_not_hang_the_scanner(recording_env):
    # the spool is uucp's: a FIFO (or a link) where a state file belongs
    # must read as no state, not block the scanner for ever
    directory, recorder, table = recording_env
    message_id = helpers.spool_message(directory, "a@example.net", ["good@example.org"], GOOD)
    path = directory / spool.STATE / message_id
    os.mkfifo(path, 0o600)
    uid, gid = helpers.uucp_ids()
    os.chown(path, uid, gid)
    result = helpers.run_once(table, timeout=30)
    assert result.returncode == 0, result.stderr
    assert runs_to(recorder, "good@example.org") and message_id not in queued(directory)


def test_an_entry_that_cannot_be_swept_does_not_stop_the_queue(recording_env):
    # a stale directory in tmp/ cannot be unlinked; the sweep at the first
    # scan raised and smapd died at every start
    directory, recorder, table = recording_env
    stale = directory / spool.TMP / "0123456789ABCDEF"
    stale.mkdir()
    (stale / "x").write_bytes(b"")
    old = time.time() - 3 * 86400
    os.utime(stale, (old, old))
    good = helpers.spool_message(directory, "a@example.net", ["good@example.org"], GOOD)
    result = helpers.run_once(table)
    assert result.returncode == 0, result.stderr
    assert b"Traceback" not in result.stderr
    assert runs_to(recorder, "good@example.org") and good not in queued(directory)

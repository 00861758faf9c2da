"""smapd's exit-code matrix with the recording MTA, and quarantine cases.

The recording MTA (tests/integration/recording_mta.py) is the one stand-in
here: a real MTA cannot return each sysexits code on demand.  smapd itself
runs for real, as root, so it chroots and drops to uucp.
"""

import os
import time

import pytest

from common import spool
from smapd import state
from tests.integration import realpeers
from tests.integration import smapd_helpers as helpers

pytestmark = pytest.mark.integration

MESSAGE = (b"From: Alice <alice@example.net>\r\nTo: someone@example.org\r\n"
           b"Subject: matrix\r\nMessage-ID: <m@example.net>\r\n\r\nline\r\n.\r\n..\r\n\xe9t\xe9\r\n")


@pytest.fixture
def setup(tmp_path, rsyslog):
    realpeers.require_root()
    directory = helpers.make_spool(tmp_path / "spool")
    recorder = helpers.recorder_dir(tmp_path / "mta")
    table = helpers.write_table(tmp_path / "table", directory,
                                sendmail=helpers.recording_sendmail(recorder),
                                logsocket=rsyslog.socket, lines=["smapd: retry 1", "smapd: deliver-timeout 2"])
    yield directory, recorder, table, rsyslog


def assert_every_line_has_an_id(rsyslog, ids):
    lines = [line for line in rsyslog.read().splitlines() if " smapd[" in line]
    assert lines
    for line in lines:
        event = line.split("]: ", 1)[1].split()[0]
        if event not in ("start", "stop", "agent-stop"):
            assert " id=" in line, line
    for message_id in ids:
        assert any("id=%s" % message_id in line for line in lines), message_id


def runs_to(recorder, recipient):
    return [(argv, data) for argv, data, _ in helpers.recorded_runs(recorder)
            if argv[argv.index("--") + 1:] == [recipient]]


def in_queue(directory, message_id):
    return (directory / spool.QUEUE / message_id).exists()


def test_exit_code_matrix(setup):
    directory, recorder, table, rsyslog = setup
    ids = {}
    for local in ("exit0", "exit75", "exit71", "exit74", "exit73", "exit69", "killed", "hang",
                  "exit67", "exit65"):
        ids[local] = helpers.spool_message(directory, "alice@example.net",
                                           ["%s@example.org" % local], MESSAGE)
    ids["empty-sender"] = helpers.spool_message(directory, "", ["exit67@example.net"], MESSAGE)
    notice = (b"From: MAILER-DAEMON@gw.example.org\r\nX-Mailwall-Notice: bounce\r\n"
              b"Subject: Undelivered\r\n\r\nbounce text\r\n")
    ids["bounce-of-bounce"] = helpers.spool_message(directory, "", ["exit67@example.com"], notice)
    old = time.time() - 6 * 86400    # maxage is 5 days
    ids["too-old"] = helpers.spool_message(directory, "carol@example.net",
                                           ["exit75@example.com"], MESSAGE, arrival=old)
    result = helpers.run_once(table)
    assert result.returncode == 0, result.stderr

    # 0: delivered with the exact argv, the message on stdin (LF line ends), file removed
    [(argv, data)] = runs_to(recorder, "exit0@example.org")
    assert argv == ["-oi", "-f", "alice@example.net", "--", "exit0@example.org"]
    assert data == MESSAGE.replace(b"\r\n", b"\n")
    assert not in_queue(directory, ids["exit0"])

    # temporary: kept, one attempt recorded, retried later
    now = time.time()
    for local in ("exit75", "exit71", "exit74", "exit73", "exit69", "killed", "hang"):
        assert in_queue(directory, ids[local]), local
        record = state.load(str(directory), ids[local])
        assert record.attempts == 1 and record.next_try > now - 5, local
    assert "timed out" in state.load(str(directory), ids["hang"]).last_error
    assert "signal 9" in state.load(str(directory), ids["killed"]).last_error

    # permanent: removed and bounced to the sender with a DSN carrying the header
    bounces = runs_to(recorder, "alice@example.net")
    assert len(bounces) == 2
    for argv, data in bounces:
        assert argv[:4] == ["-oi", "-f", "", "--"]
        assert b"multipart/report" in data and b"Message-ID: <m@example.net>" in data
        assert b"X-Mailwall-Notice: bounce" in data
    reported = b"".join(data for _, data in bounces)
    assert b"Final-Recipient: rfc822; exit67@example.org" in reported
    assert b"Final-Recipient: rfc822; exit65@example.org" in reported
    assert not in_queue(directory, ids["exit67"]) and not in_queue(directory, ids["exit65"])

    # empty sender: the report goes to the postmaster
    [(argv, data)] = runs_to(recorder, "postmaster")
    assert argv[:4] == ["-oi", "-f", "", "--"]
    assert b"Final-Recipient: rfc822; exit67@example.net" in data
    # too old: given up and bounced
    [(argv, data)] = runs_to(recorder, "carol@example.net")
    assert b"gave up after" in data and not in_queue(directory, ids["too-old"])

    # a bounce of a bounce never: it waits in the quarantine, nobody is mailed
    assert not in_queue(directory, ids["bounce-of-bounce"])
    assert (directory / spool.BAD / ids["bounce-of-bounce"]).exists()
    reason = (directory / spool.BAD / (ids["bounce-of-bounce"] + ".reason")).read_text()
    assert "undeliverable notice" in reason
    everyone = [argv[argv.index("--") + 1:] for argv, _, _ in helpers.recorded_runs(recorder)]
    assert sum(1 for r in everyone if r == ["postmaster"]) == 1
    assert not spool.queued(str(directory / "tmp"))

    # the retry: after `retry` seconds the temporary ones are tried again
    time.sleep(1.2)
    result = helpers.run_once(table)
    assert result.returncode == 0, result.stderr
    for local in ("exit75", "killed"):
        assert state.load(str(directory), ids[local]).attempts == 2
        assert len(runs_to(recorder, "%s@example.org" % local)) == 2
    assert_every_line_has_an_id(rsyslog, ids.values())


BAD_RECIPIENTS = ["-oQ/tmp", "|/bin/sh", "/etc/passwd"]
BROKEN = b"From: a@b\r\nno colon here\r\n\r\nbody\r\n"


def test_quarantine(setup):
    directory, recorder, table, rsyslog = setup
    good = spool.encode_envelope({"id": "AAAA0001", "arrival": "%.3f" % time.time(),
                                  "sender": "a@example.net", "rcpt": ["b@example.org"]})
    whole = good + MESSAGE + spool.END + b"%d\n" % len(MESSAGE)
    cases = {
        "truncated": whole[:-20],
        "no end marker": good + MESSAGE,
        "bad envelope": b"MAILWALL-SPOOL 1\nsender\x01 x\n\n" + MESSAGE + spool.END
                        + b"%d\n" % len(MESSAGE),
        "not a spool file": b"From: x\r\n\r\nhello\r\n",
        "unparseable header": good + BROKEN + spool.END + b"%d\n" % len(BROKEN),
    }
    expected = {"truncated": "truncated", "no end marker": "no end marker",
                "bad envelope": "envelope", "not a spool file": "no spool header",
                "unparseable header": "unparseable header",
                "-oQ/tmp": "bad recipient -oQ/tmp", "|/bin/sh": "bad recipient |/bin/sh",
                "/etc/passwd": "bad recipient /etc/passwd"}
    ids = {}
    for number, (name, raw) in enumerate(cases.items()):
        message_id = "BBBB%04d" % number
        ids[name] = helpers.spool_message(directory, None, None, None, message_id,
                                          raw=raw.replace(b"AAAA0001", message_id.encode()))
    for recipient in BAD_RECIPIENTS:
        message_id = spool.new_id()
        envelope = spool.encode_envelope({"id": message_id, "arrival": "%.3f" % time.time(),
                                          "sender": "a@example.net",
                                          "rcpt": ["ok@example.org", recipient]})
        ids[recipient] = helpers.spool_message(
            directory, None, None, None, message_id,
            raw=envelope + MESSAGE + spool.END + b"%d\n" % len(MESSAGE))
    result = helpers.run_once(table)
    assert result.returncode == 0, result.stderr
    assert spool.queued(str(directory)) == []
    for name, message_id in ids.items():
        assert (directory / spool.BAD / message_id).exists(), name
        reason = (directory / spool.BAD / (message_id + ".reason")).read_text()
        assert expected[name] in reason, (name, reason)
    runs = helpers.recorded_runs(recorder)
    # nothing reached the MTA but the notices to the postmaster
    assert len(runs) == len(ids)
    for argv, data, _ in runs:
        assert argv == ["-oi", "-f", "", "--", "postmaster"]
        assert b"quarantined" in data
    assert_every_line_has_an_id(rsyslog, ids.values())


def test_more_recipients_than_one_request_carries(setup):
    directory, recorder, table, rsyslog = setup
    recipients = ["r%03d@example.org" % n for n in range(150)] + ["postmaster"]
    message_id = helpers.spool_message(directory, "a@example.net", recipients, MESSAGE)
    result = helpers.run_once(table)
    assert result.returncode == 0, result.stderr
    assert not in_queue(directory, message_id)
    runs = helpers.recorded_runs(recorder)
    assert len(runs) == 2 and all(len(argv) <= 4 + 100 for argv, _, _ in runs)
    delivered = [r for argv, _, _ in runs for r in argv[argv.index("--") + 1:]]
    assert sorted(delivered) == sorted(recipients)      # bare postmaster: the postmaster attribute

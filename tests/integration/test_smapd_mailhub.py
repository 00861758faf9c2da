"""The `mailhub` path: recipients in the accept-domains go by SMTP straight
to the internal hub (here Postfix's real smtp-sink), everything else through
`sendmail` (the recording stand-in); `shorten-domain` rewrites the header.
"""

import time

import pytest

from common import spool
from smapd import state
from tests.integration import realpeers
from tests.integration import smapd_helpers as helpers

pytestmark = pytest.mark.integration

MESSAGE = (b"From: Penny <penny@dimension.example.org>\r\nTo: bob@example.org\r\n"
           b"Cc: joe@host.example.org\r\nSubject: hub\r\n"
           b"Message-ID: <hub@example.org>\r\n\r\nline\r\n.\r\n..\r\n\xe9t\xe9\r\n")


def table_for(tmp_path, directory, recorder, hub_port, rsyslog):
    return helpers.write_table(
        tmp_path / "table", directory, sendmail=helpers.recording_sendmail(recorder),
        logsocket=rsyslog.socket,
        lines=["smapd: mailhub 127.0.0.1:%d" % hub_port, "smapd: shorten-domain example.org",
               "smapd: retry 1"])


def test_hub_for_our_domains_sendmail_for_the_rest(tmp_path, smtp_sink, rsyslog):
    realpeers.require_root()
    directory = helpers.make_spool(tmp_path / "spool")
    recorder = helpers.recorder_dir(tmp_path / "mta")
    table = table_for(tmp_path, directory, recorder, smtp_sink.port, rsyslog)
    message_id = helpers.spool_message(directory, "penny@dimension.example.org",
                                       ["bob@example.org", "ann@sub.example.org",
                                        "far@example.com"], MESSAGE)
    result = helpers.run_once(table)
    assert result.returncode == 0, result.stderr
    assert spool.queued(str(directory)) == []

    [dump] = smtp_sink.wait_count(1)
    assert sorted(dump.rcpt_to) == ["ann@sub.example.org", "bob@example.org"]
    assert dump.mail_from == "penny@dimension.example.org"     # the envelope is not rewritten
    shortened = MESSAGE.replace(b"penny@dimension.example.org", b"penny@example.org") \
        .replace(b"joe@host.example.org", b"joe@example.org")
    assert dump.data == shortened.replace(b"\r\n", b"\n")

    [(argv, data, _)] = helpers.recorded_runs(recorder)
    assert argv == ["-oi", "-f", "penny@dimension.example.org", "--", "far@example.com"]
    assert data == shortened.replace(b"\r\n", b"\n")
    log = rsyslog.read()
    assert "delivered id=%s via=mailhub" % message_id in log
    assert "delivered id=%s via=sendmail" % message_id in log


def test_hub_soft_refusal_and_no_hub_are_temporary(tmp_path, rsyslog):
    realpeers.require_root()
    realpeers.require("smtp-sink")
    directory = helpers.make_spool(tmp_path / "spool")
    recorder = helpers.recorder_dir(tmp_path / "mta")
    with realpeers.SmtpSink(tmp_path / "sink", extra_args=["-r", "rcpt"]) as refusing:
        table = table_for(tmp_path, directory, recorder, refusing.port, rsyslog)
        message_id = helpers.spool_message(directory, "a@example.net", ["bob@example.org"],
                                           MESSAGE)
        assert helpers.run_once(table).returncode == 0
        record = state.load(str(directory), message_id)
        assert record.attempts == 1 and "mailhub said 4" in record.last_error
    closed_port = realpeers.free_port()
    table = table_for(tmp_path, directory, recorder, closed_port, rsyslog)
    time.sleep(1.1)
    assert helpers.run_once(table).returncode == 0
    record = state.load(str(directory), message_id)
    assert record.attempts == 2 and "unreachable" in record.last_error
    assert spool.queued(str(directory)) == [message_id]
    assert helpers.recorded_runs(recorder) == []

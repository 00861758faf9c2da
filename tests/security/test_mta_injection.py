"""argv and header injection toward the MTA.

smapd runs `sendmail … -oi -f SENDER -- RCPT…` from an argv list.  An
address that begins with `-` would become an MTA option (`-oQ/tmp` moves
the queue, `-be` expands, `-C` reads another config), `|cmd` and `/file`
are programs and files to a local delivery agent, and a CR or LF in an
address or header can start a new command or header.  Two layers stop
these, and both are tested here with the real programs:

* at the door: the real smap refuses every such sender and recipient at
  MAIL/RCPT, so nothing is spooled;
* behind the door: spool files that carry them anyway (as if smap had been
  subverted or the spool tampered with) are put straight into queue/, and
  the real smapd (chrooted scanner + agent, as root dropping to uucp) runs
  with the recording MTA: every argv the MTA ever sees is checked - no word
  after `--` and no `-f` value begins with `-` - and the hostile file is
  quarantined in bad/ with a reason, never deleted.

The recording MTA (tests/integration/recording_mta.py) is the stand-in
because the test needs the MTA's argv, which no real MTA records.
"""

import pytest

from common import spool
from tests.integration import realpeers
from tests.integration import smapd_helpers as helpers
from tests.security.harness import SmapSetup, queue_id_of, send_message

ARGV_TRICKS = ["-oQ/tmp", "-oQ/tmp@example.com", "-be", "-bs@example.com", "-C/tmp/x",
               "-X/tmp/log@example.com", "--@example.com", "-f@example.com",
               "|/bin/sh -c id", "|cmd@example.com", "/etc/passwd", "/tmp/x@example.com",
               '"-oQ/tmp"@example.com', '"|cmd"@example.com', '"/etc/passwd"@example.com',
               "\t-be@example.com", " -be@example.com",
               # issue 11 finding 8: the option behind a quote and white space
               '" -oQ/tmp"@example.com', '" |/bin/sh"@example.com', '"  /etc/passwd"@example.com',
               '"\t-be"@example.com', '" "@example.com', '"\\-x"@example.com']


@pytest.fixture
def smap(tmp_path):
    setup = SmapSetup(tmp_path)
    yield setup
    setup.stop()


@pytest.mark.parametrize("rcpt", ARGV_TRICKS)
def test_smap_refuses_option_program_and_file_recipients(smap, rcpt):
    client = smap.inetd()
    assert client.reply()[0] == 220
    assert client.cmd("EHLO a.example.org")[0] == 250
    assert client.cmd("MAIL FROM:<a@example.org>")[0] == 250
    code, text = client.cmd("RCPT TO:<%s>" % rcpt)
    assert 500 <= code < 600, "%r accepted: %s" % (rcpt, text)
    assert client.cmd("DATA")[0] >= 500
    assert client.cmd("QUIT")[0] == 221
    assert smap.queued() == []


@pytest.mark.parametrize("sender", ["-oQ/tmp", "-be@example.org", "|cmd@example.org",
                                    "/tmp/x@example.org", '"-f"@example.org',
                                    '" -oQ/tmp"@b.org', '" |/bin/sh"@b.org', "u@b.org.."])
def test_smap_refuses_option_program_and_file_senders(smap, sender):
    client = smap.inetd()
    assert client.reply()[0] == 220
    assert client.cmd("EHLO a.example.org")[0] == 250
    code, text = client.cmd("MAIL FROM:<%s>" % sender)
    assert 500 <= code < 600, "%r accepted: %s" % (sender, text)
    assert client.cmd("QUIT")[0] == 221
    assert smap.queued() == []


def test_newline_in_an_address_ends_the_session(smap):
    client = smap.inetd()
    assert client.reply()[0] == 220
    assert client.cmd("EHLO a.example.org")[0] == 250
    assert client.cmd("MAIL FROM:<a@example.org>")[0] == 250
    client.send(b"RCPT TO:<v@example.com\n-oQ/tmp>\r\n")
    assert client.reply()[0] >= 500
    assert client.closed_by_server(10)
    assert smap.queued() == [] and smap.tmp_files() == []


# -- behind the door: hostile spool files, real smapd, recording MTA ---------

GOOD = (b"From: a@example.net\r\nTo: v@example.org\r\nSubject: ok\r\n\r\nbody\r\n")

HOSTILE_ENVELOPES = {
    "rcpt-option": ("a@example.net", ["-oQ/tmp"]),
    "rcpt-option-with-domain": ("a@example.net", ["-be@example.org"]),
    "rcpt-program": ("a@example.net", ["|/bin/sh -c id"]),
    "rcpt-file": ("a@example.net", ["/etc/passwd"]),
    "rcpt-quoted-option": ("a@example.net", ['"-oQ/tmp"@example.org']),
    "one-good-one-option": ("a@example.net", ["v@example.org", "-C/tmp"]),
    "sender-option": ("-oQ/tmp", ["v@example.org"]),
    "sender-program": ("|cmd@example.net", ["v@example.org"]),
    # issue 11 finding 8: behind a quote and white space, and empty labels
    "rcpt-space-quoted-option": ("a@example.net", ['" -oQ/tmp"@example.org']),
    "rcpt-space-quoted-program": ("a@example.net", ['" |/bin/sh"@example.org']),
    "sender-space-quoted-option": ('" -oQ/tmp"@example.net', ["v@example.org"]),
    "rcpt-empty-quoted": ("a@example.net", ['" "@example.org']),
    "rcpt-empty-label": ("a@example.net", ["v@example.org.."]),
    "sender-trailing-dot": ("a@example.net.", ["v@example.org"]),
}

HOSTILE_HEADERS = {
    "to-program": b"From: a@example.net\r\nTo: |/bin/sh -c id\r\n\r\nx\r\n",
    "cc-option": b"From: a@example.net\r\nCc: -oQ/tmp@example.org\r\n\r\nx\r\n",
    "bcc-file": b"From: a@example.net\r\nBcc: /etc/passwd\r\n\r\nx\r\n",
    "from-quoted-option": b'From: "-be"@example.net\r\nTo: v@example.org\r\n\r\nx\r\n',
    "reply-to-display-name": b"From: a@example.net\r\nReply-To: Joe <|cmd@example.net>\r\n\r\nx\r\n",
    "bare-lf-header-injection": b"From: a@example.net\r\nSubject: x\nBcc: -oQ/tmp\r\n\r\nx\r\n",
    "bare-cr-header-injection": b"From: a@example.net\r\nSubject: x\rTo: |cmd\r\n\r\nx\r\n",
    "nul-in-header": b"From: a@example.net\r\nTo: v@example.org\0-be\r\n\r\nx\r\n",
    "folded-to-program": b"From: a@example.net\r\nTo: v@example.org,\r\n |cmd@example.org\r\n\r\nx\r\n",
    # found by the fuzzer: a group display name to one parser, an address to the other
    "parser-differential": b'From: a@example.net\r\nTo: "-be"@x.orgFrom: a@example.org\r\n\r\nx\r\n',
    # issue 11 finding 8: white space inside the quotes, a quoted pair outside them
    "to-space-quoted-program": b'From: a@example.net\r\nTo: " |/bin/sh"@example.org\r\n\r\nx\r\n',
    "cc-backslash-option": b"From: a@example.net\r\nCc: \\-oQ/tmp@example.org\r\n\r\nx\r\n",
}


@pytest.fixture
def smapd_env(tmp_path, rsyslog):
    realpeers.require_root()
    directory = helpers.make_spool(tmp_path / "spool")
    recorder = helpers.recorder_dir(tmp_path / "mta")
    table = helpers.write_table(tmp_path / "table", directory,
                                sendmail=helpers.recording_sendmail(recorder),
                                logsocket=rsyslog.socket,
                                lines=["smapd: retry 1", "smapd: deliver-timeout 20"])
    return directory, recorder, table


def assert_no_option_reaches_the_mta(recorder):
    runs = helpers.recorded_runs(recorder)
    for argv, _, _ in runs:
        assert "--" in argv, argv
        split = argv.index("--")
        assert "-f" in argv[:split], argv
        sender = argv[argv.index("-f") + 1]
        assert not sender.startswith(("-", "|", "/")), argv
        for word in argv[split + 1:]:
            assert not word.startswith(("-", "|", "/")), argv
            assert "\n" not in word and "\r" not in word, argv
    return runs


def write_raw(directory, sender, recipients, data):
    """A spool file in the real format, bypassing smap's checks."""
    message_id = spool.new_id()
    envelope = ["MAILWALL-SPOOL 1", "id %s" % message_id, "arrival 1", "client-addr 192.0.2.1",
                "client-name unknown", "helo x", "sender %s" % sender]
    envelope += ["rcpt %s" % r for r in recipients]
    raw = ("\n".join(envelope) + "\n\n").encode() + data + b"\nMAILWALL-END %d\n" % len(data)
    return helpers.spool_message(directory, sender, recipients, data, message_id, raw=raw)


def test_hostile_spool_files_never_put_an_option_into_the_mta_argv(smapd_env):
    directory, recorder, table = smapd_env
    hostile = {}
    for name, (sender, recipients) in HOSTILE_ENVELOPES.items():
        hostile[write_raw(directory, sender, recipients, GOOD)] = name
    for name, data in HOSTILE_HEADERS.items():
        hostile[write_raw(directory, "a@example.net", ["v@example.org"], data)] = name
    control = helpers.spool_message(directory, "a@example.net", ["v@example.org"], GOOD)
    result = helpers.run_once(table)
    assert result.returncode == 0, result.stderr
    runs = assert_no_option_reaches_the_mta(recorder)
    # The control went through, with exactly the argv of DESIGN §7.
    assert [argv[-5:] for argv, stdin, _ in runs if argv[-1] == "v@example.org"
            and b"Subject: ok" in stdin] == [["-oi", "-f", "a@example.net", "--", "v@example.org"]]
    assert control not in spool.queued(str(directory))
    # Every hostile file is in bad/ with its reason, none is lost or delivered.
    bad = directory / spool.BAD
    for message_id, name in hostile.items():
        assert (bad / message_id).exists(), "%s (%s) not quarantined" % (name, message_id)
        assert (bad / (message_id + ".reason")).read_text().strip(), name
        assert message_id not in spool.queued(str(directory))
    for argv, stdin, _ in runs:
        # only the control and the postmaster notices reached the MTA
        recipients = argv[argv.index("--") + 1:]
        assert recipients in (["v@example.org"], ["postmaster"]) or \
            all(r.startswith("postmaster") for r in recipients), argv


def test_control_smap_to_smapd_argv_is_exact(tmp_path, smapd_env):
    # The same path through the real smap: what it accepts reaches the MTA
    # as `-oi -f SENDER -- RCPT`, nothing more.
    directory, recorder, table = smapd_env
    table.write_text(table.read_text().replace("accept-domains example.org",
                                               "accept-domains example.org example.com"))
    setup = SmapSetup(tmp_path / "smap")
    setup.table = table
    setup.spool = directory
    try:
        client = setup.inetd()
        code, text = send_message(client, "a@example.net", ["v@example.com", "w@example.org"],
                                  b"Subject: x\r\n\r\nbody\r\n")
        assert code == 250, text
        queue_id_of(text)
        client.cmd("QUIT")
    finally:
        setup.stop()
    assert helpers.run_once(table).returncode == 0
    runs = assert_no_option_reaches_the_mta(recorder)
    assert [argv[-6:] for argv, _, _ in runs] == [
        ["-oi", "-f", "a@example.net", "--", "v@example.com", "w@example.org"]]

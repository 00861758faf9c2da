"""`smap --daemon 127.0.0.1:PORT -F` with real clients: Python's smtplib,
swaks over TCP and `swaks --pipe` (smap on a pipe pair, as inetd-mode code
sees it); host rules with a client bound to 127.0.0.2; relay control; the
session child's title, uid/gid and chroot seen from /proc.
"""

import os
import re
import smtplib
import subprocess

import pytest

from common import spool
from tests.integration import realpeers
from tests.integration.smap_helpers import (SmtpClient, contents, make_spool, proc_status,
                                            session_child, smap_program, write_table)

pytestmark = pytest.mark.integration
QUEUED_TEXT = re.compile(r"250 2\.0\.0 Ok: queued as ([0-9A-F]+)")


class SmapDaemon:
    def __init__(self, tmp_path, table):
        self.port = realpeers.free_port()
        self.proc = realpeers.Proc(
            [smap_program(), "--daemon", "127.0.0.1:%d" % self.port, "-F", "-c", table],
            new_session=True, log=tmp_path / "smap.out")
        try:
            realpeers.wait_for_listen("127.0.0.1", self.port)
        except Exception:
            self.proc.stop()
            raise AssertionError("smap --daemon did not listen: %s" % self.proc.output())

    def stop(self):
        self.proc.stop()


@pytest.fixture
def spool_dir(tmp_path):
    realpeers.require_root()
    return make_spool(tmp_path / "spool")


@pytest.fixture
def daemon_factory(tmp_path):
    started = []

    def start(table):
        daemon = SmapDaemon(tmp_path, table)
        started.append(daemon)
        return daemon
    yield start
    for daemon in started:
        daemon.stop()


def test_smtplib_message_is_queued_with_its_id(tmp_path, spool_dir, daemon_factory):
    daemon = daemon_factory(write_table(tmp_path / "table", spool_dir))
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as client:
        code, _ = client.ehlo("client.example.net")
        assert code == 250 and client.has_extn("size") and client.has_extn("8bitmime")
        assert not client.has_extn("pipelining")
        assert int(client.esmtp_features["size"]) == 10485760
        client.mail("sender@example.net")
        client.rcpt("user@example.org")
        code, text = client.data(b"Subject: smtplib\r\n\r\n.starts with a dot\r\nend\r\n")
    assert code == 250
    queue_id = QUEUED_TEXT.match("250 " + text.decode()).group(1)
    assert contents(spool_dir) == ([queue_id], [])
    envelope, message = spool.read_message(str(spool_dir / spool.QUEUE / queue_id))
    assert envelope["client-addr"] == "127.0.0.1" and envelope["id"] == queue_id
    assert message.endswith(b"Subject: smtplib\r\n\r\n.starts with a dot\r\nend\r\n")
    assert b"[127.0.0.1])\r\n\tby mx.example.org (mailwall smap) with ESMTP id " + \
        queue_id.encode() in message


def test_size_and_recipient_limits_with_smtplib(tmp_path, spool_dir, daemon_factory):
    daemon = daemon_factory(write_table(tmp_path / "table", spool_dir,
                                        "smap: maxbytes 2048", "smap: maxrecip 2"))
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as client:
        client.ehlo("client.example.net")
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("a@example.net", ["b@example.org"], b"x" * 5000)
        assert refused.value.smtp_code == 552      # smtplib sends SIZE=
        client.rset()
        client.mail("a@example.net")
        assert client.rcpt("b1@example.org")[0] == 250
        assert client.rcpt("b2@example.org")[0] == 250
        assert client.rcpt("b3@example.org")[0] == 452
        assert client.data(b"small\r\n")[0] == 250
        client.mail("a@example.net")
        client.rcpt("b1@example.org")
        # no SIZE= this time: the real size is what counts
        code, _ = client.data(b"Subject: big\r\n\r\n" + (b"z" * 70 + b"\r\n") * 60)
        assert code == 552
    queue, tmp = contents(spool_dir)
    assert len(queue) == 1 and tmp == []


def test_swaks_over_tcp(tmp_path, spool_dir, daemon_factory):
    realpeers.require("swaks")
    daemon = daemon_factory(write_table(tmp_path / "table", spool_dir))
    result = subprocess.run(
        [realpeers.which("swaks"), "--server", "127.0.0.1:%d" % daemon.port,
         "--from", "sender@example.net", "--to", "user@example.org",
         "--helo", "client.example.net", "--header", "Subject: swaks", "--body", "via swaks"],
        capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    queue_id = QUEUED_TEXT.search(result.stdout.decode()).group(1)
    assert contents(spool_dir) == ([queue_id], [])
    _, message = spool.read_message(str(spool_dir / spool.QUEUE / queue_id))
    assert b"Subject: swaks\r\n" in message and b"via swaks\r\n" in message


def test_swaks_pipe_runs_inetd_mode_on_pipes(tmp_path, spool_dir):
    realpeers.require("swaks")
    table = write_table(tmp_path / "table", spool_dir)
    result = subprocess.run(
        [realpeers.which("swaks"), "--pipe", "%s -c %s" % (smap_program(), table),
         "--from", "sender@example.net", "--to", "user@example.org",
         "--helo", "client.example.net", "--body", "via a pipe"],
        capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    queue_id = QUEUED_TEXT.search(result.stdout.decode()).group(1)
    envelope, _ = spool.read_message(str(spool_dir / spool.QUEUE / queue_id))
    assert envelope["client-addr"] == "unknown"     # pipes: not an IP peer


def test_swaks_pipe_from_an_outside_host_cannot_relay(tmp_path, spool_dir):
    realpeers.require("swaks")
    table = write_table(tmp_path / "table", spool_dir, "smap: permit-relay 127.0.0.1")
    result = subprocess.run(
        [realpeers.which("swaks"), "--pipe", "%s -c %s" % (smap_program(), table),
         "--from", "sender@example.net", "--to", "victim@foreign.example"],
        capture_output=True, timeout=60)
    assert result.returncode != 0
    assert b"554 5.7.1 <victim@foreign.example>: Relay access denied" in result.stdout
    assert contents(spool_dir) == ([], [])


def test_denied_host_gets_554_and_the_connection_closes(tmp_path, spool_dir, daemon_factory):
    daemon = daemon_factory(write_table(tmp_path / "table", spool_dir,
                                        "smap: deny-hosts 127.0.0.2", "smap: permit-hosts *"))
    denied = SmtpClient.connect("127.0.0.1", daemon.port, source="127.0.0.2")
    try:
        denied.rest()
        assert denied.received == b"554 5.7.1 mx.example.org: access denied\r\n"
    finally:
        denied.close()
    allowed = SmtpClient.connect("127.0.0.1", daemon.port, source="127.0.0.1")
    try:
        assert allowed.reply().startswith(b"220 mx.example.org ")
        assert allowed.command(b"QUIT\r\n") == b"221 2.0.0 Bye\r\n"
    finally:
        allowed.close()


def test_relay_only_from_permit_relay_hosts(tmp_path, spool_dir, daemon_factory):
    daemon = daemon_factory(write_table(tmp_path / "table", spool_dir,
                                        "smap: permit-relay 127.0.0.1"))
    for source, expected in (("127.0.0.1", 250), ("127.0.0.3", 554)):
        client = SmtpClient.connect("127.0.0.1", daemon.port, source=source)
        try:
            client.reply()
            client.command(b"EHLO c.example\r\n")
            client.command(b"MAIL FROM:<a@example.net>\r\n")
            reply = client.command(b"RCPT TO:<friend@foreign.example>\r\n")
            assert int(reply[:3]) == expected, (source, reply)
            assert client.command(b"RCPT TO:<user@example.org>\r\n") == b"250 2.1.5 Ok\r\n"
        finally:
            client.close()


def test_session_child_is_jailed_and_titled(tmp_path, spool_dir, daemon_factory):
    daemon = daemon_factory(write_table(tmp_path / "table", spool_dir))
    client = SmtpClient.connect("127.0.0.1", daemon.port)
    try:
        assert client.reply().startswith(b"220 ")
        child = session_child(daemon.proc.pid)
        uid, gid = realpeers._ids("uucp")
        status = proc_status(child)
        assert status["Uid"] == [uid] * 4 and status["Gid"] == [gid] * 4
        assert status["Groups"] == []
        assert os.readlink("/proc/%d/root" % child) == str(spool_dir)
        with open("/proc/%d/cmdline" % child, "rb") as cmdline:
            assert cmdline.read().rstrip(b"\0") == b"smap: 127.0.0.1"
        assert client.command(b"QUIT\r\n") == b"221 2.0.0 Bye\r\n"
    finally:
        client.close()

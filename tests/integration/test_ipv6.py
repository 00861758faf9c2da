"""IPv6 end to end on ::1 (issue 16 item 2), with the real peers: `smap
--daemon [::1]:PORT` takes a client on ::1, writes `[IPv6:::1]` in its
Received: line and judges it with IPv6 host rules (CIDR and glob);
`pop3-gw --daemon [::1]:PORT` in front of a Dovecot on ::1 (`server
[::1]:PORT`, and `user%[::1]:PORT` with a -dest rule); smapd delivers to
a mail hub on ::1 (`mailhub [::1]:PORT`, Postfix's smtp-sink)."""

import os
import poplib
import shutil
import socket
import tempfile

import pytest

from common import spool
from tests.integration import realpeers
from tests.integration import smapd_helpers
from tests.integration.pop3_helpers import Daemon, Setup
from tests.integration.smap_helpers import SmtpClient, make_spool, write_table
from tests.integration.test_proxy_haproxy import SmapDaemon

pytestmark = pytest.mark.integration


def ipv6_client(port, timeout=20):
    sock = socket.socket(socket.AF_INET6)
    sock.bind(("::1", 0))
    sock.settimeout(timeout)
    sock.connect(("::1", port))
    return SmtpClient(sock)


@pytest.fixture
def ipv6_smap(tmp_path, rsyslog):
    realpeers.require_root()
    started = []

    def start(*lines):
        directory = make_spool(tmp_path / ("spool%d" % len(started)))
        table = write_table(tmp_path / ("table%d" % len(started)), directory, *lines,
                            logsocket=rsyslog.socket)
        daemon = SmapDaemon(tmp_path, table, host="::1")
        daemon.directory = directory
        started.append(daemon)
        return daemon
    yield start
    for daemon in started:
        daemon.stop()


def test_ipv6_smap_daemon_queues_with_an_ipv6_literal(ipv6_smap, rsyslog):
    daemon = ipv6_smap("smap: permit-hosts ::1/128", "smap: deny-hosts *")
    client = ipv6_client(daemon.port)
    assert client.reply().startswith(b"220 ")
    assert client.command(b"EHLO client.example.net\r\n").startswith(b"250")
    assert client.command(b"MAIL FROM:<a@example.net>\r\n").startswith(b"250")
    assert client.command(b"RCPT TO:<user@example.org>\r\n").startswith(b"250")
    assert client.command(b"DATA\r\n").startswith(b"354")
    assert client.command(b"Subject: v6\r\n\r\nhi\r\n.\r\n").startswith(b"250 2.0.0 Ok: queued")
    client.close()
    [name] = spool.queued(str(daemon.directory))
    envelope, message = spool.read_message(str(daemon.directory / spool.QUEUE / name))
    assert envelope["client-addr"] == "::1"
    assert message.startswith(b"Received: from client.example.net (unknown [IPv6:::1])")
    assert "connect host=unknown addr=::1" in rsyslog.wait_for("connect host=")


def test_ipv6_glob_deny_rule_refuses_the_client(ipv6_smap, rsyslog):
    daemon = ipv6_smap("smap: deny-hosts ::*", "smap: permit-hosts *")
    client = ipv6_client(daemon.port)
    assert client.reply().startswith(b"554 5.7.1 ")
    client.close()
    assert "addr=::1" in rsyslog.wait_for("deny host=")


def test_ipv6_pop3_gateway_to_dovecot_on_ipv6(tmp_path):
    realpeers.require_root()
    realpeers.require("dovecot")
    shared = tempfile.mkdtemp(prefix="mw-pop3v6-")
    os.chmod(shared, 0o755)
    try:
        with realpeers.Dovecot(os.path.join(shared, "dovecot"), listen="::1") as dovecot:
            setup = Setup(os.path.join(shared, "gw"), "[::1]:%d" % dovecot.port,
                          rules=("permit-hosts ::1 -dest ::1", "permit-hosts ::1/128"))
            try:
                with Daemon(setup, host="::1") as gateway:
                    for name in ("alice", "alice%%[::1]:%d" % dovecot.port):
                        client = poplib.POP3("::1", gateway.port, timeout=20)
                        client.apop(name, "alicesecret")
                        assert client.stat()[0] == 0
                        client.quit()
                    line = setup.log.wait_for(r"login host=\S+ addr=::1 user=alice "
                                              r"dest=\[::1\]:%d" % dovecot.port)
                    assert "proxy=" not in line
                assert "rip=::1" in dovecot.read_log()
            finally:
                setup.log.close()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_ipv6_mailhub_delivery(tmp_path, rsyslog):
    realpeers.require_root()
    realpeers.require("smtp-sink")
    with realpeers.SmtpSink(tmp_path / "sink", host="::1") as sink:
        directory = smapd_helpers.make_spool(tmp_path / "spool")
        recorder = smapd_helpers.recorder_dir(tmp_path / "mta")
        table = smapd_helpers.write_table(
            tmp_path / "table", directory,
            sendmail=smapd_helpers.recording_sendmail(recorder), logsocket=rsyslog.socket,
            lines=["smapd: mailhub [::1]:%d" % sink.port])
        message_id = smapd_helpers.spool_message(
            directory, "a@example.net", ["bob@example.org"],
            b"Subject: v6 hub\r\n\r\nhello\r\n")
        result = smapd_helpers.run_once(table)
        assert result.returncode == 0, result.stderr
        [dump] = sink.wait_count(1)
        assert dump.rcpt_to == ["bob@example.org"]
        assert spool.queued(str(directory)) == []
        assert "delivered id=%s via=mailhub" % message_id in rsyslog.read()

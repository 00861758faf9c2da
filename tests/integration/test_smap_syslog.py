"""smap's log lines, received by a real rsyslogd on a private socket named
with `logsocket` in the table: connect, message id=… from=… nrcpt size,
refusals with their reasons, the denied host, and the disconnect with bytes
in/out.  The socket is opened before the chroot, so a jailed smap logs; a
--daemon whose rsyslogd was restarted logs again from its next workers.
"""

import re
import smtplib

import pytest

from tests.integration import realpeers
from tests.integration.smap_helpers import (InetdSmap, SmtpClient, make_spool, send_message,
                                            smap_program, write_table)

pytestmark = pytest.mark.integration


@pytest.fixture
def spool_dir(tmp_path):
    realpeers.require_root()
    return make_spool(tmp_path / "spool")


def test_daemon_session_log_lines(tmp_path, spool_dir, rsyslog):
    table = write_table(tmp_path / "table", spool_dir, "smap: deny-hosts 127.0.0.2",
                        "smap: permit-hosts *", logsocket=rsyslog.socket)
    port = realpeers.free_port()
    daemon = realpeers.Proc([smap_program(), "--daemon", "127.0.0.1:%d" % port, "-F",
                             "-c", table], new_session=True, log=tmp_path / "smap.out")
    try:
        realpeers.wait_for_listen("127.0.0.1", port)
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
            client.ehlo("client.example.net")
            client.mail("sender@example.net")
            assert client.rcpt("victim@foreign.example")[0] == 554
            client.rcpt("user@example.org")
            code, text = client.data(b"Subject: logged\r\n\r\nhello\r\n")
        assert code == 250
        queue_id = text.decode().rsplit(" ", 1)[1]
        line = rsyslog.wait_for("message id=%s " % queue_id)
        assert re.search(r"smap\[\d+\]: message id=%s from=<sender@example\.net> nrcpt=1 "
                         r"size=\d+" % queue_id, line), line
        rsyslog.wait_for(re.compile(r"smap\[\d+\]: connect host=\S+ addr=127\.0\.0\.1"))
        rsyslog.wait_for(re.compile(r"reject .*reason=\"relay denied "
                                    r"to=<victim@foreign\.example>\""))
        done = rsyslog.wait_for(re.compile(r"disconnect .*addr=127\.0\.0\.1 messages=1 "))
        assert re.search(r"bytes_in=\d+ bytes_out=\d+ duration=[\d.]+", done), done
        denied = SmtpClient.connect("127.0.0.1", port, source="127.0.0.2")
        try:
            denied.rest()
        finally:
            denied.close()
        rsyslog.wait_for(re.compile(r"smap\[\d+\]: deny host=\S+ addr=127\.0\.0\.2 reason="))
    finally:
        daemon.stop()


def test_inetd_session_logs_smuggling_refusal(tmp_path, spool_dir, rsyslog):
    table = write_table(tmp_path / "table", spool_dir, logsocket=rsyslog.socket)
    with InetdSmap(table) as smap:
        client = smap.client
        assert client.reply().startswith(b"220 ")
        assert client.command(b"EHLO c.example\r\n").startswith(b"250")
        assert client.command(b"MAIL FROM:<a@example.net>\r\n").startswith(b"250")
        assert client.command(b"RCPT TO:<b@example.org>\r\n").startswith(b"250")
        assert client.command(b"DATA\r\n").startswith(b"354")
        reply = client.command(b"hello\n.\nMAIL FROM:<evil@example.net>\r\n")
        assert reply.startswith(b"554 5.5.2 ")
        client.rest()
        assert smap.wait() == 0
    rsyslog.wait_for(re.compile(r"smap\[%d\]: reject id=[0-9A-F]+ addr=unknown "
                                r"reason=\"bare CR or LF" % smap.pid))
    rsyslog.wait_for(re.compile(r"smap\[%d\]: disconnect .*messages=0 bytes_in=\d+"
                                % smap.pid))


def test_full_session_with_message_over_inetd_is_logged(tmp_path, spool_dir, rsyslog):
    table = write_table(tmp_path / "table", spool_dir, logsocket=rsyslog.socket)
    with InetdSmap(table) as smap:
        assert smap.client.reply().startswith(b"220 ")
        reply = send_message(smap.client)
        queue_id = reply.split()[-1].decode()
        smap.client.command(b"QUIT\r\n")
    rsyslog.wait_for("smap[%d]: message id=%s from=<sender@example.net> nrcpt=1"
                     % (smap.pid, queue_id))


def test_daemon_logs_again_after_rsyslogd_is_restarted(tmp_path, spool_dir):
    realpeers.require("rsyslogd")
    where = tmp_path / "rsyslog"
    first = realpeers.Rsyslog(where)
    table = write_table(tmp_path / "table", spool_dir, "smap: maxuse 1",
                        logsocket=first.socket)
    port = realpeers.free_port()
    daemon = realpeers.Proc([smap_program(), "--daemon", "127.0.0.1:%d" % port, "-F",
                             "-c", table], new_session=True, log=tmp_path / "smap.out")
    second = None
    try:
        realpeers.wait_for_listen("127.0.0.1", port)
        first.wait_for("listen addr=127.0.0.1")
        first.stop()                    # syslogd restarts: a new socket at the same path
        second = realpeers.Rsyslog(where)
        assert second.socket == first.socket
        # the workers forked before the restart hold the old socket; with
        # maxuse 1 each connection's worker is replaced, and the new ones
        # connect afresh before their chroot
        for number in range(4):
            client = SmtpClient.connect("127.0.0.1", port)
            try:
                client.reply()
                assert client.command(b"HELO c%d.example\r\n" % number).startswith(b"250")
                assert client.command(b"QUIT\r\n").startswith(b"221")
            finally:
                client.close()
        line = second.wait_for("disconnect host=")
        assert re.search(r"smap\[\d+\]: disconnect host=\S+ addr=127\.0\.0\.1 ", line), line
    finally:
        daemon.stop()
        if second is not None:
            second.stop()

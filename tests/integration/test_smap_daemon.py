"""`smap --daemon 127.0.0.1:PORT -F` with real clients: Python's smtplib,
swaks over TCP and `swaks --pipe` (smap on a pipe pair, as inetd-mode code
sees it); host rules with a client bound to 127.0.0.2; relay control; the
session process's title, uid/gid and chroot seen from /proc; the pre-forked
workers: `maxuse` connections each, a new session every time, name rules
through the resolver helper, a broken spool, SIGTERM.
"""

import os
import re
import signal
import smtplib
import socket
import subprocess

import pytest

from common import spool
from tests.integration import realpeers
from tests.integration.smap_helpers import (IDLE_TITLE, SmtpClient, contents, make_spool,
                                            proc_status, send_message, session_child,
                                            smap_program, title_of, write_table)
from tests.integration.smapd_helpers import children_of

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


# -- the pre-forked session processes (maxuse) -----------------------------------

def serving_worker(daemon):
    """The pid of the one busy worker (bounded wait)."""
    return session_child(daemon.proc.pid)


def test_a_worker_serves_connections_one_after_another_each_a_new_session(
        tmp_path, spool_dir, daemon_factory):
    daemon = daemon_factory(write_table(tmp_path / "table", spool_dir, "smap: maxuse 3"))
    served_by = []
    for number in range(4):
        client = SmtpClient.connect("127.0.0.1", daemon.port)
        try:
            assert client.reply().startswith(b"220 mx.example.org ")
            served_by.append(serving_worker(daemon))
            if number == 0:
                # a transaction left open must not leak into the next connection
                assert client.command(b"EHLO a.example\r\n").startswith(b"250")
                assert client.command(b"MAIL FROM:<a@example.net>\r\n") == b"250 2.1.0 Ok\r\n"
            else:
                assert client.command(b"RCPT TO:<user@example.org>\r\n").startswith(b"503 ")
                assert send_message(client, rcpt=b"u%d@example.org" % number).startswith(b"250 ")
            client.send(b"QUIT\r\n")
            client.rest()
        finally:
            client.close()
        realpeers.wait_until(lambda: not [p for p in children_of(daemon.proc.pid)
                                          if title_of(p) != IDLE_TITLE], 10, what="worker idle")
    # one process for the first three connections (maxuse 3), then a new one
    assert served_by[0] == served_by[1] == served_by[2] != served_by[3]
    queue, tmp = contents(spool_dir)
    assert len(queue) == 3 and tmp == []
    rcpts = sorted(spool.read_message(str(spool_dir / spool.QUEUE / q))[0]["rcpt"][0]
                   for q in queue)
    assert rcpts == ["u1@example.org", "u2@example.org", "u3@example.org"]


def test_name_rules_work_inside_the_jail(tmp_path, spool_dir, daemon_factory, rsyslog):
    # 127.0.0.1 is "localhost" forward and back (/etc/hosts): the worker is
    # chrooted to the spool, so only its resolver helper can find that name
    daemon = daemon_factory(write_table(tmp_path / "table", spool_dir,
                                        "smap: deny-hosts localhost", "smap: permit-hosts *",
                                        logsocket=rsyslog.socket))
    for _ in range(2):              # the same worker, twice
        denied = SmtpClient.connect("127.0.0.1", daemon.port)
        try:
            denied.rest()
            assert denied.received == b"554 5.7.1 mx.example.org: access denied\r\n"
        finally:
            denied.close()
    assert "deny host=localhost addr=127.0.0.1" in rsyslog.wait_for("deny host=")
    other = SmtpClient.connect("127.0.0.1", daemon.port, source="127.0.0.2")
    try:
        assert other.reply().startswith(b"220 ")
    finally:
        other.close()


def test_a_spool_the_workers_cannot_use_gets_421_without_a_fork_loop(
        tmp_path, daemon_factory, rsyslog):
    realpeers.require_root()
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    daemon = daemon_factory(write_table(tmp_path / "table", blocker / "spool",
                                        logsocket=rsyslog.socket))
    for _ in range(2):
        client = SmtpClient.connect("127.0.0.1", daemon.port, timeout=10)
        try:
            client.rest()
            assert client.received.startswith(b"421 4.3.0 mx.example.org ")
        finally:
            client.close()
    assert "setup" in rsyslog.wait_for("setup reason=")
    time_window_forks = len(re.findall(r"setup reason=", rsyslog.read()))
    # each failed worker answered one client; a broken set-up is retried at
    # most about once a second, not in a tight loop
    assert time_window_forks <= 6, rsyslog.read()


def test_sigterm_lets_the_busy_worker_finish_and_stops_the_rest(
        tmp_path, spool_dir, daemon_factory):
    daemon = daemon_factory(write_table(tmp_path / "table", spool_dir))
    client = SmtpClient.connect("127.0.0.1", daemon.port)
    try:
        assert client.reply().startswith(b"220 ")
        busy = serving_worker(daemon)
        realpeers.wait_until(lambda: len(children_of(daemon.proc.pid)) >= 2, 10,
                             what="an idle spare next to the busy worker")
        idle = [p for p in children_of(daemon.proc.pid) if p != busy]
        os.kill(daemon.proc.pid, signal.SIGTERM)
        realpeers.wait_until(lambda: not any(os.path.exists("/proc/%d" % p) and
                                             title_of(p) for p in idle), 10,
                             what="idle workers gone")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", daemon.port), timeout=5).close()
        assert send_message(client).startswith(b"250 ")
        assert client.command(b"QUIT\r\n") == b"221 2.0.0 Bye\r\n"
    finally:
        client.close()
    realpeers.wait_until(lambda: not title_of(busy), 10, what="the busy worker gone")
    assert len(contents(spool_dir)[0]) == 1


def test_back_to_back_connections_never_hit_a_slot_still_being_freed(
        tmp_path, spool_dir, daemon_factory):
    # one slot, one connection per process: each next client arrives while the
    # previous process is still on its way out, and must be served, not 421
    daemon = daemon_factory(write_table(tmp_path / "table", spool_dir,
                                        "smap: maxchildren 1", "smap: maxuse 1"))
    pids = set()
    for _ in range(15):
        client = SmtpClient.connect("127.0.0.1", daemon.port)
        try:
            assert client.reply().startswith(b"220 "), client.received
            pids.add(serving_worker(daemon))
            assert client.command(b"QUIT\r\n") == b"221 2.0.0 Bye\r\n"
        finally:
            client.close()
    assert len(pids) == 15          # maxuse 1: a process of its own each time

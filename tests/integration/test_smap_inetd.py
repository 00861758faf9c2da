"""smap in inetd mode, started exactly as inetd starts it: the connected
socket on fd 0, 1 and 2.  Proves the good path, that nothing but SMTP ever
reaches the client even when something fails (a table error, a broken or
unwritable spool), the privilege drop seen from /proc, kill -9 mid-DATA,
talk before the banner, the idle timeout and a full file system.
"""

import grp
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from common import spool
from tests.integration import realpeers
from tests.integration.smap_helpers import (InetdSmap, SmtpClient, contents, make_spool,
                                            proc_status, send_message, smap_program,
                                            wait_for_file, write_table)

pytestmark = pytest.mark.integration
QUEUED = re.compile(rb"^250 2\.0\.0 Ok: queued as ([0-9A-F]+)\r\n$")


@pytest.fixture
def root_required():
    realpeers.require_root()


@pytest.fixture
def spool_dir(tmp_path, root_required):
    return make_spool(tmp_path / "spool")


def test_message_over_inetd_socket(tmp_path, spool_dir):
    table = write_table(tmp_path / "table", spool_dir)
    with InetdSmap(table) as smap:
        client = smap.client
        assert client.reply() == b"220 mx.example.org ESMTP mailwall smap\r\n"
        reply = send_message(client, body=b"Subject: t\r\n\r\n..dot\r\nbody\r\n")
        queue_id = QUEUED.match(reply).group(1).decode()
        assert client.command(b"QUIT\r\n") == b"221 2.0.0 Bye\r\n"
        client.rest()
        assert smap.wait() == 0
        assert client.only_smtp(), client.received
    assert contents(spool_dir) == ([queue_id], [])
    path = spool_dir / spool.QUEUE / queue_id
    assert path.stat().st_uid == realpeers._ids("uucp")[0]
    assert path.stat().st_mode & 0o777 == 0o600
    envelope, message = spool.read_message(str(path))
    assert envelope["rcpt"] == ["user@example.org"] and envelope["client-addr"] == "unknown"
    assert message.endswith(b"Subject: t\r\n\r\n.dot\r\nbody\r\n")


def test_table_error_gives_only_a_421(tmp_path, spool_dir):
    table = write_table(tmp_path / "table", spool_dir, "smap: no-such-attribute 1")
    with InetdSmap(table) as smap:
        smap.client.rest()
        assert smap.wait() == 1
        assert smap.client.received.startswith(b"421 ")
        assert smap.client.only_smtp(), smap.client.received
    assert contents(spool_dir) == ([], [])


def test_bad_command_line_gives_only_a_421(tmp_path, root_required):
    server_end, client_end = socket.socketpair()
    proc = subprocess.Popen([smap_program(), "--no-such-option"], stdin=server_end.fileno(),
                            stdout=server_end.fileno(), stderr=server_end.fileno())
    server_end.close()
    client = SmtpClient(client_end)
    try:
        client.rest()
        assert proc.wait(timeout=20) == 2     # a bad command line, in every mode
        assert client.received.startswith(b"421 ") and client.only_smtp(), client.received
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=20)
        client.close()


def test_spool_that_is_not_a_directory_gives_only_a_421(tmp_path, root_required):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    table = write_table(tmp_path / "table", not_a_dir)
    with InetdSmap(table) as smap:
        smap.client.rest()
        assert smap.wait() == 1
        assert re.match(rb"^421 4\.3\.0 mx\.example\.org ", smap.client.received)
        assert smap.client.only_smtp(), smap.client.received


def test_unwritable_spool_gives_451_and_only_smtp(tmp_path, root_required):
    spool_dir = tmp_path / "spool"
    spool.make_dirs(str(spool_dir))          # tmp/ and queue/ stay root's, mode 0700
    table = write_table(tmp_path / "table", spool_dir)
    with InetdSmap(table) as smap:
        client = smap.client
        assert client.reply().startswith(b"220 ")
        assert client.command(b"EHLO c.example\r\n").startswith(b"250")
        assert client.command(b"MAIL FROM:<a@example.net>\r\n") == b"250 2.1.0 Ok\r\n"
        assert client.command(b"RCPT TO:<b@example.org>\r\n") == b"250 2.1.5 Ok\r\n"
        assert client.command(b"DATA\r\n") == b"451 4.3.0 Error: local error in processing\r\n"
        assert client.command(b"QUIT\r\n") == b"221 2.0.0 Bye\r\n"
        client.rest()
        assert client.only_smtp(), client.received
    assert contents(spool_dir) == ([], [])


def test_privileges_while_a_session_is_open(tmp_path, spool_dir):
    table = write_table(tmp_path / "table", spool_dir, "smap: groupid mail")
    uid = realpeers._ids("uucp")[0]
    gid = grp.getgrnam("mail").gr_gid
    with InetdSmap(table) as smap:
        assert smap.client.reply().startswith(b"220 ")
        status = proc_status(smap.pid)
        assert status["Uid"] == [uid] * 4
        assert status["Gid"] == [gid] * 4
        assert status["Groups"] == []
        assert os.readlink("/proc/%d/root" % smap.pid) == str(spool_dir)
        assert os.readlink("/proc/%d/cwd" % smap.pid) == str(spool_dir)
        assert smap.client.command(b"QUIT\r\n") == b"221 2.0.0 Bye\r\n"


def test_kill_9_mid_data_leaves_nothing_in_queue(tmp_path, spool_dir):
    table = write_table(tmp_path / "table", spool_dir)
    with InetdSmap(table) as smap:
        client = smap.client
        assert client.reply().startswith(b"220 ")
        assert client.command(b"EHLO c.example\r\n").startswith(b"250")
        assert client.command(b"MAIL FROM:<a@example.net>\r\n") == b"250 2.1.0 Ok\r\n"
        assert client.command(b"RCPT TO:<b@example.org>\r\n") == b"250 2.1.5 Ok\r\n"
        assert client.command(b"DATA\r\n").startswith(b"354 ")
        client.send(b"Subject: half\r\n\r\n" + b"line of text\r\n" * 30000)
        wait_for_file(spool_dir / spool.TMP)
        os.kill(smap.pid, signal.SIGKILL)
        assert smap.wait() == -signal.SIGKILL
    queue, tmp = contents(spool_dir)
    assert queue == [] and len(tmp) == 1


def test_talk_before_the_banner_is_refused(tmp_path, spool_dir):
    table = write_table(tmp_path / "table", spool_dir)
    with InetdSmap(table, before_start=b"EHLO eager.example\r\n") as smap:
        smap.client.rest()
        assert smap.client.received == (
            b"554 5.5.0 Protocol error: talked before the greeting\r\n")


def test_idle_client_gets_421(tmp_path, spool_dir):
    table = write_table(tmp_path / "table", spool_dir, "smap: timeout 1")
    with InetdSmap(table) as smap:
        client = smap.client
        assert client.reply().startswith(b"220 ")
        assert client.command(b"EHLO c.example\r\n").startswith(b"250")
        assert client.reply() == b"421 4.4.2 mx.example.org Error: timeout exceeded\r\n"
        client.rest()
        assert smap.wait() == 0


@pytest.fixture
def small_tmpfs(tmp_path, root_required):
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k,mode=0755", "tmpfs",
                             str(mountpoint)], capture_output=True)
    if result.returncode != 0:
        realpeers._missing("cannot mount a tmpfs: %r" % result.stderr)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_full_file_system_gives_452_never_250(tmp_path, small_tmpfs):
    spool_dir = make_spool(small_tmpfs / "spool")
    table = write_table(tmp_path / "table", spool_dir)
    with InetdSmap(table) as smap:
        client = smap.client
        assert client.reply().startswith(b"220 ")
        big = b"Subject: big\r\n\r\n" + (b"y" * 98 + b"\r\n") * 6000      # 600 KB > 128 KB
        reply = send_message(client, body=big)
        assert reply in (b"452 4.3.1 Error: insufficient system storage\r\n",
                         b"451 4.3.0 Error: local error in processing\r\n"), reply
        # the session goes on, and a small message still fits
        small = send_message(client, body=b"Subject: small\r\n\r\nok\r\n")
        assert QUEUED.match(small), small
        assert client.command(b"QUIT\r\n") == b"221 2.0.0 Bye\r\n"
        client.rest()
        assert client.only_smtp()
    queue, tmp = contents(spool_dir)
    assert len(queue) == 1 and tmp == []
    _, message = spool.read_message(str(spool_dir / spool.QUEUE / queue[0]))
    assert message.endswith(b"Subject: small\r\n\r\nok\r\n")


def test_check_option_reports_file_line_problems(tmp_path):
    """`smap -n` needs no root: it prints FILE:LINE: message and exits 0 or 1."""
    bad = tmp_path / "bad"
    bad.write_text("smap: maxrecip 5\nsmap: timeout never\n")
    result = subprocess.run([smap_program(), "-n", "-c", str(bad)], capture_output=True,
                            timeout=30)
    assert result.returncode == 1
    # (smap prints the report on stderr, like `postfix check`)
    assert (result.stdout + result.stderr).decode() == (
        "%s:2: timeout: 'never' is not a whole number\n" % bad)
    good = tmp_path / "good"
    good.write_text("smap: maxrecip 5\nsmap: directory %s/absent\n" % tmp_path)
    result = subprocess.run([smap_program(), "-n", "-c", str(good)], capture_output=True,
                            timeout=30)
    assert result.returncode == 0
    assert b"warning: directory:" in result.stdout + result.stderr

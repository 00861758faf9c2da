"""smap under the launchers that start it in production: the real Debian
xinetd with the entry shipped in conf/xinetd.d/smap (only port, bind and
paths adapted), and ucspi-tcp's tcpserver as a second launcher, with the
options of the shipped run script conf/tcpserver/smap.run.
"""

import os
import re
import shlex
import smtplib
from pathlib import Path

import pytest

from common import spool
from tests.integration import realpeers
from tests.integration.smap_helpers import (contents, make_spool, proc_status, session_child,
                                            smap_program, write_table, SmtpClient)

pytestmark = pytest.mark.integration
SHIPPED = Path(__file__).resolve().parents[2] / "conf" / "xinetd.d" / "smap"
INETD_CONF = Path(__file__).resolve().parents[2] / "conf" / "inetd.conf"
TCPSERVER_RUN = Path(__file__).resolve().parents[2] / "conf" / "tcpserver" / "smap.run"


def shipped_tcpserver_argv():
    """The argv of the shipped run script's `exec tcpserver ...` line."""
    lines = [l for l in TCPSERVER_RUN.read_text().splitlines()
             if l.startswith("exec tcpserver ")]
    assert len(lines) == 1
    return shlex.split(lines[0])[1:]


def adapt_xinetd_entry(text, port, program, table):
    """The shipped entry on 127.0.0.1:port with this checkout's smap and table."""
    lines = []
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip()
        if key == "server":
            line = "\tserver = %s" % program
        elif key == "server_args":
            line = "\tserver_args = -c %s" % table
        lines.append(line)
        if line.strip() == "{":
            lines += ["\ttype = UNLISTED", "\tport = %d" % port, "\tbind = 127.0.0.1"]
    return "\n".join(lines) + "\n"


def test_shipped_entries_name_smap_with_a_table():
    text = SHIPPED.read_text()
    settings = dict(re.findall(r"^\s*(\w+)\s*\+?=\s*(.*?)\s*$", text, re.M))
    assert settings["socket_type"] == "stream" and settings["wait"] == "no"
    assert settings["user"] == "root"            # smap drops privileges itself
    assert settings["server"].endswith("/smap")
    assert settings["server_args"] == "-c /etc/mailwall/netperm-table"
    line = [l for l in INETD_CONF.read_text().splitlines() if l and not l.startswith("#")]
    assert line[0].split() == ["smtp", "stream", "tcp", "nowait", "root", settings["server"],
                               "smap", "-c", "/etc/mailwall/netperm-table"]


def test_smap_under_real_xinetd_with_the_shipped_entry(tmp_path):
    realpeers.require("xinetd")
    realpeers.require_root()
    spool_dir = make_spool(tmp_path / "spool")
    table = write_table(tmp_path / "table", spool_dir)
    port = realpeers.free_port()
    service = adapt_xinetd_entry(SHIPPED.read_text(), port, smap_program(), table)
    with realpeers.Xinetd(tmp_path / "xinetd", service) as xinetd:
        client = SmtpClient.connect("127.0.0.1", port)
        try:
            assert client.reply() == b"220 mx.example.org ESMTP mailwall smap\r\n"
            child = session_child(xinetd.proc.pid)
            status = proc_status(child)
            assert status["Uid"][0] == realpeers._ids("uucp")[0] and status["Groups"] == []
            assert os.readlink("/proc/%d/root" % child) == str(spool_dir)
            assert client.command(b"QUIT\r\n") == b"221 2.0.0 Bye\r\n"
            client.rest()
            assert client.only_smtp()
        finally:
            client.close()
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
            refused = smtp.sendmail("a@example.net", ["user@example.org"],
                                    b"Subject: xinetd\r\n\r\nthrough xinetd\r\n")
        assert refused == {}
    queue, tmp = contents(spool_dir)
    assert len(queue) == 1 and tmp == []
    envelope, message = spool.read_message(str(spool_dir / spool.QUEUE / queue[0]))
    assert envelope["client-addr"] == "127.0.0.1"
    assert message.endswith(b"Subject: xinetd\r\n\r\nthrough xinetd\r\n")


def test_shipped_tcpserver_run_script_runs_smap_per_connection():
    argv = shipped_tcpserver_argv()
    assert argv[:7] == ["tcpserver", "-R", "-H", "-l", "0", "-c", "200"]
    assert argv[7:] == ["0", "25", "/usr/local/sbin/smap", "-c", "/etc/mailwall/netperm-table"]
    assert os.access(TCPSERVER_RUN, os.X_OK)


def test_smap_under_tcpserver(tmp_path):
    realpeers.require("tcpserver")
    realpeers.require_root()
    spool_dir = make_spool(tmp_path / "spool")
    table = write_table(tmp_path / "table", spool_dir)
    limit = int(shipped_tcpserver_argv()[6])
    with realpeers.Tcpserver(tmp_path / "tcpserver", [smap_program(), "-c", table],
                             limit=limit) as server:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=20) as smtp:
            assert smtp.ehlo("client.example.net")[0] == 250
            refused = smtp.sendmail("a@example.net", ["user@example.org"],
                                    b"Subject: tcpserver\r\n\r\nthrough tcpserver\r\n")
        assert refused == {}
        # nothing of smap's reached tcpserver's stderr log either
        assert "smap" not in Path(server.log_path).read_text(errors="replace")
    queue, tmp = contents(spool_dir)
    assert len(queue) == 1 and tmp == []

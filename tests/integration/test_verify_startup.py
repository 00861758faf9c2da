"""smap under inetd pays for recipient verification only when it is on
(issue 14, brief: no `socket`, `select`, `threading`, `sqlite3`, ...):
the real smap.main.main in a fresh interpreter on a socketpair, as inetd
runs it, reporting the modules it loaded through a pipe that survives the
chroot."""

import os
import socket
import subprocess
import sys

import pytest

from tests.integration import realpeers
from tests.integration.smap_helpers import make_spool, write_table

pytestmark = pytest.mark.integration

REPORT = """
import os, sys
from smap import main
main.main(["-c", sys.argv[1]])
os.write(int(sys.argv[2]), "\\n".join(sorted(sys.modules)).encode())
"""
EXPENSIVE = {"socket", "selectors", "signal", "enum", "ssl", "email", "sqlite3",
             "logging", "threading", "queue", "hashlib", "json", "subprocess", "smtplib"}


def modules_of_a_session(table, rcpt):
    server_end, client_end = socket.socketpair()
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        [sys.executable, "-c", REPORT, str(table), str(write_end)], stdin=server_end,
        stdout=server_end, stderr=subprocess.DEVNULL, pass_fds=[write_end], close_fds=True,
        cwd="/", env={"PYTHONPATH": os.environ.get("PYTHONPATH", ""), "PATH": "/usr/bin:/bin"})
    server_end.close()
    os.close(write_end)
    client_end.settimeout(20)
    replies = []
    reader = client_end.makefile("rb")
    try:
        replies.append(reader.readline())
        for line in (b"EHLO c.example.net", b"MAIL FROM:<a@example.net>",
                     b"RCPT TO:<%s>" % rcpt, b"QUIT"):
            client_end.sendall(line + b"\r\n")
            reply = reader.readline()
            while reply[3:4] == b"-":
                reply = reader.readline()
            replies.append(reply)
        assert process.wait(20) == 0
        with os.fdopen(read_end, "rb") as report:
            return set(report.read().decode().split("\n")), replies
    finally:
        reader.close()
        client_end.close()
        if process.poll() is None:
            process.kill()
            process.wait()


def test_verification_off_loads_none_of_it_and_on_loads_only_itself(tmp_path):
    realpeers.require_root()
    spool_dir = make_spool(tmp_path / "spool")
    off = write_table(tmp_path / "off", spool_dir)
    on = write_table(tmp_path / "on", spool_dir, "smap: verify-recipients yes",
                     "smap, smapd: mailhub 127.0.0.1:2", "smap: verify-wait 0")
    modules_off, replies_off = modules_of_a_session(off, b"new@example.org")
    modules_on, replies_on = modules_of_a_session(on, b"new@example.org")
    assert replies_off[3] == b"250 2.1.5 Ok\r\n"
    assert replies_on[3].startswith(b"450 4.1.1 <new@example.org>: ")     # no prober running
    assert not {"smap.verify", "common.verifycache", "_sha256"} & modules_off
    assert not EXPENSIVE & modules_off and not EXPENSIVE & modules_on
    assert modules_on - modules_off <= {"smap.verify", "common.verifycache", "_sha256", "binascii"}

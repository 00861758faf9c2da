"""common.log.Log against a datagram socket standing where syslogd's would be:
lines arrive whole and in the traditional format, a value cannot forge a
second line, and when syslogd is restarted (its socket replaced at the same
path) the next line reconnects instead of being lost for the rest of a
long-lived process."""

import os
import socket

import pytest

from common import log


def listener(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    return sock


@pytest.fixture
def path(tmp_path):
    return tmp_path / "log.sock"


def test_a_line_arrives_with_facility_ident_and_fields(path):
    server = listener(path)
    try:
        logger = log.Log("smap", 2, str(path))
        logger.info("connect", host="client.example", addr="192.0.2.1")
        line = server.recv(4096).decode()
        assert line.startswith("<22>")                  # mail.info
        assert line.endswith(" smap[%d]: connect host=client.example addr=192.0.2.1"
                             % os.getpid())
        logger.close()
    finally:
        server.close()


def test_a_value_cannot_make_a_second_line(path):
    server = listener(path)
    try:
        logger = log.Log("smap", 2, str(path))
        logger.notice("deny", reason="x\nsmap[1]: forged line\r\n")
        line = server.recv(4096)
        assert b"\n" not in line and b"\r" not in line
        assert b'reason="x?smap[1]: forged line??"' in line
        logger.close()
    finally:
        server.close()


def test_a_restarted_syslogd_gets_the_next_line(path):
    first = listener(path)
    logger = log.Log("smapd", 2, str(path))
    logger.info("before")
    assert b"before" in first.recv(4096)
    first.close()
    os.unlink(path)                     # syslogd stops, and starts again
    second = listener(path)
    try:
        logger.info("after")
        assert b"after" in second.recv(4096)
        logger.info("and on")
        assert b"and on" in second.recv(4096)
    finally:
        second.close()
        logger.close()


def test_no_syslogd_at_all_is_silent(path):
    logger = log.Log("smap", 2, str(path))      # nothing listens there
    logger.error("abort", reason="nobody hears this")
    assert logger.sock is None

"""common.lookup: the peer-name helper of smap --daemon's jailed workers.

It must answer exactly what hostmatch.confirmed_name answers in-process,
refuse anything but the canonical text of an IP address (and still serve
afterwards), run as the given user with nothing else open, and be gone
after close().  A helper that dies makes the asking side give up (no
name) and mark itself broken, so that its worker retires.
"""

import os
import pwd
import socket

import pytest

from common import hostmatch, lookup


@pytest.fixture
def helper():
    made = lookup.Lookup(None, None, drop=False, title="test: resolver")
    yield made
    made.close()


def raw(helper, request):
    helper.sock.send(request)
    return helper.sock.recv(lookup.MAX_REPLY)


def test_answers_like_the_in_process_lookup(helper):
    for addr in ("127.0.0.1", "::1", "192.0.2.1"):
        assert helper.confirmed_name(addr) == hostmatch.confirmed_name(addr)
    assert helper.confirmed_name("127.0.0.1")[0] is not None    # localhost, from /etc/hosts
    assert helper.confirmed_name(None) == (None, False)


@pytest.mark.parametrize("request_bytes", [
    b"localhost", b"127.000.000.001", b"127.0.0.1\n", b"::ffff:127.0.0.1", b"\xff\xfe",
    b"1" * (lookup.MAX_REQUEST + 1), b"0:0:0:0:0:0:0:1", b" 127.0.0.1",
])
def test_anything_but_a_canonical_address_gets_no_name(helper, request_bytes):
    assert raw(helper, request_bytes) == b"0 "
    assert helper.confirmed_name("127.0.0.1") == hostmatch.confirmed_name("127.0.0.1")


def test_the_helper_holds_nothing_but_its_socket(helper):
    keep = open(os.devnull)          # an inherited descriptor that must not survive
    try:
        other = lookup.Lookup(None, None, drop=False)
        try:
            assert other.confirmed_name("127.0.0.1")[0]     # it has started serving
            fds = sorted(int(fd) for fd in os.listdir("/proc/%d/fd" % other.pid))
            assert len([fd for fd in fds if fd > 2]) == 1, fds
            link = os.readlink("/proc/%d/fd/%d" % (other.pid, fds[-1]))
            assert link.startswith("socket:")
        finally:
            other.close()
    finally:
        keep.close()


def test_runs_as_the_given_user_when_root():
    if os.geteuid() != 0:
        pytest.skip("needs root to drop")
    uucp = pwd.getpwnam("uucp")
    helper = lookup.Lookup(uucp.pw_uid, uucp.pw_gid)
    try:
        assert helper.confirmed_name("127.0.0.1") == hostmatch.confirmed_name("127.0.0.1")
        with open("/proc/%d/status" % helper.pid) as status:
            fields = dict(line.split(":", 1) for line in status)
        assert fields["Uid"].split() == [str(uucp.pw_uid)] * 4
        assert fields["Gid"].split() == [str(uucp.pw_gid)] * 4
        assert fields["Groups"].split() == []
        assert os.readlink("/proc/%d/root" % helper.pid) == "/"
    finally:
        helper.close()


def test_close_reaps_the_helper(helper):
    pid = helper.pid
    helper.close()
    assert not os.path.exists("/proc/%d" % pid)
    helper.close()                   # twice is harmless


def test_a_dead_helper_means_no_name_and_a_broken_lookup(helper):
    os.kill(helper.pid, 9)
    os.waitpid(helper.pid, 0)
    helper.pid = 0                  # reaped here already
    assert helper.confirmed_name("127.0.0.1") == (None, False)
    assert helper.broken
    assert helper.confirmed_name("127.0.0.1") == (None, False)


def test_socket_type_keeps_requests_apart(helper):
    # SOCK_SEQPACKET: two requests sent back to back are two answers
    helper.sock.send(b"127.0.0.1")
    helper.sock.send(b"bogus")
    first = helper.sock.recv(lookup.MAX_REPLY)
    second = helper.sock.recv(lookup.MAX_REPLY)
    name, spoofed = hostmatch.confirmed_name("127.0.0.1")
    assert first == ("%d %s" % (spoofed, name)).encode()
    assert second == b"0 "
    assert helper.sock.type == socket.SOCK_SEQPACKET


# -- "milter N": a connected socket passed back (issue 15) ---------------------

def test_milter_request_passes_a_connected_socket(tmp_path):
    path = str(tmp_path / "m.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    made = lookup.Lookup(None, None, drop=False, milters=["unix:" + path], milter_timeout=5)
    try:
        sock, error = made.milter_socket(0)
        assert error is None and sock.family == socket.AF_UNIX
        server, _ = listener.accept()
        sock.sendall(b"ping")
        assert server.recv(4) == b"ping"
        sock.close()
        server.close()
        assert made.milter_socket(1) == (None, "no such milter")
        # the helper connects only to the SPECs it was given: a path is no index
        assert raw(made, b"milter /etc/passwd") == b"error no such milter"
        assert raw(made, b"milter -1") == b"error no such milter"
        listener.close()
        os.unlink(path)
        sock, error = made.milter_socket(0)
        assert sock is None and error.startswith("connect: ")
        assert not made.broken and made.confirmed_name("127.0.0.1")[0]
    finally:
        made.close()

"""common.lineio: CRLF-only framing, bounded lines, reads with deadlines."""

import os
import socket

import pytest
from hypothesis import given, settings, strategies as st

from common import lineio
from common.lineio import BARE, LINE, TOO_LONG, LineSplitter


def drain(splitter):
    items = []
    while True:
        item = splitter.next()
        if item is None:
            return items
        items.append(item)
        if item[0] == BARE:
            return items


def test_lines_end_only_at_crlf_even_when_split_between_reads():
    splitter = LineSplitter(100)
    splitter.feed(b"one\r\ntw")
    assert drain(splitter) == [(LINE, b"one\r\n")]
    splitter.feed(b"o\r")
    assert drain(splitter) == [] and splitter.pending() == 4
    splitter.feed(b"\nthree\r\n")
    assert drain(splitter) == [(LINE, b"two\r\n"), (LINE, b"three\r\n")]
    assert splitter.pending() == 0


@pytest.mark.parametrize("data,bare", [
    (b"a\nb\r\n", b"a\n"), (b"a\rb\r\n", b"a\r"), (b"\n", b"\n"),
    (b"a\r\r\n", b"a\r"), (b"ok\r\nx\ny", b"x\n"), (b"a\r.\r", b"a\r"),
])
def test_bare_cr_and_lf_are_reported(data, bare):
    splitter = LineSplitter(100)
    splitter.feed(data)
    assert drain(splitter)[-1] == (BARE, bare)


def test_final_cr_waits_for_its_lf():
    splitter = LineSplitter(100)
    splitter.feed(b"abc\r")
    assert splitter.next() is None
    splitter.feed(b"x")
    assert splitter.next() == (BARE, b"abc\r")


def test_limit_counts_the_crlf():
    splitter = LineSplitter(10)
    splitter.feed(b"12345678\r\n123456789\r\n")
    assert drain(splitter) == [(LINE, b"12345678\r\n"), (TOO_LONG, b"123456789\r")]


def test_overlong_line_is_reported_once_and_the_buffer_stays_bounded():
    splitter = LineSplitter(10)
    reports = []
    for _ in range(1000):
        splitter.feed(b"x" * 7)
        reports += drain(splitter)
        assert splitter.pending() <= 16
    assert reports == [(TOO_LONG, b"")]
    splitter.feed(b"\r\nnext\r\n")
    assert drain(splitter) == [(LINE, b"next\r\n")]


def test_take_rest_returns_unconsumed_bytes():
    splitter = LineSplitter(100)
    splitter.feed(b"a\r\nrest")
    assert splitter.next() == (LINE, b"a\r\n")
    assert splitter.take_rest() == b"rest" and splitter.pending() == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=30), max_size=20))
def test_lines_concatenate_back_to_the_input(chunks):
    """Whatever the chunking, LINEs are CRLF-terminated, hold no other CR/LF,
    and (without bare or long lines) join back to the input."""
    splitter = LineSplitter(1000)
    out = []
    for chunk in chunks:
        splitter.feed(chunk)
        items = drain(splitter)
        out += items
        if items and items[-1][0] == BARE:
            break
    data = b"".join(chunks)
    for kind, line in out:
        if kind == LINE:
            assert line.endswith(b"\r\n") and b"\r" not in line[:-2] and b"\n" not in line[:-2]
    if all(kind == LINE for kind, _ in out):
        joined = b"".join(line for _, line in out)
        assert data.startswith(joined)
        assert joined + splitter.take_rest() == data


def test_channel_reads_counts_and_times_out():
    left, right = socket.socketpair()
    with left, right:
        channel = lineio.Channel(left.fileno(), left.fileno())
        assert not channel.readable_now()
        with pytest.raises(lineio.Timeout):
            channel.read(0.01)
        right.sendall(b"hello")
        assert channel.readable_now()
        assert channel.read(5) == b"hello" and channel.bytes_in == 5
        channel.write(b"reply\r\n")
        assert right.recv(100) == b"reply\r\n" and channel.bytes_out == 7
        right.shutdown(socket.SHUT_WR)
        with pytest.raises(lineio.Closed):
            channel.read(5)


def test_channel_on_two_pipes_like_swaks_pipe():
    in_read, in_write = os.pipe()
    out_read, out_write = os.pipe()
    try:
        channel = lineio.Channel(in_read, out_write)
        os.write(in_write, b"EHLO x\r\n")
        assert channel.read(5) == b"EHLO x\r\n"
        channel.write(b"250 ok\r\n")
        assert os.read(out_read, 100) == b"250 ok\r\n"
        os.close(in_write)
        in_write = None
        with pytest.raises(lineio.Closed):
            channel.read(5)
    finally:
        for fd in (in_read, in_write, out_read, out_write):
            if fd is not None:
                os.close(fd)


def test_write_gives_up_on_a_client_that_never_reads():
    import socket
    ours, theirs = socket.socketpair()
    try:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        channel = lineio.Channel(ours.fileno(), ours.fileno())
        with pytest.raises(lineio.Closed):
            channel.write(b"x" * (4 << 20), timeout=0.2)
        assert 0 < channel.bytes_out < 4 << 20       # it wrote what fitted, then stopped
    finally:
        ours.close()
        theirs.close()


def test_write_delivers_everything_to_a_reader():
    import socket
    ours, theirs = socket.socketpair()
    try:
        channel = lineio.Channel(ours.fileno(), ours.fileno())
        channel.write(b"250 2.0.0 Ok\r\n", timeout=1)
        assert theirs.recv(100) == b"250 2.0.0 Ok\r\n"
        assert channel.bytes_out == 14
    finally:
        ours.close()
        theirs.close()


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class _Feed:
    """A channel that hands out the given chunks, one per read."""

    def __init__(self, *chunks):
        self.chunks = list(chunks)
        self.waits = []

    def read(self, timeout):
        self.waits.append(timeout)
        return self.chunks.pop(0)


def test_line_deadline_bounds_a_whole_line_not_each_read():
    clock, splitter = _Clock(), lineio.LineSplitter(100)
    deadline = lineio.LineDeadline(10, splitter, clock)
    channel = _Feed(b"NO", b"O", b"P\r\nQU", b"IT\r\n")
    splitter.feed(deadline.read(channel))
    deadline.fed()
    assert channel.waits == [10]                  # nothing pending: a full timeout
    clock.now += 4
    splitter.feed(deadline.read(channel))         # the same line, still incomplete
    deadline.fed()
    assert channel.waits[-1] == 6
    clock.now += 3
    splitter.feed(deadline.read(channel))         # NOOP completed, QU pending
    assert splitter.next() == (lineio.LINE, b"NOOP\r\n")
    deadline.fed()
    assert deadline.remaining() == 10             # a new line: a new deadline
    clock.now += 10
    with pytest.raises(lineio.Timeout):
        deadline.read(channel)


def test_line_deadline_stops_when_nothing_is_pending():
    clock, splitter = _Clock(), lineio.LineSplitter(100)
    deadline = lineio.LineDeadline(5, splitter, clock)
    splitter.feed(deadline.read(_Feed(b"QUIT\r\n")))
    splitter.next()
    deadline.fed()
    clock.now += 1000
    assert deadline.remaining() == 5

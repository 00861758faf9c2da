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

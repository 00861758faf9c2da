"""common.conversation: the one read → feed → write loop, without sockets.

A fake transport hands out scripted reads and records writes; a fake
session speaks a toy line protocol with a STARTTLS-like verb that asks
for a transport switch.  The attack: plaintext pipelined after the verb
(in the same read, or still in the transport's own buffer) must never be
executed over the new transport (CVE-2011-0411)."""

import pytest

from common import conversation, lineio


class FakeTransport:
    def __init__(self, reads, buffered=0, name="plain", readable=False):
        self.reads = list(reads)        # bytes, or an exception class to raise
        self.written = []
        self.bytes_in = self.bytes_out = 0
        self.pending_buffer = buffered
        self.name = name
        self.readable = readable
        self.discarded = False
        self.timeouts = []

    def read(self, timeout):
        self.timeouts.append(timeout)
        if not self.reads:
            raise lineio.Closed()
        item = self.reads.pop(0)
        if isinstance(item, type):
            raise item()
        self.bytes_in += len(item)
        return item

    def write(self, data, timeout):
        if data == b"FAIL\r\n":
            raise lineio.Closed()
        self.written.append((data, timeout))
        self.bytes_out += len(data)

    def readable_now(self):
        return self.readable

    def discard_pending(self):
        self.discarded = True

    def fileno(self):
        return 0

    def buffered(self):
        return self.pending_buffer


class FakeSession:
    """`CMD x` → `ok x`; `SWITCH` → `go ahead` and a switch request (it
    stops taking lines after that one, as a real session must); `QUIT`."""

    def __init__(self):
        self.splitter = lineio.LineSplitter(512)
        self.closed = False
        self.executed = []
        self.switch_request = None
        self.events = []

    def greeting(self):
        return b"hello\r\n"

    def pregreet(self):
        self.closed = True
        return b"too early\r\n"

    def timeout(self):
        self.events.append("timeout")
        self.closed = True
        return b"timeout\r\n"

    def eof(self):
        self.events.append("eof")
        self.closed = True

    def feed(self, data):
        self.splitter.feed(data)
        replies = []
        while not self.closed and not self.switch_request:
            item = self.splitter.next()
            if item is None:
                break
            line = item[1][:-2]
            self.executed.append(line)
            if line == b"SWITCH":
                self.switch_request = "tls"
                replies.append(b"go ahead\r\n")
            elif line == b"QUIT":
                self.closed = True
                replies.append(b"bye\r\n")
            else:
                replies.append(b"ok " + line + b"\r\n")
        return b"".join(replies)

    def switch_refused(self):
        self.events.append("refused")
        self.closed = True
        return b"protocol error: input after the switch\r\n"

    def switched(self):
        self.events.append("switched")
        self.switch_request = None


def written(transport):
    return b"".join(data for data, _ in transport.written)


def test_plain_dialogue_greets_answers_and_closes():
    transport = FakeTransport([b"CMD a\r\nCMD b\r\n", b"QUIT\r\n"])
    session = FakeSession()
    dialogue = conversation.Conversation(transport, session, timeout=30, write_timeout=7)
    assert dialogue.run() == conversation.CLOSED
    assert written(transport) == b"hello\r\nok CMD a\r\nok CMD b\r\nbye\r\n"
    assert all(timeout == 7 for _, timeout in transport.written)
    assert dialogue.bytes_in == 20 and dialogue.bytes_out == len(written(transport))
    dialogue.close()
    assert transport.discarded


def test_talk_before_the_greeting_is_refused_when_asked_to_detect_it():
    transport = FakeTransport([b"CMD a\r\n"], readable=True)
    session = FakeSession()
    assert conversation.Conversation(transport, session, 30, detect_pregreet=True).run() \
        == conversation.CLOSED
    assert written(transport) == b"too early\r\n"
    assert session.executed == []


def test_eof_timeout_and_a_failed_write_end_on_one_path():
    session = FakeSession()
    transport = FakeTransport([b"CMD a\r\n"])
    assert conversation.Conversation(transport, session, 30).run() == conversation.EOF
    assert session.events == ["eof"]

    session = FakeSession()
    transport = FakeTransport([b"CMD a\r\n", lineio.Timeout])
    assert conversation.Conversation(transport, session, 30).run() == conversation.TIMEOUT
    assert written(transport).endswith(b"timeout\r\n") and session.events == ["timeout"]

    session = FakeSession()
    transport = FakeTransport([b"FAIL\r\n"])    # the fake transport cannot write "ok FAIL"
    session.feed = lambda data: b"FAIL\r\n"
    assert conversation.Conversation(transport, session, 30).run() == conversation.WRITE_FAILED
    assert session.events == ["eof"]


def test_until_stops_the_loop_with_the_rest_unread():
    transport = FakeTransport([b"CMD a\r\n", b"CMD b\r\n"])
    session = FakeSession()
    result = conversation.Conversation(transport, session, 30).run(
        until=lambda: session.executed == [b"CMD a"])
    assert result == conversation.DONE
    assert transport.reads == [b"CMD b\r\n"]


def test_the_line_deadline_bounds_a_whole_line_not_each_read():
    now = [0.0]
    drip = [b"C", b"M", b"D", b" ", b"a"]
    transport = FakeTransport(drip + [b"\r\n"])
    real_read = transport.read

    def slow_read(timeout):
        now[0] += 4
        return real_read(timeout)
    transport.read = slow_read
    session = FakeSession()
    result = conversation.Conversation(transport, session, 10, clock=lambda: now[0]).run()
    assert result == conversation.TIMEOUT
    assert session.executed == []


def test_switch_goes_on_over_the_new_transport():
    plain = FakeTransport([b"CMD a\r\n", b"SWITCH\r\n"])
    secure = FakeTransport([b"CMD b\r\n", b"QUIT\r\n"], name="tls")
    asked = []

    def switch(old):
        asked.append(old.name)
        return secure
    session = FakeSession()
    dialogue = conversation.Conversation(plain, session, 30, switch=switch)
    assert dialogue.run() == conversation.CLOSED
    assert asked == ["plain"]
    assert written(plain) == b"hello\r\nok CMD a\r\ngo ahead\r\n"   # the go-ahead in the clear
    assert written(secure) == b"ok CMD b\r\nbye\r\n"
    assert session.events == ["switched"]
    assert session.executed == [b"CMD a", b"SWITCH", b"CMD b", b"QUIT"]
    assert dialogue.bytes_in == len(b"CMD a\r\nSWITCH\r\nCMD b\r\nQUIT\r\n")
    assert dialogue.bytes_out == len(written(plain)) + len(written(secure))
    dialogue.close()
    assert secure.discarded and not plain.discarded


def test_plaintext_pipelined_after_the_switch_line_is_never_executed():
    """CVE-2011-0411: `SWITCH\\r\\nCMD evil\\r\\n` in one packet."""
    plain = FakeTransport([b"SWITCH\r\nCMD evil\r\n"])
    switched = []
    session = FakeSession()
    dialogue = conversation.Conversation(plain, session, 30, switch=switched.append)
    assert dialogue.run() == conversation.SWITCH_REFUSED
    assert switched == []
    assert session.executed == [b"SWITCH"]
    assert written(plain) == b"hello\r\ngo ahead\r\nprotocol error: input after the switch\r\n"
    assert session.events == ["refused"]


def test_a_partial_line_after_the_switch_line_is_refused_too():
    plain = FakeTransport([b"SWITCH\r\nC"])
    session = FakeSession()
    result = conversation.Conversation(plain, session, 30, switch=lambda old: 1 / 0).run()
    assert result == conversation.SWITCH_REFUSED
    assert session.events == ["refused"]


def test_bytes_still_in_the_transports_buffer_are_refused():
    """The transport read more than it returned (a TLS layer's record
    buffer): the switch is refused although the splitter is empty."""
    plain = FakeTransport([b"SWITCH\r\n"], buffered=9)
    session = FakeSession()
    result = conversation.Conversation(plain, session, 30, switch=lambda old: 1 / 0).run()
    assert result == conversation.SWITCH_REFUSED
    assert session.executed == [b"SWITCH"] and session.events == ["refused"]


def test_a_switch_without_a_switcher_is_refused():
    plain = FakeTransport([b"SWITCH\r\n", b"CMD a\r\n"])
    session = FakeSession()
    assert conversation.Conversation(plain, session, 30).run() == conversation.SWITCH_REFUSED
    assert session.executed == [b"SWITCH"]


def test_a_failed_switch_ends_the_conversation():
    plain = FakeTransport([b"SWITCH\r\n", b"CMD a\r\n"])
    session = FakeSession()

    def switch(old):
        raise lineio.Closed()
    assert conversation.Conversation(plain, session, 30, switch=switch).run() \
        == conversation.SWITCH_FAILED
    assert session.executed == [b"SWITCH"] and session.events == ["eof"]


@pytest.mark.parametrize("name", ["CLOSED", "DONE", "TIMEOUT", "EOF", "WRITE_FAILED",
                                  "SWITCH_REFUSED", "SWITCH_FAILED"])
def test_every_ending_is_known_to_pop3gw(name):
    from pop3gw import gateway
    assert getattr(conversation, name) in gateway.DIALOGUE_ENDINGS


def test_the_plain_channel_is_a_transport(tmp_path):
    import os
    read_fd, write_fd = os.pipe()
    channel = lineio.Channel(read_fd, write_fd)
    try:
        assert channel.buffered() == 0 and channel.fileno() == read_fd
        channel.write(b"abc\r\n", 5)
        assert channel.readable_now()
        assert channel.read(1) == b"abc\r\n"
        assert (channel.bytes_in, channel.bytes_out) == (5, 5)
    finally:
        os.close(read_fd)
        os.close(write_fd)

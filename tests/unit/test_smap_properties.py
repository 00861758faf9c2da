"""Property test of smap's session: for arbitrary client transcripts (a list
of writes, each fed after the previous reply), a message reaches queue/
only after a "354" and a write that ends in a well-formed CRLF.CRLF, and its
text is exactly the dot-unstuffed bytes between the 354 and that marker.
Nothing is ever left in tmp/ once the session has ended.  The same holds
with an end-of-data hook that accepts everything, and that hook is shown
exactly the text that was spooled.
"""

import os
import re
import shutil
import tempfile

from hypothesis import HealthCheck, event, given, settings, strategies as st

from common import spool
from smap import policy
from tests.unit.smap_fixtures import make_session, spooled, unstuff

QUEUED = re.compile(rb"250 2\.0\.0 Ok: queued as ([0-9A-F]+)\r\n")

# Pieces that steer the session towards DATA, and pieces that attack framing.
COMMANDS = [b"EHLO a.example\r\n", b"HELO b.example\r\n", b"MAIL FROM:<s@example.net>\r\n",
            b"MAIL FROM:<>\r\n", b"RCPT TO:<u@example.org>\r\n", b"RCPT TO:<x@foreign.example>\r\n",
            b"DATA\r\n", b"RSET\r\n", b"NOOP\r\n"]
FRAGMENTS = [b".", b"..", b"\r\n", b"\r", b"\n", b"\r\n.\r\n", b".\r\n", b"\0", b"x" * 600,
             b"text", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"Subject: s\r\n"]

piece = st.one_of(st.sampled_from(COMMANDS), st.sampled_from(FRAGMENTS),
                  st.binary(max_size=12))
write = st.lists(piece, min_size=1, max_size=4).map(b"".join)
# Most transcripts open a transaction first so that DATA is reached often.
opening = st.just([COMMANDS[0], COMMANDS[2], COMMANDS[4], COMMANDS[6]])
# Message text: mostly plausible lines, sometimes with a framing attack.
text_line = st.one_of(st.sampled_from([b"", b".", b"..", b"...x", b"Subject: s", b"x" * 998,
                                       b"a\rb", b"a\nb", b"\0"]),
                      st.binary(max_size=20).filter(lambda b: b"\r" not in b and b"\n" not in b),
                      st.binary(max_size=20).filter(lambda b: b"\r" not in b and b"\n" not in b),
                      st.binary(max_size=8))
body_write = st.lists(text_line, max_size=5).map(lambda lines: b"".join(l + b"\r\n" for l in lines))
ending = st.sampled_from([b".\r\n", b".\r\nQUIT\r\n", b".\n", b"\r\n.\r\n", b""])
messages = st.tuples(opening, st.lists(body_write, max_size=4), ending,
                     st.lists(write, max_size=4)).map(
    lambda t: t[0] + t[1] + [t[2]] + t[3])
transcripts = st.one_of(
    st.lists(write, max_size=12),
    st.tuples(opening, st.lists(write, max_size=10)).map(lambda t: t[0] + t[1]),
    messages, messages, messages)


def well_formed(data):
    """DATA input that ends the message: CRLF framing only, ends in CRLF.CRLF
    (or is just '.CRLF'), and that end marker is the first one."""
    if data == b".\r\n":
        return True
    if not data.endswith(b"\r\n.\r\n") or data.startswith(b".\r\n"):
        return False
    if data.find(b"\r\n.\r\n") != len(data) - 5:
        return False
    return data.count(b"\r") == data.count(b"\r\n") == data.count(b"\n")


class Scanner:
    """An end-of-data hook that accepts everything and keeps, per queue id,
    the text it was shown (it must be exactly what was spooled)."""

    def __init__(self):
        self.seen = {}
        self.asked = []

    def on_text(self, smtp, envelope, data):
        self.seen[envelope.id] = self.seen.get(envelope.id, b"") + data

    def on_data(self, smtp, envelope):
        self.asked.append(envelope.id)
        return policy.accept()


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(transcripts)
def test_only_well_formed_messages_are_spooled_and_unchanged(writes):
    check_transcript(writes)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(transcripts)
def test_an_accepting_scanner_changes_nothing_and_sees_exactly_the_spooled_text(writes):
    scanner = Scanner()
    messages = check_transcript(writes, [scanner])
    for name, message in messages.items():
        assert scanner.seen[name] == message
    assert set(messages) <= set(scanner.asked)


def check_transcript(writes, hooks=()):
    """The property for one transcript; returns {queue id: spooled text}."""
    root = tempfile.mkdtemp(prefix="smap-prop-")
    try:
        smtp, _ = make_session(root, hooks=hooks)
        expected = {}
        data = None                      # DATA input since the last 354
        for sent in writes:
            if smtp.closed:
                break
            if data is not None:
                data += sent
            reply = smtp.feed(sent)
            queued = QUEUED.search(reply)
            if queued:
                assert data is not None, "250 queued without a 354 before it"
                assert well_formed(data), data
                expected[queued.group(1).decode()] = unstuff(data[:-3])  # without ".CRLF"
                data = None
            elif data is not None and reply:
                data = None              # DATA refused or the session ended
            if reply.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n"):
                data = b""
        event("messages spooled: %d" % min(len(expected), 2))
        smtp.eof()
        queue, tmp = spooled(root)
        assert tmp == []
        assert sorted(expected) == queue
        messages = {}
        for name, text in expected.items():
            _, message = spool.read_message(os.path.join(root, spool.QUEUE, name))
            assert message.startswith(b"Received: ")
            assert message.endswith(text)
            header = message[:len(message) - len(text)]
            # what comes before the text is exactly one Received: field
            assert re.fullmatch(rb"Received: [^\r\n]*(\r\n\t[^\r\n]*)*\r\n", header), header
            messages[name] = message
        return messages
    finally:
        shutil.rmtree(root)

"""smap's DATA fast path (Session.data_block, issue 6) against the
line-by-line path it short-cuts: for random DATA streams cut into random
reads, both give the same replies, the same final state and the same
committed message.  (Only the bytes of a message that is aborted anyway may
differ: the fast path stops writing at the block that crosses maxbytes.)

It trusts nothing but the Session API; the writer is an in-memory fake.
"""

import random

import pytest

from common import hostmatch, spool
from smap import policy, session

PIECES = [b"abc", b"..x", b".", b"\r\n", b"\r\n", b"\r\n.", b"\r", b"\n", b"\0",
          b"x" * 990, b"y" * 1200, b"\r\n..\r\n", b"line", b" ", b".\r\n", b"\r\n.x"]


class Log:
    def __getattr__(self, name):
        return lambda *args, **fields: None


class Writer:
    def __init__(self, outcomes):
        self.outcomes = outcomes
        self.data = bytearray()

    def start(self, envelope):
        pass

    def write(self, data):
        self.data += data

    def commit(self):
        self.outcomes.append(("commit", bytes(self.data)))

    def abort(self):
        self.outcomes.append(("abort", None))


def run(seed, fast, monkeypatch):
    monkeypatch.setattr(spool, "new_id", lambda *args, **kwargs: "1528CF921080555001")
    if not fast:
        monkeypatch.setattr(session.Session, "data_block", lambda self: None)
    rnd = random.Random(seed)
    outcomes = []
    settings = session.Settings("gw.example", maxbytes=rnd.choice([2000, 10485760]), maxrecip=10)
    smtp = session.Session(settings, policy.standard_hooks(["example.com"]),
                           hostmatch.Peer("192.0.2.1"), "/nonexistent", Log(),
                           writer_factory=lambda root, mid: Writer(outcomes),
                           clock=lambda: 1.0)
    replies = [smtp.greeting()]
    for command in (b"EHLO a.example\r\n", b"MAIL FROM:<a@b.example>\r\n",
                    b"RCPT TO:<u@example.com>\r\n", b"DATA\r\n"):
        replies.append(smtp.feed(command))
    body = b"".join(rnd.choice(PIECES) for _ in range(rnd.randint(0, 60)))
    if rnd.random() < 0.8:
        body += rnd.choice([b"\r\n.\r\n", b".\r\n", b"\r\n.\r\nQUIT\r\n"])
    position = 0
    while position < len(body) and not smtp.closed:
        size = rnd.randint(1, 300)
        replies.append(smtp.feed(body[position:position + size]))
        position += size
    return replies, smtp.state, smtp.envelope.size, outcomes


@pytest.mark.parametrize("block", range(10))
def test_fast_path_answers_and_spools_like_the_line_path(block, monkeypatch):
    for seed in range(block * 300, block * 300 + 300):
        with monkeypatch.context() as patch:
            fast = run(seed, True, patch)
        with monkeypatch.context() as patch:
            slow = run(seed, False, patch)
        assert fast[:3] == slow[:3], seed
        assert [o for o in fast[3] if o[0] == "commit"] == \
            [o for o in slow[3] if o[0] == "commit"], seed
        assert [o[0] for o in fast[3]] == [o[0] for o in slow[3]], seed

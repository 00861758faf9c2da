"""smapd.scan: the guard around one message, in-process (no root, no agent).

The real Scanner runs on a private spool; the test plays the delivery agent
on the other end of a real SOCK_SEQPACKET pair.  A step of the scanner is
made to fail and the test checks what is left in the spool: the message
quarantined with its reason and what was already delivered, or left for a
later scan with a pause, and the next message delivered all the same.
"""

import os
import socket
import time

import pytest

from common import spool
from smapd import agent, bounce, scan, state
from tests.unit.smap_fixtures import RecordingLog

HEADER = b"From: a@example.net\r\nSubject: x\r\n\r\n"


class Config:
    def __init__(self, **values):
        self.values = {"wakeup": 60, "retry": 900, "maxage": 5 * 86400, "maxchildren": 5,
                       "deliver-timeout": 30, "postmaster": "postmaster@gw.example.org",
                       "mailhub": None, "accept-domains": [], "shorten-domain": []}
        self.values.update(values)

    def get(self, name):
        return self.values[name]


class Queue:
    """A spool, a Scanner on it and the agent's end of its channel."""

    def __init__(self, root):
        self.root = str(root)
        spool.make_dirs(self.root)
        self.scanner_end, self.agent_end = socket.socketpair(socket.AF_UNIX,
                                                             socket.SOCK_SEQPACKET)
        self.log = RecordingLog()
        self.scanner = scan.Scanner(self.root, Config(), self.log, self.scanner_end, None,
                                    "gw.example.org", os.path.join(self.root, spool.BAD))

    def add(self, recipients, sender="a@example.net"):
        message_id = spool.new_id()
        writer = spool.MessageWriter(self.root, message_id)
        writer.start({"id": message_id, "arrival": "%.6f" % (scan.time.time() - 60),
                      "sender": sender, "rcpt": list(recipients)})
        writer.write(HEADER + b"body\r\n")
        writer.commit()
        return message_id

    def run(self, answer):
        """One scan; every request answered with answer(recipient) -> (kind, text)."""
        self.scanner.scan()
        while self.scanner.inflight:
            data, fds, _, _ = socket.recv_fds(self.agent_end, agent.MAX_REQUEST + 1, 4)
            request = agent.decode_request(data, fds[0], False)
            for fd in fds:
                os.close(fd)
            outcomes = [(r,) + answer(r) for r in request["hub"] + request["mta"]]
            self.agent_end.send(agent.encode_result(request["id"], outcomes))
            assert self.scanner.receive()
        self.scanner.sync_removals()

    def queued(self):
        return spool.queued(self.root)

    def bad(self, name):
        return os.path.join(self.root, spool.BAD, name)

    def events(self, kind):
        return [fields for _, event, fields in self.log.events if event == kind]

    def close(self):
        self.scanner_end.close()
        self.agent_end.close()


@pytest.fixture
def queue(tmp_path):
    made = Queue(tmp_path)
    yield made
    made.close()


def by_local_part(recipient):
    local = recipient.split("@")[0]
    return {"ok": ("ok", "MTA exit 0"), "gone": ("perm", "MTA exit 67 EX_NOUSER"),
            "later": ("temp", "MTA exit 75 EX_TEMPFAIL")}.get(local, ("ok", "MTA exit 0"))


def test_a_bug_after_a_partial_delivery_quarantines_with_what_was_delivered(queue,
                                                                           monkeypatch):
    broken = queue.add(["ok@example.org", "gone@example.org"])
    good = queue.add(["ok@example.org"])

    def failing(*args, **kwargs):
        raise RuntimeError("the bounce builder broke")
    monkeypatch.setattr(bounce, "build_bounce", failing)
    queue.run(by_local_part)
    # the next message went out all the same, the broken one is in the quarantine
    assert good not in queue.queued() and broken not in queue.queued()
    assert os.path.exists(queue.bad(broken))
    with open(queue.bad(broken + ".reason")) as source:
        reason = source.read()
    assert "RuntimeError: the bounce builder broke" in reason
    assert "delivered: <ok@example.org>" in reason
    assert "failed: <gone@example.org> MTA exit 67 EX_NOUSER" in reason
    assert not os.path.exists(os.path.join(queue.root, spool.STATE, broken))
    [failure] = queue.events("failure")
    assert failure["id"] == broken and "RuntimeError" in failure["reason"]
    # the postmaster hears of it: the notice is in the queue, for him alone
    [notice] = queue.events("notice")
    envelope, _ = spool.read_message(os.path.join(queue.root, spool.QUEUE,
                                                  notice["notice_id"]))
    assert envelope["rcpt"] == ["postmaster@gw.example.org"] and envelope["sender"] == ""


def test_a_system_error_defers_with_a_pause_then_quarantines(queue, monkeypatch):
    message_id = queue.add(["ok@example.org", "gone@example.org"])
    calls = []

    def full_disk(*args, **kwargs):
        calls.append(args)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(bounce, "build_bounce", full_disk)
    queue.run(by_local_part)
    # left in the queue, its state kept: the delivered recipient is not sent again
    assert message_id in queue.queued()
    record = state.load(queue.root, message_id)
    assert record.done == ["ok@example.org"] and record.failed[0][0] == "gone@example.org"
    assert queue.scanner.troubles[message_id][0] == 1
    # within the pause a scan passes it by; nothing reaches the agent
    queue.run(lambda r: pytest.fail("delivered again during the pause"))
    assert len(calls) == 1
    # after the pause: tried again (only the bounce is left to do), and the
    # third failure quarantines it
    clock = [scan.time.time()]
    monkeypatch.setattr(scan, "time", Clock(clock))
    for failures in (2, 3):
        clock[0] += scan.MAX_TROUBLE_PAUSE + 1
        queue.run(lambda r: pytest.fail("a delivered recipient was sent again"))
        assert len(calls) == failures
    assert message_id not in queue.queued() and os.path.exists(queue.bad(message_id))
    assert [f["failures"] for f in queue.events("failure")] == [1, 2, 3]


def test_a_quarantine_that_fails_leaves_the_message_for_later(queue, monkeypatch):
    message_id = queue.add(["gone@example.org"])
    monkeypatch.setattr(bounce, "build_bounce",
                        lambda *a, **k: (_ for _ in ()).throw(ValueError("bug")))
    queue.scanner.baddir = os.path.join(queue.root, "no-such-directory")
    queue.run(by_local_part)
    assert message_id in queue.queued()
    assert [e for e in queue.events("quarantine-failed") if e["id"] == message_id]
    count, not_before = queue.scanner.troubles[message_id]
    assert count == 1 and not_before > scan.time.time()
    # the next scans do not loop on it
    queue.run(lambda r: pytest.fail("tried again during the pause"))
    assert queue.scanner.troubles[message_id][0] == 1


def test_a_bug_while_checking_quarantines_and_the_next_message_goes(queue, monkeypatch):
    first = queue.add(["ok@example.org"])
    second = queue.add(["ok@example.org"])
    real = scan.checks.problem_of
    seen = []

    def failing_once(envelope, data):
        seen.append(envelope["id"])
        if len(seen) == 1:
            raise UnicodeEncodeError("ascii", "\xe4", 0, 1, "a bug")
        return real(envelope, data)
    monkeypatch.setattr(scan.checks, "problem_of", failing_once)
    queue.run(by_local_part)
    assert queue.queued() == [e["notice_id"] for e in queue.events("notice")]
    assert os.path.exists(queue.bad(first)) and second not in queue.queued()
    assert [e["id"] for e in queue.events("done")] == [second]


class Clock:
    """The scanner's `time` with time() read from a list the test moves."""

    def __init__(self, now):
        self.now = now

    def time(self):
        return self.now[0]

    def __getattr__(self, name):
        return getattr(time, name)


def test_a_message_smap_marked_for_the_quarantine_goes_to_baddir_at_once(queue):
    """A milter said quarantine (issue 15): smap wrote the mark, smapd moves
    the message to baddir with the milter's reason and tells the postmaster;
    nothing is delivered."""
    message_id = spool.new_id()
    writer = spool.MessageWriter(queue.root, message_id)
    writer.start({"id": message_id, "arrival": "%.6f" % scan.time.time(),
                  "sender": "a@example.net", "rcpt": ["user@example.org"]})
    writer.write(HEADER + b"body\r\n")
    writer.quarantine("milter: milter inet:127.0.0.1:7357: Eicar found")
    writer.commit()
    delivered = []
    queue.run(lambda recipient: delivered.append(recipient) or ("ok", "MTA exit 0"))
    assert message_id not in queue.queued()
    assert os.path.exists(queue.bad(message_id))
    with open(queue.bad(message_id) + ".reason") as reason:
        assert "reason: smap: milter: milter inet:127.0.0.1:7357: Eicar found" in reason.read()
    (event,) = queue.events("quarantine")
    assert event["id"] == message_id
    assert "user@example.org" not in delivered
    assert queue.events("notice")                          # the postmaster is told

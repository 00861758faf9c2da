"""smap's session in the shape of issue 12: the state table, the one
transition function, the Envelope made new for every transaction, and
policy as hooks (smap.policy) at connect, HELO, MAIL, RCPT and end of data.

Bytes in, replies out, no sockets; the spool is a real directory under
tmp_path, or a recording writer where a test must see what reaches it.
The replies a hook may ask for are attacked here too: whatever a hook (a
milter, later) says, smap sends only a well-formed 4xx or 5xx line.
"""

import os
import re

import pytest

from common import spool
from smap import policy, session
from smap.session import State
from tests.unit.smap_fixtures import make_session, spooled

QUEUED = re.compile(rb"^250 2\.0\.0 Ok: queued as ([0-9A-F]+)\r\n$")
EHLO, MAIL, RCPT = (b"EHLO client.example.net\r\n", b"MAIL FROM:<s@example.net>\r\n",
                    b"RCPT TO:<u@example.org>\r\n")


def open_transaction(smtp, upto):
    """Walk a session to a state with good commands."""
    steps = {State.CONNECTED: [], State.HELLO: [EHLO], State.MAIL: [EHLO, MAIL],
             State.RCPT: [EHLO, MAIL, RCPT], State.DATA: [EHLO, MAIL, RCPT, b"DATA\r\n"]}
    for line in steps[upto]:
        assert smtp.feed(line)[:1] in (b"2", b"3"), line
    assert smtp.state == upto


class Recorder:
    """A hook that answers what it is told to and records every call."""

    def __init__(self, name="recorder", **answers):
        self.name = name
        self.answers = answers
        self.calls = []
        for method in ("on_connect", "on_helo", "on_mail", "on_rcpt", "on_data"):
            if method in answers:
                setattr(self, method, self._answer(method))
        for method in ("on_text", "on_reset", "on_close"):
            if answers.get(method):
                setattr(self, method, self._note(method))

    def _answer(self, method):
        def call(*arguments):
            self.calls.append((method,) + arguments[1:])
            answer = self.answers[method]
            if isinstance(answer, Exception):
                raise answer
            return answer
        return call

    def _note(self, method):
        def call(*arguments):
            self.calls.append((method,) + arguments[1:])
        return call


class RecordingWriter:
    """A spool writer that keeps what it is given, and can edit and quarantine."""

    def __init__(self, root, message_id):
        self.id = message_id
        self.data = bytearray()
        self.calls = []
        RecordingWriter.last = self

    def start(self, envelope):
        self.calls.append("start")

    def write(self, data):
        self.data += data

    def edit_header(self, changes):
        self.calls.append(("edit_header", list(changes)))

    def quarantine(self, reason):
        self.calls.append(("quarantine", reason))

    def commit(self):
        self.calls.append("commit")

    def abort(self):
        self.calls.append("abort")


# -- the command table and the one transition function ---------------------

# What each verb gets in each state where commands are read: a reply
# prefix when it is allowed, the exact refusal when it is not.
ALLOWED = {
    b"HELO a.example": b"250 ", b"EHLO a.example": b"250-", b"RSET": b"250 2.0.0",
    b"NOOP": b"250 2.0.0", b"HELP": b"214-", b"VRFY u": b"252 ", b"EXPN u": b"502 5.5.1",
    b"STARTTLS": b"502 5.5.1", b"BDAT 10": b"502 5.5.1", b"QUIT": b"221 ",
}
SEQUENCE = {
    (b"MAIL FROM:<a@example.net>", State.CONNECTED): b"503 5.5.1 Error: send HELO/EHLO first\r\n",
    (b"MAIL FROM:<a@example.net>", State.HELLO): b"250 2.1.0 Ok\r\n",
    (b"MAIL FROM:<a@example.net>", State.MAIL): b"503 5.5.1 Error: nested MAIL command\r\n",
    (b"MAIL FROM:<a@example.net>", State.RCPT): b"503 5.5.1 Error: nested MAIL command\r\n",
    (b"RCPT TO:<b@example.org>", State.CONNECTED): b"503 5.5.1 Error: need MAIL command\r\n",
    (b"RCPT TO:<b@example.org>", State.HELLO): b"503 5.5.1 Error: need MAIL command\r\n",
    (b"RCPT TO:<b@example.org>", State.MAIL): b"250 2.1.5 Ok\r\n",
    (b"RCPT TO:<b@example.org>", State.RCPT): b"250 2.1.5 Ok\r\n",
    (b"DATA", State.CONNECTED): b"503 5.5.1 Error: need RCPT command\r\n",
    (b"DATA", State.HELLO): b"503 5.5.1 Error: need RCPT command\r\n",
    (b"DATA", State.MAIL): b"554 5.5.1 Error: no valid recipients\r\n",
    (b"DATA", State.RCPT): b"354 End data with <CR><LF>.<CR><LF>\r\n",
}
AFTER = {b"HELO a.example": State.HELLO, b"EHLO a.example": State.HELLO, b"QUIT": State.CLOSED,
         b"MAIL FROM:<a@example.net>": State.MAIL, b"RCPT TO:<b@example.org>": State.RCPT,
         b"DATA": State.DATA}


@pytest.mark.parametrize("state", session.COMMAND_STATES, ids=lambda s: State.NAMES[s])
@pytest.mark.parametrize("verb", list(ALLOWED) + sorted({v for v, _ in SEQUENCE}))
def test_every_verb_in_every_state(tmp_path, verb, state):
    smtp, log = make_session(tmp_path)
    open_transaction(smtp, state)
    reply = smtp.feed(verb + b"\r\n")
    if verb in ALLOWED:
        assert reply.startswith(ALLOWED[verb]), reply
        if verb == b"RSET":
            assert smtp.state == (State.CONNECTED if state == State.CONNECTED else State.HELLO)
        else:
            assert smtp.state == AFTER.get(verb, state)
        return
    expected = SEQUENCE[verb, state]
    assert reply == expected
    if expected[:1] == b"5":
        assert smtp.state == state              # a refused command changes nothing
        assert log.reasons()
    else:
        assert smtp.state == AFTER[verb]


def test_the_table_answers_every_verb_in_every_command_state():
    for verb, command in session.COMMANDS.items():
        for state in session.COMMAND_STATES:
            assert state in command.allowed or state in command.refusals, (verb, state)
    with pytest.raises(ValueError):
        session.Command(session.Session.cmd_data, [State.RCPT], {State.MAIL: ("x", "y")})


def test_every_transition_goes_through_enter(tmp_path, monkeypatch):
    trace = []
    real_enter = session.Session.enter

    def traced(self, state):
        trace.append((State.NAMES[self.state], State.NAMES[state]))
        real_enter(self, state)
    monkeypatch.setattr(session.Session, "enter", traced)
    smtp, _ = make_session(tmp_path, greet=False)
    smtp.greeting()
    open_transaction(smtp, State.DATA)
    assert QUEUED.match(smtp.feed(b"text\r\n.\r\n"))
    smtp.feed(b"QUIT\r\n")
    assert trace == [("greeting", "connected"), ("connected", "hello"), ("hello", "mail"),
                     ("mail", "rcpt"), ("rcpt", "data"), ("data", "hello"),
                     ("hello", "closed")]
    # and nothing else assigns the state: only __init__ (the first) and enter
    with open(session.__file__, encoding="utf-8") as source:
        assert source.read().count("self.state = ") == 2


# -- the Envelope ---------------------------------------------------------------

def test_rset_makes_a_new_envelope_and_keeps_the_connection(tmp_path):
    smtp, _ = make_session(tmp_path)
    open_transaction(smtp, State.RCPT)
    before = smtp.envelope
    before.notes["hook"] = "state"
    assert before.sender == "s@example.net" and before.recipients == ["u@example.org"]
    assert smtp.feed(b"RSET\r\n") == b"250 2.0.0 Ok\r\n"
    after = smtp.envelope
    assert after is not before
    assert (after.id, after.sender, after.recipients, after.notes) == (None, None, [], {})
    assert smtp.helo == "client.example.net" and smtp.esmtp    # the Session's, kept
    assert smtp.feed(MAIL) == b"250 2.1.0 Ok\r\n"


@pytest.mark.parametrize("text,reply", [
    (b"ok\r\n.\r\n", QUEUED),
    (b"a\0b\r\n.\r\n", re.compile(rb"^554 5\.6\.0 ")),
])
def test_every_data_ends_with_a_new_envelope(tmp_path, text, reply):
    smtp, _ = make_session(tmp_path)
    open_transaction(smtp, State.DATA)
    during = smtp.envelope
    assert during.writer is not None
    assert reply.match(smtp.feed(text))
    assert smtp.envelope is not during and smtp.envelope.sender is None
    assert smtp.state == State.HELLO
    assert smtp.feed(RCPT) == b"503 5.5.1 Error: need MAIL command\r\n"
    assert spooled(tmp_path)[1] == []


def test_helo_in_a_transaction_ends_it(tmp_path):
    smtp, _ = make_session(tmp_path)
    open_transaction(smtp, State.RCPT)
    before = smtp.envelope
    assert smtp.feed(b"HELO other.example\r\n") == b"250 mx.example.org\r\n"
    assert smtp.envelope is not before and smtp.helo == "other.example" and not smtp.esmtp


# -- hooks at each stage ----------------------------------------------------------

def test_connect_hook_reject_and_tempfail_replace_the_banner_and_end_the_session(tmp_path):
    hook = Recorder(on_connect=policy.reject(550, "5.7.1", "Error: your network is listed"))
    smtp, log = make_session(tmp_path, greet=False, hooks=[hook])
    assert smtp.greeting() == b"554 5.7.1 mx.example.org Error: your network is listed\r\n"
    assert smtp.closed and smtp.feed(EHLO) == b""
    assert ("reject", "connect", "recorder") in [
        (event, fields.get("stage"), fields.get("hook")) for _, event, fields in log.events]
    smtp, _ = make_session(tmp_path / "b", greet=False,
                           hooks=[Recorder(on_connect=policy.tempfail(text="Error: busy"))])
    assert smtp.greeting() == b"421 4.7.1 mx.example.org Error: busy\r\n" and smtp.closed


def test_connect_hook_accept_gives_the_banner(tmp_path):
    hook = Recorder(on_connect=policy.accept())
    smtp, _ = make_session(tmp_path, greet=False, hooks=[hook])
    assert smtp.greeting() == b"220 mx.example.org ESMTP mailwall smap\r\n"
    assert hook.calls == [("on_connect",)]


def test_helo_hook_reject_leaves_the_session_without_helo(tmp_path):
    hook = Recorder(on_helo=policy.reject(550, "5.7.1", "Error: you are not localhost"))
    smtp, log = make_session(tmp_path, hooks=[hook])
    assert smtp.feed(b"HELO localhost\r\n") == b"550 5.7.1 Error: you are not localhost\r\n"
    assert hook.calls == [("on_helo", "localhost")]
    assert smtp.state == State.CONNECTED and smtp.helo is None
    assert smtp.feed(MAIL) == b"503 5.5.1 Error: send HELO/EHLO first\r\n"


def test_mail_hook_tempfail_with_its_own_reply(tmp_path):
    hook = Recorder(on_mail=policy.tempfail(451, "4.7.1", "Error: greylisted, try later",
                                            reason="greylist"))
    smtp, log = make_session(tmp_path, hooks=[hook])
    smtp.feed(EHLO)
    assert smtp.feed(b"MAIL FROM:<s@example.net> SIZE=10 BODY=8bitmime\r\n") == (
        b"451 4.7.1 Error: greylisted, try later\r\n")
    (_, envelope, address), = [call for call in hook.calls]
    assert address == "s@example.net"
    assert smtp.state == State.HELLO and smtp.envelope.sender is None
    assert "greylist" in log.reasons()


def test_mail_hook_sees_the_checked_parameters(tmp_path):
    seen = []

    class Parameters:
        def on_mail(self, smtp, envelope, path):
            seen.append(dict(envelope.parameters))
            return policy.accept()
    smtp, _ = make_session(tmp_path, hooks=[Parameters()])
    smtp.feed(EHLO)
    assert smtp.feed(b"MAIL FROM:<> SIZE=10 BODY=8bitmime\r\n") == b"250 2.1.0 Ok\r\n"
    assert seen == [{"SIZE": "10", "BODY": "8BITMIME"}]
    assert smtp.envelope.sender == ""


def test_rcpt_hooks_reject_and_tempfail_as_recipient_verification_will(tmp_path):
    unknown = "550 5.1.1 <nobody@example.org>: Recipient address rejected: User unknown"

    class Verify:
        name = "verify"

        def on_rcpt(self, smtp, envelope, path):
            if path.startswith("nobody@"):
                return policy.reject(550, "5.1.1", unknown[10:], reason="recipient unknown")
            if path.startswith("new@"):
                return policy.tempfail(450, "4.1.1", "<%s>: verification in progress" % path)
            return policy.accept()
    smtp, log = make_session(tmp_path, hooks=[Verify()])
    open_transaction(smtp, State.MAIL)
    assert smtp.feed(b"RCPT TO:<nobody@example.org>\r\n") == unknown.encode() + b"\r\n"
    assert smtp.feed(b"RCPT TO:<new@example.org>\r\n") == (
        b"450 4.1.1 <new@example.org>: verification in progress\r\n")
    assert smtp.state == State.MAIL
    # the standard hooks come first: relaying is still refused before verification
    assert smtp.feed(b"RCPT TO:<nobody@foreign.example>\r\n") == (
        b"554 5.7.1 <nobody@foreign.example>: Relay access denied\r\n")
    assert smtp.feed(RCPT) == b"250 2.1.5 Ok\r\n"
    assert smtp.envelope.recipients == ["u@example.org"]
    rejects = [f for _, event, f in log.events if event == "reject"]
    assert rejects[0]["reason"] == "recipient unknown" and rejects[0]["hook"] == "verify"
    assert rejects[0]["stage"] == "rcpt"


def test_the_first_hook_that_does_not_accept_answers(tmp_path):
    first = Recorder("first", on_rcpt=policy.accept())
    second = Recorder("second", on_rcpt=policy.reject(550, "5.7.1", "Error: second says no"))
    third = Recorder("third", on_rcpt=policy.reject(550, "5.7.1", "Error: third says no"))
    smtp, _ = make_session(tmp_path, hooks=[first, second, third])
    open_transaction(smtp, State.MAIL)
    assert smtp.feed(RCPT) == b"550 5.7.1 Error: second says no\r\n"
    assert len(first.calls) == len(second.calls) == 1 and third.calls == []


def test_policy_refusals_count_as_errors(tmp_path):
    smtp, _ = make_session(tmp_path, hooks=[Recorder(on_rcpt=policy.reject())])
    open_transaction(smtp, State.MAIL)
    for _ in range(9):
        assert smtp.feed(RCPT) == b"550 5.7.1 Error: rejected by policy\r\n"
    assert smtp.feed(RCPT).endswith(b"421 4.7.0 mx.example.org Error: too many errors\r\n")
    assert smtp.closed


HOSTILE = [
    policy.reject(250, "2.0.0", "Ok"),                              # success dressed as a verdict
    policy.reject(550, "5.7.1", "no\r\n250 2.0.0 Ok: queued as 1"),  # a second reply line
    policy.reject(550, "5.7.1", "no\n250 ok"),
    policy.reject(550, "4.7.1", "class does not match"),
    policy.reject(450, "4.7.1", "a 4xx for a reject"),
    policy.tempfail(550, "5.7.1", "a 5xx for a tempfail"),
    policy.tempfail(421, "4.7.0", "closing, says the hook"),
    policy.reject(590, "5.7.1", "second digit 9"),
    policy.reject(5500, "5.7.1", "four digits"),
    policy.reject("550", "5.7.1", "code as text"),
    policy.reject(True, "5.7.1", "code as bool"),
    policy.reject(550, "5.7", "short enhanced code"),
    policy.reject(550, "5.7.1000", "long enhanced code"),
    policy.reject(550, "5.x.1", "letters in the enhanced code"),
    policy.reject(550, "5.7.1", "x" * 600),
    policy.reject(550, "5.7.1", ""),
    policy.reject(550, "5.7.1", "tab\there"),
    policy.reject(550, "5.7.1", "caf\u00e9"),
    policy.reject(550, "5.7.1", "nul\0"),
]


@pytest.mark.parametrize("verdict", HOSTILE, ids=repr)
def test_a_hostile_reply_is_refused_for_a_safe_default(tmp_path, verdict):
    smtp, log = make_session(tmp_path, hooks=[Recorder("milter", on_rcpt=verdict)])
    open_transaction(smtp, State.MAIL)
    expected = {policy.REJECT: b"550 5.7.1 Error: rejected by policy\r\n",
                policy.TEMPFAIL: b"450 4.7.1 Error: temporarily rejected, try again later\r\n"}
    assert smtp.feed(RCPT) == expected[verdict.action]
    assert smtp.envelope.recipients == [] and not smtp.closed
    warnings = [f for level, event, f in log.events if event == "policy"]
    assert warnings and warnings[0]["hook"] == "milter"
    assert warnings[0]["reason"].startswith("refused reply: ")


@pytest.mark.parametrize("answer,reason", [
    (RuntimeError("milter went away"), "hook failed: RuntimeError: milter went away"),
    (None, "hook answered NoneType, not a Verdict"),
    ("accept", "hook answered str, not a Verdict"),
    (policy.discard("too early"), "discard is only for the end of data"),
    (policy.quarantine("too early"), "quarantine is only for the end of data"),
    (policy.Verdict("maybe"), "unknown verdict 'maybe'"),
    (policy.accept([policy.add_header("X-A", "1")]), "header changes are only for the end of data"),
])
def test_a_broken_hook_is_a_temporary_failure_never_an_accept(tmp_path, answer, reason):
    smtp, log = make_session(tmp_path, hooks=[Recorder(on_rcpt=answer)])
    open_transaction(smtp, State.MAIL)
    assert smtp.feed(RCPT) == b"450 4.7.1 Error: temporarily rejected, try again later\r\n"
    assert reason in log.reasons() and smtp.envelope.recipients == []


# -- the end of data ------------------------------------------------------------

def data_session(tmp_path, hook, writer=RecordingWriter):
    smtp, log = make_session(tmp_path, hooks=[hook], writer_factory=writer)
    open_transaction(smtp, State.DATA)
    return smtp, log


def test_on_text_gets_exactly_what_the_spool_gets_and_on_data_comes_before_the_commit(tmp_path):
    order = []

    class Scanner:
        def __init__(self):
            self.text = bytearray()

        def on_text(self, smtp, envelope, data):
            self.text += data

        def on_data(self, smtp, envelope):
            order.append(("on_data", list(RecordingWriter.last.calls)))
            return policy.accept()
    scanner = Scanner()
    smtp, _ = data_session(tmp_path, scanner)
    body = b"Subject: s\r\n\r\n..dot\r\n" + b"line\r\n" * 2000
    replies = b"".join(smtp.feed(body[i:i + 777]) for i in range(0, len(body), 777))
    replies += smtp.feed(b".\r\n")
    assert QUEUED.match(replies)
    writer = RecordingWriter.last
    assert bytes(scanner.text) == bytes(writer.data)
    assert writer.data.startswith(b"Received: from client.example.net")
    assert writer.data.endswith(b"\r\n\r\n.dot\r\n" + b"line\r\n" * 2000)
    assert order == [("on_data", ["start"])] and writer.calls == ["start", "commit"]


def test_data_reject_spools_nothing_and_answers_the_hooks_reply(tmp_path):
    hook = Recorder("clamav", on_data=policy.reject(550, "5.7.0", "Error: virus Eicar found",
                                                    reason="Eicar-Signature"))
    smtp, log = make_session(tmp_path, hooks=[hook])
    open_transaction(smtp, State.DATA)
    assert smtp.feed(b"X5O!P%@AP\r\n.\r\n") == b"550 5.7.0 Error: virus Eicar found\r\n"
    assert spooled(tmp_path) == ([], [])
    assert smtp.state == State.HELLO and smtp.envelope.sender is None
    assert "Eicar-Signature" in log.reasons()


def test_data_tempfail_with_a_hostile_reply_gets_the_default(tmp_path):
    hook = Recorder(on_data=policy.tempfail(250, "2.0.0", "Ok: queued as 1"))
    smtp, _ = make_session(tmp_path, hooks=[hook])
    open_transaction(smtp, State.DATA)
    assert smtp.feed(b"x\r\n.\r\n") == (
        b"451 4.7.1 Error: message temporarily rejected, try again later\r\n")
    assert spooled(tmp_path) == ([], [])


def test_discard_answers_250_and_spools_nothing(tmp_path):
    smtp, log = make_session(tmp_path, hooks=[Recorder("rspamd", on_data=policy.discard("spam"))])
    open_transaction(smtp, State.DATA)
    queue_id = smtp.envelope.id
    assert smtp.feed(b"x\r\n.\r\n") == b"250 2.0.0 Ok: queued as %s\r\n" % queue_id.encode()
    assert spooled(tmp_path) == ([], [])
    assert [(f["hook"], f["reason"]) for _, event, f in log.events if event == "discard"] == [
        ("rspamd", "spam")]
    assert smtp.messages == 0


def test_quarantine_and_header_changes_reach_the_writer_before_its_commit(tmp_path):
    changes = [policy.add_header("X-Spam-Score", "7.5"),
               policy.change_header("Subject", "[SPAM] hello"),
               policy.insert_header(0, "Authentication-Results", "mx; dkim=pass\r\n\theader.d=a")]
    first = Recorder("opendkim", on_data=policy.accept(changes[2:]))
    second = Recorder("rspamd", on_data=policy.quarantine("score 7.5", changes[:2]))
    smtp, log = make_session(tmp_path, hooks=[first, second], writer_factory=RecordingWriter)
    open_transaction(smtp, State.DATA)
    assert QUEUED.match(smtp.feed(b"Subject: hello\r\n\r\nx\r\n.\r\n"))
    assert RecordingWriter.last.calls == [
        "start", ("edit_header", [changes[2], changes[0], changes[1]]),
        ("quarantine", "rspamd: score 7.5"), "commit"]
    assert [f["reason"] for _, event, f in log.events if event == "quarantine"] == ["score 7.5"]


@pytest.mark.parametrize("change", [
    policy.add_header("X-Evil", "1\r\nBcc: victim@example.org"),
    policy.add_header("X-Evil", "1\nBcc: victim@example.org"),
    policy.add_header("X-Evil", "1\r\n\r\nforged body"),
    policy.add_header("X-Evil", "ends in a line break\r\n"),
    policy.add_header("Bad Name", "x"),
    policy.add_header("Bad:Name", "x"),
    policy.add_header("", "x"),
    policy.add_header("X-Nul", "a\0b"),
    policy.change_header("Subject", "x", index=0),
    policy.insert_header(-1, "X-A", "x"),
    policy.HeaderChange("replace-body", "X-A", "x"),
    "not a change",
])
def test_a_bad_header_change_is_a_temporary_failure_and_spools_nothing(tmp_path, change):
    smtp, log = make_session(tmp_path, hooks=[Recorder(on_data=policy.accept([change]))])
    open_transaction(smtp, State.DATA)
    assert smtp.feed(b"Subject: s\r\n\r\nx\r\n.\r\n") == (
        b"451 4.7.1 Error: message temporarily rejected, try again later\r\n")
    assert spooled(tmp_path) == ([], [])
    assert any(r.startswith("refused header change: ") for r in log.reasons())


def test_a_folded_header_value_is_a_good_change():
    assert policy.change_problem(policy.add_header("X-A", "one\r\n two\r\n\tthree")) is None
    assert policy.change_problem(policy.delete_header("X-A", 2)) is None


class PlainWriter(spool.MessageWriter):
    """A spool writer without header editing or quarantine (the writer of
    before issue 15)."""

    def __getattribute__(self, name):
        if name in ("edit_header", "quarantine"):
            raise AttributeError(name)
        return super().__getattribute__(name)


def test_a_writer_that_cannot_edit_or_quarantine_gives_451_not_a_silent_commit(tmp_path):
    for number, verdict in enumerate([policy.accept([policy.add_header("X-A", "1")]),
                                      policy.quarantine("virus")]):
        root = tmp_path / str(number)
        smtp, log = make_session(root, hooks=[Recorder(on_data=verdict)],
                                 writer_factory=PlainWriter)
        open_transaction(smtp, State.DATA)
        assert smtp.feed(b"x\r\n.\r\n") == b"451 4.3.0 Error: local error in processing\r\n"
        assert spooled(root) == ([], [])
        assert [e for _, e, _ in log.events if e == "spool"]


def test_the_spool_writer_applies_header_changes_and_the_quarantine_mark(tmp_path):
    """Issue 15 closed the gap: spool.MessageWriter edits the header and
    marks the message for smapd's quarantine before the commit."""
    changes = [policy.add_header("X-A", "1"), policy.delete_header("Subject")]
    for number, verdict in enumerate([policy.accept(changes),
                                      policy.quarantine("virus", changes)]):
        root = tmp_path / str(number)
        smtp, log = make_session(root, hooks=[Recorder(on_data=verdict)])
        open_transaction(smtp, State.DATA)
        assert smtp.feed(b"Subject: s\r\n\r\nx\r\n.\r\n").startswith(b"250 2.0.0 Ok: queued as ")
        (name,), tmp = spooled(root)
        assert tmp == []
        envelope, data = spool.read_message(str(root / "queue" / name))
        assert b"\r\nX-A: 1\r\n\r\nx\r\n" in data and b"Subject" not in data
        assert ("quarantine" in envelope) == bool(number)
        if number:
            assert "virus" in envelope["quarantine"]


def test_refused_text_reaches_no_hook_and_no_verdict_is_asked(tmp_path):
    hook = Recorder(on_text=True, on_data=policy.accept())
    smtp, _ = make_session(tmp_path, maxbytes=3000, hooks=[hook])
    open_transaction(smtp, State.DATA)
    smtp.feed(b"x" * 98 + b"\r\n")
    seen = len(hook.calls)
    smtp.feed((b"x" * 98 + b"\r\n") * 40)
    assert smtp.feed(b".\r\n").startswith(b"552 5.3.4 ")
    assert all(call[0] == "on_text" for call in hook.calls)
    assert sum(len(call[2]) for call in hook.calls) <= 3000 and len(hook.calls) >= seen


# -- notifications and the cost when nobody listens -------------------------------

def test_reset_is_told_for_every_begun_transaction_without_a_commit_and_close_once(tmp_path):
    hook = Recorder(on_reset=True, on_close=True)
    smtp, _ = make_session(tmp_path, hooks=[hook])
    smtp.feed(EHLO)
    smtp.feed(b"RSET\r\n")                      # no transaction begun: nothing to tell
    smtp.feed(MAIL)
    smtp.feed(b"RSET\r\n")
    open_transaction_from_hello = [MAIL, RCPT, b"DATA\r\n", b"x\r\n.\r\n"]
    for line in open_transaction_from_hello:
        smtp.feed(line)                         # ends in a commit: not a reset
    for line in [MAIL, RCPT, b"DATA\r\n", b"a\0b\r\n.\r\n"]:
        smtp.feed(line)                         # refused at the dot: a reset
    smtp.feed(MAIL)
    smtp.eof()
    smtp.eof()
    assert [call[0] for call in hook.calls] == ["on_reset"] * 3 + ["on_close"]
    assert len(spooled(tmp_path)[0]) == 1


def test_the_standard_hooks_have_no_end_of_data_stage(tmp_path):
    smtp, _ = make_session(tmp_path)
    assert smtp.hooks.text == [] and smtp.hooks.data == [] and smtp.hooks.connect == []
    assert [name for name, _ in smtp.hooks.rcpt] == ["address", "relay"]
    assert [name for name, _ in smtp.hooks.mail] == ["address"]


# -- today's rules as the first hooks: today's replies ------------------------------

@pytest.mark.parametrize("hook,stage,path,reply", [
    (policy.RelayControl(["example.org"]), "rcpt", "victim@foreign.example",
     b"554 5.7.1 <victim@foreign.example>: Relay access denied\r\n"),
    (policy.RelayControl(["example.org"]), "rcpt", "user@[192.0.2.1]",
     b"554 5.7.1 <user@[192.0.2.1]>: Relay access denied\r\n"),
    (policy.AddressCheck(), "rcpt", "-oQ/tmp@example.org",
     b"553 5.1.3 Error: bad recipient address: address starts with -\r\n"),
    (policy.AddressCheck(), "rcpt", '" |/bin/sh"@example.org',
     b"553 5.1.3 Error: bad recipient address: local part starts with |\r\n"),
    (policy.AddressCheck(), "mail", "a%b@example.net",
     b"553 5.1.7 Error: bad sender address: %/! relaying is not allowed\r\n"),
    (policy.AddressCheck(), "mail", "u@b.org..",
     b"553 5.1.7 Error: bad sender address: empty label in domain\r\n"),
])
def test_the_standard_hooks_give_todays_replies(hook, stage, path, reply):
    verdict = getattr(hook, "on_" + stage)(None, session.Envelope(), path)
    assert policy.reply_of(verdict, stage, "mx.example.org") == (reply, None)


@pytest.mark.parametrize("hook,stage,path", [
    (policy.RelayControl(["example.org"]), "rcpt", "user@Sales.EXAMPLE.org"),
    (policy.RelayControl([]), "rcpt", "Postmaster"),
    (policy.RelayControl([], relay_ok=True), "rcpt", "friend@foreign.example"),
    (policy.AddressCheck(), "mail", ""),
    (policy.AddressCheck(), "rcpt", "postmaster"),
])
def test_the_standard_hooks_accept_what_they_accepted(hook, stage, path):
    assert getattr(hook, "on_" + stage)(None, session.Envelope(), path) is policy.ACCEPTED


def test_a_message_through_every_stage_with_an_accepting_hook_is_spooled_unchanged(tmp_path):
    hook = Recorder(on_connect=policy.accept(), on_helo=policy.accept(),
                    on_mail=policy.accept(), on_rcpt=policy.accept(), on_data=policy.accept())
    smtp, _ = make_session(tmp_path, greet=False, hooks=[hook])
    smtp.greeting()
    open_transaction(smtp, State.DATA)
    name = QUEUED.match(smtp.feed(b"Subject: s\r\n\r\nbody\r\n.\r\n")).group(1).decode()
    _, message = spool.read_message(os.path.join(tmp_path, spool.QUEUE, name))
    assert message.startswith(b"Received: ") and message.endswith(b"Subject: s\r\n\r\nbody\r\n")
    assert [call[0] for call in hook.calls] == ["on_connect", "on_helo", "on_mail", "on_rcpt",
                                                "on_data"]


def test_an_on_text_hook_that_fails_makes_the_message_a_temporary_failure(tmp_path):
    class Broken:
        name = "scanner"

        def on_text(self, smtp, envelope, data):
            if b"boom" in data:
                raise OSError("milter connection lost")
    smtp, log = make_session(tmp_path, hooks=[Broken()])
    open_transaction(smtp, State.DATA)
    assert smtp.feed(b"a\r\nboom\r\nb\r\n.\r\n") == (
        b"451 4.7.1 Error: message temporarily rejected, try again later\r\n")
    assert spooled(tmp_path) == ([], [])
    assert "hook scanner failed: OSError: milter connection lost" in log.reasons()


def test_a_bad_change_with_a_quarantine_is_refused_too(tmp_path):
    verdict = policy.quarantine("virus", [policy.add_header("X-A", "1\r\nBcc: x@example.org")])
    smtp, log = make_session(tmp_path, hooks=[Recorder(on_data=verdict)],
                             writer_factory=RecordingWriter)
    open_transaction(smtp, State.DATA)
    assert smtp.feed(b"x\r\n.\r\n") == (
        b"451 4.7.1 Error: message temporarily rejected, try again later\r\n")
    assert "commit" not in RecordingWriter.last.calls

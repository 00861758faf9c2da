"""smapd.checks: envelope and header checks, shorten-domain rewriting."""

import pytest

from smapd import checks

GOOD = (b"Received: from x\r\n\tby y; Sat, 1 Jan 2000 00:00:00 +0000\r\n"
        b"From: Alice <alice@example.net>\r\nTo: bob@example.org\r\nSubject: hi\r\n"
        b"\r\nbody\r\n.\r\n..\r\n")


def envelope(sender="alice@example.net", rcpt=("bob@example.org",)):
    return {"id": "ABCD", "arrival": 0.0, "sender": sender, "rcpt": list(rcpt)}


def test_good_message_passes():
    assert checks.problem_of(envelope(), GOOD) is None


def test_empty_sender_and_bare_postmaster_pass():
    assert checks.problem_of(envelope("", ["postmaster"]), GOOD) is None


@pytest.mark.parametrize("recipient", ["-oQ/tmp", "|/bin/sh", "/etc/passwd",
                                       "a@b@c", "x%y@example.org", "a b@example.org"])
def test_dangerous_envelope_recipients_fail(recipient):
    assert "bad recipient" in checks.problem_of(envelope(rcpt=[recipient]), GOOD)


def test_dangerous_sender_fails():
    assert "bad sender" in checks.problem_of(envelope("-oQ/tmp"), GOOD)


@pytest.mark.parametrize("data, words", [
    (b"From: a@b\r\nNUL\0: x\r\n\r\nbody\r\n", "NUL"),
    (b"From: a@b\r\nSubject: x\nbody\r\n", "bare CR or LF"),
    (b"\tcontinued\r\nFrom: a@b\r\n\r\nbody\r\n", "continuation"),
    (b"From: a@b\r\nthis is body text without a blank line\r\n", "unparseable header"),
    (b"From: a@b\r\nSubject: " + b"x" * 1000 + b"\r\n\r\nbody\r\n", "longer than 998"),
    (b"From: a@b\r\nBad Name: x\r\n\r\nbody\r\n", "unparseable header"),
    (b"From: a@b\r\nTo: \"|/bin/sh\"@example.org\r\n\r\nx\r\n", "program, a file"),
    (b"From: a@b\r\nCc: /etc/passwd\r\n\r\nx\r\n", "program, a file"),
    (b"From: a@b\r\nReply-To: x@y,\r\n -oQ/tmp@z\r\n\r\nx\r\n", "program, a file"),
])
def test_bad_headers_fail(data, words):
    reason = checks.header_problem(data)
    assert reason is not None and words in reason


def test_headers_only_message_passes():
    assert checks.header_problem(b"From: a@b\r\nSubject: x\r\n") is None


def test_body_may_hold_anything_header_like():
    assert checks.header_problem(b"From: a@b\r\n\r\n|/bin/sh\r\n-oQ\r\nBad line\r\n") is None


def test_shorten_rewrites_only_the_four_fields():
    header = (b"From: Penny <penny@dimension.yoyodyne.com>\r\n"
              b"To: joe@host.yoyodyne.com\r\n"
              b"Cc: a@x.yoyodyne.com,\r\n b@y.z.yoyodyne.com, c@yoyodyne.com.evil.net\r\n"
              b"Reply-To: r@mail.YOYODYNE.com\r\nSender: s@notyoyodyne.com\r\n\r\n")
    out = checks.shorten(header, ["yoyodyne.com"])
    assert out == (b"From: Penny <penny@yoyodyne.com>\r\n"
                   b"To: joe@host.yoyodyne.com\r\n"
                   b"Cc: a@yoyodyne.com,\r\n b@yoyodyne.com, c@yoyodyne.com.evil.net\r\n"
                   b"Reply-To: r@YOYODYNE.com\r\nSender: s@notyoyodyne.com\r\n\r\n")


def test_shorten_without_domains_is_identity():
    assert checks.shorten(GOOD, []) is GOOD


@pytest.mark.parametrize("field", [
    b"To: =?utf-8?b?LWJl?=@example.org\r\n",          # an encoded word that decodes to "-be"
    b"To: =?us-ascii?q?=7Cprog?=@example.org\r\n",     # ... and to "|prog"
    b"To: \"-be\"@example.org\r\n",
    b"To: x </etc/passwd@example.org>\r\n",
])
def test_address_fields_that_could_name_a_program_are_parsed(field):
    # the fast path (no "|", "/", "-", "\\" or "=?" in the field) must not
    # let any of these through
    assert checks.address_field_problem(field) is not None


def test_plain_address_fields_pass_the_fast_path():
    assert checks.address_field_problem(b"To: Bob <bob@example.org>, carol@example.org\r\n") is None
    assert checks.address_field_problem(b"To: Jean <jp@mail-x.example.org>\r\n") is None

"""APOP timestamps, their validation and digests (RFC 1939 §7)."""

import hashlib

import pytest
from hypothesis import given, strategies as st

from common import apop


def test_rfc1939_example_digest():
    # RFC 1939 §7: the example of the APOP command
    stamp = "<1896.697170952@dbc.mtview.ca.us>"
    assert apop.digest(stamp, "tanstaaf") == "c4c9334bac560ecc979e58001b3e22fb"


def test_make_timestamp_is_fresh_and_valid():
    first = apop.make_timestamp("gw.example.org", pid=42, clock=lambda: 1000)
    second = apop.make_timestamp("gw.example.org", pid=42, clock=lambda: 1000)
    assert first != second
    assert first.startswith("<42.1000.") and first.endswith("@gw.example.org>")
    assert apop.valid_timestamp(first)


def test_make_timestamp_with_unusable_hostname_falls_back():
    stamp = apop.make_timestamp("bad host<>", pid=1)
    assert stamp.endswith("@localhost>") and apop.valid_timestamp(stamp)


@pytest.mark.parametrize("greeting, stamp", [
    (b"+OK Dovecot ready. <1a2b.3.5f00aa.Zm9v+/bar=@mail.example>\r\n",
     "<1a2b.3.5f00aa.Zm9v+/bar=@mail.example>"),
    (b"+OK POP3 server ready <1896.697170952@dbc.mtview.ca.us>\r\n",
     "<1896.697170952@dbc.mtview.ca.us>"),
    (b"+OK <a@[10.0.0.1]>\r\n", "<a@[10.0.0.1]>"),
])
def test_find_timestamp_accepts_msg_ids(greeting, stamp):
    assert apop.find_timestamp(greeting) == stamp


@pytest.mark.parametrize("greeting", [
    b"+OK ready\r\n",                                  # none
    b"+OK <no-at-sign>\r\n",
    b"+OK <a b@host>\r\n",                              # space
    b"+OK <a@host><b@host>\r\n",                        # two
    b"+OK <\xff@host>\r\n",                             # not ASCII
    b"+OK <a..b@host>\r\n",                             # empty atom
    b"+OK <a@host.>\r\n",
    b"+OK <\"quoted\"@host>\r\n",
    b"+OK <a@ho(st>\r\n",
    b"+OK <" + b"a" * 300 + b"@host>\r\n",              # too long
])
def test_find_timestamp_refuses_malformed(greeting):
    with pytest.raises(ValueError):
        apop.find_timestamp(greeting)


def test_check_is_exact():
    stamp = "<1.2@h>"
    good = apop.digest(stamp, "secret")
    assert apop.check(stamp, "secret", good)
    assert not apop.check(stamp, "secret", good.upper())
    assert not apop.check(stamp, "Secret", good)
    assert not apop.check(stamp, "secret", good[:-1])
    assert not apop.check(stamp, "secret", "\xe4" * 32)


@pytest.mark.parametrize("text, ok", [
    ("0" * 32, True), ("a" * 32, True), ("A" * 32, False), ("0" * 31, False),
    ("0" * 33, False), ("g" * 32, False), ("", False)])
def test_well_formed_digest(text, ok):
    assert apop.well_formed_digest(text) is ok


@given(st.text(min_size=1, max_size=40))
def test_digest_is_md5_of_timestamp_and_secret(secret):
    stamp = "<9.9@x>"
    expected = hashlib.md5((stamp + secret).encode()).hexdigest()
    assert apop.digest(stamp, secret) == expected
    assert apop.check(stamp, secret, expected)

"""common.address: only plain local@domain passes; programs, files, options,
source routes and %/! relaying never become addresses."""

import pytest

from common import address


@pytest.mark.parametrize("good", [
    "user@example.org", "first.last+tag@sub.example.org", "u@[192.0.2.1]",
    "u@[IPv6:2001:db8::1]", '"quoted local"@example.org', "o'brien@example.org",
    "user@example.org.", "a|b@example.org", "x" * 64 + "@example.org",
])
def test_acceptable(good):
    assert address.problem(good) is None


@pytest.mark.parametrize("bad,reason", [
    ("", "empty address"),
    ("-oQ/tmp@example.org", "address starts with -"),
    ("|/bin/sh", "address starts with |"),
    ("/etc/passwd", "address starts with /"),
    ("@hop.example:user@example.org", "source route"),
    ("@a,@b:user@example.org", "source route"),
    ("user%other@example.org", "%/! relaying is not allowed"),
    ("host!user@example.org", "%/! relaying is not allowed"),
    ("a@b@example.org", "source route or not exactly one @"),
    ("user", "no domain"),
    ("user@", "no domain"),
    ("us er@example.org", "control character or space in address"),
    ("user\t@example.org", "control character or space in address"),
    ("user\x7f@example.org", "control character or space in address"),
    ("üser@example.org", "control character or space in address"),
    ('"|cmd"@example.org', "local part starts with |"),
    ('"-oX"@example.org', "local part starts with -"),
    ('"/tmp/x"@example.org', "local part starts with /"),
    ('"a%b"@example.org', "quoted local part with a forbidden character"),
    ('"a@b"@example.org', "quoted local part with a forbidden character"),
    ('"open@example.org', "unterminated quoted local part"),
    (".user@example.org", "bad local part"),
    ("us..er@example.org", "bad local part"),
    ("x" * 65 + "@example.org", "local part too long"),
    ("user@-bad.example", "bad domain"),
    ("user@exa_mple.org", "bad character in domain"),
    ("user@[300.1.1.1]", "bad address literal"),
    ("user@" + "a" * 250 + ".org", "address too long"),
])
def test_refused_with_reason(bad, reason):
    assert address.problem(bad) == reason


def test_bare_postmaster_only_where_allowed():
    assert address.problem("postmaster") == "no domain"
    assert address.problem("PostMaster", allow_bare_postmaster=True) is None
    assert address.problem("webmaster", allow_bare_postmaster=True) == "no domain"


def test_domains_include_subdomains_only():
    domains = ["example.org"]
    assert address.in_domains("a@example.org", domains)
    assert address.in_domains("a@Mail.Example.ORG.", domains)
    assert not address.in_domains("a@badexample.org", domains)
    assert not address.in_domains("a@example.org.evil.test", domains)
    assert not address.in_domains("a@[192.0.2.1]", domains)
    assert not address.in_domains("postmaster", domains)

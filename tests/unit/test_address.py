"""common.address: only plain local@domain passes; programs, files, options,
source routes and %/! relaying never become addresses."""

import pytest

from common import address


@pytest.mark.parametrize("good", [
    "user@example.org", "first.last+tag@sub.example.org", "u@[192.0.2.1]",
    "u@[IPv6:2001:db8::1]", '"quoted local"@example.org', "o'brien@example.org",
    "a|b@example.org", "x" * 64 + "@example.org",
    # ordinary spellings that the finding-8 rule must leave alone
    '"john smith"@yoyodyne.com', "o'brien@x.org", "a-b@x.org", "x@[127.0.0.1]",
    "x@[IPv6:::1]", '"john "@x.org', '"a-b"@x.org', '"a|b"@x.org', '"a/b"@x.org',
    "a/b@x.org", "a.-b@x.org", "U@YOYODYNE.COM", "u@a-b.x.org",
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
    # issue 11 finding 8: the local part as a delivery agent reads it
    ('" -oQ/tmp"@b.org', "local part starts with -"),
    ('" |/bin/sh"@yoyodyne.com', "local part starts with |"),
    ('"   /etc/passwd"@x.org', "local part starts with /"),
    ('" "@x.org', "empty local part"),
    ('"    "@x.org', "empty local part"),
    ('""@x.org', "empty local part"),
    ('"\t-be"@x.org', "control character or space in address"),
    ('"\\-x"@x.org', "quoted local part with a forbidden character"),
    ('"\\ -x"@x.org', "quoted local part with a forbidden character"),
    ('"\u00a0-be"@x.org', "control character or space in address"),
    ('"\u2003|cmd"@x.org', "control character or space in address"),
    ('"\u3000/x"@x.org', "control character or space in address"),
    ('"a"."-b"@x.org', "no domain"),
    ('""-b@x.org', "no domain"),
    # a domain with an empty label, the trailing dot of an FQDN included
    ("u@yoyodyne.com..", "empty label in domain"),
    ("u@yoyodyne..com", "empty label in domain"),
    ("u@.yoyodyne.com", "empty label in domain"),
    ("u@yoyodyne.com.", "empty label in domain"),
    ("u@.", "empty label in domain"),
    ('"a b"@yoyodyne.com.', "empty label in domain"),
])
def test_refused_with_reason(bad, reason):
    assert address.problem(bad) == reason


def test_bare_postmaster_only_where_allowed():
    assert address.problem("postmaster") == "no domain"
    assert address.problem("PostMaster", allow_bare_postmaster=True) is None
    assert address.problem("webmaster", allow_bare_postmaster=True) == "no domain"


@pytest.mark.parametrize("local,bare", [
    ("user", "user"), ('"john smith"', "john smith"), ('" -oQ/tmp"', "-oQ/tmp"),
    ('"\t |cmd "', "|cmd"), ('" "', ""), ('""', ""), ('"\\-x"', "-x"),
    ('"\\\\-x"', "\\-x"), ("\\-x", "-x"), ('"" "-be"', "-be"), ('"a"."-b"', "a.-b"),
    ('"\u00a0/x"', "/x"), ("\r\n\t-x", "-x"),
])
def test_unquoted_local_part(local, bare):
    assert address.unquoted_local_part(local) == bare


@pytest.mark.parametrize("local", ["-x", '" -x"', '"\t|x"', "  /x", '"\\-x"', "\\|x",
                                   '"" "-be"', '"\u2003-x"'])
def test_names_an_option_program_or_file(local):
    assert address.names_option_program_or_file(local)


@pytest.mark.parametrize("local", ["user", '"john smith"', "a-b", "a|b", '"\\\\-x"', '"a"."-b"',
                                   "", '" "'])
def test_does_not_name_an_option_program_or_file(local):
    assert not address.names_option_program_or_file(local)


def test_domains_include_subdomains_only():
    domains = ["example.org"]
    assert address.in_domains("a@example.org", domains)
    assert address.in_domains("a@Mail.Example.ORG", domains)
    assert not address.in_domains("a@badexample.org", domains)
    assert not address.in_domains("a@example.org.evil.test", domains)
    assert not address.in_domains("a@[192.0.2.1]", domains)
    assert not address.in_domains("postmaster", domains)


@pytest.mark.parametrize("spelling", ["a@example.org.", "a@example.org..", "a@mail..example.org",
                                      "a@.example.org", "a@example.org.evil.test.",
                                      "a@EXAMPLE.ORG.."])
def test_no_spelling_variant_passes_the_relay_check(spelling):
    # what problem() refuses, in_domains never counts as one of ours either
    assert address.problem(spelling) is not None
    assert not address.in_domains(spelling, ["example.org"])


@pytest.mark.parametrize("configured", ["example.org", "Example.ORG", "example.org."])
def test_configured_domains_match_in_any_case_or_with_a_trailing_dot(configured):
    # smapd passes the table's words as they are: the same rule as smap's Policy
    assert address.in_domains("a@mail.example.org", [configured])
    assert address.in_domains("a@EXAMPLE.org", [configured])
    assert not address.in_domains("a@example.org.", [configured])

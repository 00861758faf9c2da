"""common.netperm: the FWTK-syntax table, typed values from common.params,
and every problem as FILE:LINE: message."""

import os
import pwd

import pytest

from common import netperm, params


def parse(text, program="smap", path="table"):
    return netperm.parse(text, path, program)


def messages(config):
    return [str(p) for p in config.problems]


def test_defaults_come_from_the_declarations():
    config = parse("")
    assert config.errors == []
    assert config.get("timeout") == 300
    assert config.get("maxbytes") == 10485760
    assert config.get("maxrecip") == 100
    assert config.get("directory") == "/var/spool/smap"
    assert config.get("logfacility") == params.FACILITIES["mail"]
    assert config.get("userid")[2] == "uucp"
    assert parse("", "pop3-gw").get("timeout") == 600


def test_keywords_comments_continuations_and_quotes():
    text = ("# a comment\n"
            "\n"
            "   # indented comment\n"
            "smap, smapd: accept-domains Example.ORG \\\n"
            "    example.net\n"
            "smap smapd: timeout 60\n"
            "*: logfacility local3\n"
            "pop3-gw: timeout 900\n"
            "smap: hostname 'mx.example.org'\n")
    config = parse(text)
    assert config.errors == []
    assert config.get("accept-domains") == ["example.org", "example.net"]
    assert config.get("timeout") == 60
    assert config.get("logfacility") == params.FACILITIES["local3"]
    assert config.get("hostname") == "mx.example.org"


def test_first_matching_line_wins():
    config = parse("smap: maxrecip 5\nsmap: maxrecip 7\n*: maxrecip 9\n")
    assert config.get("maxrecip") == 5


@pytest.mark.parametrize("line,message", [
    ("no colon here", "table:1: no ':' after the program names"),
    (": timeout 5", "table:1: no program named before ':'"),
    ("smpa: timeout 5", "table:1: unknown program smpa"),
    ("smap:", "table:1: no attribute after ':'"),
    ("smap: tiemout 5", "table:1: unknown attribute 'tiemout' for smap"),
    ("smap: server mail.example.org", "table:1: unknown attribute 'server' for smap"),
    ("smap: timeout", "table:1: timeout: needs exactly one number"),
    ("smap: timeout 5 6", "table:1: timeout: needs exactly one number"),
    ("smap: timeout five", "table:1: timeout: 'five' is not a whole number"),
    ("smap: timeout 1_000", "table:1: timeout: '1_000' is not a whole number"),
    ("smap: timeout +5", "table:1: timeout: '+5' is not a whole number"),
    ("smap: timeout 0", "table:1: timeout: 0 is outside 1..86400"),
    ("smap: maxrecip 10001", "table:1: maxrecip: 10001 is outside 1..10000"),
    ("smap: directory spool", "table:1: directory: 'spool' is not an absolute path"),
    ("smap: userid no-such-user-here", "table:1: userid: no such user 'no-such-user-here'"),
    ("smap: logfacility nonsense", "table:1: logfacility: unknown syslog facility 'nonsense'"),
    ("smap: hostname 'two words'", "table:1: hostname: 'two words' has a character that is not allowed"),
    ("smap: accept-domains", "table:1: accept-domains: needs at least one argument"),
    ("smap: permit-hosts 10.0.0.0/40", "table:1: permit-hosts: bad CIDR pattern '10.0.0.0/40'"),
    ("smap: permit-relay", "table:1: permit-relay: needs at least one argument"),
    ("smap: hostname 'open", "table:1: unterminated quote"),
])
def test_errors_are_file_line_message(line, message):
    config = parse("# first line\n" + line + "\n", path="table")
    shifted = message.replace("table:1:", "table:2:")
    assert messages(config) == [shifted]
    assert config.errors


def test_continued_line_reports_its_first_line():
    config = parse("smap: timeout \\\n  nope\n")
    assert messages(config) == ["table:1: timeout: 'nope' is not a whole number"]


def test_star_lines_for_other_programs_are_not_errors():
    config = parse("*: server pop.example.org\n*: authfile /etc/mailwall/pop3-auth\n")
    assert config.errors == []
    assert parse("*: nonsense 1\n").errors


def test_missing_paths_are_warnings_not_errors(tmp_path):
    config = parse("smap: directory %s/absent\n" % tmp_path)
    assert config.errors == []
    assert [str(p) for p in config.problems] == [
        "table:1: warning: directory: %s/absent does not exist on this machine" % tmp_path]
    config = parse("smapd: sendmail /no/such/sendmail -bm\n", "smapd")
    assert config.errors == [] and config.problems[0].warning


def test_users_groups_and_numbers():
    config = parse("smap: userid uucp\nsmap: groupid 4242\n")
    uucp = pwd.getpwnam("uucp")
    assert config.get("userid") == (uucp.pw_uid, uucp.pw_gid, "uucp")
    assert config.get("groupid") == 4242
    assert parse("smap: userid 54321\n").get("userid") == (54321, 54321, "54321")


def test_host_rules_are_kept_in_file_order():
    config = parse("smap: deny-hosts 127.0.0.2\nsmap: permit-hosts 127.0.0.0/8 *.example.org\n"
                   "smapd: permit-hosts 10.0.0.1\n")
    assert [(r.permit, r.line) for r in config.rules] == [(False, 1), (True, 2)]
    assert [p.text for p in config.rules[1].sources] == ["127.0.0.0/8", "*.example.org"]


def test_hostport_values():
    assert netperm.parse_hostport("mail.example.org:2525", 25) == ("mail.example.org", 2525)
    assert netperm.parse_hostport("[2001:db8::1]:110", 110) == ("2001:db8::1", 110)
    assert netperm.parse_hostport("10.0.0.1", 110) == ("10.0.0.1", 110)
    for bad in ("host:99999", "bad host", "[::1", "host:port"):
        with pytest.raises(ValueError):
            netperm.parse_hostport(bad, 25)
    config = parse("smapd: mailhub None\n", "smapd")
    assert config.errors == [] and config.get("mailhub") is None


def test_load_reports_unreadable_big_and_non_utf8_files(tmp_path):
    missing = netperm.load(str(tmp_path / "absent"), "smap")
    assert str(missing.errors[0]).startswith("%s: cannot read" % (tmp_path / "absent"))
    big = tmp_path / "big"
    big.write_bytes(b"#" * (netperm.MAX_TABLE_BYTES + 1))
    assert "larger than" in str(netperm.load(str(big), "smap").errors[0])
    latin = tmp_path / "latin"
    latin.write_bytes(b"smap: timeout 5\nsmap: hostname caf\xe9\n")
    assert str(netperm.load(str(latin), "smap").errors[0]) == "%s:2: not UTF-8 text" % latin
    good = tmp_path / "good"
    good.write_text("smap: maxrecip 3\n")
    assert netperm.load(str(good), "smap").get("maxrecip") == 3


def test_every_declaration_has_a_doc_and_a_usable_default():
    for param in params.declared():
        assert param.doc and param.programs
        if param.kind == "int":
            assert param.low <= param.default <= param.high, param.name
        if param.default is not None and param.kind not in ("user",):
            netperm.convert(param, netperm.split_words(str(param.default)))


def test_a_table_others_may_write_or_replace_is_refused(tmp_path):
    """Root acts on the table: a file or directory others can write is refused
    with one `FILE: reason` problem, and nothing of its content is used."""
    table = tmp_path / "table"
    table.write_text("smap: maxrecip 3\n")
    os.chmod(table, 0o666)
    config = netperm.load(str(table), "smap")
    assert [str(p) for p in config.problems] == [
        "%s: writable by group or others (mode 0666); root acts on this table, "
        "so it must be root's alone" % table]
    assert config.get("maxrecip") == 100
    os.chmod(table, 0o644)
    assert netperm.load(str(table), "smap").errors == []
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    inside = shared / "table"
    inside.write_text("smap: maxrecip 3\n")
    assert "%s: writable by group or others" % shared in str(
        netperm.load(str(inside), "smap").errors[0])
    link = tmp_path / "link"
    link.symlink_to(table)
    assert "is a symbolic link" in str(netperm.load(str(link), "smap").errors[0])


def test_a_table_owned_by_another_user_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file away")
    table = tmp_path / "table"
    table.write_text("smap: maxrecip 3\n")
    os.chown(table, 65534, 65534)
    assert "owned by uid 65534, not by root" in str(netperm.load(str(table), "smap").errors[0])


def test_root_user_and_root_group_are_refused():
    for line in ("smap: userid root", "smap: userid 0", "smapd: userid root",
                 "pop3-gw: userid 0"):
        program = line.split(":")[0]
        config = parse(line + "\n", program)
        assert any("uid 0 is root" in str(p) for p in config.errors), line
    for line in ("smap: groupid 0", "smap: groupid root", "pop3-gw: groupid 0"):
        program = line.split(":")[0]
        config = parse(line + "\n", program)
        assert any("gid 0 is root's group" in str(p) for p in config.errors), line


def test_a_user_whose_own_group_is_root_needs_a_groupid(monkeypatch):
    monkeypatch.setattr(netperm, "lookup_user", lambda word: (4321, 0, word))
    config = parse("smap: userid operator\n", "smap")
    assert [str(p) for p in config.errors] == [
        "table:1: userid: operator's group is gid 0 (root's); name another with groupid"]
    assert parse("smap: userid operator\nsmap: groupid 4321\n", "smap").errors == []

"""The man pages, conf/netperm-table and common/params.py must agree.

common/params.py declares every tunable once.  This test reads

* the CONFIGURATION section of each program's man page (man/smap.8,
  man/smapd.8, man/pop3-gw.8, man/authmgr.8): one `.TP` entry per
  attribute whose tag line starts with the attribute name, and one line
  `Default: \\fBliteral\\fR.` (the exact default) or
  `Default: \\fIdescription\\fR.` (the declaration has no literal default);
* the ATTRIBUTES section of man/netperm-table.5: the same, one entry per
  declaration, with the programs in parentheses at the end of the tag;
* conf/netperm-table: every attribute of every program appears on a table
  line (commented out or not), and a commented-out table line shows the
  built-in default exactly (a declaration without a literal default may
  show an example);

and fails on any difference: a missing or extra attribute, a default that
differs, an attribute listed for the wrong programs.  The helpers return
lists of problems so that the last tests can prove each check fails on a
drifted copy.  Pure: reads files of the checkout, nothing else.
"""

import re
from pathlib import Path

import pytest

from common import netperm, params

ROOT = Path(__file__).resolve().parents[2]
MAN_PAGES = {
    params.SMAP: "man/smap.8",
    params.SMAPD: "man/smapd.8",
    params.POP3GW: "man/pop3-gw.8",
    params.AUTHMGR: "man/authmgr.8",
}
NETPERM_PAGE = "man/netperm-table.5"
SAMPLE = "conf/netperm-table"
DESCRIPTIVE = object()      # "the default is described, not a literal"


def roff_text(text):
    """Plain text of one roff line: font escapes dropped, \\- and \\e decoded."""
    text = re.sub(r"\\f[BIRP]", "", text)
    return text.replace("\\-", "-").replace("\\e", "\\").replace("\\(em", "--")


def section(text, name):
    """The lines of section `.SH name` (up to the next .SH)."""
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith(".SH"):
            if inside:
                break
            inside = line.split(None, 1)[1:] == [name]
            continue
        if inside:
            lines.append(line)
    return lines


def entries(lines):
    """(tag, body lines) of each .TP entry."""
    found, current = [], None
    for line in lines:
        if line == ".TP":
            current = []
            found.append(current)
        elif current is not None:
            current.append(line)
    return [(chunk[0], chunk[1:]) for chunk in found if chunk]


def parse_default(body):
    """(default or DESCRIPTIVE, problem or None) from an entry's Default: line."""
    lines = [line for line in body if line.startswith("Default:")]
    if len(lines) != 1:
        return None, "has %d Default: lines, not one" % len(lines)
    raw = lines[0][len("Default:"):].strip()
    if raw.endswith("."):
        raw = raw[:-1]
    if raw.startswith("\\fI"):
        return DESCRIPTIVE, None
    if raw.startswith("\\fB") and raw.endswith("\\fR"):
        return roff_text(raw), None
    return None, "Default: neither \\fBliteral\\fR nor \\fIdescription\\fR: %r" % raw


def expected_default(param):
    return DESCRIPTIVE if param.default is None else str(param.default)


def show(default):
    return "(described)" if default is DESCRIPTIVE else repr(default)


def man_page_problems(program, text, declared=None):
    """Differences between a program's CONFIGURATION section and its declarations."""
    declared = params.for_program(program) if declared is None else declared
    problems, seen = [], {}
    config = section(text, "CONFIGURATION")
    if not config:
        return ["no CONFIGURATION section"]
    for tag, body in entries(config):
        words = roff_text(tag).split()
        name = words[0] if words else ""
        default, problem = parse_default(body)
        if problem:
            problems.append("%s: %s" % (name, problem))
            continue
        if name in seen:
            problems.append("%s: listed twice" % name)
        seen[name] = default
    for name in sorted(set(declared) - set(seen)):
        problems.append("%s: declared for %s but not documented" % (name, program))
    for name in sorted(set(seen) - set(declared)):
        problems.append("%s: documented but not declared for %s" % (name, program))
    for name in sorted(set(seen) & set(declared)):
        want = expected_default(declared[name])
        if seen[name] != want:
            problems.append("%s: man page default %s, params.py %s"
                            % (name, show(seen[name]), show(want)))
    return problems


def netperm_page_problems(text, declarations=None):
    """Differences between netperm-table(5) ATTRIBUTES and all declarations."""
    declarations = params.declared() if declarations is None else declarations
    problems, documented = [], set()
    lines = section(text, "ATTRIBUTES")
    if not lines:
        return ["no ATTRIBUTES section"]
    for tag, body in entries(lines):
        plain = roff_text(tag)
        name = plain.split()[0] if plain.split() else ""
        match = re.search(r"\(([^()]*)\)\s*$", plain)
        if not match:
            problems.append("%s: no (programs) at the end of the tag" % name)
            continue
        programs = [p.strip() for p in match.group(1).split(",")]
        programs = frozenset(params.ALL if programs == ["*"] else programs)
        default, problem = parse_default(body)
        if problem:
            problems.append("%s: %s" % (name, problem))
            continue
        documented.add((name, programs, default))
    wanted = {(p.name, frozenset(p.programs), expected_default(p)) for p in declarations}
    for name, programs, default in sorted(wanted - documented, key=str):
        problems.append("%s (%s) default %s: declared but not in netperm-table(5)"
                        % (name, ", ".join(sorted(programs)), show(default)))
    for name, programs, default in sorted(documented - wanted, key=str):
        problems.append("%s (%s) default %s: in netperm-table(5) but not declared so"
                        % (name, ", ".join(sorted(programs)), show(default)))
    return problems


TABLE_LINE = re.compile(r"^\s*(#\s*)?([A-Za-z0-9*][A-Za-z0-9*,\s-]*?)\s*:\s*(\S.*)$")


def table_lines(text):
    """(line number, commented?, programs, attribute, args) of each table line,
    commented out or not; prose comments are skipped."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        match = TABLE_LINE.match(line)
        if not match:
            continue
        names = [n for n in match.group(2).replace(",", " ").split() if n]
        if not names or any(n != "*" and n not in params.ALL for n in names):
            continue
        programs = params.ALL if "*" in names else tuple(names)
        try:
            words = netperm.split_words(match.group(3))
        except ValueError:
            words = []
        if not words:
            continue
        found.append((number, bool(match.group(1)), programs, words[0], words[1:]))
    return found


def sample_problems(text, declarations=None):
    """Differences between conf/netperm-table and the declarations."""
    declarations = params.declared() if declarations is None else declarations
    by_program = {}
    for param in declarations:
        for program in param.programs:
            by_program.setdefault(program, {})[param.name] = param
    problems, covered = [], set()
    for number, commented, programs, name, args in table_lines(text):
        for program in programs:
            param = by_program.get(program, {}).get(name)
            if param is None:
                if len(programs) < len(params.ALL):   # `*` lines need not fit every program
                    problems.append("line %d: %s is not an attribute of %s"
                                    % (number, name, program))
                continue
            covered.add((program, name))
            if commented and param.default is not None and args != str(param.default).split():
                problems.append("line %d: %s: %s shows %r, the default is %r"
                                % (number, program, name, " ".join(args), param.default))
    for param in declarations:
        for program in param.programs:
            if (program, param.name) not in covered:
                problems.append("%s: %s is not in the sample" % (program, param.name))
    return problems


def read(relative):
    return (ROOT / relative).read_text()


# --- the real files agree -------------------------------------------------

@pytest.mark.parametrize("program", sorted(MAN_PAGES))
def test_man_page_matches_params(program):
    assert man_page_problems(program, read(MAN_PAGES[program])) == []


def test_netperm_table_page_matches_params():
    assert netperm_page_problems(read(NETPERM_PAGE)) == []


def test_sample_table_matches_params():
    assert sample_problems(read(SAMPLE)) == []


@pytest.mark.parametrize("program", params.ALL)
def test_sample_table_is_a_usable_table(program):
    config = netperm.parse(read(SAMPLE), SAMPLE, program)
    assert [str(p) for p in config.errors] == []


def test_every_program_has_a_page_and_every_page_documents_something():
    assert set(MAN_PAGES) == set(params.ALL)
    for program, page in MAN_PAGES.items():
        assert entries(section(read(page), "CONFIGURATION")), page


# --- each check fails when one of the three drifts -------------------------

def test_drifted_man_default_is_caught():
    text = read(MAN_PAGES[params.SMAP]).replace("Default: \\fB300\\fR.", "Default: \\fB301\\fR.")
    assert any("timeout" in p and "301" in p for p in man_page_problems(params.SMAP, text))


def test_missing_man_entry_is_caught():
    text = read(MAN_PAGES[params.SMAPD])
    start = text.index(".TP\n\\fBwakeup\\fR")
    end = text.index(".TP", start + 3)
    assert any("wakeup" in p and "not documented" in p
               for p in man_page_problems(params.SMAPD, text[:start] + text[end:]))


def test_new_declaration_is_caught_everywhere():
    extra = params.Param("newthing", (params.POP3GW,), "int", 7, 1, 9, "a new tunable")
    declarations = params.declared() + [extra]
    declared = {**params.for_program(params.POP3GW), "newthing": extra}
    assert any("newthing" in p for p in man_page_problems(params.POP3GW, read(MAN_PAGES[params.POP3GW]), declared))
    assert any("newthing" in p for p in netperm_page_problems(read(NETPERM_PAGE), declarations))
    assert any("newthing" in p for p in sample_problems(read(SAMPLE), declarations))


def test_changed_declared_default_is_caught_everywhere():
    declarations = [p._replace(default=11) if p.name == "maxbad" else p for p in params.declared()]
    declared = {p.name: p for p in declarations if params.POP3GW in p.programs}
    assert any("maxbad" in p for p in man_page_problems(params.POP3GW, read(MAN_PAGES[params.POP3GW]), declared))
    assert any("maxbad" in p for p in netperm_page_problems(read(NETPERM_PAGE), declarations))
    assert any("maxbad" in p for p in sample_problems(read(SAMPLE), declarations))


def test_drifted_sample_default_and_missing_line_are_caught():
    text = read(SAMPLE)
    assert "# smapd: wakeup 60\n" in text
    assert any("wakeup" in p for p in sample_problems(text.replace("# smapd: wakeup 60\n", "# smapd: wakeup 30\n")))
    assert any("wakeup" in p for p in sample_problems(text.replace("# smapd: wakeup 60\n", "")))


def test_wrong_programs_in_netperm_page_are_caught():
    text = read(NETPERM_PAGE).replace("\\fBwakeup\\fR \\fIseconds\\fR (smapd)",
                                      "\\fBwakeup\\fR \\fIseconds\\fR (smap, smapd)")
    assert any("wakeup" in p for p in netperm_page_problems(text))

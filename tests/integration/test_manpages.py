"""The man pages render and are clean under mandoc -Tlint and groff -ww -z.

Real tools: mandoc, groff and man from Debian.  A missing tool skips the
test, or fails it under MAILWALL_REQUIRE_REAL=1.  Every page must have the
sections an administrator looks for.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.integration import realpeers

ROOT = Path(__file__).resolve().parents[2]
PAGES = ["man/smap.8", "man/smapd.8", "man/pop3-gw.8", "man/authmgr.8", "man/netperm-table.5"]
SECTIONS = ["NAME", "SYNOPSIS", "DESCRIPTION", "FILES", "SEE ALSO"]
PROGRAM_SECTIONS = ["OPTIONS", "CONFIGURATION", "EXIT STATUS", "SECURITY", "EXAMPLES"]


def run(argv):
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8"))


@pytest.mark.parametrize("page", PAGES)
def test_mandoc_lint_is_clean(page):
    realpeers.require("mandoc")
    result = run(["mandoc", "-Tlint", "-Wstyle", page])
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("page", PAGES)
def test_groff_has_no_warnings(page):
    realpeers.require("groff")
    result = run(["groff", "-ww", "-z", "-man", page])
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("page", PAGES)
def test_man_renders_the_sections(page):
    realpeers.require("man")
    result = run(["man", "-l", page])
    assert result.returncode == 0, result.stderr
    text = re.sub(".\b", "", result.stdout)     # overstrike bold, if any
    headings = {line.strip() for line in text.splitlines()
                if line and not line[0].isspace()}
    wanted = SECTIONS + (PROGRAM_SECTIONS if page.endswith(".8") else ["ATTRIBUTES", "EXAMPLES"])
    assert [s for s in wanted if s not in headings] == []
    name = Path(page).stem
    assert text.splitlines()[0].startswith(name.upper())


def test_lint_notices_a_broken_page(tmp_path):
    """The lint test can fail: a page with an unknown macro is reported."""
    realpeers.require("mandoc", "groff")
    broken = tmp_path / "broken.8"
    broken.write_text((ROOT / "man/smap.8").read_text().replace(".SH FILES", ".SHX FILES"))
    assert run(["mandoc", "-Tlint", str(broken)]).stdout + run(["mandoc", "-Tlint", str(broken)]).stderr
    assert run(["groff", "-ww", "-z", "-man", str(broken)]).stderr

"""CI smoke run of `make bench` (bench/run.py --smoke): tiny sizes, one
repetition, every measurement must produce a number.  It never checks
that anything is fast.  A missing peer skips the test, or fails it under
MAILWALL_REQUIRE_REAL=1, like the other integration tests.

It trusts bench/run.py to start and stop its own servers on loopback.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration import realpeers

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_every_measurement_produces_a_number(tmp_path):
    realpeers.require_root()
    realpeers.require("smtp-source", "smtp-sink", "postfix", "postconf", "sendmail",
                      "postqueue", "xinetd", "dovecot", "perdition.pop3", "nginx")
    if not os.path.exists("/usr/lib/nginx/modules/ngx_mail_module.so"):
        realpeers.require("/usr/lib/nginx/modules/ngx_mail_module.so")
    out = tmp_path / "bench.json"
    doc = tmp_path / "PERFORMANCE.md"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--smoke",
                        "--json", str(out), "--out", str(doc)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["results"]
    assert rows, "no measurement at all"
    groups = {row["group"] for row in rows}
    assert {"start-up", "smap per connection", "smap intake", "smapd", "pop3",
            "memory"} <= groups
    unmeasured = ["%s | %s | %s: %s" % (row["group"], row["measurement"], row["program"],
                                        row["not_measured"])
                  for row in rows if row["median"] is None]
    assert not unmeasured, "\n".join(unmeasured) + "\n" + r.stderr[-3000:]
    for row in rows:
        assert isinstance(row["median"], float) and row["median"] >= 0, row
    text = doc.read_text()
    assert "| group | measurement |" in text and "Targets of issue 6" in text

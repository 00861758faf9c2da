"""The quick start works: the processes `make run` starts carry a message
from smtplib through smap, smapd and the stand-in hub, and poplib's apop()
reads it back through pop3-gw.

The test runs demo/run.py itself (the file `make run` runs), on free
loopback ports and in a private run directory, as `nobody` when the test
runs as root and the checkout and .venv are usable by nobody (as they are
for an ordinary user of `make run`), otherwise as the current user.  It
then stops run.py with SIGTERM, as Ctrl-C would, and checks that every
process it started is gone.  Everything here is real: no part is faked.
"""

import os
import poplib
import pwd
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.integration import realpeers

ROOT = Path(__file__).resolve().parents[2]
RUN_PY = ROOT / "demo" / "run.py"
pytestmark = pytest.mark.integration


def demo_user():
    """(uid, gid) to run the quick start as: nobody if root and possible."""
    if os.geteuid() != 0:
        return None
    nobody = pwd.getpwnam("nobody")
    probe = subprocess.run(
        [sys.executable, "-c", "import smap.main, smapd.main, pop3gw.main, pop3gw.authmgr"],
        cwd="/", user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[],
        capture_output=True, timeout=60)
    return (nobody.pw_uid, nobody.pw_gid) if probe.returncode == 0 else None


def alive(pid):
    try:
        stat = Path("/proc/%d/stat" % pid).read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def quickstart():
    for name in ("smap", "smapd", "pop3-gw", "authmgr"):
        if not os.access(Path(sys.executable).parent / name, os.X_OK):
            pytest.fail("%s is not installed beside %s" % (name, sys.executable))
    user = demo_user()
    base = Path(tempfile.mkdtemp(prefix="mwqs-"))
    os.chmod(base, 0o755)
    if user:
        os.chown(base, *user)
    run_dir = base / "run"
    smtp_port, pop3_port = realpeers.free_port(), realpeers.free_port()
    kwargs = dict(user=user[0], group=user[1], extra_groups=[]) if user else {}
    out = open(base / "run.out", "wb")
    process = subprocess.Popen(
        [sys.executable, str(RUN_PY), "--dir", str(run_dir),
         "--smtp-port", str(smtp_port), "--pop3-port", str(pop3_port)],
        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=str(ROOT),
        **kwargs)
    out.close()
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "ready").exists():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the quick start did not come up:\n%s"
                            % (base / "run.out").read_text(errors="replace"))
            time.sleep(0.1)
        pids = {line.split()[0]: int(line.split()[1])
                for line in (run_dir / "pids").read_text().splitlines()}
        yield dict(process=process, run_dir=run_dir, pids=pids, user=user,
                   smtp_port=smtp_port, pop3_port=pop3_port, output=base / "run.out")
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        shutil.rmtree(base, ignore_errors=True)


def test_make_run_carries_a_message_from_smtplib_to_poplib_apop(quickstart):
    run_dir, pids = quickstart["run_dir"], quickstart["pids"]
    assert set(pids) == {"hub", "smap", "smapd", "pop3-gw"}
    if quickstart["user"]:
        for name, pid in pids.items():
            status = Path("/proc/%d/status" % pid).read_text()
            uids = re.search(r"^Uid:\s+(\d+)", status, re.M).group(1)
            assert int(uids) == quickstart["user"][0], name

    # the printed instructions name the ports and the demo user
    text = quickstart["output"].read_text()
    assert "127.0.0.1:%d" % quickstart["smtp_port"] in text
    assert 'apop("demo", "demo-secret")' in text

    body = "quick start %d" % time.time_ns()
    with smtplib.SMTP("127.0.0.1", quickstart["smtp_port"], timeout=30) as smtp:
        smtp.ehlo("laptop.example.org")
        smtp.mail("someone@example.org")
        assert smtp.rcpt("demo@mailwall.test")[0] == 250
        code, reply = smtp.data(("Subject: %s\r\nFrom: someone@example.org\r\n"
                                 "\r\n%s\r\n" % (body, body)).encode())
    assert code == 250, reply
    queue_id = re.search(rb"queued as (\S+)", reply).group(1).decode()

    found, deadline = None, time.monotonic() + 30
    while found is None and time.monotonic() < deadline:
        box = poplib.POP3("127.0.0.1", quickstart["pop3_port"], timeout=30)
        try:
            assert box.apop("demo", "demo-secret").startswith(b"+OK")
            for number in range(1, box.stat()[0] + 1):
                lines = box.retr(number)[1]
                if body.encode() in lines:
                    found = lines
        finally:
            box.quit()
        if found is None:
            time.sleep(0.3)
    assert found is not None, "the message did not arrive through pop3-gw"
    assert any(queue_id.encode() in line for line in found)      # smap's Received: line

    # a wrong secret is refused by pop3-gw
    box = poplib.POP3("127.0.0.1", quickstart["pop3_port"], timeout=30)
    with pytest.raises(poplib.error_proto):
        box.apop("demo", "not-the-secret")
    box.close()

    # one grep follows the message from smap through smapd in the demo's log
    log = realpeers.wait_until(
        lambda: (lambda t: t if re.search(r"smapd\[\d+\]: .*id=%s" % queue_id, t) else None)(
            (run_dir / "mailwall.log").read_text(errors="replace")), 10, what="smapd log line")
    assert re.search(r"smap\[\d+\]: .*id=%s" % queue_id, log)

    # Ctrl-C (SIGTERM here) stops everything run.py started
    process = quickstart["process"]
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    realpeers.wait_until(lambda: not any(alive(pid) for pid in pids.values()), 10,
                         what="every quick start process gone")

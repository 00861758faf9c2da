"""README "Several hosts": the documented way to move a dead host's mail
into another host's spool, run as written (the shell loop from the README,
with the two spool paths filled in): each message arrives with its
delivery state, so smapd on the live host delivers only to the recipients
the dead host had not delivered yet, and an id that exists already is
skipped, never replaced."""

import os
import re
import subprocess
from pathlib import Path

import pytest

from common import spool
from smapd import state
from tests.integration import realpeers
from tests.integration import smapd_helpers as helpers

pytestmark = pytest.mark.integration
README = Path(__file__).resolve().parents[2] / "README.md"


def readme_loop():
    """The shell lines of the README's procedure, from `old=` to the sync."""
    text = README.read_text()
    match = re.search(r"\n( +)old=/mnt/old/var/spool/smap new=/var/spool/smap\n(.*?)\n +smapd --flush\n",
                      text, re.S)
    assert match, "the procedure is no longer in README.md"
    indent = len(match.group(1))
    lines = ["old=/mnt/old/var/spool/smap new=/var/spool/smap"] + \
        [line[indent:] for line in match.group(2).splitlines()]
    return "\n".join(lines) + "\n"


def test_a_dead_hosts_mail_moves_with_its_state_and_is_delivered_once(tmp_path):
    realpeers.require_root()
    old = helpers.make_spool(tmp_path / "old")
    new = helpers.make_spool(tmp_path / "new")
    moved = helpers.spool_message(old, "a@example.net", ["one@example.org", "two@example.org"],
                                  b"Subject: moved\r\n\r\nhello\r\n")
    record = state.State()
    record.attempts, record.done = 1, ["one@example.org"]
    state.save(str(old), moved, record)
    uid, gid = helpers.uucp_ids()
    os.chown(old / spool.STATE / moved, uid, gid)
    clash = helpers.spool_message(old, "b@example.net", ["x@example.org"], b"Subject: old\r\n\r\n")
    helpers.spool_message(new, "c@example.net", ["y@example.org"], b"Subject: new\r\n\r\n",
                          message_id=clash)
    script = readme_loop().replace("/mnt/old/var/spool/smap", str(old)) \
        .replace("/var/spool/smap", str(new))
    result = subprocess.run(["bash", "-e", "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "skipped %s: exists" % clash in result.stdout
    assert sorted(spool.queued(str(new))) == sorted([moved, clash])
    assert os.listdir(new / spool.TMP) == []
    envelope, _ = spool.read_message(str(new / spool.QUEUE / clash))
    assert envelope["sender"] == "c@example.net"          # never replaced
    for name in (spool.QUEUE, spool.STATE):
        info = os.stat(new / name / moved)
        assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (uid, gid, 0o600)
    assert state.load(str(new), moved).done == ["one@example.org"]

    recorder = helpers.recorder_dir(tmp_path / "mta")
    table = helpers.write_table(tmp_path / "table", new,
                                sendmail=helpers.recording_sendmail(recorder))
    assert helpers.run_once(table).returncode == 0
    runs = helpers.recorded_runs(recorder)
    recipients = sorted(argv[-1] for argv, _, _ in runs)
    assert recipients == ["two@example.org", "y@example.org"]     # not one@ again
    assert spool.queued(str(new)) == []

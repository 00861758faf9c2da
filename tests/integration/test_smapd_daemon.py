"""smapd as a running daemon: privileges read from /proc, one instance per
spool, the trigger FIFO, --flush, SIGTERM, kill -9 and restart, and a
start as a non-root user.  The MTA is the recording stand-in (it must be
made slow or failing on demand); smapd and smap are the real programs.
"""

import os
import signal
import statistics
import subprocess
import time

import pytest

from common import spool
from smapd import state
from tests.integration import realpeers
from tests.integration import smapd_helpers as helpers

pytestmark = pytest.mark.integration

MESSAGE = b"From: a@example.net\r\nSubject: daemon\r\n\r\nbody\r\n"


@pytest.fixture
def setup(tmp_path, rsyslog):
    realpeers.require_root()
    directory = helpers.make_spool(tmp_path / "spool")
    recorder = helpers.recorder_dir(tmp_path / "mta")

    def table(*lines):
        return helpers.write_table(tmp_path / "table", directory,
                                   sendmail=helpers.recording_sendmail(recorder),
                                   logsocket=rsyslog.socket, lines=lines)
    return tmp_path, directory, recorder, table, rsyslog


def delivered_ids(recorder):
    """Queue ids named in smap's or our test's messages that reached the MTA."""
    return [data for _, data, _ in helpers.recorded_runs(recorder)]


def wait_gone(pid, timeout=30):
    realpeers.wait_until(lambda: not realpeers._pid_alive(pid), timeout, what="pid %d gone" % pid)


def test_privileges_single_instance_and_sigterm(setup):
    tmp_path, directory, recorder, table, rsyslog = setup
    config = table("smapd: deliver-timeout 30")
    message_id = helpers.spool_message(directory, "a@example.net", ["slow@example.org"], MESSAGE)
    with helpers.Smapd(config, directory, tmp_path / "smapd.out") as smapd:
        spool.poke(str(directory))
        processes = realpeers.wait_until(
            lambda: (d := helpers.descendants_of(smapd.pid)) and len(d) >= 3 and d, 15,
            what="agent, worker and MTA")
        everyone = [smapd.pid] + processes
        for pid in everyone:
            assert "0" not in helpers.proc_status(pid, "Uid"), helpers.title_of(pid)
            assert "0" not in helpers.proc_status(pid, "Gid"), helpers.title_of(pid)
            assert helpers.proc_status(pid, "Groups") in ([], ["10"])
        assert helpers.title_of(smapd.pid) == "smapd: scanner"
        assert os.readlink("/proc/%d/root" % smapd.pid) == os.path.realpath(directory)
        agent = smapd.agent_pid()
        assert helpers.title_of(agent) == "smapd: agent"
        assert os.readlink("/proc/%d/root" % agent) == "/"
        [worker] = helpers.children_of(agent)
        assert helpers.title_of(worker) == "smapd: delivering %s" % message_id

        # a second smapd on the same spool refuses, in every mode that delivers
        for mode in ("--once", "-F"):
            second = subprocess.run([helpers.SMAPD, "-c", str(config), mode],
                                    capture_output=True, timeout=30)
            assert second.returncode == 1 and b"another smapd" in second.stderr

        # SIGTERM: no new work, but the running delivery finishes and is settled
        os.kill(smapd.pid, signal.SIGTERM)
        assert smapd.proc.popen.wait(30) == 0
        wait_gone(agent)
    assert spool.queued(str(directory)) == []
    assert len(helpers.recorded_runs(recorder)) == 1
    assert not (directory / ".smapd.pid").exists()


def test_trigger_latency_with_wakeup_60(setup):
    tmp_path, directory, recorder, table, rsyslog = setup
    config = table("smapd: maxchildren 6")
    latencies = []
    with helpers.Smapd(config, directory, tmp_path / "smapd.out"):
        accepted = {}
        for number in range(50):
            message_id = helpers.smap_submit(config, "a@example.net", ["n%d@example.org" % number],
                                             MESSAGE)
            accepted[message_id] = time.time()
        runs = realpeers.wait_until(
            lambda: (r := helpers.recorded_runs(recorder)) and len(r) >= 50 and r, 30,
            what="50 MTA runs")
    for argv, data, _ in runs:
        pass
    started = {}
    for path in recorder.glob("*.stdin"):
        data = path.read_bytes()
        for message_id in accepted:
            if (" id %s" % message_id).encode() in data:
                started[message_id] = float(path.name.split("-")[0])
    assert set(started) == set(accepted)
    latencies = [started[i] - accepted[i] for i in accepted]
    # loose: the benchmark measures it precisely; without the trigger it would be ~30 s
    assert statistics.median(latencies) < 0.5, sorted(latencies)


def test_flush_retries_deferred_mail_now(setup):
    tmp_path, directory, recorder, table, rsyslog = setup
    config = table("smapd: retry 3600")
    message_id = helpers.spool_message(directory, "a@example.net", ["exit75@example.org"], MESSAGE)
    with helpers.Smapd(config, directory, tmp_path / "smapd.out"):
        spool.poke(str(directory))
        realpeers.wait_until(lambda: state.load(str(directory), message_id).attempts == 1, 15,
                             what="first attempt")
        spool.poke(str(directory))          # a poke alone does not retry before `retry`
        time.sleep(0.5)
        assert state.load(str(directory), message_id).attempts == 1
        flushed = subprocess.run([helpers.SMAPD, "-c", str(config), "--flush"],
                                 capture_output=True, timeout=30)
        assert flushed.returncode == 0, flushed.stderr
        realpeers.wait_until(lambda: state.load(str(directory), message_id).attempts == 2, 15,
                             what="second attempt after --flush")
    listing = subprocess.run([helpers.SMAPD, "-c", str(config), "-q"], capture_output=True,
                             timeout=30).stdout.decode()
    assert message_id in listing and "attempts=2" in listing and "EX_TEMPFAIL" in listing
    assert "<exit75@example.org>" in listing
    stopped = subprocess.run([helpers.SMAPD, "-c", str(config), "--flush"],
                             capture_output=True, timeout=30)
    assert stopped.returncode == 1


@pytest.mark.parametrize("victim", ["scanner", "agent"])
def test_kill_9_during_delivery_then_restart(setup, victim):
    tmp_path, directory, recorder, table, rsyslog = setup
    config = table("smapd: wakeup 1", "smapd: maxchildren 2")
    ids = [helpers.spool_message(directory, "a@example.net", ["slow%d@example.org" % n], MESSAGE)
           for n in range(4)]
    first = helpers.Smapd(config, directory, tmp_path / "smapd1.out")
    try:
        spool.poke(str(directory))
        realpeers.wait_until(lambda: len(helpers.descendants_of(first.pid)) >= 3, 15,
                             what="deliveries running")
        agent = first.agent_pid()
        survivors = helpers.descendants_of(first.pid)
        os.kill(first.pid if victim == "scanner" else agent, signal.SIGKILL)
        for pid in [first.pid] + survivors:
            wait_gone(pid, 30)
    finally:
        first.stop()
    with helpers.Smapd(config, directory, tmp_path / "smapd2.out"):
        realpeers.wait_until(lambda: spool.queued(str(directory)) == [], 60,
                             what="the queue delivered after the restart")
    recipients = [argv[-1] for argv, _, _ in helpers.recorded_runs(recorder)]
    for number in range(4):
        assert "slow%d@example.org" % number in recipients
    assert list((directory / spool.BAD).iterdir()) == []
    assert len(ids) == 4


def test_started_as_a_user_runs_as_that_user(setup):
    tmp_path, directory, recorder, table, rsyslog = setup
    config = table()
    os.chmod(config, 0o644)
    realpeers.open_up(tmp_path)
    message_id = helpers.spool_message(directory, "a@example.net", ["b@example.org"], MESSAGE)
    result = subprocess.run(realpeers.as_user("uucp", [helpers.SMAPD, "-c", str(config), "--once"]),
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert spool.queued(str(directory)) == []
    [(argv, data, _)] = helpers.recorded_runs(recorder)
    assert argv[-1] == "b@example.org"
    warnings = [line for line in rsyslog.read().splitlines() if "unprivileged" in line]
    assert len(warnings) == 1 and " smapd[" in warnings[0]
    assert any("done id=%s" % message_id in line for line in rsyslog.read().splitlines())

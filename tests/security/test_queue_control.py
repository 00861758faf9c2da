"""Queue control (issue 16): `smapd --hold/--release/--delete/--requeue` and
`-q --json` as root in uucp's spool, against hostile ids, links planted by
a taken-over uucp, a running delivery that holds the message's lock, and
commands that race each other or the scanner.

The programs are the real `smapd` (started as root, as an administrator
would) and, where a delivery is needed, the real `smapd -F` with the
recording MTA.  Outcomes are read from the spool, the MTA's records, the
commands' output and exit status, and the log.  Every wait is bounded and
every process is stopped by its pid.
"""

import fcntl
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from common import spool
from smapd import state
from tests.integration import realpeers
from tests.integration import smapd_helpers as helpers

pytestmark = pytest.mark.integration

MESSAGE = b"From: a@example.net\r\nSubject: queue control\r\n\r\nbody\r\n"


@pytest.fixture
def setup(tmp_path, rsyslog):
    realpeers.require_root()
    directory = helpers.make_spool(tmp_path / "spool")
    recorder = helpers.recorder_dir(tmp_path / "mta")

    def table(*lines, code=0):
        return helpers.write_table(tmp_path / "table", directory,
                                   sendmail=helpers.recording_sendmail(recorder, code),
                                   logsocket=rsyslog.socket, lines=lines)
    return tmp_path, directory, recorder, table, rsyslog


def smapd(config, *arguments, timeout=60):
    return subprocess.run([helpers.SMAPD, "-c", str(config)] + list(arguments),
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def root_file(path, content=b"root's own file\n"):
    path = Path(path)
    path.write_bytes(content)
    os.chown(path, 0, 0)
    os.chmod(path, 0o600)
    return path


def snapshot(path):
    info = os.lstat(path)
    return info.st_uid, info.st_gid, info.st_mode, Path(path).read_bytes()


def where(directory, message_id):
    """The spool directories that hold message_id (at most one, always)."""
    return [name for name in (spool.QUEUE, spool.HOLD)
            if os.path.lexists(directory / name / message_id)]


def queue_json(config):
    result = smapd(config, "-q", "--json")
    assert result.returncode == 0, result.stderr
    return {entry["id"]: entry for entry in map(json.loads, result.stdout.splitlines())}


# -- ids from the command line -----------------------------------------------------

@pytest.mark.parametrize("command", ["--hold", "--release", "--delete", "--requeue"])
def test_an_id_that_is_a_path_is_refused_before_anything_is_opened(setup, command):
    tmp_path, directory, recorder, table, rsyslog = setup
    config = table()
    victim = root_file(tmp_path / "victim")
    before = snapshot(victim)
    good = helpers.spool_message(directory, "a@example.net", ["b@example.org"], MESSAGE)
    passwd = snapshot("/etc/passwd")
    hostile = ["../../victim", "/etc/passwd", "queue/../../victim", "../victim", "",
               "-x", good + "/", good.lower() + "\n"]
    result = smapd(config, command, "--", *hostile)
    assert result.returncode == 1
    for shown in ("../../victim", "/etc/passwd", "queue/../../victim"):
        assert "smapd: %s: not a queue id" % shown in result.stderr
    assert "0 messages" in result.stdout
    assert snapshot(victim) == before and snapshot("/etc/passwd") == passwd
    assert where(directory, good) == [spool.QUEUE]


def test_an_unknown_id_fails_and_the_others_are_done(setup):
    tmp_path, directory, recorder, table, rsyslog = setup
    config = table()
    first = helpers.spool_message(directory, "a@example.net", ["b@example.org"], MESSAGE)
    second = helpers.spool_message(directory, "a@example.net", ["c@example.org"], MESSAGE)
    result = smapd(config, "--hold", first, "ABCDEF0123", second)
    assert result.returncode == 1
    assert "smapd: ABCDEF0123: no such message" in result.stderr
    assert result.stdout == "smapd: held 2 messages\n"
    assert where(directory, first) == [spool.HOLD] and where(directory, second) == [spool.HOLD]
    # the hold directory is uucp's own, made by uucp (the command ran as uucp)
    uid, gid = helpers.uucp_ids()
    info = os.lstat(directory / spool.HOLD)
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (uid, gid, 0o700)
    rsyslog.wait_for(re.compile(r"smapd\[\d+\]: hold id=%s uid=0 from=<a@example.net>" % first))
    # holding again is no failure; releasing twice reports the second as not held
    again = smapd(config, "--hold", first)
    assert again.returncode == 0 and "already on hold" in again.stderr
    assert smapd(config, "--release", first).returncode == 0
    twice = smapd(config, "--release", first)
    assert twice.returncode == 0 and "not on hold" in twice.stderr
    assert where(directory, first) == [spool.QUEUE]


def test_delete_confirms_with_a_count_and_logs_each_message(setup):
    tmp_path, directory, recorder, table, rsyslog = setup
    config = table()
    queued = helpers.spool_message(directory, "a@example.net", ["b@example.org"], MESSAGE)
    held = helpers.spool_message(directory, "a@example.net", ["c@example.org"], MESSAGE)
    assert smapd(config, "--hold", held).returncode == 0
    state.save(str(directory), queued, state.State())
    result = smapd(config, "--delete", queued, held)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "smapd: deleted 2 messages\n"
    assert where(directory, queued) == [] and where(directory, held) == []
    assert not (directory / spool.STATE / queued).exists()
    for message_id, place in ((queued, "queue"), (held, "hold")):
        rsyslog.wait_for(re.compile(r"delete id=%s uid=0 from=<a@example.net> nrcpt=1 .*queue=%s"
                                    % (message_id, place)))


# -- links planted by uucp -----------------------------------------------------------

def test_a_link_planted_where_the_hold_mark_goes_is_not_followed(setup):
    tmp_path, directory, recorder, table, rsyslog = setup
    config = table()
    uid, gid = helpers.uucp_ids()
    victim = root_file(tmp_path / "victim")
    before = snapshot(victim)
    message_id = helpers.spool_message(directory, "a@example.net", ["b@example.org"], MESSAGE)
    # uucp makes hold/ itself and plants a link named like the message in it
    (directory / spool.HOLD).mkdir(mode=0o700)
    os.chown(directory / spool.HOLD, uid, gid)
    os.symlink(victim, directory / spool.HOLD / message_id)
    # and links the state file and its temporary name to root's file
    os.symlink(victim, directory / spool.STATE / message_id)
    os.symlink(victim, directory / spool.STATE / (message_id + ".new"))
    result = smapd(config, "--hold", message_id)
    assert result.returncode == 1
    assert "hold/%s is in the way" % message_id in result.stderr
    assert snapshot(victim) == before
    assert where(directory, message_id) == [spool.QUEUE, spool.HOLD]   # the link, untouched
    assert os.path.islink(directory / spool.HOLD / message_id)
    # --release and --delete of the link: a link is not a message
    for command in ("--release", "--delete"):
        if command == "--delete":
            os.unlink(directory / spool.QUEUE / message_id)
        result = smapd(config, command, message_id)
        assert result.returncode == 1
        assert "is a symbolic link, not a message" in result.stderr
        assert snapshot(victim) == before


def test_a_hold_directory_that_is_a_link_is_refused(setup):
    tmp_path, directory, recorder, table, rsyslog = setup
    config = table()
    victims = tmp_path / "root-dir"
    victims.mkdir(mode=0o755)
    os.symlink(victims, directory / spool.HOLD)
    message_id = helpers.spool_message(directory, "a@example.net", ["b@example.org"], MESSAGE)
    result = smapd(config, "--hold", message_id)
    assert result.returncode == 1
    assert "hold/ is not a directory" in result.stderr
    assert os.listdir(victims) == []
    assert where(directory, message_id) == [spool.QUEUE]


def test_queue_json_does_not_read_root_files_through_links(setup):
    tmp_path, directory, recorder, table, rsyslog = setup
    config = table()
    message_id = helpers.spool_message(directory, "a@example.net", ["b@example.org"], MESSAGE)
    secret = root_file(tmp_path / "secret", b"attempts 7\nlast-error ROOTS-SECRET-TEXT\n")
    os.symlink(secret, directory / spool.STATE / message_id)
    os.symlink(secret, directory / spool.QUEUE / "ABCDEF012345")
    entries = queue_json(config)
    assert entries[message_id]["attempts"] == 0
    assert entries[message_id]["last_error"] is None
    assert "error" in entries["ABCDEF012345"]
    assert "ROOTS-SECRET" not in json.dumps(entries)


# -- the lock of a delivery ---------------------------------------------------------

def test_a_locked_message_is_busy_and_left_alone(setup):
    """The scanner's claim is an flock on the open spool file: while it is
    held nothing is deleted, held, released or requeued."""
    tmp_path, directory, recorder, table, rsyslog = setup
    config = table()
    message_id = helpers.spool_message(directory, "a@example.net", ["b@example.org"], MESSAGE)
    fd = os.open(directory / spool.QUEUE / message_id, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for command in ("--delete", "--hold", "--requeue"):
            result = smapd(config, command, message_id)
            assert result.returncode == 1, command
            assert "busy: being delivered now; try again" in result.stderr
            assert where(directory, message_id) == [spool.QUEUE]
    finally:
        os.close(fd)
    result = smapd(config, "--delete", message_id)
    assert result.returncode == 0 and where(directory, message_id) == []


def test_delete_during_a_real_delivery_is_refused_and_the_mail_is_delivered_once(setup):
    tmp_path, directory, recorder, table, rsyslog = setup
    config = table("smapd: deliver-timeout 30")
    message_id = helpers.spool_message(directory, "a@example.net", ["slow@example.org"], MESSAGE)
    with helpers.Smapd(config, directory, tmp_path / "smapd.out") as daemon:
        spool.poke(str(directory))
        realpeers.wait_until(lambda: len(helpers.descendants_of(daemon.pid)) >= 3, 15,
                             what="the delivery under way")
        result = smapd(config, "--delete", message_id)
        assert result.returncode == 1 and "busy" in result.stderr
        realpeers.wait_until(lambda: not where(directory, message_id), 30, what="delivered")
    assert len(helpers.recorded_runs(recorder)) == 1
    result = smapd(config, "--delete", message_id)
    assert result.returncode == 1 and "no such message" in result.stderr


# -- races ------------------------------------------------------------------------

def test_delete_and_release_racing_never_lose_or_double_a_message(setup):
    tmp_path, directory, recorder, table, rsyslog = setup
    config = table()
    outcomes = set()
    for _ in range(8):
        message_id = helpers.spool_message(directory, "a@example.net", ["b@example.org"],
                                           MESSAGE)
        assert smapd(config, "--hold", message_id).returncode == 0
        argv = [helpers.SMAPD, "-c", str(config)]
        deleting = subprocess.Popen(argv + ["--delete", message_id], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        releasing = subprocess.Popen(argv + ["--release", message_id], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        deleted, delete_errors = deleting.communicate(timeout=60)
        released, release_errors = releasing.communicate(timeout=60)
        places = where(directory, message_id)
        assert len(places) <= 1
        if deleting.returncode == 0:
            assert places == [] and "deleted 1 message" in deleted
        else:
            # busy: the message is wherever the release left it, and whole
            assert "busy" in delete_errors or "keeps moving" in delete_errors, delete_errors
            assert len(places) == 1
            envelope, data = spool.read_message(str(directory / places[0] / message_id))
            assert data == MESSAGE
        assert releasing.returncode == 0 or "busy" in release_errors \
            or "no such message" in release_errors, release_errors
        outcomes.add((deleting.returncode, releasing.returncode))
    # leave nothing for the next test
    for message_id in spool.queued(str(directory)) + spool.held(str(directory)):
        smapd(config, "--delete", message_id)


def test_hold_racing_the_scanner_delivers_each_message_once_or_holds_it(setup):
    tmp_path, directory, recorder, table, rsyslog = setup
    config = table("smapd: maxchildren 4")
    with helpers.Smapd(config, directory, tmp_path / "smapd.out"):
        ids = []
        for number in range(10):
            message_id = helpers.spool_message(directory, "a@example.net",
                                               ["n%d@example.org" % number], MESSAGE)
            ids.append(message_id)
            spool.poke(str(directory))
            smapd(config, "--hold", message_id)
        # everything still queued goes out; nothing on hold does
        realpeers.wait_until(lambda: not spool.queued(str(directory)), 30, what="queue empty")
        time.sleep(0.5)
        subprocess.run([helpers.SMAPD, "-c", str(config), "--flush"], timeout=30)
        time.sleep(0.5)
        runs = helpers.recorded_runs(recorder)
    delivered = [argv[-1] for argv, _, _ in runs]
    assert len(delivered) == len(set(delivered))        # never twice
    held = spool.held(str(directory))
    for number, message_id in enumerate(ids):
        recipient = "n%d@example.org" % number
        assert (message_id in held) != (recipient in delivered), (message_id, recipient)


# -- held messages are neither delivered nor expired ---------------------------------

def test_a_held_message_is_not_delivered_until_released(setup):
    tmp_path, directory, recorder, table, rsyslog = setup
    config = table()
    message_id = helpers.spool_message(directory, "a@example.net", ["b@example.org"], MESSAGE)
    assert smapd(config, "--hold", message_id).returncode == 0
    with helpers.Smapd(config, directory, tmp_path / "smapd.out"):
        spool.poke(str(directory))
        assert subprocess.run([helpers.SMAPD, "-c", str(config), "--flush"],
                              timeout=30).returncode == 0
        time.sleep(1.0)
        assert helpers.recorded_runs(recorder) == []
        entry = queue_json(config)[message_id]
        assert entry["held"] is True and entry["queue"] == "hold"
        text = smapd(config, "-q").stdout
        assert "%s!" % message_id in text and "(on hold)" in text
        result = smapd(config, "--release", message_id)
        assert result.returncode == 0 and result.stdout == "smapd: released 1 message\n"
        realpeers.wait_until(lambda: helpers.recorded_runs(recorder), 15, what="delivery")
    assert where(directory, message_id) == []
    [(argv, data, _)] = helpers.recorded_runs(recorder)
    assert argv[-1] == "b@example.org"


def test_a_held_message_past_maxage_is_not_bounced(setup):
    tmp_path, directory, recorder, table, rsyslog = setup
    config = table("smapd: maxage 60", code=75)
    old = time.time() - 10 * 86400
    message_id = helpers.spool_message(directory, "a@example.net", ["b@example.org"], MESSAGE,
                                       arrival=old)
    assert smapd(config, "--hold", message_id).returncode == 0
    result = helpers.run_once(config)
    assert result.returncode == 0, result.stderr
    assert where(directory, message_id) == [spool.HOLD]
    assert helpers.recorded_runs(recorder) == [] and spool.queued(str(directory)) == []


def test_the_time_on_hold_does_not_count_towards_maxage(setup):
    tmp_path, directory, recorder, table, rsyslog = setup
    config = table("smapd: maxage 600", "smapd: retry 3600", code=75)
    now = time.time()
    # it arrived 2000 s ago and has been on hold for the last 1900 s
    message_id = helpers.spool_message(directory, "a@example.net", ["b@example.org"], MESSAGE,
                                       arrival=now - 2000)
    assert smapd(config, "--hold", message_id).returncode == 0
    record = state.load(str(directory), message_id)
    assert record.held_since >= now - 5
    record.held_since = now - 1900
    state.save(str(directory), message_id, record)
    os.chown(directory / spool.STATE / message_id, *helpers.uucp_ids())
    assert smapd(config, "--release", message_id).returncode == 0
    record = state.load(str(directory), message_id)
    assert 1890 < record.held_seconds < 1960 and record.held_since == 0
    result = helpers.run_once(config)
    assert result.returncode == 0, result.stderr
    # tried and deferred (100 s of its 600), not bounced (2000 s since arrival)
    assert len(helpers.recorded_runs(recorder)) == 1
    assert spool.queued(str(directory)) == [message_id]
    entry = queue_json(config)[message_id]
    assert entry["attempts"] == 1 and entry["next_retry"] > now + 3000
    assert "EX_TEMPFAIL" in entry["last_error"] or "75" in entry["last_error"]


def test_requeue_retries_a_deferred_message_now(setup):
    tmp_path, directory, recorder, table, rsyslog = setup
    config = table("smapd: retry 3600")
    message_id = helpers.spool_message(directory, "a@example.net", ["exit75@example.org"],
                                       MESSAGE)
    with helpers.Smapd(config, directory, tmp_path / "smapd.out"):
        spool.poke(str(directory))
        realpeers.wait_until(lambda: state.load(str(directory), message_id).attempts == 1, 15,
                             what="first attempt")
        spool.poke(str(directory))      # a poke alone does not retry before `retry`
        time.sleep(0.5)
        assert state.load(str(directory), message_id).attempts == 1
        result = smapd(config, "--requeue", message_id)
        assert result.returncode == 0 and result.stdout == "smapd: requeued 1 message\n"
        realpeers.wait_until(lambda: state.load(str(directory), message_id).attempts == 2, 15,
                             what="the retry --requeue asked for")
    assert len(helpers.recorded_runs(recorder)) == 2


def test_queue_json_describes_each_message(setup):
    tmp_path, directory, recorder, table, rsyslog = setup
    config = table()
    arrival = time.time() - 3600
    message_id = helpers.spool_message(directory, "a@example.net",
                                       ["b@example.org", "c@example.org", "d@example.org"],
                                       MESSAGE, arrival=arrival)
    record = state.State()
    record.attempts = 2
    record.next_try = arrival + 7200
    record.last_error = "MTA exit 75 EX_TEMPFAIL"
    record.done = ["b@example.org"]
    record.failed = [("c@example.org", "MTA exit 67 EX_NOUSER")]
    state.save(str(directory), message_id, record)
    os.chown(directory / spool.STATE / message_id, *helpers.uucp_ids())
    held_id = helpers.spool_message(directory, "", ["e@example.org"], MESSAGE)
    assert smapd(config, "--hold", held_id).returncode == 0
    result = smapd(config, "-q", "--json")
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    entries = {entry["id"]: entry for entry in map(json.loads, lines)}
    entry = entries[message_id]
    assert entry["sender"] == "a@example.net" and entry["held"] is False
    assert entry["recipients"] == [
        {"address": "b@example.org", "state": "delivered"},
        {"address": "c@example.org", "state": "failed", "reason": "MTA exit 67 EX_NOUSER"},
        {"address": "d@example.org", "state": "pending"}]
    assert entry["size"] == len(MESSAGE) and entry["attempts"] == 2
    assert entry["arrival_time"] == int(arrival) and 3590 <= entry["age"] <= 3700
    assert entry["next_retry"] == int(arrival + 7200)
    assert entry["last_error"] == "MTA exit 75 EX_TEMPFAIL"
    held = entries[held_id]
    assert held["held"] is True and held["sender"] == "" and held["next_retry"] is None
    # usage errors
    assert smapd(config, "--json").returncode == 2
    assert smapd(config, "-q", "--hold", message_id).returncode == 2
    assert smapd(config, "--hold").returncode == 2

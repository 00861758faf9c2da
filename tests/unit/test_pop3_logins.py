"""pop3gw.logins: the login counters each root monitor adds to (issue 16).

Private directories, no network; the real pop3-gw, node_exporter and
promtool are in tests/integration/test_pop3gw_metrics.py.  What a hostile
local user could plant (a link as the lock or the file, a directory others
may write) is refused and logged, never followed; concurrent monitors
never lose a count.
"""

import os

from pop3gw import logins
from tests.unit.smap_fixtures import RecordingLog


def private_dir(tmp_path):
    directory = tmp_path / "textfile"
    directory.mkdir(mode=0o755)
    os.chmod(tmp_path, 0o755)
    return directory


def test_counts_accumulate_in_the_file_itself(tmp_path):
    directory = private_dir(tmp_path)
    tally = logins.Tally(str(directory / "pop3-gw.prom"), RecordingLog())
    for result in ("good", "good", "bad", "refused"):
        assert tally.count(result)
    text = (directory / "pop3-gw.prom").read_text()
    assert text == (
        "# HELP mailwall_pop3_logins_total " + logins.HELP + "\n"
        "# TYPE mailwall_pop3_logins_total counter\n"
        'mailwall_pop3_logins_total{result="good"} 2\n'
        'mailwall_pop3_logins_total{result="bad"} 1\n'
        'mailwall_pop3_logins_total{result="refused"} 1\n')
    assert oct(os.stat(directory / "pop3-gw.prom").st_mode & 0o777) == "0o644"
    assert sorted(os.listdir(directory)) == ["pop3-gw.prom", "pop3-gw.prom.lock"]
    # a damaged count starts again at 0, the others are kept
    (directory / "pop3-gw.prom").write_text(
        'mailwall_pop3_logins_total{result="good"} -5\n'
        'mailwall_pop3_logins_total{result="bad"} 7\n')
    assert tally.count("bad")
    assert logins.parse((directory / "pop3-gw.prom").read_text()) == {
        "good": 0, "bad": 8, "refused": 0}


def test_links_and_a_directory_others_may_write_are_refused_and_logged(tmp_path):
    directory = private_dir(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    log = RecordingLog()
    tally = logins.Tally(str(directory / "pop3-gw.prom"), log)
    os.symlink(victim, directory / "pop3-gw.prom.lock")
    assert not tally.count("good")
    os.unlink(directory / "pop3-gw.prom.lock")
    os.symlink(victim, directory / "pop3-gw.prom")
    assert not tally.count("good")
    os.unlink(directory / "pop3-gw.prom")
    os.symlink(victim, directory / "pop3-gw.prom.tmp")      # replaced, not followed
    assert tally.count("good")
    assert victim.read_text() == "untouched\n"
    assert not os.path.lexists(directory / "pop3-gw.prom.tmp")
    os.chmod(directory, 0o777)
    assert not tally.count("good")
    reasons = [fields["reason"] for _, event, fields in log.events if event == "metrics"]
    assert len(reasons) == 3
    assert "symbolic link" in reasons[0] and "symbolic link" in reasons[1]
    assert "writable by group or others" in reasons[2]


def test_concurrent_monitors_never_lose_a_count(tmp_path):
    directory = private_dir(tmp_path)
    path = str(directory / "pop3-gw.prom")
    children = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                tally = logins.Tally(path, RecordingLog())
                for _ in range(25):
                    if not tally.count("bad"):
                        status = 1
            finally:
                os._exit(status)
        children.append(pid)
    for pid in children:
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    with open(path) as source:
        assert logins.parse(source.read())["bad"] == 100

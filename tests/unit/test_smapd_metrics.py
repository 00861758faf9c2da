"""smapd.metrics: the exposition text, the counters kept in the spool and
the atomic write through a directory descriptor.  No root, no process;
promtool and node_exporter read the real file in
tests/integration/test_smapd_metrics.py.
"""

import os

from common import spool
from smapd import metrics
from tests.unit.smap_fixtures import RecordingLog


def test_the_exposition_has_help_type_and_escaped_labels():
    counts = dict.fromkeys(metrics.COUNTER_NAMES, 0)
    counts["deliveries_ok"] = 7
    text = metrics.render('/var/spool/a"b\\c\nd', {"queue_messages": 2,
                                                    "queue_oldest_age_seconds": 1.5}, counts)
    lines = text.decode().split("\n")
    assert text.endswith(b"\n") and lines[-1] == ""
    label = 'spool="/var/spool/a\\"b\\\\c\\nd"'
    assert "mailwall_queue_messages{%s} 2" % label in lines
    assert "mailwall_queue_oldest_age_seconds{%s} 1.5" % label in lines
    assert 'mailwall_deliveries_total{result="ok",%s} 7' % label in lines
    names = {line.split("{")[0] for line in lines if line and not line.startswith("#")}
    for name in names:
        assert "# TYPE %s " % name in text.decode() and "# HELP %s " % name in text.decode()
        if name.endswith("_total"):
            assert "# TYPE %s counter" % name in text.decode()


def test_counters_survive_and_damage_reads_as_zero(tmp_path):
    spool.make_dirs(str(tmp_path))
    log = RecordingLog()
    target = metrics.Target(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY), "m.prom",
                            str(tmp_path / "m.prom"))
    try:
        first = metrics.Metrics(target, str(tmp_path), str(tmp_path / "bad"), "/s", log)
        first.count("bounces", 2)
        first.count("received_bytes", 100)
        assert first.write(force=True)
        assert not first.write()                # nothing new: no write
        first.count("bounces")
        assert not first.write()                # within MIN_INTERVAL: later
        assert 0 < first.wait() <= metrics.MIN_INTERVAL
        assert first.write(force=True)
        again = metrics.Metrics(target, str(tmp_path), str(tmp_path / "bad"), "/s", log)
        assert again.counts["bounces"] == 3 and again.counts["received_bytes"] == 100
        assert oct(os.stat(tmp_path / "m.prom").st_mode & 0o777) == "0o644"
        assert sorted(os.listdir(tmp_path)) == sorted(
            ["m.prom", ".smapd.counters", "tmp", "queue", "state", "bad", ".trigger"])
    finally:
        target.close()
    (tmp_path / ".smapd.counters").write_text(
        "bounces -1\nquarantined 1e9\nreceived_messages 99999999999999999999\n"
        "deliveries_ok 12\nnonsense 5\n")
    counts = metrics.read_counters(str(tmp_path))
    assert counts["bounces"] == counts["quarantined"] == counts["received_messages"] == 0
    assert counts["deliveries_ok"] == 12 and "nonsense" not in counts


def test_a_failing_write_is_logged_once(tmp_path):
    spool.make_dirs(str(tmp_path))
    log = RecordingLog()
    gone = tmp_path / "gone"
    gone.mkdir()
    target = metrics.Target(os.open(gone, os.O_RDONLY | os.O_DIRECTORY), "m.prom", str(gone))
    try:
        os.rmdir(gone)                          # writes into it now fail (ENOENT)
        counting = metrics.Metrics(target, str(tmp_path), None, "/s", log)
        assert not counting.write(force=True)
        counting.count("bounces")
        assert not counting.write(force=True)
        assert [e for _, e, _ in log.events].count("metrics") == 1
    finally:
        target.close()

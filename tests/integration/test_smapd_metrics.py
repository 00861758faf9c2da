"""smapd's metrics file (issue 16, `smapd: metrics-file PATH`) read by a real
node_exporter's textfile collector and linted by promtool.

The real smap accepts the mail (over a socketpair, as inetd hands it a
socket), the real `smapd -F` delivers it through the recording MTA, and
the scanner, chrooted in the spool as uucp, writes the metrics through
the descriptor of a directory outside the spool.  node_exporter scrapes
that directory as nobody on a private loopback port; promtool checks what
it serves.  Every process is stopped by its pid and every wait is bounded.
"""

import os
import pwd
import stat
import subprocess

import pytest

from common import spool
from tests.integration import metrics_peers, realpeers
from tests.integration import smapd_helpers as helpers

pytestmark = pytest.mark.integration

MESSAGE = b"From: a@example.net\r\nSubject: metrics\r\n\r\nbody\r\n"


@pytest.fixture
def setup(tmp_path, rsyslog):
    realpeers.require_root()
    realpeers.require(metrics_peers.NODE_EXPORTER, metrics_peers.PROMTOOL)
    directory = helpers.make_spool(tmp_path / "spool")
    recorder = helpers.recorder_dir(tmp_path / "mta")
    realpeers.open_up(tmp_path)
    metrics_dir = tmp_path / "metrics"          # made by smapd, for uucp

    def table(*lines):
        return helpers.write_table(
            tmp_path / "table", directory, sendmail=helpers.recording_sendmail(recorder),
            logsocket=rsyslog.socket,
            lines=lines + ("smapd: metrics-file %s/mailwall.prom" % metrics_dir,))
    return tmp_path, directory, recorder, table, metrics_dir


def series(name, spool_dir, **labels):
    labels["spool"] = spool_dir
    return "mailwall_%s{%s}" % (name, ",".join('%s="%s"' % (key, labels[key])
                                                for key in sorted(labels)))


def test_node_exporter_serves_smapds_metrics_and_promtool_passes_them(setup):
    tmp_path, directory, recorder, table, metrics_dir = setup
    config = table("smapd: retry 3600")
    # on hold before smapd starts: counted as held, never delivered
    held = helpers.spool_message(directory, "a@example.net", ["held@example.org"], MESSAGE)
    assert subprocess.run([helpers.SMAPD, "-c", str(config), "--hold", held],
                          capture_output=True, timeout=30).returncode == 0
    # a damaged file: quarantined (and the postmaster's notice delivered)
    helpers.spool_message(directory, "", [], b"", raw=b"not a spool file\n")
    with helpers.Smapd(config, directory, tmp_path / "smapd.out"):
        uucp = pwd.getpwnam(helpers.USER)
        info = os.lstat(metrics_dir)
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (uucp.pw_uid, 0o755)
        for recipient in ("ok@example.org", "exit75@example.org", "exit67@example.org"):
            helpers.smap_submit(config, "a@example.net", [recipient], MESSAGE)
        path = metrics_dir / "mailwall.prom"

        def settled():
            values = metrics_peers.samples(path.read_text()) if path.exists() else {}
            return values.get(series("bounces_total", directory)) == 1 \
                and values.get(series("deliveries_in_progress", directory)) == 0 \
                and values.get(series("queue_messages", directory)) == 1 and values
        values = realpeers.wait_until(settled, 30, what="metrics after the deliveries")
        info = os.lstat(path)
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (uucp.pw_uid, 0o644)
        assert not (metrics_dir / "mailwall.prom.tmp").exists()

        # node_exporter's own textfile directory (root's) links to uucp's file
        textfile_dir = tmp_path / "node-exporter"
        textfile_dir.mkdir(mode=0o755)
        os.symlink(path, textfile_dir / "mailwall.prom")
        with metrics_peers.NodeExporter(textfile_dir, tmp_path / "node-exporter.out") as peer:
            scraped = peer.scrape()
    status, problems = metrics_peers.promtool_check(scraped)
    assert status == 0, problems + scraped
    assert "node_textfile_scrape_error 0" in scraped
    served = metrics_peers.samples(scraped)
    expected = {
        "queue_messages": 1, "held_messages": 1, "quarantine_messages": 1,
        "bounces_total": 1, "quarantined_total": 1, "received_messages_total": 3,
    }
    for name, value in expected.items():
        assert served[series(name, directory)] == value, name
    # ok, the bounce and the postmaster's notice delivered; one deferred, one failed
    assert served[series("deliveries_total", directory, result="ok")] == 3
    assert served[series("deliveries_total", directory, result="temp")] == 1
    assert served[series("deliveries_total", directory, result="perm")] == 1
    assert served[series("received_bytes_total", directory)] > 3 * len(MESSAGE)
    assert served[series("queue_oldest_age_seconds", directory)] >= 0
    assert "# TYPE mailwall_deliveries_total counter" in scraped
    assert "# HELP mailwall_queue_messages " in scraped
    for name, value in values.items():     # the file as smapd wrote it, served unchanged
        if "last_scan" not in name and "oldest" not in name:
            assert served[name] == value, name

    # the counters survive a restart; the gauges are read afresh
    assert subprocess.run([helpers.SMAPD, "-c", str(config), "--delete", held],
                          capture_output=True, timeout=30).returncode == 0
    result = helpers.run_once(config)
    assert result.returncode == 0, result.stderr
    again = metrics_peers.samples((metrics_dir / "mailwall.prom").read_text())
    assert again[series("bounces_total", directory)] == 1
    assert again[series("deliveries_total", directory, result="perm")] == 1
    assert again[series("received_messages_total", directory)] == 3
    assert again[series("held_messages", directory)] == 0


def run_smapd(config, *arguments):
    return subprocess.run([helpers.SMAPD, "-c", str(config)] + list(arguments),
                          capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


def test_a_metrics_directory_of_someone_elses_is_refused_not_chowned(setup):
    tmp_path, directory, recorder, table, metrics_dir = setup
    metrics_dir.mkdir(mode=0o755)               # root's, as node_exporter's own would be
    config = table()
    result = run_smapd(config, "--once")
    assert result.returncode == 1
    assert result.stderr == "smapd: %s: owned by uid 0, not by uid %d (the scanner writes " \
        "the metrics there as userid)\n" % (metrics_dir, pwd.getpwnam(helpers.USER).pw_uid)
    assert os.lstat(metrics_dir).st_uid == 0 and os.listdir(metrics_dir) == []


def test_a_metrics_directory_reached_through_a_link_is_refused(setup):
    tmp_path, directory, recorder, table, metrics_dir = setup
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    os.symlink(elsewhere, metrics_dir)
    config = table()
    result = run_smapd(config, "--once")
    assert result.returncode == 1
    assert result.stderr == "smapd: %s: is a symbolic link, not a directory\n" % metrics_dir
    assert os.lstat(elsewhere).st_uid == 0 and os.listdir(elsewhere) == []


def test_a_link_uucp_plants_at_the_temporary_name_is_not_followed(setup):
    """uucp owns the metrics directory: what it plants there is replaced, and
    what a link there points to is never written (the scanner is uucp)."""
    tmp_path, directory, recorder, table, metrics_dir = setup
    uid, gid = helpers.uucp_ids()
    metrics_dir.mkdir(mode=0o755)
    os.chown(metrics_dir, uid, gid)
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's\n")
    os.chmod(victim, 0o644)
    os.symlink(victim, metrics_dir / "mailwall.prom.tmp")
    os.symlink(victim, directory / ".smapd.counters.tmp")
    config = table()
    result = run_smapd(config, "--once")
    assert result.returncode == 0, result.stderr
    assert victim.read_bytes() == b"root's\n"
    text = (metrics_dir / "mailwall.prom").read_text()
    assert series("queue_messages", directory) + " 0" in text
    assert not os.path.lexists(metrics_dir / "mailwall.prom.tmp")
    assert stat.S_ISREG(os.lstat(directory / ".smapd.counters").st_mode)
    assert spool.queued(str(directory)) == []

"""pop3-gw's login counters (issue 16, `pop3-gw: metrics-file PATH`) with
real peers: pop3-gw --daemon in front of Dovecot with APOP, logins good,
bad and refused (a source past maxbad), the counters served by a real
node_exporter from its textfile directory and linted by promtool."""

import os

import pytest

from tests.integration import metrics_peers, realpeers
from tests.integration import pop3_helpers as helpers
from tests.integration.pop3_helpers import close_clients, dovecot, shared_dir  # noqa: F401

pytestmark = pytest.mark.integration


def login(port, secret="alicesecret", source="127.0.0.1"):
    client = helpers.Client(port, source=source)
    greeting = client.line()
    reply = client.apop("alice", secret, greeting)
    client.close()
    return reply


def test_logins_are_counted_and_served_by_node_exporter(shared_dir, dovecot, tmp_path):
    realpeers.require(metrics_peers.NODE_EXPORTER, metrics_peers.PROMTOOL)
    textfile = shared_dir / "node-exporter"     # root's, 0755, like Debian's
    textfile.mkdir(mode=0o755)
    setup = helpers.Setup(shared_dir / "gw", "localhost:%d" % dovecot.port,
                          extra=("pop3-gw: maxbad 2", "pop3-gw: badsleep 3600",
                                 "pop3-gw: metrics-file %s/pop3-gw.prom" % textfile))
    try:
        with helpers.Daemon(setup) as daemon:
            assert login(daemon.port).startswith(b"+OK")
            for _ in range(2):
                assert login(daemon.port, "wrong", "127.0.0.2").startswith(b"-ERR")
            assert login(daemon.port, source="127.0.0.2").startswith(b"-ERR")  # refused
            setup.log.wait_for(r"auth-fail .*reason=\"source refused")
        path = textfile / "pop3-gw.prom"
        assert os.lstat(path).st_uid == 0
        with metrics_peers.NodeExporter(textfile, tmp_path / "node-exporter.out") as peer:
            scraped = peer.scrape()
    finally:
        setup.log.close()
    status, problems = metrics_peers.promtool_check(scraped)
    assert status == 0, problems + scraped
    assert "node_textfile_scrape_error 0" in scraped
    served = metrics_peers.samples(scraped)
    assert served == {'mailwall_pop3_logins_total{result="good"}': 1,
                      'mailwall_pop3_logins_total{result="bad"}': 2,
                      'mailwall_pop3_logins_total{result="refused"}': 1}

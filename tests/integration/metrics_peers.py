"""The real Prometheus peers of the metrics tests (issue 16): Debian's
`prometheus-node-exporter` with only its textfile collector, on a private
loopback high port as nobody, and `promtool check metrics` (REAL-PEERS.md:
"node_exporter's textfile collector", "promtool").  Beside realpeers.py,
in the same style: argv lists, bounded waits, stopped by pid.
"""

import subprocess
import urllib.request

from tests.integration import realpeers

NODE_EXPORTER = "prometheus-node-exporter"
PROMTOOL = "promtool"


class NodeExporter(realpeers._Stoppable):
    """node_exporter reading DIRECTORY's *.prom files: .scrape() -> text."""

    def __init__(self, directory, log):
        realpeers.require(NODE_EXPORTER)
        self.port = realpeers.free_port()
        argv = realpeers.as_user("nobody", [
            realpeers.which(NODE_EXPORTER),
            "--collector.textfile.directory=%s" % directory,
            "--web.listen-address=127.0.0.1:%d" % self.port,
            "--collector.disable-defaults", "--collector.textfile",
            "--web.disable-exporter-metrics"])
        self.proc = realpeers.Proc(argv, log=log)
        try:
            realpeers.wait_for_listen("127.0.0.1", self.port, 15)
        except BaseException:
            self.stop()
            raise

    def scrape(self):
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open("http://127.0.0.1:%d/metrics" % self.port, timeout=10) as answer:
            return answer.read().decode("utf-8")

    def stop(self):
        self.proc.stop()


def promtool_check(text):
    """(exit status, stderr) of `promtool check metrics` on text."""
    realpeers.require(PROMTOOL)
    result = subprocess.run([realpeers.which(PROMTOOL), "check", "metrics"],
                            input=text.encode("utf-8"), capture_output=True, timeout=60)
    return result.returncode, result.stderr.decode("utf-8", "replace")


def samples(text, prefix="mailwall_"):
    """{series with labels: value} of the samples whose name starts with prefix."""
    found = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            series, _, value = line.rpartition(" ")
            found[series] = float(value)
    return found

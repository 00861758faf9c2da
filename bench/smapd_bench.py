"""smapd's measurements: draining a spool into Postfix's sendmail, and the
time from smap's "250" to the MTA call.

- drain: a spool of 2,000 messages of 5 KB (10 with --smoke) is filled
  once by smap itself (smtp-source into smap --daemon) and kept as a
  template; each run copies it into a fresh spool and times `smapd --once`
  (sendmail = the private Postfix's `sendmail -C DIR -bm`, maxchildren 6),
  against a plain loop that reads the same files (common.spool.read_message)
  and pipes each message, CRLF turned into LF as smapd does, to the same
  sendmail as the same user (uucp) with the same concurrency (6 threads).
  Between runs, untimed, Postfix's queue is left to empty.
- "250" → MTA: smap --daemon and `smapd -F` with `wakeup 60` share a third
  spool; sendmail is a small wrapper script that logs the time of its call
  and then execs Postfix's sendmail.  Messages are sent one at a time with
  smtplib, each to its own recipient; the latency is the wrapper's time
  minus the moment the client read "250".  Median and 95th percentile.

It trusts the servers from bench.peers; every spool is private to the run.
"""

import concurrent.futures
import os
import shutil
import smtplib
import statistics
import subprocess
import time

from bench import peers
from bench.harness import Measurement, NotMeasured, Variant
from bench.smtp_bench import missing_any, smtp_source
from common import spool as spoolfmt
from tests.integration import realpeers as rp

MAXCHILDREN = 6
USER = "uucp"


def _table(path, directory, sendmail, log_socket, wakeup=60):
    path.write_text(
        "smap, smapd: directory %s\n"
        "smap: hostname bench.example\n"
        "smap, smapd: accept-domains example.com\n"
        "smap: maxchildren 1000\n"
        "smapd: sendmail %s\n"
        "smapd: maxchildren %d\n"
        "smapd: wakeup %d\n"
        "*: logsocket %s\n" % (directory, sendmail, MAXCHILDREN, wakeup, log_socket))


class Drain:
    """The template spool and the two ways of draining it."""

    def __init__(self, env, smoke):
        self.env = env
        self.count = 10 if smoke else 2000
        self.ready = False

    def setup(self):
        if self.ready:
            return
        postfix = self.env.get("postfix")
        work = self.env.dir("smapd-drain")
        self.spool = work / "spool"
        self.template = work / "template"
        self.scratch = work / "scratch"
        self.table = work / "netperm-table"
        self.sendmail = postfix["sendmail"] + ["-bm"]
        _table(self.table, self.spool, " ".join(self.sendmail), self.env.log_socket())
        # fill the spool with smap itself, keep its queue as the template
        port = rp.free_port()
        proc = rp.Proc([peers.VENV_BIN / "smap", "-c", self.table, "--daemon",
                        "%s:%d" % (peers.LOOPBACK, port), "-F"], new_session=True,
                       log=work / "smap.out")
        try:
            rp.wait_for_listen(peers.LOOPBACK, port)
            smtp_source(port, 10, self.count, 5 * 1024, True)
            queue = self.spool / spoolfmt.QUEUE
            rp.wait_until(lambda: len(spoolfmt.queued(str(self.spool))) >= self.count, 60,
                          what="%d messages in the template spool" % self.count)
        finally:
            proc.stop()
        if self.template.exists():
            shutil.rmtree(self.template)
        shutil.copytree(queue, self.template)
        self.names = spoolfmt.queued(str(self.spool))
        if len(self.names) != self.count:
            raise RuntimeError("template holds %d of %d messages" % (len(self.names),
                                                                     self.count))
        self.uid, self.gid = peers.uid_gid(USER)
        self.ready = True

    def _refill(self, directory):
        peers.clear_dir(directory)
        for name in self.names:
            shutil.copy2(self.template / name, directory / name)
            os.chown(directory / name, self.uid, self.gid)

    def _settle(self):
        """Untimed: let Postfix empty its queue before the next run."""
        self.env.get("postfix")["peer"].wait_queue_empty(timeout=300)

    def smapd(self):
        self.setup()
        self._settle()
        queue = self.spool / spoolfmt.QUEUE
        self._refill(queue)
        started = time.monotonic()
        r = subprocess.run([str(peers.VENV_BIN / "smapd"), "-c", str(self.table), "--once"],
                           capture_output=True, text=True, timeout=1800,
                           stdin=subprocess.DEVNULL)
        elapsed = time.monotonic() - started
        if r.returncode != 0:
            raise RuntimeError("smapd --once exited %d: %s" % (r.returncode, r.stderr[-300:]))
        left = spoolfmt.queued(str(self.spool))
        if left:
            raise RuntimeError("smapd --once left %d of %d messages" % (len(left), self.count))
        return self.count / elapsed

    def plain_loop(self):
        self.setup()
        self._settle()
        self.scratch.mkdir(exist_ok=True)
        self._refill(self.scratch)

        def deliver(name):
            envelope, message = spoolfmt.read_message(str(self.scratch / name))
            argv = self.sendmail + ["-oi", "-f", envelope["sender"], "--", *envelope["rcpt"]]
            r = subprocess.run(argv, input=message.replace(b"\r\n", b"\n"),
                               capture_output=True, user=self.uid, group=self.gid,
                               extra_groups=[], timeout=600)
            if r.returncode != 0:
                raise RuntimeError("sendmail exited %d: %r" % (r.returncode, r.stderr[-200:]))
            os.unlink(self.scratch / name)

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(MAXCHILDREN) as pool:
            for _ in pool.map(deliver, self.names):
                pass
        return self.count / (time.monotonic() - started)


class Latency:
    """smap → smapd -F (wakeup 60) → a sendmail wrapper that logs its call."""

    def __init__(self, env, smoke):
        self.env = env
        self.count = 3 if smoke else 40
        self.started = False
        self.p95 = None

    def setup(self):
        if self.started:
            return
        postfix = self.env.get("postfix")
        work = self.env.dir("smapd-latency")
        self.spool = work / "spool"
        self.calls = work / "calls.log"
        self.calls.write_text("")
        os.chmod(self.calls, 0o666)
        wrapper = work / "sendmail-wrapper"
        wrapper.write_text("#!/bin/sh\nprintf '%%s %%s\\n' \"$(date +%%s.%%N)\" \"$*\" >> %s\n"
                           "exec %s \"$@\"\n" % (self.calls, " ".join(postfix["sendmail"])))
        os.chmod(wrapper, 0o755)
        table = work / "netperm-table"
        _table(table, self.spool, "%s -bm" % wrapper, self.env.log_socket(), wakeup=60)
        self.port = rp.free_port()
        smap = rp.Proc([peers.VENV_BIN / "smap", "-c", table, "--daemon",
                        "%s:%d" % (peers.LOOPBACK, self.port), "-F"], new_session=True,
                       log=work / "smap.out")
        self.env.stack.callback(smap.stop)
        rp.wait_for_listen(peers.LOOPBACK, self.port)
        # smap creates the spool (and its trigger FIFO) on its first connection
        with smtplib.SMTP(peers.LOOPBACK, self.port, timeout=30) as client:
            client.noop()
        rp.wait_until(lambda: (self.spool / spoolfmt.QUEUE).is_dir(), 10, what="the spool")
        smapd = rp.Proc([peers.VENV_BIN / "smapd", "-c", table, "-F"], new_session=True,
                        log=work / "smapd.out")
        self.env.stack.callback(smapd.stop)
        rp.wait_for_path(self.spool / ".smapd.pid", 20)
        time.sleep(0.5)        # the scanner's first (empty) pass
        self.sequence = 0
        self.started = True

    def _call_time(self, rcpt, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.calls.read_text().splitlines():
                stamp, _, args = line.partition(" ")
                if args.endswith(" " + rcpt):
                    return float(stamp)
            time.sleep(0.005)
        raise RuntimeError("the MTA was not called for %s within %ds" % (rcpt, timeout))

    def median(self):
        self.setup()
        samples = []
        message = peers.make_message(0, 5 * 1024).replace(b"\n", b"\r\n")
        for _ in range(self.count):
            self.sequence += 1
            rcpt = "lat%d@example.com" % self.sequence
            with smtplib.SMTP(peers.LOOPBACK, self.port, timeout=30) as client:
                client.sendmail("bench@example.org", [rcpt], message)
                accepted = time.time()
            samples.append(self._call_time(rcpt) - accepted)
        samples.sort()
        self.p95 = samples[min(len(samples) - 1, int(round(0.95 * (len(samples) - 1))))]
        return statistics.median(samples)

    def percentile95(self):
        if self.p95 is None:
            raise NotMeasured("the median run did not complete")
        value, self.p95 = self.p95, None
        return value


def measurements(env, smoke):
    drain, latency = Drain(env, smoke), Latency(env, smoke)
    need = missing_any("smapd", "smap", "postfix", "smtp-source")
    return [
        Measurement("smapd", "drain %d × 5 KB into Postfix sendmail, concurrency %d"
                    % (drain.count, MAXCHILDREN), "msg/s", True,
                    [Variant("plain loop", drain.plain_loop, need),
                     Variant("smapd --once", drain.smapd, need)], baseline="plain loop"),
        Measurement("smapd", "\"250\" → MTA call, median of %d (wakeup 60)" % latency.count,
                    "s", False, [Variant("smapd -F", latency.median, need)]),
        Measurement("smapd", "\"250\" → MTA call, 95th percentile of %d (wakeup 60)"
                    % latency.count, "s", False,
                    [Variant("smapd -F", latency.percentile95, need)]),
    ]

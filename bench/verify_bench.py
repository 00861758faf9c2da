"""Recipient verification's measurements (issue 14), group "verify".

One private set-up, started on first use and stopped with the run: a real
Postfix as the inside hub that refuses unknown users (local_recipient_maps,
tests/integration/hubpeers.py) relaying known users' mail to an smtp-sink;
`smapd -F` on a spool with `verify-recipients yes` (so its prober runs);
and two `smap --daemon` (the `make install` launcher), one on that spool
with verification on, one on another spool with it off.  The tables set
`verify-rate 1000` so that the rows measure the work of the path, not the
limit (at the default 10 a second a run of fresh addresses would measure
the limit).

- RCPT latency: one connection each, EHLO, MAIL, then 50 RCPTs timed one
  by one (mean per RCPT): no check at all, against a cached "exists"
  (addresses probed in a warm-up), same run (target: within 1 ms); and
  Verifier.check of a cached answer alone, in-process (what it adds).
- the probe path: 20 RCPTs for addresses that are not cached (fresh ones
  each repetition): smap -> the prober's socket -> a probe of the real
  Postfix -> the cache -> smap's answer, mean per RCPT.
- smap started per connection on a socketpair (as inetd does): banner,
  EHLO, MAIL, one cached RCPT, QUIT, with verification off and on (the
  cost of loading it at every start).
- the mixed run: N messages (1,000; --smoke 20), 30% to unknown users, one
  connection each with smtplib; wall time, and two counts that must be 0:
  bounces made by smapd, known recipients not delivered to the hub.

It trusts the Debian peers and the mailwall programs of the checkout.
"""

import os
import random
import shutil
import smtplib
import socket
import subprocess
import sys
import time

from bench import peers
from bench.harness import Measurement, NotMeasured, Variant
from common import spool
from tests.integration import realpeers as rp

DOMAIN = "example.org"
RCPTS = 50
PROBES = 20
SENDER = b"bench@example.net"
REPS_PREPARED = 12          # fresh address sets the hub knows, one per repetition


class Setup:
    def __init__(self, env, smoke):
        self.env, self.smoke = env, smoke
        self.started = None
        self.failed = None
        self.round = {"probe": 0, "mixed": 0}

    def get(self):
        if self.failed:
            raise NotMeasured(self.failed)
        if self.started is None:
            try:
                self.start()
            except NotMeasured as err:
                self.failed = str(err)
                raise
            except Exception as err:
                self.failed = "verify set-up did not start: %s: %s" % (type(err).__name__,
                                                                       str(err)[:300])
                raise NotMeasured(self.failed) from None
        return self

    def start(self):
        for name in ("smap", "smapd"):
            missing = peers.program_missing(name)
            if missing:
                raise NotMeasured(missing)
        for need in ("postfix", "postmap", "smtp-sink"):
            if rp.which(need) is None:
                raise NotMeasured("%s missing" % need)
        from tests.integration.hubpeers import InsideHub
        work = self.env.dir("verify")
        stack = self.env.stack
        self.sink = stack.enter_context(rp.SmtpSink(work / "sink", extra_args=["-c"]))
        users = ["cached%03d" % n for n in range(RCPTS)]
        users += ["probe%02d-%02d" % (r, n) for r in range(REPS_PREPARED) for n in range(PROBES)]
        users += ["mix%02d-%04d" % (r, n) for r in range(REPS_PREPARED) for n in range(200)]
        self.hub = stack.enter_context(InsideHub(work / "hub", users, self.sink.port))
        uid, gid = peers.uid_gid("uucp")
        log = self.env.log_socket()
        self.mta = work / "mta"
        self.mta.mkdir(exist_ok=True)
        os.chmod(self.mta, 0o777)
        self.spools, self.tables = {}, {}
        for kind in ("on", "off"):
            directory = work / ("spool-" + kind)
            directory.mkdir(exist_ok=True)
            os.chown(directory, uid, gid)
            os.chmod(directory, 0o700)
            spool.make_dirs(str(directory), uid, gid)
            lines = ["smap, smapd: directory %s" % directory, "smap, smapd: userid uucp",
                     "smap, smapd: accept-domains %s" % DOMAIN, "smap: hostname gw.bench",
                     "smap: maxchildren 1000", "*: logsocket %s" % log,
                     "smap, smapd: mailhub 127.0.0.1:%d" % self.hub.port,
                     "smapd: sendmail %s %s %s" % (peers.VENV_BIN / "python",
                                                   peers.ROOT / "tests/integration/recording_mta.py",
                                                   self.mta),
                     "smapd: wakeup 60", "smapd: maxchildren 6"]
            if kind == "on":
                lines += ["smap: verify-recipients yes", "smap: verify-rate 1000",
                          "smap: verify-wait 6"]
            table = work / ("table-" + kind)
            table.write_text("\n".join(lines) + "\n")
            self.spools[kind], self.tables[kind] = directory, table
        smapd = rp.Proc([str(peers.VENV_BIN / "smapd"), "-c", str(self.tables["on"]), "-F"],
                        new_session=True, log=work / "smapd.out")
        stack.callback(smapd.stop)
        rp.wait_until(lambda: (self.spools["on"] / ".verify").exists(), 20,
                      what="the prober's socket")
        self.ports = {}
        for kind in ("on", "off"):
            port = rp.free_port()
            proc = rp.Proc([self.env.launcher("install"), "-c", str(self.tables[kind]),
                            "--daemon", "%s:%d" % (peers.LOOPBACK, port), "-F"],
                           new_session=True, log=work / ("smap-%s.out" % kind))
            stack.callback(proc.stop)
            rp.wait_for_listen(peers.LOOPBACK, port)
            self.ports[kind] = port
        # warm-up: every "cached" address probed once, through the real path
        replies = rcpt_session(self.ports["on"], [b"cached%03d@%s" % (n, DOMAIN.encode())
                                                  for n in range(RCPTS)])
        if any(not reply.startswith(b"250") for _, reply in replies):
            raise RuntimeError("warm-up RCPT refused: %r" % [r for _, r in replies][:3])
        self.started = True

    def log_text(self):
        syslog = self.env.started.get("syslog")
        return syslog.read() if syslog else ""

    def next_round(self, what):
        self.round[what] += 1
        if self.round[what] > REPS_PREPARED:
            raise NotMeasured("more repetitions than prepared address sets (%d)"
                              % REPS_PREPARED)
        return self.round[what] - 1


# -- SMTP by hand: timed RCPTs ------------------------------------------------

def reply_of(reader):
    line = reader.readline()
    while line[3:4] == b"-":
        line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise RuntimeError("connection closed: %r" % line)
    return line


def rcpt_session(port, rcpts):
    """[(seconds, reply)] of each RCPT in one connection."""
    with socket.create_connection((peers.LOOPBACK, port), timeout=30) as sock:
        reader = sock.makefile("rb")
        try:
            if not reply_of(reader).startswith(b"220"):
                raise RuntimeError("no banner")
            for line in (b"EHLO bench.example.net", b"MAIL FROM:<%s>" % SENDER):
                sock.sendall(line + b"\r\n")
                if not reply_of(reader).startswith(b"250"):
                    raise RuntimeError("%s refused" % line.split()[0].decode())
            out = []
            for rcpt in rcpts:
                started = time.perf_counter()
                sock.sendall(b"RCPT TO:<%s>\r\n" % rcpt)
                reply = reply_of(reader)
                out.append((time.perf_counter() - started, reply))
            sock.sendall(b"QUIT\r\n")
            reply_of(reader)
            return out
        finally:
            reader.close()


def mean_rcpt_ms(port, rcpts):
    timed = rcpt_session(port, rcpts)
    bad = [reply for _, reply in timed if not reply.startswith(b"250")]
    if bad:
        raise RuntimeError("RCPT refused: %r" % bad[0])
    return 1000.0 * sum(seconds for seconds, _ in timed) / len(timed)


def cached_quit_session(sock):
    reader = sock.makefile("rb")
    try:
        reply_of(reader)
        for line in (b"EHLO bench.example.net", b"MAIL FROM:<%s>" % SENDER,
                     b"RCPT TO:<cached000@%s>" % DOMAIN.encode(), b"QUIT"):
            sock.sendall(line + b"\r\n")
            reply = reply_of(reader)
            if line.startswith(b"RCPT") and not reply.startswith(b"250"):
                raise RuntimeError("RCPT refused: %r" % reply)
        while sock.recv(4096):
            pass
    finally:
        reader.close()


# -- the mixed run ------------------------------------------------------------

def mixed_run(setup, messages):
    """(seconds, bounces by smapd, known recipients not delivered)."""
    rep = setup.next_round("mixed")
    rng = random.Random(1400 + rep)
    known = ["mix%02d-%04d@%s" % (rep, n, DOMAIN) for n in range(200)]
    unknown = ["nomix%02d-%04d@%s" % (rep, n, DOMAIN) for n in range(100)]
    order = [rng.choice(unknown) if rng.random() < 0.3 else rng.choice(known)
             for _ in range(messages)]
    log_before = setup.log_text()
    delivered_before = log_before.count("delivered id=")
    bounces_before = log_before.count(" bounce id=")
    runs_before = len(os.listdir(setup.mta))
    started = time.monotonic()
    accepted = refused = 0
    for number, rcpt in enumerate(order):
        with smtplib.SMTP(peers.LOOPBACK, setup.ports["on"], timeout=60) as client:
            try:
                client.sendmail(SENDER.decode(), [rcpt],
                                b"Subject: mixed %d\r\n\r\nbody\r\n" % number)
                accepted += 1
            except smtplib.SMTPRecipientsRefused as err:
                codes = {code for code, _ in err.recipients.values()}
                if codes != {550}:
                    raise RuntimeError("refused with %r" % codes) from None
                refused += 1
    expected = sum(1 for rcpt in order if rcpt in known)
    if accepted != expected:
        raise RuntimeError("%d accepted, %d to known users" % (accepted, expected))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if setup.log_text().count("delivered id=") - delivered_before >= expected and \
                not spool.queued(str(setup.spools["on"])):
            break
        time.sleep(0.2)
    elapsed = time.monotonic() - started
    log_after = setup.log_text()
    bounces = (log_after.count(" bounce id=") - bounces_before) + \
        (len(os.listdir(setup.mta)) - runs_before) // 2
    missing = expected - (log_after.count("delivered id=") - delivered_before)
    return elapsed, bounces, max(0, missing)


def measurements(env, smoke):
    setup = Setup(env, smoke)
    messages = 20 if smoke else 1000
    probes = 5 if smoke else PROBES
    mixed = {}

    def no_check():
        s = setup.get()
        return mean_rcpt_ms(s.ports["off"], [b"cached%03d@%s" % (n, DOMAIN.encode())
                                             for n in range(RCPTS)])

    def cached():
        s = setup.get()
        return mean_rcpt_ms(s.ports["on"], [b"cached%03d@%s" % (n, DOMAIN.encode())
                                            for n in range(RCPTS)])

    def probe_path():
        s = setup.get()
        rep = s.next_round("probe")
        return mean_rcpt_ms(s.ports["on"], [b"probe%02d-%02d@%s" % (rep, n, DOMAIN.encode())
                                            for n in range(probes)])

    def per_connection(kind):
        def measure():
            from bench import smtp_bench
            s = setup.get()
            return smtp_bench.spawn_on_socketpair_ms(
                [env.launcher("install"), "-c", str(s.tables[kind])], 5 if smoke else 50,
                cached_quit_session)
        return measure

    def mixed_value(index):
        def measure():
            s = setup.get()
            if index == 0:
                mixed.pop("last", None)
                mixed["last"] = mixed_run(s, messages)
            elif "last" not in mixed:
                raise NotMeasured("the mixed run of this repetition failed")
            return mixed["last"][index]
        return measure

    def in_process():
        """Verifier.check on a cached "exists", in this process (µs per call):
        the part of an RCPT that verification adds, without the network."""
        import tempfile
        from common import verifycache
        from smap import verify
        with tempfile.TemporaryDirectory() as root:
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
            store = verifycache.Store(fd)
            now = int(time.time())
            store.write("john@example.org", verifycache.Record(verifycache.OK, now, now + 3600))
            store.close()
            os.close(fd)
            session = type("Session", (), {"spool_root": root})()
            verifier = verify.Verifier(wait=0)
            calls = 1000 if smoke else 20000
            started = time.perf_counter()
            for _ in range(calls):
                verdict = verifier.check(session, None, "john@example.org")
            elapsed = time.perf_counter() - started
            verifier.close()
            if verdict is not verify.policy.ACCEPTED:
                raise RuntimeError("not accepted: %r" % verdict)
            return elapsed * 1e6 / calls

    none = "smap --daemon, no check"
    mixed_name = "mixed run: %d messages, 30%% to unknown users, a connection each" % messages
    return [
        Measurement("verify", "RCPT latency, mean of %d in one connection" % RCPTS, "ms", False,
                    [Variant(none, no_check), Variant("smap --daemon, verify: cached answer",
                                                      cached)], baseline=none),
        Measurement("verify", "Verifier.check of a cached answer, in-process", "µs", False,
                    [Variant("smap.verify", in_process)]),
        Measurement("verify", "RCPT latency of an uncached address (probe via smapd's prober "
                    "to Postfix), mean of %d" % probes, "ms", False,
                    [Variant("smap --daemon, verify: probe path", probe_path)]),
        Measurement("verify", "smap on a socketpair per connection: banner, EHLO, MAIL, "
                    "one RCPT, QUIT", "ms", False,
                    [Variant("verify-recipients no", per_connection("off")),
                     Variant("verify-recipients yes, cached", per_connection("on"))],
                    baseline="verify-recipients no"),
        Measurement("verify", mixed_name + ": wall time", "s", False,
                    [Variant("smap --daemon + smapd, verify", mixed_value(0))]),
        Measurement("verify", mixed_name + ": bounces made by smapd", "count", False,
                    [Variant("smap --daemon + smapd, verify", mixed_value(1))]),
        Measurement("verify", mixed_name + ": known recipients not delivered", "count", False,
                    [Variant("smap --daemon + smapd, verify", mixed_value(2))]),
    ]

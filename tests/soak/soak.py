#!/usr/bin/env python3
"""Fault injection: `make soak TRIALS=N SEED=S` (issue 7).

Each trial sends a few messages through the real chain - smap (inetd mode
over a socketpair, as root: chroot + uucp) → spool → smapd (scanner +
agent, uucp) → Postfix's real sendmail (a private instance) → smtp-sink -
and breaks one thing at a moment drawn from the seed:

    smap-mid-data    kill -9 of smap in the middle of DATA
    smap-after-250   kill -9 of smap right after its "250"
    scanner          kill -9 of the smapd scanner while deliveries run
    agent            kill -9 of the smapd delivery agent while they run
    mta-kill         kill -9 of the MTA process during a delivery
    mta-75           the MTA answers EX_TEMPFAIL for a while
    mta-67           the MTA answers EX_NOUSER (permanent: bounce)
    mta-hang         the MTA hangs (deliver-timeout must end it)
    spool-full       the spool is a small tmpfs that fills up

The only stand-in is tests/soak/faulty_mta.py, a switch in front of the
real sendmail that returns a chosen exit code or hangs (no real MTA does
that on demand).  Then the trial recovers (the MTA is fixed, a dead smapd
is started again, space is freed) and waits, bounded, until every message
that received "250" is accounted for: delivered (at smtp-sink), bounced
(a bounce to its sender at smtp-sink) or quarantined (in bad/).  Anything
else is lost.  A message delivered twice is a duplicate; duplicates are
tolerated only for the kinds that can kill between the MTA's success and
the spool file's removal (scanner, agent, mta-kill).

It prints trials, messages, lost (must be 0) and duplicates, and exits 1
when anything was lost or duplicated where it must not be.  Needs root and
the Debian postfix package.  Every process it starts is stopped by pid.
"""

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common import spool  # noqa: E402
from tests.integration import realpeers  # noqa: E402
from tests.integration import smapd_helpers as helpers  # noqa: E402

KINDS = ["smap-mid-data", "smap-after-250", "scanner", "agent", "mta-kill", "mta-75",
         "mta-67", "mta-hang", "spool-full"]
DUPLICATES_ALLOWED = {"scanner", "agent", "mta-kill"}
FAULTY_MTA = str(Path(__file__).with_name("faulty_mta.py"))
SENDER = "sender@example.net"
RECIPIENT = "rcpt@example.org"


class Stats:
    def __init__(self):
        self.trials = self.messages = self.acknowledged = 0
        self.delivered = self.bounced = self.quarantined = 0
        self.lost = self.duplicates = self.bad_duplicates = 0
        self.problems = []

    def line(self):
        return ("trials=%d messages=%d acknowledged=%d delivered=%d bounced=%d "
                "quarantined=%d lost=%d duplicates=%d unexpected_duplicates=%d"
                % (self.trials, self.messages, self.acknowledged, self.delivered,
                   self.bounced, self.quarantined, self.lost, self.duplicates,
                   self.bad_duplicates))

    @property
    def ok(self):
        return self.lost == 0 and self.bad_duplicates == 0 and not self.problems


# -- smap, spoken to over a socketpair as inetd would hand it -------------------

class Smap:
    def __init__(self, table):
        self.sock, theirs = socket.socketpair()
        self.proc = subprocess.Popen([helpers.SMAP, "-c", str(table)], stdin=theirs,
                                     stdout=theirs, stderr=subprocess.DEVNULL, close_fds=True)
        theirs.close()
        self.sock.settimeout(30)
        self.buffer = b""

    def reply(self):
        while True:
            while b"\r\n" not in self.buffer:
                data = self.sock.recv(65536)
                if not data:
                    raise EOFError("smap closed")
                self.buffer += data
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            if line[3:4] != b"-":
                return int(line[:3]), line.decode("ascii", "replace")

    def command(self, text):
        self.sock.sendall(text.encode() + b"\r\n")
        return self.reply()

    def kill(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)

    def close(self):
        try:
            self.sock.close()
        finally:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
                self.proc.wait(10)


def message_text(token, size):
    body = b"".join(b"line %d of %s\r\n" % (n, token.encode()) for n in range(size // 24 + 1))
    return (b"From: <%s>\r\nTo: <%s>\r\nSubject: %s\r\nMessage-ID: <%s@soak>\r\n\r\n"
            % (SENDER.encode(), RECIPIENT.encode(), token.encode(), token.encode()) + body)


def send(table, token, size=1000, kill_mid_data=False, kill_after_250=False, rng=None):
    """(reply code or None, queue id when smap said 250 else None)."""
    smap = Smap(table)
    try:
        assert smap.reply()[0] == 220
        assert smap.command("EHLO soak.example.net")[0] == 250
        assert smap.command("MAIL FROM:<%s>" % SENDER)[0] == 250
        assert smap.command("RCPT TO:<%s>" % RECIPIENT)[0] == 250
        assert smap.command("DATA")[0] == 354
        data = message_text(token, size) + b".\r\n"
        if kill_mid_data:
            cut = rng.randrange(1, len(data) - 3)
            smap.sock.sendall(data[:cut])
            time.sleep(rng.random() * 0.2)
            smap.kill()
            return None, None
        smap.sock.sendall(data)
        code, text = smap.reply()
        if code != 250:
            return code, None
        if kill_after_250:
            smap.kill()
        else:
            smap.command("QUIT")
        return code, text.rsplit(" ", 1)[1]
    except (EOFError, OSError):
        return None, None
    finally:
        smap.close()


# -- smapd ------------------------------------------------------------------------

class Smapd:
    """smapd -F, started again when it died."""

    def __init__(self, table, directory, log):
        self.table, self.directory, self.log = table, directory, log
        self.proc = None
        self.start()

    def start(self, timeout=20):
        deadline = time.monotonic() + timeout
        while True:
            proc = realpeers.Proc([helpers.SMAPD, "-c", str(self.table), "-F"], log=self.log)
            try:
                realpeers.wait_until(lambda: self.ready(proc) or proc.exited(), 10,
                                     what="smapd start")
            except TimeoutError:
                pass
            if not proc.exited() and self.ready(proc):
                self.proc = proc
                return
            proc.stop()
            # an agent of a killed scanner may still hold the lock a moment
            if time.monotonic() > deadline:
                raise RuntimeError("smapd does not start: %s" % Path(self.log).read_text()[-800:])
            time.sleep(0.3)

    def ready(self, proc):
        try:
            pid = int((self.directory / ".smapd.pid").read_text())
        except (OSError, ValueError):
            return False
        return pid == proc.pid and len(helpers.children_of(proc.pid)) >= 1

    def scanner(self):
        return self.proc.pid

    def agent(self):
        children = helpers.children_of(self.proc.pid)
        return children[0] if children else None

    def alive(self):
        return self.proc is not None and not self.proc.exited()

    def stop(self):
        if self.proc is not None:
            pids = [self.proc.pid] + helpers.descendants_of(self.proc.pid)
            self.proc.stop(30)
            for pid in pids:              # leftovers of a killed scanner, by pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def mta_pids(mode_file):
    """pids of running faulty_mta.py processes of this trial (before their exec)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path("/proc/%s/cmdline" % entry).read_bytes().split(b"\0")
        except OSError:
            continue
        if FAULTY_MTA.encode() in cmdline and str(mode_file).encode() in cmdline:
            found.append(int(entry))
    return found


def sendmail_pids(confdir):
    """pids of Postfix sendmail/postdrop runs for this instance's config."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path("/proc/%s/cmdline" % entry).read_bytes().split(b"\0")
        except OSError:
            continue
        if str(confdir).encode() in cmdline and cmdline[0].endswith(b"sendmail"):
            found.append(int(entry))
    return found


# -- one trial ------------------------------------------------------------------------

def run_trial(number, kind, rng, work, postfix, sink, stats, log=print):
    trial = work / ("trial-%03d" % number)
    trial.mkdir()
    realpeers.open_up(trial)
    directory = trial / "spool"
    directory.mkdir()
    mounted = False
    if kind == "spool-full":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs",
                        str(directory)], check=True)
        mounted = True
    helpers.make_spool(directory)
    mode_file = trial / "mta-mode"
    mode_file.write_text("ok\n")
    os.chmod(mode_file, 0o644)
    sendmail = [helpers.PYTHON, FAULTY_MTA, str(mode_file)] + postfix.sendmail_argv() + ["-bm"]
    table = helpers.write_table(trial / "table", directory, sendmail=sendmail, lines=[
        "smapd: wakeup 1", "smapd: retry 1", "smapd: deliver-timeout 3",
        "smapd: maxchildren 3", "*: logsocket %s" % (trial / "no-syslog")])
    # wakeup is 60 in write_table's defaults; the first line wins, so put ours first
    text = table.read_text().replace("smapd: wakeup 60\n", "")
    table.write_text(text)
    smapd = Smapd(table, directory, trial / "smapd.out")
    acked = {}                    # token -> queue id
    count = rng.randint(3, 5)
    victim = rng.randrange(count)
    tokens = ["soak-%d-%d-%d" % (number, n, rng.randrange(10 ** 9)) for n in range(count)]
    try:
        fault = "none"
        if kind in ("mta-75", "mta-67", "mta-hang", "scanner", "agent", "mta-kill",
                    "spool-full"):
            # spool-full: deferring keeps the messages in the spool so that it fills
            mode_file.write_text({"mta-75": "75", "mta-67": "67", "mta-hang": "hang",
                                  "spool-full": "75"}.get(kind, "slow") + "\n")
        filler = None
        if kind == "spool-full":
            filler = directory / "filler"
            free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
            with open(filler, "wb") as out:
                out.write(b"\0" * max(0, free - 60 * 1024))
        for n, token in enumerate(tokens):
            stats.messages += 1
            code, queue_id = send(table, token, size=25000 if kind == "spool-full" else 800,
                            kill_mid_data=(kind == "smap-mid-data" and n == victim),
                            kill_after_250=(kind == "smap-after-250" and n == victim), rng=rng)
            if queue_id:
                acked[token] = queue_id
            elif kind == "spool-full" and code in (451, 452):
                fault = "refused-%d-while-full" % code
            if kind == "smap-after-250" and n == victim:
                fault = "killed-smap-after-250"
            if kind == "smap-mid-data" and n == victim:
                fault = "killed-smap-mid-data"
                # a half-received message is never visible to smapd
                assert queue_id is None
        if kind in ("scanner", "agent", "mta-kill"):
            # the MTA is in "slow" mode (2 s a run): wait for a run, then
            # kill at a random moment inside that window
            try:
                realpeers.wait_until(lambda: mta_pids(mode_file), 10, 0.02, what="an MTA run")
            except TimeoutError:
                pass
            time.sleep(rng.random() * 1.5)
            if kind == "scanner":
                target = smapd.scanner()
            elif kind == "agent":
                target = smapd.agent()
            else:
                targets = mta_pids(mode_file) or sendmail_pids(postfix.confdir)
                target = rng.choice(targets) if targets else None
            busy = bool(mta_pids(mode_file) or sendmail_pids(postfix.confdir))
            if target:
                try:
                    os.kill(target, signal.SIGKILL)
                    fault = "killed-%s-%s" % (kind, "mid-delivery" if busy else "idle")
                except ProcessLookupError:
                    pass
        elif kind in ("mta-75", "mta-hang", "mta-67"):
            time.sleep(1.5 + rng.random() * 2)   # a few failed attempts
            fault = kind
        # -- recovery --------------------------------------------------------
        if kind != "mta-67":
            mode_file.write_text("ok\n")
        if filler is not None:
            filler.unlink()
            token = "soak-%d-late-%d" % (number, rng.randrange(10 ** 9))
            tokens.append(token)
            stats.messages += 1
            code, queue_id = send(table, token, size=25000)
            if not queue_id:
                stats.problems.append("trial %d: no 250 after space was freed" % number)
            else:
                acked[token] = queue_id
        time.sleep(0.3)
        if not smapd.alive():
            smapd.stop()
            smapd.start()
        subprocess.run([helpers.SMAPD, "-c", str(table), "--flush"], capture_output=True,
                       timeout=30)
        outcome = account(acked, directory, sink, smapd, timeout=60)
    finally:
        smapd.stop()
        if mounted:
            subprocess.run(["umount", "-l", str(directory)], check=False)
    stats.trials += 1
    stats.acknowledged += len(acked)
    lost = [t for t, how in outcome.items() if how == "lost"]
    duplicated = [t for t in acked if sink_count(sink, t, RECIPIENT) > 1]
    stats.delivered += sum(1 for how in outcome.values() if how == "delivered")
    stats.bounced += sum(1 for how in outcome.values() if how == "bounced")
    stats.quarantined += sum(1 for how in outcome.values() if how == "quarantined")
    stats.lost += len(lost)
    stats.duplicates += len(duplicated)
    if kind not in DUPLICATES_ALLOWED:
        stats.bad_duplicates += len(duplicated)
    for token in lost:
        stats.problems.append("trial %d (%s): %s id=%s lost" % (number, kind, token, acked[token]))
    if fault == "none":
        stats.problems.append("trial %d (%s): the fault did not happen" % (number, kind))
    log("trial %d %-15s fault=%s sent=%d acked=%d lost=%d duplicates=%d" % (
        number, kind, fault, count + (1 if kind == "spool-full" else 0), len(acked),
        len(lost), len(duplicated)))


def sink_count(sink, token, recipient):
    needle = b"Subject: " + token.encode()
    return sum(1 for dump in sink.dumps() if recipient in dump.rcpt_to and needle in dump.data)


def account(acked, directory, sink, smapd, timeout):
    """{token: delivered|bounced|quarantined|lost} once all are settled or time is up."""
    deadline = time.monotonic() + timeout
    while True:
        outcome = {}
        for token, queue_id in acked.items():
            if sink_count(sink, token, RECIPIENT):
                outcome[token] = "delivered"
            elif sink_count(sink, token, SENDER):
                outcome[token] = "bounced"
            elif (directory / spool.BAD / queue_id).exists():
                outcome[token] = "quarantined"
            else:
                outcome[token] = "lost"
        if "lost" not in outcome.values() or time.monotonic() > deadline:
            return outcome
        if not smapd.alive():
            smapd.stop()
            smapd.start()
        time.sleep(0.3)


def run(trials, seed, kinds=None, log=print):
    """Run the trials; returns Stats.  Needs root, postfix and smtp-sink."""
    rng = random.Random(seed)
    kinds = kinds or KINDS
    stats = Stats()
    work = Path(tempfile.mkdtemp(prefix="mwsoak-"))
    os.chmod(work, 0o755)
    try:
        with realpeers.SmtpSink(work / "sink") as sink, \
                realpeers.Postfix(work / "postfix", sink.port) as postfix:
            for number in range(trials):
                kind = kinds[number % len(kinds)] if trials >= len(kinds) and number < len(kinds) \
                    else rng.choice(kinds)
                run_trial(number, kind, rng, work, postfix, sink, stats, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return stats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help="comma-separated fault kinds (default: all)")
    options = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("soak: needs root (smap and smapd drop to uucp)", file=sys.stderr)
        return 2
    stats = run(options.trials, options.seed, options.kinds.split(","))
    print(stats.line())
    for problem in stats.problems:
        print("  " + problem)
    return 0 if stats.ok else 1


if __name__ == "__main__":
    sys.exit(main())

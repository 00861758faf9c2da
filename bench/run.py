#!/usr/bin/env python3
"""`make bench`: mailwall against the programs a site would otherwise run.

Checks for (and names) what it needs, installs nothing, starts every server
privately on 127.0.0.1 high ports (bench.peers), runs the measurements of
bench.smtp_bench, bench.smapd_bench and bench.pop3_bench interleaved
(A B A B ...) `--reps` times (at least 3; --smoke: tiny sizes, 1), prints one
table of medians with ratios, checks the targets of issue 6 against it, and
writes table, targets, machine and date into docs/PERFORMANCE.md between
its markers (the hand-written analysis around them is kept).  --json PATH
also dumps every value.  Must run as root (Postfix, Dovecot, smap's chroot).

It trusts the Debian peers and the mailwall programs in .venv; it stops
every process it started by pid when it ends, also on Ctrl-C.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import harness, milter_bench, peers, pop3_bench, smapd_bench, smtp_bench, targets  # noqa: E402,E501
from bench import verify_bench  # noqa: E402  (issue 14)

BEGIN = "<!-- bench:begin (written by bench/run.py; edit outside the markers) -->"
END = "<!-- bench:end -->"
GROUPS = ("startup", "smap", "smapd", "pop3", "memory", "verify", "milter")


def machine():
    info = {"cores": os.cpu_count(), "python": sys.version.split()[0],
            "interpreter": os.path.realpath(peers.VENV_BIN / "python"),
            "kernel": platform.release()}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    info["memory"] = "%.1f GiB" % (int(line.split()[1]) / 1048576)
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/etc/debian_version") as fh:
            info["debian"] = fh.read().strip()
    except OSError:
        pass
    r = subprocess.run([str(peers.VENV_BIN / "python"), "-c", "import sys; print(sys.version)"],
                       capture_output=True, text=True)
    if r.returncode == 0:
        info["python"] = r.stdout.split()[0]
    return info


def check_requirements(stream):
    """Print what is there and what is missing; return the missing names."""
    missing = {}
    for name in ("smtp-source", "postfix", "xinetd", "dovecot", "perdition", "nginx",
                 "smap", "smapd", "pop3-gw"):
        reason = peers.program_missing(name)
        if reason:
            missing[name] = reason
            hint = peers.PACKAGES.get(name)
            stream.write("bench: %-12s MISSING (%s)%s\n" % (
                name, reason, "; apt-get install %s" % hint if hint else ""))
        else:
            stream.write("bench: %-12s ok\n" % name)
    return missing


def build(env, smoke, groups):
    measurements = []
    if "startup" in groups:
        measurements += smtp_bench.startup_measurements(env, smoke)
    if "smap" in groups:
        measurements += smtp_bench.inetd_measurements(env, smoke)
        measurements += smtp_bench.intake_measurements(env, smoke)
        measurements += smtp_bench.fork_cost_measurements(env, smoke)
    if "smapd" in groups:
        measurements += smapd_bench.measurements(env, smoke)
    if "pop3" in groups:
        measurements += pop3_bench.measurements(env, smoke)
    if "memory" in groups:
        measurements += smtp_bench.memory_measurements(env, smoke)
        measurements += pop3_bench.memory_measurements(env, smoke)
    if "verify" in groups:
        measurements += verify_bench.measurements(env, smoke)
    if "milter" in groups:
        measurements += milter_bench.measurements(env, smoke)
    return measurements


def report(measurements, info, versions, reps, smoke, started):
    lines = ["Run of %s UTC, %d repetition%s%s, interleaved; medians." % (
        started.strftime("%Y-%m-%d %H:%M"), reps, "" if reps == 1 else "s",
        " (--smoke: tiny sizes, not a measurement)" if smoke else ""), "",
        "Machine: " + ", ".join("%s %s" % (k, v) for k, v in info.items()) + ".", "",
        "Peers: " + (", ".join("%s %s" % (k, v) for k, v in sorted(versions.items()))
                     or "none found") + ".", "",
        harness.table(measurements), "",
        "Targets of issue 6, checked against this table:", "",
        targets.check(measurements), ""]
    return "\n".join(lines)


def write_doc(path, text):
    path = Path(path)
    block = "%s\n%s\n%s\n" % (BEGIN, text.rstrip("\n"), END)
    if path.exists():
        old = path.read_text()
        if BEGIN in old and END in old:
            head, rest = old.split(BEGIN, 1)
            tail = rest.split(END, 1)[1]
            path.write_text(head + block + tail.lstrip("\n"))
            return
    path.write_text("# mailwall performance\n\n" + block)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, one repetition (CI: checks only that every "
                             "measurement produces a number)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3)")
    parser.add_argument("--out", default=None,
                        help="Markdown file to update (default docs/PERFORMANCE.md; "
                             "--smoke writes none unless given)")
    parser.add_argument("--json", default=None, help="also dump every value here")
    parser.add_argument("--only", default=",".join(GROUPS),
                        help="comma-separated groups: %s" % ",".join(GROUPS))
    options = parser.parse_args(argv)
    reps = options.reps or (1 if options.smoke else 3)
    if not options.smoke and reps < 3:
        parser.error("a measurement run needs at least 3 repetitions")
    groups = [g for g in options.only.split(",") if g]
    if os.geteuid() != 0:
        sys.stderr.write("bench: must run as root (Postfix, Dovecot, smap's chroot)\n")
        return 2
    check_requirements(sys.stderr)
    started = datetime.datetime.now(datetime.timezone.utc)
    info, versions = machine(), peers.versions()
    with tempfile.TemporaryDirectory(prefix="mwbench-") as tmp:
        os.chmod(tmp, 0o755)
        with peers.Env(tmp, smoke=options.smoke) as env:
            measurements = build(env, options.smoke, groups)
            harness.run(measurements, reps)
    text = report(measurements, info, versions, reps, options.smoke, started)
    sys.stdout.write(text)
    out = options.out or (None if options.smoke else str(ROOT / "docs" / "PERFORMANCE.md"))
    if out:
        write_doc(out, text)
        sys.stderr.write("bench: wrote %s\n" % out)
    if options.json:
        with open(options.json, "w") as fh:
            json.dump({"machine": info, "versions": versions, "reps": reps,
                       "smoke": options.smoke, "date": started.isoformat(),
                       "results": harness.results(measurements)}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

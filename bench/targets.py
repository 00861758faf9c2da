"""The targets of issue 6, checked against one run's medians.

Each target names the rows it reads (group, measurement prefix, program)
and a bound on a ratio or a value; check() reports every target as met,
NOT met (with the figures) or not measured (with the reason).  It trusts
the harness's medians; it decides nothing about why a target is missed
(that analysis is hand-written in docs/PERFORMANCE.md).
"""


def find(measurements, group, prefix):
    return [m for m in measurements if m.group == group and m.name.startswith(prefix)]


def _ratio_target(measurements, group, prefix, program, baseline, bound, at_least):
    rows = find(measurements, group, prefix)
    if not rows:
        return None, "no such row"
    figures, ok, missing = [], True, []
    for m in rows:
        v, b = m.variant(program), m.variant(baseline)
        if v is None or b is None or v.median is None or b.median is None:
            missing.append("%s: %s" % (m.name, (v and v.reason()) or (b and b.reason())
                                       or "no value"))
            continue
        ratio = v.median / b.median if b.median else float("inf")
        figures.append("%s %.2f×" % (m.name, ratio))
        ok = ok and (ratio >= bound if at_least else ratio <= bound)
    if missing and not figures:
        return None, "; ".join(missing)
    return ok and not missing, "; ".join(figures + ["not measured: " + x for x in missing])


def _value_target(measurements, group, prefix, program, bound):
    rows = find(measurements, group, prefix)
    figures, ok, missing = [], True, []
    for m in rows:
        v = m.variant(program)
        if v is None or v.median is None:
            missing.append("%s: %s" % (m.name, (v and v.reason()) or "no value"))
            continue
        figures.append("%s %.3g %s" % (m.name, v.median, m.unit))
        ok = ok and v.median <= bound
    if not rows:
        return None, "no such row"
    if missing and not figures:
        return None, "; ".join(missing)
    return ok and not missing, "; ".join(figures + ["not measured: " + x for x in missing])


TARGETS = [
    ("smap --daemon intake ≥ 1.0× Postfix smtpd at -s 10",
     lambda ms: _ratio_target(ms, "smap intake", "-s 10", "smap --daemon", "Postfix smtpd",
                              1.0, True)),
    ("smap under inetd: per-connection cost ≤ 1.5× the bare interpreter",
     lambda ms: _ratio_target(ms, "smap per connection", "under xinetd",
                              "smap (make install launcher, -IS, explicit sys.path)",
                              "python -I -S -c pass", 1.5, False)),
    ("smap ≤ 15 MiB resident per connection (under xinetd)",
     lambda ms: _value_target(ms, "memory", "resident (VmRSS) of one smap",
                              "smap under xinetd (make install launcher)",
                              15.0)),
    ("smapd drain ≥ 0.9× the plain sendmail loop",
     lambda ms: _ratio_target(ms, "smapd", "drain", "smapd --once", "plain loop", 0.9, True)),
    ("\"250\" → MTA median ≤ 0.5 s with wakeup 60",
     lambda ms: _value_target(ms, "smapd", "\"250\" → MTA call, median", "smapd -F", 0.5)),
    ("pop3-gw bulk and 20 MB throughput ≥ 0.9× direct, both clients",
     lambda ms: _ratio_target(ms, "pop3", "bulk", "pop3-gw", "Dovecot direct", 0.9, True)
     if find(ms, "pop3", "bulk") else (None, "no such row")),
    ("pop3-gw bulk and 20 MB throughput ahead of perdition",
     lambda ms: _ratio_target(ms, "pop3", "bulk", "pop3-gw", "perdition", 1.0, True)),
    ("pop3-gw bulk and 20 MB throughput ahead of nginx",
     lambda ms: _ratio_target(ms, "pop3", "bulk", "pop3-gw", "nginx mail", 1.0, True)),
    ("pop3-gw connect + login + QUIT ≤ 1.05× direct",
     lambda ms: _ratio_target(ms, "pop3", "connect + login + QUIT", "pop3-gw",
                              "Dovecot direct", 1.05, False)),
    ("pop3-gw concurrent logins ≥ 0.97× direct",
     lambda ms: _ratio_target(ms, "pop3", "logins/s", "pop3-gw", "Dovecot direct", 0.97,
                              True)),
    ("pop3-gw ≤ 3 MiB private per session",
     lambda ms: _value_target(ms, "memory", "private (Private_*) of one pop3-gw", "pop3-gw",
                              3.0)),
    ("smap --daemon intake through clamav-milter ≥ 1.0× Postfix smtpd with the same milter "
     "(issue 15)",
     lambda ms: _ratio_target(ms, "milter", "intake through clamav-milter",
                              "smap --daemon + clamav-milter", "Postfix smtpd + clamav-milter",
                              1.0, True)),
]


def _difference_target(measurements, group, prefix, program, baseline, bound):
    """program's median at most `bound` above baseline's (same unit)."""
    rows = find(measurements, group, prefix)
    if not rows:
        return None, "no such row"
    figures, ok = [], True
    for m in rows:
        v, b = m.variant(program), m.variant(baseline)
        if v is None or b is None or v.median is None or b.median is None:
            return None, "%s: %s" % (m.name, (v and v.reason()) or (b and b.reason())
                                     or "no value")
        figures.append("%s %+.3g %s" % (m.name, v.median - b.median, m.unit))
        ok = ok and v.median - b.median <= bound
    return ok, "; ".join(figures)


# issue 14: recipient verification (bench/verify_bench.py)
TARGETS += [
    ("verify: RCPT with a cached answer within 1 ms of no check",
     lambda ms: _difference_target(ms, "verify", "RCPT latency, mean",
                                   "smap --daemon, verify: cached answer",
                                   "smap --daemon, no check", 1.0)),
    ("verify: the mixed run ends with 0 bounces from smapd",
     lambda ms: _zero_target(ms, "bounces made by smapd")),
    ("verify: the mixed run delivers every known recipient",
     lambda ms: _zero_target(ms, "known recipients not delivered")),
]


def _zero_target(measurements, suffix):
    rows = [m for m in find(measurements, "verify", "mixed run") if m.name.endswith(suffix)]
    if not rows:
        return None, "no such row"
    v = rows[0].variants[0]
    if v.median is None:
        return None, v.reason() or "no value"
    return max(v.values) == 0, "%s: %s in every run" % (suffix, ", ".join("%d" % x
                                                                        for x in v.values))


def check(measurements):
    lines = []
    for text, test in TARGETS:
        ok, figures = test(measurements)
        verdict = "not measured" if ok is None else ("met" if ok else "NOT met")
        lines.append("- %s: **%s** (%s)" % (text, verdict, figures))
    return "\n".join(lines)

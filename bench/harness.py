"""The benchmark harness: interleaved repetitions, medians, ratios, the table.

A Measurement names what is measured, its unit, whether higher is better,
and its variants (the programs compared), one of which is the baseline the
ratios refer to.  run() repeats every measurement `reps` times and, inside
each repetition, runs the variants one after the other (A B C A B C ...), so
slow drift of a shared machine falls on every variant alike.  A variant that
cannot run (a program missing, a peer that did not start, a measurement that
raised) is reported as "not measured: <reason>", never as a number.

It trusts the measuring functions it is given to return a float or raise;
it does no I/O besides printing progress to stderr.
"""

import statistics
import sys
import time
import traceback


class NotMeasured(Exception):
    """Raised by a measuring function (or set up front) with the reason."""


class Variant:
    def __init__(self, label, measure=None, missing=None):
        self.label = label
        self.measure = measure      # callable() -> float, or None
        self.missing = missing      # reason it cannot be measured, or None
        self.values = []
        self.error = None

    @property
    def median(self):
        return statistics.median(self.values) if self.values else None

    def reason(self):
        return self.missing or self.error


class Measurement:
    def __init__(self, group, name, unit, higher_is_better, variants, baseline=None,
                 note=""):
        self.group = group
        self.name = name
        self.unit = unit
        self.higher_is_better = higher_is_better
        self.variants = variants
        self.baseline = baseline    # label of the variant ratios refer to
        self.note = note

    def variant(self, label):
        for variant in self.variants:
            if variant.label == label:
                return variant
        return None

    def ratio(self, variant):
        base = self.variant(self.baseline) if self.baseline else None
        if base is None or base.median in (None, 0) or variant.median is None:
            return None
        return variant.median / base.median


def run(measurements, reps, progress=sys.stderr):
    """Fill every variant's values, interleaved, `reps` times."""
    for rep in range(reps):
        for m in measurements:
            for variant in m.variants:
                if variant.missing or variant.error:
                    continue
                started = time.monotonic()
                try:
                    value = variant.measure()
                except NotMeasured as err:
                    variant.error = str(err)
                    continue
                except Exception as err:  # a broken run is a finding, not a number
                    variant.error = "%s: %s" % (type(err).__name__, err)
                    if progress:
                        traceback.print_exc(file=progress)
                    continue
                if not isinstance(value, (int, float)) or value != value:
                    variant.error = "measurement returned %r" % (value,)
                    continue
                variant.values.append(float(value))
                if progress:
                    progress.write("[%d/%d] %s | %s | %s: %.4g %s (%.1fs)\n" % (
                        rep + 1, reps, m.group, m.name, variant.label, value, m.unit,
                        time.monotonic() - started))
                    progress.flush()


def fmt(value):
    if value is None:
        return "-"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000:
        return "%.0f" % value
    if magnitude >= 100:
        return "%.1f" % value
    if magnitude >= 1:
        return "%.2f" % value
    return "%.3g" % value


def table(measurements):
    """One Markdown table of medians with ratios to each row's baseline."""
    lines = ["| group | measurement | program | median | unit | ratio | runs |",
             "|---|---|---|---:|---|---:|---:|"]
    for m in measurements:
        for variant in m.variants:
            if variant.median is None:
                value = "not measured: %s" % (variant.reason() or "no value")
                ratio = "-"
            else:
                value = fmt(variant.median)
                r = m.ratio(variant)
                if r is None:
                    ratio = "-"
                elif variant.label == m.baseline:
                    ratio = "1 (base)"
                else:
                    ratio = "%.2f×" % r
            lines.append("| %s | %s | %s | %s | %s | %s | %d |" % (
                m.group, m.name, variant.label, value, m.unit, ratio, len(variant.values)))
    return "\n".join(lines) + "\n"


def results(measurements):
    """A plain structure of every value (for the JSON dump and the tests)."""
    out = []
    for m in measurements:
        for variant in m.variants:
            out.append({"group": m.group, "measurement": m.name, "program": variant.label,
                        "unit": m.unit, "higher_is_better": m.higher_is_better,
                        "values": variant.values, "median": variant.median,
                        "ratio": m.ratio(variant), "baseline": m.baseline,
                        "not_measured": None if variant.values else
                        (variant.reason() or "no value")})
    return out

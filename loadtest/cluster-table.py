#!/usr/bin/env python3
"""Medians and verdicts of cluster.sh's SUMMARY lines: loadtest/cluster-table.py DIR -> markdown.

For each figure: the single-node side and the cluster side, median (the runs), the ratio of the
medians and, where issue 9 sets a bound, whether the medians meet it and in how many runs it held.
"""
import os, statistics, sys

import summaries
from summaries import fmt, med, vals

d = sys.argv[1]


def runs(name, side):
    return summaries.runs(d, name, side)


def cell(xs):
    return summaries.cell(xs, bold=False)


def cpu_us_per_event(s):
    return s["unicast"]["cpu_us_per_event"]


def round_ms(s):
    # The run's median round: first request -> last delivery.
    return statistics.median(r["round_us"] for r in s["broadcast"]["per_round"]) / 1000


rows = []  # (figure, single cells, cluster cells, ratio, bound, verdict)


def complete(s):
    """A run whose figures mean something: every send accepted and delivered, every publish
    delivered to every stream, no missed deadline. A bound is never 'met' on a run that isn't."""
    if s.get("deadlines_missed"):
        return False
    if "unicast" in s:
        u = s["unicast"]
        return u["accepted"] > 0 and u["failed"] == 0 and u["lost"] == 0
    if "broadcast" in s:
        b = s["broadcast"]
        return b["missing"] == 0 and b["failed_requests"] == 0
    return bool(s.get("ok"))


def sends_ok(s):
    """For the loss bound: the sends were accepted (a loss is then a loss, not an incomplete run)."""
    u = s["unicast"]
    return u["accepted"] > 0 and u["failed"] == 0


def pair(name, label, f, bound=None, check=None, single_name=None, ratio=True, need=complete):
    """check(single_value, cluster_value) -> bool for one run or the medians, over the run pairs
    where both runs pass need()."""
    s_runs, c_runs = runs(single_name or name, "single"), runs(name, "cluster")
    if not s_runs and not c_runs:
        return
    sv, cv = vals(s_runs, f), vals(c_runs, f)
    sm, cm = med(sv), med(cv)
    r = f"{cm / sm:.2f}" if ratio and sm and cm is not None else ""
    verdict = ""
    if check is not None:
        good = [(a, b) for a, b, rs, rc in zip(sv, cv, s_runs, c_runs)
                if a is not None and b is not None and need(rs) and need(rc)]
        bad = min(len(sv), len(cv)) - len(good)
        if not good:
            verdict = f"**not measured** ({bad} incomplete run pairs)"
        else:
            ok_med = check(med([a for a, _ in good]), med([b for _, b in good]))
            held = sum(1 for a, b in good if check(a, b))
            verdict = f"{'**met**' if ok_med else '**missed**'} (held in {held} of {len(good)} runs)"
            if bad:
                verdict += f"; {bad} incomplete run pairs left out"
    rows.append((label, cell(sv), cell(cv), r, bound or "", verdict))


def ok_runs(name, side):
    rs = runs(name, side)
    return f"{sum(1 for s in rs if s.get('ok'))}/{len(rs)}" if rs else "-"


pair("publish18k", "one publish to 18k streams, first request -> last delivery, ms (median of the run's rounds)",
     round_ms, "cluster <= 1.5x single", lambda a, b: b <= 1.5 * a)
pair("publish18k", "  delivered per publish (answer's `delivered`, min over rounds)",
     lambda s: min(r["delivered"] for r in s["broadcast"]["per_round"]), ratio=False)
pair("publish18k", "  missing deliveries (all rounds)", lambda s: s["broadcast"]["missing"], ratio=False)
pair("publish18k", "  CPU µs per delivered frame (all gateways + redis)", lambda s: s["broadcast"]["cpu_us_per_event"])
pair("publish18k", "  unrelated sends during the publish rounds (200/s; cluster: cross-node), p99 ms",
     lambda s: s["broadcast"]["probe"]["during_rounds"]["p99_us"] / 1000)
pair("publish18k", "  same, max ms", lambda s: s["broadcast"]["probe"]["during_rounds"]["max_us"] / 1000)
pair("publish18k", "  same, sends completed during rounds", lambda s: s["broadcast"]["probe"]["during_rounds"]["n"],
     ratio=False)
pair("cross", "2k sends/s to 1k streams: sends accepted", lambda s: s["unicast"]["accepted"], ratio=False)
pair("cross", "  lost (accepted, never delivered)", lambda s: s["unicast"]["lost"], "0 lost",
     lambda a, b: b == 0, ratio=False, need=sends_ok)
pair("cross", "  failed sends", lambda s: s["unicast"]["failed"], ratio=False)
pair("cross", "  out-of-order + unexpected", lambda s: s["unicast"]["out_of_order"] + s["unicast"]["unexpected"], ratio=False)
pair("cross", "  delivery latency p50, ms", lambda s: s["unicast"]["delivery_latency"]["p50_us"] / 1000)
pair("cross", "  delivery latency p99, ms", lambda s: s["unicast"]["delivery_latency"]["p99_us"] / 1000,
     "cluster p99 < 5 ms", lambda a, b: b < 5)
pair("cross", "  request latency p99, ms", lambda s: s["unicast"]["request_latency"]["p99_us"] / 1000)
pair("cross", "  CPU µs per send (single: the gateway; cluster: all gateways + redis-server)", cpu_us_per_event,
     "cluster <= 3x single", lambda a, b: b <= 3 * a)
pair("cross", "  redis commands per send", lambda s: s["redis"]["calls_per_event"], ratio=False)
pair("local", "local sends on the cluster (--via holder): CPU µs per send vs one gateway", cpu_us_per_event,
     single_name="cross")
pair("local", "  delivery latency p99, ms", lambda s: s["unicast"]["delivery_latency"]["p99_us"] / 1000,
     single_name="cross")
pair("local", "  lost", lambda s: s["unicast"]["lost"], ratio=False, single_name="cross")
pair("density", "memory per idle stream, Pss slope 1k -> 18k, B (single: REDIS_URL unset; cluster: --cluster 1, set)",
     lambda s: s["slope_bytes_per_stream"]["gateway_pss_least_squares"],
     "within 10%", lambda a, b: abs(b - a) <= 0.10 * a)
pair("density", "  gateway Pss at the last step, MiB", lambda s: s["steps"][-1]["gateway_pss_bytes"] / 1048576)
pair("density", "  redis-server Pss slope, B per stream", lambda s: s["slope_bytes_per_stream"]["redis_pss_least_squares"],
     ratio=False)

print("| figure | one gateway, median (runs) | cluster, median (runs) | cluster / single | bound | verdict |")
print("| --- | --- | --- | --- | --- | --- |")
for r in rows:
    print("| " + " | ".join(r) + " |")
print()
print("runs with RESULT: ok (single / cluster): " + ", ".join(
    f"{n} {ok_runs(n, 'single')} / {ok_runs(n, 'cluster')}" for n in ("publish18k", "cross", "local", "density")
    if runs(n, "single") or runs(n, "cluster")))
m = os.path.join(d, "machine.txt")
if os.path.exists(m):
    print()
    print("".join("    " + l for l in open(m)))

#!/usr/bin/env python3
"""Medians of compare.sh's SUMMARY lines: loadtest/compare-table.py DIR -> a markdown table."""
import json, statistics, sys, glob, os

d = sys.argv[1]

def runs(name, target):
    p = os.path.join(d, f"{name}.{target}.summaries")
    if not os.path.exists(p):
        return []
    return [json.loads(l.split(" ", 1)[1]) for l in open(p) if l.startswith("SUMMARY")]

def med(xs):
    xs = [x for x in xs if x is not None]
    return (statistics.median(xs), xs) if xs else (None, [])

FIGS = [
    ("density", "Pss per idle stream (B, least squares to 18k)", lambda s: s["slope_bytes_per_stream"]["gateway_pss_least_squares"]),
    ("cpu_event", "CPU µs per delivered event (1k streams, 5k sends/s)", lambda s: s["unicast"]["cpu_us_per_event"]),
    ("max_sends", "max sends/s (1k streams, 8 conns)", lambda s: s["unicast"]["sends_per_s"]),
    ("max_sends", "  lost at max rate", lambda s: s["unicast"]["lost"]),
    ("pertoken18k", "18k per-token sends (64 conns): first request -> last delivery, ms (p50 of rounds)", lambda s: s["broadcast"]["round_time"].get("p50_us", 0) / 1000),
    ("publish18k", "18k by one publish: first request -> last delivery, ms (p50 of rounds)", lambda s: s["broadcast"]["round_time"].get("p50_us", 0) / 1000),
    ("publish18k", "  CPU µs per delivered event in that publish", lambda s: s["broadcast"]["cpu_us_per_event"]),
    ("publish18k", "  unrelated sends during the publish rounds, p99 ms", lambda s: s["broadcast"]["probe"]["during_rounds"]["p99_us"] / 1000),
    ("pertoken18k", "  gateway CPU per round of 18k sends, ms", lambda s: s["broadcast"]["gateway_cpu_s"] * 1000 / s["broadcast"]["rounds"]),
    ("connect", "CPU µs per connect+close", lambda s: s["connect_rate"]["cpu_us_per_connect"]),
    ("connect", "  connects/s (c=16)", lambda s: s["connect_rate"]["connects_per_s"]),
    ("heartbeat", "CPU µs per heartbeat (10k streams, 1 s)", lambda s: s["idle"]["cpu_us_per_heartbeat"]),
    ("batch_cpu", "CPU µs per delivered event, 1k streams, 20k events/s (gateway: batches of 100; nchan: a request each)", lambda s: s["unicast"]["cpu_us_per_event"]),
    ("batch_cpu", "  lost", lambda s: s["unicast"]["lost"]),
    ("batch_max", "max events/s accepted (1k streams, 8 conns; gateway: batches of 100; nchan: a request each)", lambda s: s["unicast"]["accepted"] / s["unicast"]["seconds"]),
    ("batch_max", "  lost at max rate", lambda s: s["unicast"]["lost"]),
]

print("| figure | gateway (median; runs) | nchan (median; runs) | gateway / nchan | ok runs gw/nchan |")
print("| --- | --- | --- | --- | --- |")
for name, label, f in FIGS:
    cells = []
    oks = []
    for t in ("gateway", "nchan"):
        rs = runs(name, t)
        vals = []
        for s in rs:
            try:
                vals.append(f(s))
            except Exception:
                vals.append(None)
        m, xs = med(vals)
        cells.append((m, xs))
        oks.append(f"{sum(1 for s in rs if s.get('ok'))}/{len(rs)}")
    fmt = lambda v: "n/a" if v is None else (f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}")
    ratio = "n/a"
    if cells[0][0] is not None and cells[1][0]:
        ratio = f"{cells[0][0] / cells[1][0]:.2f}"
    print(f"| {label} | {fmt(cells[0][0])} ({', '.join(fmt(x) for x in cells[0][1])}) | "
          f"{fmt(cells[1][0])} ({', '.join(fmt(x) for x in cells[1][1])}) | {ratio} | {oks[0]} / {oks[1]} |")

fl = []
for p in sorted(glob.glob(os.path.join(d, "floor.*.log"))):
    for l in open(p):
        if l.startswith("SUMMARY"):
            fl.append(json.loads(l.split(" ", 1)[1]))
if fl:
    dm, dx = med([s["deliver_ms_p50"] for s in fl])
    cm, cx = med([s["writer_cpu_ms_p50"] for s in fl])
    print(f"| floor: 18k x 100 B writes, first write -> last byte read, ms | {dm:.1f} ({', '.join(f'{x:.1f}' for x in dx)}) | | | |")
    print(f"| floor: writer CPU per write, µs | {cm * 1000 / 18000:.2f} | | | |")

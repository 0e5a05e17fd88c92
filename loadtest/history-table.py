#!/usr/bin/env python3
"""Medians and verdicts of history.sh's SUMMARY lines: loadtest/history-table.py DIR -> markdown.

Each cell is `median (run, run, ...)`. publish18k: history off vs on and the ratio of the medians
against the 1.2x bound (and in how many run pairs it held). storm: the resume storm beside the same
storm without Last-Event-ID, and the difference of their gateway CPU per replayed event. memory:
one row per HISTORY_MAX_BYTES variant.
"""
import statistics, sys

import summaries
from summaries import fmt, med, vals

d = sys.argv[1]
MIB = 1024 * 1024


def runs(name, side):
    return summaries.runs(d, name, side)


def cell(xs):
    return summaries.cell(xs, bold=True)


def loads(rs):
    return ", ".join(s.get("loadavg", "?").split()[0] for s in rs)


print(f"from {d}\n")

# --- publish18k -------------------------------------------------------------------------------
off, on = runs("publish18k", "off"), runs("publish18k", "on")
if off or on:
    print("| figure | history off (`HISTORY_SIZE=0`) | history on (`HISTORY_SIZE=100`) | on / off |")
    print("| --- | --- | --- | --- |")
    cpu = lambda s: s["broadcast"]["cpu_us_per_event"]
    rnd = lambda s: statistics.median(r["round_us"] for r in s["broadcast"]["per_round"]) / 1000
    ok = lambda s: s["ok"] and s["broadcast"]["missing"] == 0
    c_off, c_on = vals(off, cpu), vals(on, cpu)
    m_off, m_on = med(c_off), med(c_on)
    ratio = m_on / m_off if m_off and m_on else None
    pairs = [
        (b / a) for a, b, x, y in zip(c_off, c_on, off, on) if a and b and ok(x) and ok(y)
    ]
    held = sum(1 for r in pairs if r <= 1.2)
    print(f"| gateway CPU per delivered frame, µs | {cell(c_off)} | {cell(c_on)} | **{fmt(ratio)}** (pairs: {', '.join(f'{r:.2f}' for r in pairs)}) |")
    r_off, r_on = vals(off, rnd), vals(on, rnd)
    rr = med(r_on) / med(r_off) if med(r_off) and med(r_on) else None
    print(f"| first request → last delivery, ms (each run: median of its rounds) | {cell(r_off)} | {cell(r_on)} | {fmt(rr)} |")
    dmi = lambda rs: ", ".join("{}/{}/{}".format(s["broadcast"]["delivered"], s["broadcast"]["missing"], s["broadcast"].get("with_id", "?")) for s in rs)
    print(f"| deliveries / missing / carrying an `id:` (each run) | {dmi(off)} | {dmi(on)} | |")
    print(f"| RESULT ok / load average at start | {sum(1 for s in off if s['ok'])} of {len(off)} / {loads(off)} | {sum(1 for s in on if s['ok'])} of {len(on)} / {loads(on)} | |")
    verdict = "met" if ratio is not None and ratio <= 1.2 else "MISSED"
    print(f"\nbound history on <= 1.2x off: **{verdict}** on the medians ({fmt(ratio)}), held in {held} of {len(pairs)} complete pairs\n")


# --- storm ------------------------------------------------------------------------------------
def storm_table(name):
    res, noid = runs(name, "resume"), runs(name, "noid")
    if not res:
        return
    R = lambda k: (lambda s: s["resume"][k])
    ms = lambda k: (lambda s: s["resume"][k] / 1000)
    q = lambda h, p: (lambda s: s["resume"][h][p] / 1000 if s["resume"][h]["n"] else None)
    j = res[0]["resume"]
    print(f"{name}: {j['streams']} streams, {j['channels']} channels (join {j['join']}), "
          f"{j['before']} events seen, {j['missed']} missed, reconnect within {j['spread_ms']} ms\n")
    print("| figure | with Last-Event-ID (replay) | without (`--without-id`, no replay) |")
    print("| --- | --- | --- |")
    rows = [
        ("ALL LIVE: storm start → last stream got the live probe, ms", ms("all_live_us")),
        ("storm start → last response head, ms", ms("heads_done_us")),
        ("time to response head p50, ms", q("time_to_head", "p50_us")),
        ("time to response head p99, ms", q("time_to_head", "p99_us")),
        ("replay complete (storm start → last missed event) p50, ms", q("replay_complete_at", "p50_us")),
        ("replay complete p99, ms", q("replay_complete_at", "p99_us")),
        ("replay complete max, ms", q("replay_complete_at", "max_us")),
        ("events replayed", R("replayed")),
        ("lost", R("lost")),
        ("duplicated or out of order", R("duplicated")),
        ("`gateway.gap` events", R("gap_events")),
        ("streams not at the last event", R("not_current")),
        ("`resumes_total` complete / gap", lambda s: f"{s['resume']['resumes_complete']:.0f} / {s['resume']['resumes_gap']:.0f}"),
        ("gateway CPU over the storm, s", R("gateway_cpu_s")),
        ("gateway CPU per replayed event, µs", R("cpu_us_per_replayed")),
        ("gateway CPU per reconnect, µs", R("cpu_us_per_reconnect")),
        ("sse-load's own CPU over the storm, s (wall)", lambda s: f"{s['resume']['load_cpu_s']:.2f} ({s['resume']['wall_s']:.2f})"),
        ("ListenOverflows during the storm", R("listen_overflows")),
    ]
    for label, f in rows:
        a, b = vals(res, f), vals(noid, f)
        if all(isinstance(x, str) for x in a + b if x is not None):
            print(f"| {label} | {', '.join(str(x) for x in a)} | {', '.join(str(x) for x in b) or 'n/a'} |")
        else:
            print(f"| {label} | {cell(a)} | {cell(b) if noid else 'n/a'} |")
    print(f"| RESULT ok / load average at start | {sum(1 for s in res if s['ok'])} of {len(res)} / {loads(res)} | "
          f"{sum(1 for s in noid if s['ok'])} of {len(noid)} / {loads(noid)} |")
    if noid:
        c_r, c_n = med(vals(res, R("gateway_cpu_s"))), med(vals(noid, R("gateway_cpu_s")))
        rep = med(vals(res, R("replayed")))
        pairs = [
            (a - b) * 1e6 / r
            for a, b, r in zip(vals(res, R("gateway_cpu_s")), vals(noid, R("gateway_cpu_s")), vals(res, R("replayed")))
            if a is not None and b is not None and r
        ]
        if c_r is not None and c_n is not None and rep:
            print(f"\nwhat the replay adds: (median CPU with - without) / replayed = ({c_r:.2f} - {c_n:.2f}) s / {rep:.0f} = "
                  f"**{(c_r - c_n) * 1e6 / rep:.2f} µs per replayed event** (pairs: {', '.join(f'{p:.2f}' for p in pairs)})")
    print()


for name in ("storm", "storm-one", "storm-race"):
    storm_table(name)

# --- memory -----------------------------------------------------------------------------------
variants = [v for v in ("16m", "64m", "1g", "64m-1238", "expiry") if runs("memory", v)]
if variants:
    print("| variant | bound | event B | history bytes max, MiB | channels kept (est.) | RSS growth, MiB | Pss growth, MiB | peak RSS growth, MiB | RSS growth / history bytes | beyond the count, B per kept channel | RSS after expiry, MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for v in variants:
        rs = runs("memory", v)
        H = lambda k: (lambda s: s["history_memory"][k])
        mb = lambda k: (lambda s: s["history_memory"][k] / MIB)
        first = rs[0]["history_memory"]
        exp = vals(rs, lambda s: (s["history_memory"]["expired"]["rss"] - s["history_memory"]["before"]["rss"]) / MIB)
        print(f"| {v} | {fmt(first['max_bytes'] / MIB)} MiB | {first['event_bytes']} | {cell(vals(rs, mb('history_bytes_max')))} | "
              f"{cell(vals(rs, H('kept_channels_est')))} | {cell(vals(rs, mb('rss_growth')))} | {cell(vals(rs, mb('pss_growth')))} | "
              f"{cell(vals(rs, mb('peak_rss_growth')))} | {cell(vals(rs, H('rss_growth_over_history')))} | "
              f"{cell(vals(rs, H('beyond_counted_per_channel')))} | {cell(exp) if any(x is not None for x in exp) else '–'} |")
    base = [s["history_memory"]["before"]["rss"] / MIB for v in variants for s in runs("memory", v)]
    print(f"\n(RSS before publishing: {fmt(min(base))}–{fmt(max(base))} MiB; growths are against it; 'after expiry' is RSS growth once the history emptied)")

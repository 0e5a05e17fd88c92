"""What the *-table.py scripts share: reading a run directory's SUMMARY lines and formatting cells.

`runs(d, name, side)` reads $d/<name>.<side>.summaries (one `SUMMARY {json}` line per run, as the
benchmark scripts write them); `vals` maps a figure over runs (None where a run lacks it); a cell
is `median (run, run, ...)`.
"""
import json, os, statistics


def runs(d, name, side):
    p = os.path.join(d, f"{name}.{side}.summaries")
    if not os.path.exists(p):
        return []
    return [json.loads(l.split(" ", 1)[1]) for l in open(p) if l.startswith("SUMMARY")]


def vals(rs, f):
    out = []
    for s in rs:
        try:
            v = f(s)
        except (KeyError, TypeError, IndexError, ZeroDivisionError):
            v = None
        out.append(v)
    return out


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(v):
    if v is None:
        return "n/a"
    if isinstance(v, int) or (float(v).is_integer() and abs(v) >= 10):
        return f"{v:.0f}"
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


def cell(xs, bold=False):
    if not xs:
        return "n/a"
    median = f"**{fmt(med(xs))}**" if bold else fmt(med(xs))
    return f"{median} ({', '.join(fmt(x) for x in xs)})"

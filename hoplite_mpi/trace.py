"""``python -m hoplite_mpi.trace summary TRACE.json [--png OUT.png]``: where each rank's time
went in a timeline (hoplite_mpi/tracing.py): the shares of the traced span spent running tasks,
receiving objects, waiting for task inputs, in collective steps (reduce steps, broadcast copies,
a broadcast or reduce coordinated by the rank), and the rest (idle, or runtime work not traced).
Overlapping events of one kind are counted once (interval union); kinds overlap (a broadcast
copy's pull is a transfer too), so "other" is the span outside every event, not 100 % minus
the other columns."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

KINDS = ("task", "transfer", "wait", "collective")


def _union(spans: list) -> float:
    total, end = 0.0, None
    for a, b in sorted(spans):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def summarize(doc: dict) -> dict:
    """rank -> {"span_s", per kind of :data:`KINDS` its seconds, "other" (seconds outside every
    complete event), "tasks", "bytes_in" (bytes of its transfers)}."""
    every = doc.get("traceEvents", [])
    events = [e for e in every if e.get("ph") == "X"]
    if not events:
        return {}
    t0 = min(e["ts"] for e in events)
    t1 = max(e["ts"] + e["dur"] for e in events)
    out: dict = {}
    for rank in sorted({e["pid"] for e in every}):
        mine = [e for e in events if e["pid"] == rank]
        row = {"span_s": (t1 - t0) / 1e6, "tasks": sum(e["cat"] == "task" for e in mine),
               "bytes_in": sum(e.get("args", {}).get("bytes", 0) for e in mine if e["cat"] == "transfer")}
        for kind in KINDS:
            row[kind] = _union([(e["ts"], e["ts"] + e["dur"]) for e in mine if e["cat"] == kind]) / 1e6
        row["other"] = row["span_s"] - _union([(e["ts"], e["ts"] + e["dur"]) for e in mine]) / 1e6
        out[rank] = row
    return out


def text(summary: dict) -> str:
    lines = [f"{'rank':>4} {'tasks':>6} {'task %':>7} {'transfer %':>10} {'wait %':>7} "
             f"{'coll %':>7} {'other %':>8} {'MiB in':>8}"]
    for rank, row in summary.items():
        span = row["span_s"] or 1.0
        shares = [100 * row[k] / span for k in KINDS + ("other",)]
        lines.append(f"{rank:>4} {row['tasks']:>6} {shares[0]:>7.1f} {shares[1]:>10.1f} "
                     f"{shares[2]:>7.1f} {shares[3]:>7.1f} {shares[4]:>8.1f} "
                     f"{row['bytes_in'] / 2**20:>8.1f}")
    return "\n".join(lines)


def plot(summary: dict, path: str) -> None:
    """Each rank's shares as a group of bars, one per kind and "other" (grouped, not stacked:
    kinds overlap, e.g. a task's wait for its inputs lies within the task)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ranks = list(summary)
    kinds = KINDS + ("other",)
    colors = ("tab:blue", "tab:orange", "tab:red", "tab:green", "lightgray")
    height = 0.8 / len(kinds)
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.6 * len(ranks)))
    for k, (kind, color) in enumerate(zip(kinds, colors)):
        vals = [100 * summary[r][kind] / (summary[r]["span_s"] or 1) for r in ranks]
        ax.barh([i - 0.4 + (k + 0.5) * height for i in range(len(ranks))], vals, height=height,
                color=color, label=kind)
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of the traced span (kinds overlap)")
    ax.invert_yaxis()
    ax.legend(ncol=5, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hoplite_mpi.trace")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("summary", help="per-rank shares of task, transfer, wait, collective and other time")
    s.add_argument("trace")
    s.add_argument("--png", help="also draw the shares as a bar chart (matplotlib)")
    args = p.parse_args(argv)
    with open(args.trace) as f:
        summary = summarize(json.load(f))
    if not summary:
        print("no complete events in", args.trace)
        return 1
    print(text(summary))
    if args.png:
        try:
            plot(summary, args.png)
        except ImportError:
            print("--png needs matplotlib (pip install 'hoplite_mpi[bench]')", file=sys.stderr)
            return 2
        print("wrote", args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())

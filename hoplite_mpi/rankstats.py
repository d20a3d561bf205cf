"""A rank's counters as one dict (``hm.stats()``), every rank's (``hm.stats(all_ranks=True)``,
gathered through roles/gather.py), and the summary table ``hoplite-mpi run --stats`` prints at
the end of a job (issue 15)."""
from __future__ import annotations

import time
from typing import Any

# the named counters of a rank (always in stats(), 0 until counted)
COUNTERS = ("pulls", "serves", "replicas", "transfer_errors", "reduces_replanned",
            "reduce_bytes_kept", "auto_freed", "ranks_lost", "worker_crashes", "engine_errors",
            "tasks_ahead")


def snapshot(rt: Any) -> dict:
    """(engine thread) The dict of ``hm.stats()`` for runtime ``rt`` (see
    :func:`hoplite_mpi.introspection.stats` for its keys)."""
    counters = dict(rt.stats)
    out: dict = {name: counters.get(name, 0) for name in COUNTERS}
    out.update((k, v) for k, v in counters.items() if not k[:1].isupper())
    out["messages"] = {k: v for k, v in sorted(counters.items()) if k[:1].isupper()}
    out["store_objects"] = len(rt.store)
    out["store_bytes"] = rt.store.bytes_used
    out.update(rt.transport.traffic())
    worker = rt.ctx.tasks.worker if rt.ctx.tasks is not None else None
    out["tasks_run"] = worker.executed if worker is not None else 0
    out["busy_s"], out["idle_cpu_s"] = worker.clock.read() if worker is not None else (0.0, None)
    out["wall_s"] = time.perf_counter() - rt.started[0]
    out["cpu_s"] = time.process_time() - rt.started[1]
    out["dead_ranks"] = sorted(rt.dead)
    out["rank"] = rt.rank
    out["rank_loss_tolerance"] = bool(rt.transport.ft)
    scheduler = rt.scheduler
    out["scheduler"] = dict(scheduler.stats) if scheduler is not None else None
    driver = rt.ctx.driver
    out["stragglers"] = driver.stragglers.reports() if driver is not None else None
    workflow = getattr(rt, "workflow", None)
    out["durable"] = workflow.snapshot() if workflow is not None else None
    return out


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


# (header, width, value of a rank's stats dict)
COLUMNS = (
    ("rank", 4, lambda s: str(s["rank"])),
    ("tasks", 7, lambda s: str(s["tasks_run"])),
    ("busy s", 8, lambda s: f"{s['busy_s']:.2f}"),
    ("cpu s", 8, lambda s: f"{s['cpu_s']:.2f}"),
    ("idle cpu s", 10, lambda s: "-" if s["idle_cpu_s"] is None else f"{s['idle_cpu_s']:.2f}"),
    ("sent MiB", 9, lambda s: _mib(s["bytes_sent"])),
    ("recv MiB", 9, lambda s: _mib(s["bytes_received"])),
    ("pulls", 6, lambda s: str(s["pulls"])),
    ("serves", 6, lambda s: str(s["serves"])),
    ("held", 6, lambda s: str(s["store_objects"])),
    ("held MiB", 9, lambda s: _mib(s["store_bytes"])),
)


def table(per_rank: dict, silent: list[int] = ()) -> str:
    """The job's summary: one row per rank (``per_rank``: rank -> stats dict as
    :func:`snapshot` makes), totals, the driver's scheduler counters, the ranks that did not
    answer (``silent``) or were dead."""
    lines = ["==== hoplite_mpi job stats ===="]
    lines.append("  ".join(h.rjust(w) for h, w, _ in COLUMNS))
    rows = [per_rank[r] for r in sorted(per_rank) if isinstance(per_rank[r], dict)]
    for s in rows:
        lines.append("  ".join(f(s).rjust(w) for _, w, f in COLUMNS))
    if rows:
        total = {"rank": "all", "tasks_run": sum(s["tasks_run"] for s in rows),
                 "busy_s": sum(s["busy_s"] for s in rows), "cpu_s": sum(s["cpu_s"] for s in rows),
                 "idle_cpu_s": sum(s["idle_cpu_s"] or 0.0 for s in rows)}
        for key in ("bytes_sent", "bytes_received", "pulls", "serves", "store_objects",
                    "store_bytes"):
            total[key] = sum(s[key] for s in rows)
        lines.append("  ".join(f(total).rjust(w) for _, w, f in COLUMNS))
    driver = per_rank.get(0)
    if isinstance(driver, dict):
        sched = driver.get("scheduler") or {}
        lines.append("tasks: " + ", ".join(f"{k} {v}" for k, v in sorted(sched.items()))
                     + f"; reduces re-planned {driver['reduces_replanned']}"
                     + f"; wall {driver['wall_s']:.2f} s")
        dead = driver.get("dead_ranks") or []
        if dead:
            lines.append(f"dead ranks: {dead}")
        for s in driver.get("stragglers") or ():
            lines.append(f"straggler: rank {s['rank']} ({s['function']}: {s['ratio']:.1f}x the "
                         f"median)")
    if silent:
        lines.append(f"no answer from ranks {list(silent)}")
    return "\n".join(lines) + "\n"

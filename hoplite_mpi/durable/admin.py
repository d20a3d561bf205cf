"""``hoplite-mpi storage ls|gc|rm|verify DIR``: look after a durable workflow's storage
directory (layout: :mod:`.storage`).  Reads manifest headers and run records only; never
imports MPI; never truncates a file (a running program may have it memory-mapped), it only
unlinks.

Garbage collection (:func:`gc`) keeps the steps that the ``keep_runs`` most recent runs used
(their keys logs) and every step committed since the oldest of those runs started (a run whose
driver was killed may not have logged all it committed); it removes the other steps, attempt
directories no manifest names (a writer killed mid-write, or one that lost a race to commit) and
temporary files, both older than ``grace`` seconds.  It refuses to run while a run younger than
``grace`` is recorded as running, unless forced.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

from . import storage


@dataclass
class Step:
    key: str
    manifest: str
    mtime: float
    header: dict = field(default_factory=dict)
    nbytes: int = 0
    files: list = field(default_factory=list)     # attempt directories the manifest names


def runs(root: str) -> list[dict]:
    """The run records, oldest first (each with ``keys``: the path of its keys log)."""
    out = []
    d = os.path.join(root, "runs")
    for name in os.listdir(d) if os.path.isdir(d) else ():
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(d, name)) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            continue
        rec["keys"] = os.path.join(d, name[:-5] + ".keys")
        out.append(rec)
    return sorted(out, key=lambda r: r.get("start", 0))


def steps(root: str, headers: bool = True) -> Iterator[Step]:
    """Every committed step (``headers``: read each manifest's header for name and sizes)."""
    base = os.path.join(root, "steps")
    for sub in sorted(os.listdir(base)) if os.path.isdir(base) else ():
        for entry in os.scandir(os.path.join(base, sub)):
            if not entry.name.endswith(".m"):
                continue
            key = entry.name[:-2]
            step = Step(key, entry.path, entry.stat().st_mtime)
            if headers:
                try:
                    step.header, _, _ = storage.read_header(root, key)
                except (OSError, storage.StorageError):
                    step.header = {"damaged": True}
                docs = [d for r in step.header.get("returns", ()) for d in r.get("frames", ())]
                step.nbytes = sum(d.get("nbytes", 0) for d in docs)
                step.files = sorted({d["file"].split("/")[0] for d in docs if "file" in d})
            yield step


def _used_keys(rec: dict) -> set[str]:
    try:
        with open(rec["keys"]) as f:
            return {line.strip() for line in f if line.strip()}
    except OSError:
        return set()


def ls(root: str, show_steps: bool = False) -> str:
    """A listing of the runs and the steps (``show_steps``: one line per step)."""
    root = os.path.abspath(root)
    lines = [f"storage {root}"]
    all_steps = list(steps(root))
    total = sum(s.nbytes for s in all_steps)
    lines.append(f"{len(all_steps)} step(s), {total / 2**20:.1f} MiB")
    for rec in runs(root):
        start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.get("start", 0)))
        used = len(_used_keys(rec))
        job = f" slurm job {rec['slurm_job']} restart {rec.get('slurm_restart', 0)}" if rec.get("slurm_job") else ""
        lines.append(f"run {rec.get('run')}: {rec.get('status')}, started {start}{job}; "
                     f"restored {rec.get('restored', '?')}, committed {rec.get('persisted', '?')}, "
                     f"steps used {used}")
    if show_steps:
        now = time.time()
        for s in sorted(all_steps, key=lambda s: s.mtime):
            name = s.header.get("name", "?")
            lines.append(f"  {s.key}  {name:<24} {s.nbytes:>12} B  {(now - s.mtime) / 3600:7.2f} h ago"
                         + ("  DAMAGED" if s.header.get("damaged") else ""))
    return "\n".join(lines)


def gc(root: str, keep_runs: int = 1, grace: float = 3600.0, dry_run: bool = False,
       force: bool = False) -> list[str]:
    """Remove what is no longer referenced (module docstring); returns the removed paths
    (with ``dry_run``: what would be removed).  Raises RuntimeError while a recent run is
    recorded as running (unless ``force``)."""
    root = os.path.abspath(root)
    now = time.time()
    records = runs(root)
    busy = [r for r in records if r.get("status") == "running" and now - r.get("start", 0) < grace]
    if busy and not force:
        raise RuntimeError(f"run {busy[-1].get('run')} is recorded as running (started "
                           f"{now - busy[-1].get('start', 0):.0f} s ago); use --force if it is dead")
    kept = records[-keep_runs:] if keep_runs > 0 else []
    keep: set[str] = set()
    for rec in kept:
        keep |= _used_keys(rec)
    since = min((r.get("start", now) for r in kept), default=now)
    removed: list[str] = []

    def remove(path: str) -> None:
        removed.append(path)
        if dry_run:
            return
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    named: set[str] = set()
    for step in steps(root):
        if step.key in keep or step.mtime >= since:
            named.update(step.files)
            continue
        remove(step.manifest)
        for d in step.files:
            remove(os.path.join(os.path.dirname(step.manifest), d))
    base = os.path.join(root, "steps")
    for sub in os.listdir(base) if os.path.isdir(base) else ():
        for entry in os.scandir(os.path.join(base, sub)):
            if entry.is_dir() and entry.name not in named and now - entry.stat().st_mtime >= grace:
                remove(entry.path)          # an attempt no committed manifest names
    tmp = os.path.join(root, "tmp")
    for entry in os.scandir(tmp) if os.path.isdir(tmp) else ():
        if now - entry.stat().st_mtime >= grace:
            remove(entry.path)
    for rec in records:
        if rec not in kept and rec.get("status") != "running":
            remove(rec["keys"])
            remove(rec["keys"][:-5] + ".json")
    return removed


def rm(root: str, everything: bool = False, keys: Optional[list[str]] = None) -> list[str]:
    """Remove every step and run (``everything``), or the steps ``keys``; returns the paths."""
    root = os.path.abspath(root)
    removed = []
    if everything:
        for sub in ("steps", "runs", "tmp"):
            path = os.path.join(root, sub)
            if os.path.isdir(path):
                shutil.rmtree(path)
                removed.append(path)
        storage.open_root(root)
        return removed
    wanted = set(keys or ())
    for step in steps(root):
        if step.key in wanted:
            os.unlink(step.manifest)
            removed.append(step.manifest)
            for d in step.files:
                path = os.path.join(os.path.dirname(step.manifest), d)
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def verify(root: str) -> list[str]:
    """Read every committed step in full and check its crc32s; returns the problems found."""
    problems = []
    for step in steps(root, headers=False):
        try:
            storage.load(root, step.key, verify=True)
        except (OSError, storage.StorageError) as exc:
            problems.append(f"{step.key}: {exc}")
    return problems


def main(args: list[str]) -> int:
    """``hoplite-mpi storage ...`` (argv after ``storage``)."""
    import argparse
    p = argparse.ArgumentParser(prog="hoplite-mpi storage",
                                description="look after a durable workflow's storage directory")
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("ls", help="list runs and steps")
    a.add_argument("dir")
    a.add_argument("--steps", action="store_true", help="one line per step")
    g = sub.add_parser("gc", help="remove steps, attempts and runs no recent run used")
    g.add_argument("dir")
    g.add_argument("--keep-runs", type=int, default=1, help="runs whose steps are kept (default 1)")
    g.add_argument("--grace", type=float, default=3600.0,
                   help="seconds: leftovers younger than this are kept (default 3600)")
    g.add_argument("--dry-run", action="store_true")
    g.add_argument("--force", action="store_true", help="even while a run is recorded as running")
    r = sub.add_parser("rm", help="remove steps (by key) or everything")
    r.add_argument("dir")
    r.add_argument("keys", nargs="*")
    r.add_argument("--all", action="store_true")
    v = sub.add_parser("verify", help="check every committed step's crc32s")
    v.add_argument("dir")
    ns = p.parse_args(args)
    root = ns.dir
    if not os.path.isfile(os.path.join(root, "hoplite-storage.json")):
        print(f"hoplite-mpi storage: {root} is not a hoplite_mpi storage directory")
        return 2
    if ns.what == "ls":
        print(ls(root, ns.steps))
    elif ns.what == "gc":
        try:
            gone = gc(root, ns.keep_runs, ns.grace, ns.dry_run, ns.force)
        except RuntimeError as exc:
            print(f"hoplite-mpi storage gc: {exc}")
            return 1
        verb = "would remove" if ns.dry_run else "removed"
        print(f"{verb} {len(gone)} path(s)")
        for path in gone:
            print("  " + path)
    elif ns.what == "rm":
        if not ns.all and not ns.keys:
            p.error("rm needs step keys or --all")
        gone = rm(root, ns.all, ns.keys)
        print(f"removed {len(gone)} path(s)")
    else:
        problems = verify(root)
        for line in problems:
            print(line)
        print(f"{len(problems)} problem(s)")
        return 1 if problems else 0
    return 0

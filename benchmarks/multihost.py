#!/usr/bin/env python
"""The benchmarks across simulated hosts (issue 13): network namespaces joined by a bridge, Open
MPI over TCP between hosts (tests/hosts/, tests/multihost.py; root needed).

    python benchmarks/multihost.py [--placement 2,1,1] [--rate 1gbit] \
        [--collectives "--sizes 1M,16M,64M,256M --iters 3 --stagger-sizes ''"] \
        [--tasks "--tasks 2000 --chain 200 --repeat 2"] [--map-by node] [--config FIELD=VALUE] [--out DIR]

Makes ``len(placement)`` hosts (prefix ``hmb``, addresses 198.18.78.0/24, so that a run of the
test suite, prefix ``hmt``, is not disturbed), with ``placement[k]`` ranks on host k+1 (rank 0
on the first), optionally rate-limits every host link (``tc tbf``, both directions), runs
benchmarks/collectives.py and benchmarks/tasks.py as one mpirun job each across the hosts (MPI
and hoplite_mpi in the same job, as on one host), writes their output and JSON to ``--out``,
and removes the hosts.  An empty ``--collectives`` or ``--tasks`` skips that benchmark.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
os.environ.setdefault("HM_NETNS_PREFIX", "hmb")
os.environ.setdefault("HM_NETNS_NET", "198.18.78")
sys.path.insert(0, os.path.join(ROOT, "tests"))
import multihost as M  # noqa: E402


def run(placement: dict, script: str, args: list[str], out: str, timeout: float,
        map_by: str = "slot", flags: tuple = ()) -> int:
    env = M.job_env()
    xs = []
    for flag in flags:                   # Config fields for every rank: FIELD=VALUE
        name, value = flag.split("=", 1)
        var = f"HOPLITE_MPI_{name.upper()}"
        env[var] = value
        xs += ["-x", var]
    cmd = M.mpirun_command(placement, xs + [sys.executable, script, *args], ft=True, map_by=map_by)
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    try:
        with open(out, "w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                  timeout=timeout)
        return proc.returncode
    except subprocess.TimeoutExpired:
        print(f"timed out after {timeout} s", flush=True)
        return 124
    finally:
        shutil.rmtree(env["HM_HOSTS_TMP"], ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--placement", default="2,1,1", help="ranks per host, comma-separated")
    p.add_argument("--rate", default="", help="tbf rate limit of every host link, e.g. 1gbit")
    p.add_argument("--collectives", default="--sizes 1M,16M,64M,256M --iters 3 --stagger-sizes ''")
    p.add_argument("--tasks", default="--tasks 2000 --chain 200 --repeat 2 --idle 1")
    p.add_argument("--map-by", default="slot", help="'node': ranks round robin over the hosts")
    p.add_argument("--config", action="append", default=[], metavar="FIELD=VALUE",
                   help="a Config field for every rank (e.g. host_aware=0); repeatable")
    p.add_argument("--out", default="/tmp/hoplite-multihost")
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args()
    why = M.unavailable()
    if why:
        print(f"cannot make simulated hosts here: {why}", file=sys.stderr)
        return 2
    counts = [int(x) for x in args.placement.split(",")]
    placement = {M.host(k + 1): n for k, n in enumerate(counts)}
    os.makedirs(args.out, exist_ok=True)
    why = M.up(len(counts))
    if why:
        print(why, file=sys.stderr)
        return 2
    tag = (f"{'x'.join(map(str, counts))}{'-' + args.rate if args.rate else ''}"
           f"{'-rr' if args.map_by == 'node' else ''}{''.join('-' + c for c in args.config)}")
    rc = 0
    try:
        if args.rate:
            shaped = M.hosts("shape", args.rate)
            if shaped.returncode != 0:
                print(shaped.stderr, file=sys.stderr)
                return 2
        for name, extra in (("collectives", args.collectives), ("tasks", args.tasks)):
            if not extra:
                continue
            base = os.path.join(args.out, f"{name}-{tag}")
            rc |= run(placement, os.path.join(HERE, f"{name}.py"),
                      shlex.split(extra) + ["--json", base + ".json"], base + ".txt", args.timeout,
                      args.map_by, tuple(args.config))
            print(f"{name}: {base}.txt", flush=True)
    finally:
        M.down()
    return rc


if __name__ == "__main__":
    sys.exit(main())

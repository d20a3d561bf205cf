"""``python -m hoplite_mpi.sim``: run simulation seeds (see :mod:`hoplite_mpi.sim`).

    python -m hoplite_mpi.sim --seeds 1-500 [--kills on|off|sure] [--ops N] [--stop]
    python -m hoplite_mpi.sim --seed 123 [--log]     (replay one seed, its failures in full)

Prints one line per failing seed (``-v``: per seed) and a summary; exit status 1 if any failed.
"""
from __future__ import annotations

import argparse
import sys
import time

from .simulator import simulate, simulate_sure


def _seeds(text: str) -> range:
    a, _, b = text.partition("-")
    return range(int(a), int(b or a) + 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hoplite_mpi.sim", description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, help="replay this seed (prints its failures in full)")
    p.add_argument("--seeds", default="1-100", help="a range A-B of seeds (default 1-100)")
    p.add_argument("--kills", choices=["on", "off", "sure"],
                   help="force rank kills on or off; sure: on, and placed within the run (two runs "
                        "per seed, see simulate_sure)")
    p.add_argument("--ops", type=int, help="driver operations per seed (default: random 5..40)")
    p.add_argument("--stop", action="store_true", help="stop at the first failure")
    p.add_argument("--log", action="store_true", help="show the runtime's log (replay)")
    p.add_argument("-v", "--verbose", action="store_true", help="a line per seed")
    args = p.parse_args(argv)
    kills = None if args.kills is None else args.kills == "on"

    def one(seed: int, verbose: bool = False):
        if args.kills == "sure":
            return simulate_sure(seed, args.ops, verbose)
        return simulate(seed, args.ops, kills, verbose=verbose)
    if args.seed is not None:
        r = one(args.seed, args.log)
        print(r.summary())
        for f in r.failures[10:]:
            print(" ", f)
        return 0 if r.ok else 1
    t0, c0, bad, n, killed = time.perf_counter(), time.process_time(), [], 0, 0
    for seed in _seeds(args.seeds):
        r = one(seed)
        n += 1
        killed += bool(r.kills)
        if not r.ok:
            bad.append(seed)
        if args.verbose or not r.ok:
            print(r.summary() if not r.ok else r.summary().split("\n")[0], flush=True)
        if bad and args.stop:
            break
    print(f"{n} seeds ({killed} with kills), {len(bad)} failed {bad[:50]}, "
          f"{time.perf_counter() - t0:.1f} s ({time.process_time() - c0:.1f} s CPU)", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

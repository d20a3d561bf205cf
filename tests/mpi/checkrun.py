"""The command line of a checks script (tests/mpi/*_checks.py): run the checks one after the
other in this job, write one JSON record per check to ``--json`` after each (so the checks that
finished are reported even if the job is killed), print one line per check."""
from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from typing import Callable, Optional


def main(checks: dict, after_each: Optional[Callable[[], None]] = None) -> None:
    """``after_each()`` runs after every check that passed and may fail it (raise)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", required=True)
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(checks)
    unknown = [n for n in names if n not in checks]
    if unknown:
        parser.error(f"unknown checks: {unknown}")
    results = []
    for name in names:
        t0 = time.monotonic()
        rec = {"check": name, "ok": True}
        try:
            checks[name]()
            if after_each is not None:
                after_each()
        except BaseException:
            rec.update(ok=False, error=traceback.format_exc())
        rec["seconds"] = time.monotonic() - t0
        results.append(rec)
        print(f"{name}: {'ok' if rec['ok'] else 'FAILED'} ({rec['seconds']:.2f} s)", flush=True)
        tmp = args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(results, fh)
        os.replace(tmp, args.json)

"""hm.progress / hm.as_completed / Executor.map(progress=True) (tests/test_progress.py): bars
written to a StringIO are checked here, and the driver prints ``RESULT <json>``."""
from __future__ import annotations

import io
import json
import time

import hoplite_mpi as hm
from hoplite_mpi.progressbars import counting


@hm.remote
def slow(i: int) -> int:
    time.sleep(0.02 * (5 - i % 5))
    if i == 7:
        raise ValueError("seven")
    return i


def square(x: int) -> int:
    return x * x


def main() -> None:
    refs = [slow.remote(i) for i in range(20)]
    bar = io.StringIO()
    done = hm.progress(refs, desc="slow", show=True, file=bar)
    quiet = io.StringIO()
    order = [r for r in hm.as_completed([slow.remote(i) for i in range(5)], file=quiet)]
    mapped = io.StringIO()
    with hm.Executor() as ex:
        values = list(counting(ex.map(square, range(30)), True, "square", 30, file=mapped))
    print("RESULT " + json.dumps({
        "done": sorted(r.id for r in done) == sorted(r.id for r in refs),
        "bar": bar.getvalue().replace("\r", "\n").strip().splitlines()[-1],
        "quiet": quiet.getvalue(), "order": len(order),
        "mapped": mapped.getvalue().replace("\r", "\n").strip().splitlines()[-1],
        "values": values == [x * x for x in range(30)]}), flush=True)


if __name__ == "__main__":
    main()

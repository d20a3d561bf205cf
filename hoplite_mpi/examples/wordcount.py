"""MapReduce word count over a real corpus: the ``.py`` files of Python's standard library.

    hoplite-mpi run -n 4 -m hoplite_mpi.examples.wordcount [DIR] [--max-files N]
        [--files-per-task F] [--partitions P] [--top 20] [--map-inline-threshold 0]

(``python -m hoplite_mpi.examples.wordcount ...`` runs it on one rank.)

Input: every file whose name ends in ``.py`` under ``DIR``, recursively, in sorted order of the
full path.  Without ``DIR``: the running Python's standard library,
``sysconfig.get_paths()["stdlib"]``, leaving out its ``site-packages``/``dist-packages``
directories (installed third-party packages are not the standard library).  ``--max-files N``
keeps the first ``N`` files of that order (the small size for smoke tests).

A *word* is a match of the regular expression ``[A-Za-z_][A-Za-z0-9_]*`` (:data:`WORD`) in the
file's text, case-sensitive: a maximal run of ASCII letters, digits and underscores that does not
start with a digit (``2x`` gives ``x``, ``café`` gives ``caf``).  A file's text is its bytes decoded
as UTF-8 with ``errors="replace"``, so every file counts, undecodable bytes included (they become
U+FFFD, which is not part of any word).

The job:

- **Map**: one task per group of ``F`` consecutive files.  The task gets the *paths* and reads the
  files itself on its worker rank.  This assumes that every rank sees the same files under the same
  paths: a shared file system, or one node.  It counts the words of its files and splits the
  counts into ``P`` partitions by :func:`partition_of` (``zlib.crc32`` of the word's UTF-8 bytes
  modulo ``P``).  This is the same on every process, unlike ``hash()`` of a ``str``, which Python
  salts per process.  The task is declared with ``num_returns=P``, so each partition is an object
  of its own.
- **Shuffle through refs**: reduce task ``j`` gets the ``j``-th ref of every map task as a
  top-level argument.  The runtime fetches those objects onto the reducer's rank, from the ranks
  that made them.  The driver never calls ``get`` on a map output.
- **Reduce**: one task per partition adds up its inputs.  It checks that every word belongs to its
  partition (:class:`ValueError` otherwise).
- The driver fetches only the ``P`` final partitions.  Their key sets are disjoint, so it merges
  them with ``dict.update``, then compares the result with a sequential ``collections.Counter``
  over the same files.  It prints the top words (by count, ties by word) and the time of both runs:
  *parallel* is wall-clock seconds from the first submit to the merged result on the driver;
  *sequential* is :func:`count_words` over all files on the driver, run afterwards (so it reads
  the files from a page cache the parallel run has warmed).

**Intermediate data never passes through rank 0.**  A task result of at most ``inline_threshold``
bytes (64 KiB by default, as in Hoplite) normally travels *in-band*: in the worker's ``TaskDone``
to the scheduler on rank 0, which hands it to the consumer inside ``RunTask`` (one message hop
instead of a directory lookup and a pull; most partitions of a 40-file group are that small).  The
map tasks are therefore declared with ``.options(inline_threshold=0)``: every map output stays in
its worker's store and the reducer pulls it from there.  After the run the driver checks where
each map output went, from the object directory (``hm.object_info``, :func:`routes`):

- *in-band*: its directory entry carries the bytes (rank 0 had them);
- *on rank 0*: rank 0's store holds a copy;
- *worker-to-worker*: neither;

and counts the chunked pulls rank 0 made during the run (only the final partitions may be
pulled).  Any map output that reached rank 0 makes the exit status 1.  ``--map-inline-threshold
N`` gives the map tasks another threshold (``65536`` shows the check failing).

Exit status: 0 if the counts equal the sequential ``Counter`` and no map output went through rank
0; 1 otherwise; 2 for a bad argument or an input without
``.py`` files.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import sysconfig
import time
import zlib
from collections import Counter
from typing import Iterable, Optional, Sequence

import hoplite_mpi as hm

WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
"""What a word is: ASCII letters, digits and underscores, not starting with a digit."""

ENCODING = "utf-8"            # every file is decoded with this encoding and errors="replace"
NOT_STDLIB = ("site-packages", "dist-packages")   # skipped when the default corpus is listed


# --- pure helpers (no runtime needed) ----------------------------------------------------------

def tokenize(text: str) -> list[str]:
    """The words of ``text`` in order of appearance (matches of :data:`WORD`)."""
    return WORD.findall(text)


def read_text(path: str) -> str:
    """The text of the file at ``path``: its bytes decoded as UTF-8 with ``errors="replace"``.

    Raises OSError (e.g. FileNotFoundError) if the file cannot be read.
    """
    with open(path, "rb") as fh:
        return fh.read().decode(ENCODING, errors="replace")


def count_words(paths: Iterable[str]) -> Counter:
    """A ``Counter`` of the words of the files at ``paths`` (read with :func:`read_text`)."""
    counts: Counter = Counter()
    for path in paths:
        counts.update(tokenize(read_text(path)))
    return counts


def partition_of(word: str, partitions: int) -> int:
    """The partition (``0 .. partitions-1``) that ``word`` belongs to.

    ``zlib.crc32`` of the UTF-8 bytes, modulo ``partitions``.  The result is the same in every
    process and every run.  Python's ``hash()`` of a ``str`` is salted per process
    (``PYTHONHASHSEED``), so it cannot be used here.  Raises ValueError if ``partitions < 1``.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    return zlib.crc32(word.encode("utf-8")) % partitions


def split_counts(counts: dict, partitions: int) -> list[dict]:
    """``counts`` split into ``partitions`` dicts by :func:`partition_of` of each word."""
    parts: list[dict] = [{} for _ in range(partitions)]
    for word, n in counts.items():
        parts[partition_of(word, partitions)][word] = n
    return parts


def default_corpus() -> str:
    """The directory of the running Python's standard library (``sysconfig``'s ``stdlib``)."""
    return sysconfig.get_paths()["stdlib"]


def list_files(directory: Optional[str] = None, max_files: Optional[int] = None) -> list[str]:
    """The ``.py`` files under ``directory``, recursively, sorted by full path.

    ``directory=None`` means :func:`default_corpus`, without its ``site-packages`` and
    ``dist-packages`` directories.  ``max_files`` keeps only the first that many paths.

    Raises FileNotFoundError / NotADirectoryError if ``directory`` does not exist or is not a
    directory.  Raises ValueError if it holds no ``.py`` file or ``max_files < 1``.
    """
    if max_files is not None and max_files < 1:
        raise ValueError(f"--max-files must be >= 1, got {max_files}")
    stdlib = directory is None
    root = os.path.abspath(default_corpus() if stdlib else directory)
    if not os.path.exists(root):
        raise FileNotFoundError(f"input directory {root} does not exist")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"input {root} is not a directory")
    paths = []
    for where, dirs, files in os.walk(root):
        if stdlib:
            dirs[:] = [d for d in dirs if d not in NOT_STDLIB]
        paths.extend(os.path.join(where, f) for f in files if f.endswith(".py"))
    if not paths:
        raise ValueError(f"no .py files under {root}")
    paths.sort()
    return paths[:max_files] if max_files is not None else paths


def top_words(counts: dict, n: int) -> list[tuple[str, int]]:
    """The ``n`` most frequent ``(word, count)`` pairs: by count, descending, then by word.

    Ties are broken by the word itself, so the order is the same for any insertion order (unlike
    ``Counter.most_common``).
    """
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def diff_counts(got: dict, expected: dict, limit: int = 5) -> list[str]:
    """Up to ``limit`` lines describing words whose counts differ (empty list: equal)."""
    out = []
    for word in sorted(set(got) | set(expected)):
        if got.get(word, 0) != expected.get(word, 0):
            out.append(f"{word!r}: got {got.get(word, 0)}, expected {expected.get(word, 0)}")
            if len(out) >= limit:
                break
    return out


# --- tasks ---------------------------------------------------------------------------------------

def map_files(paths: Sequence[str], partitions: int):
    """Map task: read ``paths`` here (the worker), count words, split into ``partitions`` dicts.

    Returns the dicts as a tuple (``num_returns=partitions``), or the single dict when
    ``partitions == 1``.  Raises OSError if a file cannot be read on this rank (shared file system
    assumption).
    """
    parts = split_counts(count_words(paths), partitions)
    return parts[0] if partitions == 1 else tuple(parts)


def reduce_partition(index: int, partitions: int, *parts: dict) -> dict:
    """Reduce task: add up the ``index``-th partitions of all map tasks (received as values).

    Raises ValueError if a word does not belong to partition ``index``.
    """
    total: Counter = Counter()
    for part in parts:
        total.update(part)
    for word in total:
        if partition_of(word, partitions) != index:
            raise ValueError(f"word {word!r} reached reducer {index} of {partitions}")
    return dict(total)


map_task = hm.remote(map_files)
reduce_task = hm.remote(reduce_partition)


# --- where the intermediate objects went (hm.stats, hm.object_info, hm.is_local) -------------

def _pulls() -> int:
    """Chunked pulls rank 0 has made so far (``hm.stats()["pulls"]``)."""
    return hm.stats()["pulls"]


def routes(refs: Sequence[hm.ObjectRef], timeout: Optional[float] = 60.0) -> Optional[dict]:
    """Where the objects of ``refs`` travelled, from what the directory and rank 0 know (driver).

    Call it while the refs are still held, after their consumers finished.  Returns a dict:

    - ``objects``: how many refs;
    - ``bytes``: their total serialized size in bytes;
    - ``inband``: how many travelled inside control messages through rank 0 (at most
      ``inline_threshold`` bytes each);
    - ``on_rank0``: how many have a copy on rank 0 (rank 0 pulled them);
    - ``direct``: how many rank 0 never held, so they moved only from worker to worker;
    - ``inline_threshold``: the size of the largest in-band one (None if none was).

    Returns None with one rank (rank 0 is then the worker too).  Raises what
    :func:`hoplite_mpi.object_info` raises (e.g. TimeoutError after ``timeout`` seconds).
    """
    if hm.world_size() == 1:
        return None
    out = {"objects": len(refs), "bytes": 0, "inband": 0, "on_rank0": 0, "direct": 0,
           "inline_threshold": None}
    found = hm.object_info(refs, timeout=timeout)
    for ref in refs:
        loc = found[ref]
        out["bytes"] += loc.nbytes
        if loc.inline:
            out["inband"] += 1
            out["inline_threshold"] = max(out["inline_threshold"] or 0, loc.nbytes)
        elif hm.is_local(ref):
            out["on_rank0"] += 1
        else:
            out["direct"] += 1
    return out


# --- the job -----------------------------------------------------------------------------------

def run(paths: Sequence[str], files_per_task: int = 40, partitions: Optional[int] = None,
        top: int = 20, timeout: float = 600.0, map_inline_threshold: int = 0) -> dict:
    """Count the words of ``paths`` with map and reduce tasks and check against a sequential run.

    Args:
        paths: files to read, on the workers (see the module docstring about file systems).
        files_per_task: files per map task (>= 1).
        partitions: partitions = reduce tasks (>= 1); None means one per worker rank.
        top: how many of the most frequent words to return.
        timeout: seconds allowed for fetching the final partitions.
        map_inline_threshold: the map tasks' ``inline_threshold`` option (bytes); 0 keeps every
            map output off rank 0.

    Returns a dict: ``files``, ``bytes`` (input size), ``words`` (total), ``distinct``,
    ``map_tasks``, ``partitions``, ``ranks``, ``top`` (list of ``(word, count)``),
    ``parallel_s`` and ``sequential_s`` (seconds, wall clock), ``match`` (bool: equal to the
    sequential ``Counter``), ``diff`` (lines describing differences), ``routes`` (see
    :func:`routes`) and ``rank0_pulls`` (chunked pulls rank 0 made during the parallel run: the
    final partitions that were not in-band).

    Raises ValueError for empty ``paths`` or a bad ``files_per_task``/``partitions``; a task's
    exception (e.g. OSError for an unreadable file) and TimeoutError propagate from ``get``.
    """
    if not paths:
        raise ValueError("no input files")
    if files_per_task < 1:
        raise ValueError(f"--files-per-task must be >= 1, got {files_per_task}")
    ranks = hm.world_size()
    if partitions is None:
        partitions = max(1, ranks - 1)
    if partitions < 1:
        raise ValueError(f"--partitions must be >= 1, got {partitions}")
    groups = [list(paths[i:i + files_per_task]) for i in range(0, len(paths), files_per_task)]

    pulls0 = _pulls()
    t0 = time.perf_counter()
    mapped = []                       # mapped[m][j]: partition j of map task m
    for m, group in enumerate(groups):
        out = map_task.options(num_returns=partitions, name=f"map{m}",
                               inline_threshold=map_inline_threshold).remote(group, partitions)
        mapped.append([out] if partitions == 1 else list(out))
    reduced = [reduce_task.options(name=f"reduce{j}").remote(j, partitions, *(row[j] for row in mapped))
               for j in range(partitions)]
    finals = hm.get(reduced, timeout=timeout)
    merged: dict = {}
    for part in finals:
        merged.update(part)
    parallel = time.perf_counter() - t0
    pulls = _pulls() - pulls0
    intermediate = [ref for row in mapped for ref in row]
    where = routes(intermediate)
    if sum(len(p) for p in finals) != len(merged):
        raise AssertionError("final partitions overlap: a word reached two reducers")
    hm.delete(intermediate + reduced)

    t0 = time.perf_counter()
    expected = count_words(paths)
    sequential = time.perf_counter() - t0

    diff = diff_counts(merged, expected)
    return {"files": len(paths), "bytes": sum(os.path.getsize(p) for p in paths),
            "words": sum(merged.values()), "distinct": len(merged), "map_tasks": len(groups),
            "partitions": partitions, "ranks": ranks, "top": top_words(merged, top),
            "parallel_s": parallel, "sequential_s": sequential, "match": not diff, "diff": diff,
            "routes": where, "rank0_pulls": pulls}


def report(out: dict, source: str) -> str:
    """The text ``main`` prints for the result ``out`` of :func:`run`."""
    lines = [f"wordcount: {out['files']} files ({out['bytes'] / 1e6:.1f} MB) under {source}: "
             f"{out['words']} words, {out['distinct']} distinct",
             f"  {out['map_tasks']} map tasks x {out['partitions']} partitions -> "
             f"{out['partitions']} reduce tasks on {out['ranks']} ranks",
             f"  top {len(out['top'])} words:"]
    lines += [f"  {i:>4}. {word:<28} {count:>9}" for i, (word, count) in enumerate(out["top"], 1)]
    if out["match"]:
        lines.append("  result matches the sequential collections.Counter")
    else:
        lines.append("  MISMATCH with the sequential collections.Counter:")
        lines += [f"    {line}" for line in out["diff"]]
    speedup = out["sequential_s"] / out["parallel_s"] if out["parallel_s"] > 0 else float("inf")
    lines.append(f"  parallel {out['parallel_s']:.3f} s   sequential {out['sequential_s']:.3f} s   "
                 f"speed-up {speedup:.2f}x   ({out['ranks']} ranks)")
    r = out["routes"]
    if r is None:
        lines.append("  intermediate data: route not checked (one rank, or runtime state unavailable)")
    else:
        lines.append(f"  intermediate data: {r['objects']} map outputs, {r['bytes'] / 1e6:.2f} MB: "
                     f"{r['direct']} worker-to-worker, {r['inband']} in-band via rank 0, "
                     f"{r['on_rank0']} copied to rank 0; "
                     f"rank 0 pulled {out['rank0_pulls']} objects")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hoplite_mpi.examples.wordcount",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", default=None,
                        help="directory to read .py files from (default: the standard library)")
    parser.add_argument("--max-files", type=int, default=None,
                        help="use only the first N files (sorted by path)")
    parser.add_argument("--files-per-task", type=int, default=40, help="files per map task")
    parser.add_argument("--partitions", type=int, default=None,
                        help="partitions = reduce tasks (default: number of worker ranks)")
    parser.add_argument("--top", type=int, default=20, help="how many top words to print")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole get")
    parser.add_argument("--map-inline-threshold", type=int, default=0, metavar="BYTES",
                        help="the map tasks' inline_threshold option (default 0: map outputs "
                             "never pass through rank 0)")
    args = parser.parse_args(argv)
    for name in ("files_per_task", "partitions", "top"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "top" else 1):
            parser.error(f"--{name.replace('_', '-')} must be >= {0 if name == 'top' else 1}, "
                         f"got {value}")
    hm.init()
    try:
        try:
            paths = list_files(args.dir, args.max_files)
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
        out = run(paths, args.files_per_task, args.partitions, args.top, args.timeout,
                  args.map_inline_threshold)
        print(report(out, args.dir or default_corpus()), flush=True)
        status = 0 if out["match"] else 1
        r, pulls = out["routes"], out["rank0_pulls"]
        if r is not None:      # (one rank: rank 0 is the worker, nothing to check)
            if r["direct"] != r["objects"] or pulls is None or pulls > out["partitions"]:
                print(f"wordcount: not every map output moved worker-to-worker "
                      f"(routes {r}, rank 0 pulls {pulls})", file=sys.stderr)
                status = 1
            else:
                print(f"  rank 0 held none of the map outputs and pulled only {pulls} final partitions")
        return status
    finally:
        hm.shutdown()


if __name__ == "__main__":
    # Run the importable module rather than this __main__ copy, so the worker ranks import the
    # task functions by name (hoplite_mpi.examples.wordcount) instead of receiving pickled copies.
    from hoplite_mpi.examples import wordcount

    sys.exit(wordcount.main())

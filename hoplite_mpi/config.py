"""Runtime options: one frozen :class:`Config`; keyword > ``HOPLITE_MPI_*`` environment variable > default.

Every field can be set as ``hoplite_mpi.init(field=value)`` or with the environment variable
``HOPLITE_MPI_<FIELD>`` (upper case), e.g. ``HOPLITE_MPI_CHUNK_SIZE=1048576``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Mapping

ENV_PREFIX = "HOPLITE_MPI_"
BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True,
              "0": False, "false": False, "no": False, "off": False}


@dataclasses.dataclass(frozen=True)
class Config:
    """All runtime options, with units.

    Attributes:
        chunk_size: bytes per point-to-point data message of an object transfer (default 1 MiB;
            256 KiB-1 MiB measured best on one host, benchmarks/RESULTS.md).
        window: chunks of one transfer in flight at once (posted ``Isend``/``Irecv``).
        inline_threshold: objects of at most this many serialized bytes travel inside control
            messages (completion, directory replies) instead of a chunked transfer (Hoplite: 64 KiB).
        small_collectives: reduces/allreduces of inline inputs are combined on rank 0 and their
            result sent inline; a broadcast of an inline value sends it in one message per
            target (no tree, no directory hop; see ``collectives``).  False: the tree for all.
        reduce_now: (with ``small_collectives``) a reduce on the driver whose inputs are all
            inline values already known on rank 0 and whose result stays there is combined on
            the calling thread, as ``put`` stores a value: the ref is ready when ``reduce``
            returns, no engine round trip (``Coordination.combine_now``).
        host_aware: (ranks on several hosts) a broadcast receiver is given a sender on its own
            host when one has a copy (``DirectoryShard``), and the inputs of a reduce that are
            ready together are placed grouped by host, the target's host last
            (``collectives.host_order``): chains cross each host boundary once.  False: host
            names are ignored.
        worker_deps: a task whose missing inputs are all being made by tasks placed on one
            worker rank is placed there at once and waits on the worker, which starts it the
            moment the last input is made there (no rank-0 round trip per link of a chain;
            Dask's worker-side dependency handling).  False: a task is placed once its inputs exist.
        adaptive_chunks: the chunk size of an object depends on its size: the power of two at or
            above a quarter of its bytes, at least ``chunk_size``, at most 4 MiB
            (``store.object_chunk_size``); fewer Python events per MiB for large objects.
            Off by default: it helped on a loaded machine (load ~10: 0.85-0.94x the time at
            16 MiB) but not on a quiet one (interleaved A/B, load ~2.5: 16 MiB broadcast 1.14x,
            allreduce 1.09x; 64 MiB reduce 1.06x, allreduce 1.07x; benchmarks/RESULTS.md).  Like ``chunk_size``, every rank must have the
            same value (both ends of a transfer cut the object alike): set it by the
            environment or with the same ``init`` keywords on every rank.  False: ``chunk_size``
            for every object.
        chunk_aware_plan: the reduce coordinator (rank 0) counts the chunks of an object when it
            chooses between a star and the tree-chain (``collectives.star_cheaper``): an object of
            one or a few chunks is not pipelined through a chain, so a 1 MiB reduce of 4 inputs
            takes the star.  False: Hoplite's model (chunks pipelined).
        broadcast_direct: a broadcast of a one-chunk object the broadcasting rank holds, and an
            allreduce's one-chunk result, are pulled by every target from that copy at once
            (``Fetch.sender``): no DirPull/DirSender hop before the pull, and no chain of copies,
            which would forward a one-chunk object whole, hop after hop (4 ranks / 2 cores, same
            job: 1 MiB broadcast ~0.8x, allreduce ~0.87x).  Chosen by the broadcasting rank (the
            choice travels in the Fetch).  False: the targets ask the directory for a sender.
        direct_args: a task's input of one chunk per frame that is not inline is pulled straight from a
            live holder its RunTask names (rank 0's view), without the DirPull/DirSender hop to
            the object's shard; a holder that no longer has it (PullRefused) or dies sends the
            worker to the directory as before.  (Objects of several chunks still ask the shard:
            its chain of partial copies pipelines them.)  False: every input asks the shard.
        ready_on_engine: a ref whose object became ready and that has no done-callback is
            completed on the engine thread at once, not handed to the notifier thread first (a
            thread waiting in ``get``/``wait``/``result`` wakes one hand-off sooner).  Refs with
            callbacks, and failures, still complete on the notifier thread, so user code never
            runs on the engine thread.  False: every ref completes on the notifier thread.
        tasks_per_worker: tasks the scheduler keeps in flight on one worker rank (queued there),
            so fine-grained tasks do not wait for a round trip to rank 0.
        worker_threads: tasks one worker rank executes at the same time (tasks blocked in a
            nested ``get``/``wait`` do not count).
        replication: copies of every chunked object (the extra ``r - 1`` made in the background
            by receiver-driven pulls as soon as it exists, on the ranks after its maker) and
            ranks each directory shard lives on; losing any ``r - 1`` ranks loses no object
            whose copies were complete and no directory entry (default 1: lineage only).
        link_bandwidth: bytes/s of one rank-to-rank link, ``B`` in Hoplite's reduce cost model.
        link_latency: seconds per message, ``L`` in that model; chain length ``k = S / (B * L)``
            (see ``collectives``).  Defaults: measured order of magnitude on one host with the
            Open MPI wheel (a 1 MiB chunk hop ~0.7 ms; ~100 us per small message in Python).
        backoff_max: seconds; the longest sleep of an idle progress engine between polls.  Each poll
            costs ~90 us of CPU here (mostly inside MPI's progress); measured idle cost per rank
            (4 ranks, 2 cores, /proc CPU times over 10 s): 2.1-2.4 % of a core at 10 ms,
            0.9-1.3 % at 20 ms (default).  It bounds the extra latency of the first message after
            an idle spell from a rank on another host; a rank on the same host rings the
            doorbell, which wakes the engine at once (1 KiB collectives and task chains: the
            same at 10 and 20 ms).
        hot_window: seconds after any activity during which an idle engine polls by yielding
            the core instead of sleeping (a reply usually follows within a round trip); 0:
            sleep at once, on the doorbell that a control batch from the same host rings.
        hot_yield: the hot poll yields the core with ``os.sched_yield`` (returns at once when no
            other thread is runnable); False: ``time.sleep(0)``, which sleeps for the kernel's
            timer slack (~50 us: a 1 KiB ping-pong polled that way took 2.5x as long here).
        malloc_mmap_threshold: bytes; glibc's mmap threshold in every process of the job (at
            most 32 MiB; the trim threshold becomes four times it), set when the runtime starts
            (:mod:`hoplite_mpi.malloc`): buffers up to it (pickled messages, received values)
            are reused from the heap instead of being fresh mmaps whose pages all fault.  A
            task returning 320 KB in-band reached the driver ~0.5 ms sooner here.  Freed memory
            up to the trim threshold stays resident.  0: leave glibc's own policy.
        heartbeat: seconds between a worker's heartbeats to rank 0 (rank-loss tolerance).
        heartbeat_timeout: seconds without any message from a worker after which rank 0 declares
            it dead although MPI did not (a hung rank: stopped, deadlocked, swapping); every rank
            then goes on without it and the rank itself exits if it ever runs again.  Keep it well
            above the longest time a task can hold the GIL without releasing it.
        shutdown_timeout: seconds the driver waits for workers to acknowledge shutdown.
        log_level: name of the ``logging`` level of the ``hoplite_mpi`` logger.
        storage: a directory for durable workflows (issue 14; typically on a shared file system,
            e.g. ``$SLURM_SUBMIT_DIR/.hoplite/<name>``): the results of checkpointed tasks are
            committed there by the ranks that made them, and a later run of the same program
            with the same directory restores them instead of running those tasks again (see
            ``hoplite_mpi.durable``).  Only rank 0's value matters.  "": no storage.
        checkpoint: with ``storage``, every task submitted on the driver is checkpointed unless
            its ``checkpoint`` option says otherwise.  False: only tasks with
            ``checkpoint=True``.
        storage_sync: fsync each committed file and directory (a commit then survives a crash
            of the host, not only of the process).  False on tmpfs or scratch space.
        drain_grace: seconds a drain (``hoplite_mpi/roles/drain.py``) waits for running tasks and
            their checkpoints before the program gets ``Drained``.
        drain_margin: seconds before the job's end time (``HOPLITE_MPI_JOB_END_TIME`` or
            ``SLURM_JOB_END_TIME``, epoch seconds) at which rank 0 starts draining.
        forward_output: a worker's ``print``/``sys.stdout``/``sys.stderr``/``logging`` output
            reaches the driver's stdout/stderr, each line prefixed ``(f pid=P, rank=R)`` (the
            task) or ``(rank=R)`` (outside tasks), in order per task (``hoplite_mpi/output.py``).
            False: workers write to their own streams (mpirun forwards them, unlabelled).
        stall_timeout: seconds without progress (no task finished, no object became ready)
            while work is outstanding after which rank 0 prints a stall report for the whole job
            (what waits for what, silent ranks, the likely culprit; ``roles/stall.py``); 0: never.
        timeline: a file to write the whole run's timeline to (Chrome trace events, written when
            the driver shuts down; ``hoplite_mpi/tracing.py``).  "": not recorded (unless
            ``hm.timeline()`` starts it).
        print_stats: when the driver shuts down, gather every rank's ``hm.stats()`` and print a
            summary table on its stderr (``hoplite-mpi run --stats``; ``hoplite_mpi/rankstats.py``).
        submit_batch: tasks submitted in a burst (``remote()`` calls in a row, with no other
            call to the engine in between) reach the engine as one call and the scheduler as
            one event, placed in one pass; False: one engine call and one event per task.
    """

    chunk_size: int = 1 << 20
    window: int = 4
    inline_threshold: int = 64 << 10
    small_collectives: bool = True
    reduce_now: bool = True
    host_aware: bool = True
    worker_deps: bool = True
    adaptive_chunks: bool = False
    chunk_aware_plan: bool = True
    broadcast_direct: bool = True
    direct_args: bool = True
    ready_on_engine: bool = True
    tasks_per_worker: int = 16
    worker_threads: int = 1
    replication: int = 1
    link_bandwidth: float = 1.5e9
    link_latency: float = 1e-4
    backoff_max: float = 0.02
    hot_window: float = 0.005
    hot_yield: bool = True
    malloc_mmap_threshold: int = 32 << 20
    heartbeat: float = 1.0
    heartbeat_timeout: float = 10.0
    shutdown_timeout: float = 30.0
    log_level: str = "WARNING"
    submit_batch: bool = True
    storage: str = ""
    checkpoint: bool = False
    storage_sync: bool = True
    drain_grace: float = 60.0
    drain_margin: float = 120.0
    forward_output: bool = True
    stall_timeout: float = 60.0
    timeline: str = ""
    print_stats: bool = False

    def __post_init__(self) -> None:
        positive = ("chunk_size", "window", "tasks_per_worker", "worker_threads", "replication")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if logging.getLevelName(str(self.log_level).upper()) not in range(0, 100):
            raise ValueError(f"log_level must be a logging level name, got {self.log_level!r}")
        for name in ("inline_threshold", "malloc_mmap_threshold"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        for name in ("small_collectives", "reduce_now", "host_aware", "worker_deps", "submit_batch", "adaptive_chunks",
                     "chunk_aware_plan", "broadcast_direct", "direct_args", "ready_on_engine",
                     "hot_yield", "checkpoint", "storage_sync", "forward_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.storage, str):
            raise ValueError(f"storage must be a directory path (str), got {self.storage!r}")
        if self.chunk_size % 64:
            raise ValueError(f"chunk_size must be a multiple of 64 bytes (whole array elements), got {self.chunk_size}")
        if not float(self.stall_timeout) >= 0:
            raise ValueError(f"stall_timeout must be >= 0 seconds, got {self.stall_timeout!r}")
        if not float(self.hot_window) >= 0:
            raise ValueError(f"hot_window must be >= 0 seconds, got {self.hot_window!r}")
        for name in ("backoff_max", "shutdown_timeout", "link_bandwidth", "link_latency",
                     "heartbeat", "heartbeat_timeout", "drain_grace", "drain_margin"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)!r}")

    @classmethod
    def from_sources(cls, options: Mapping[str, Any] | None = None,
                     environ: Mapping[str, str] | None = None) -> "Config":
        """Build a Config: ``options`` (keywords) win over ``environ`` (default ``os.environ``).

        Raises:
            TypeError: an unknown option keyword.
            ValueError: a value of the wrong type or range (env values are parsed first).
        """
        options = dict(options or {})
        environ = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise TypeError(f"unknown hoplite_mpi option(s) {unknown}; known: {sorted(fields)}")
        values: dict[str, Any] = {}
        for name, field in fields.items():
            if name in options:
                values[name] = options[name]
                continue
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is None:
                continue
            kind = type(field.default)
            bad = ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind.__name__}")
            if kind is bool:
                word = raw.strip().lower()
                if word not in BOOL_WORDS:
                    raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid bool "
                                     f"(one of {sorted(BOOL_WORDS)})")
                values[name] = BOOL_WORDS[word]
                continue
            try:
                value = kind(raw) if kind is str else float(raw)
            except ValueError:
                raise bad from None
            if kind is int:
                if not math.isfinite(value) or not value.is_integer():
                    raise bad
                value = int(value)   # accepts 1e6, 1048576.0
            values[name] = value
        return cls(**values)

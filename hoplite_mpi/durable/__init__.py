"""Durable workflows (issue 14; ExoFlow, seed 002): checkpointed task results in a storage
directory, so that a run of the same program after the driver died, or after the allocation
ended, does not execute a completed checkpointed task again.

- :mod:`.keys`: a task's durable key, the same in every run of the program (function identity,
  argument values, the producers' keys of ref arguments: lineage).
- :mod:`.storage`: the directory layout, the atomic commit of a step (write, fsync, ``link``) and
  zero-copy reads (memory maps).
- :mod:`.persister`: the background writer of a rank (off the task's critical path).
- :mod:`.workflow`: the driver's state (keys of its objects, the committed keys of earlier
  runs, counters).

No module here imports MPI.
"""

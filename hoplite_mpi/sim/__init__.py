"""Deterministic simulation of the whole runtime in one process (issue 11).

- :mod:`hoplite_mpi.transport.local`: N ranks' transports over one seeded event queue and a
  virtual clock, with rank kills (ULFM semantics).
- :mod:`.simulator`: :func:`simulate` runs one seed: random ranks, config, workload, kills;
  returns a :class:`SimResult` (failures, trace digest for replay checks).
- :mod:`.workload` (the driver program and its sequential reference), :mod:`.driver` (what it
  waits on), :mod:`.tasks` (its remote functions), :mod:`.worker` (tasks run inline); shared
  with ``tests/mpi/random_workload.py``: :mod:`.dag` (the objects, the operations of the same
  draws, a reduce's reference value) and :mod:`.values` (value specs).

Run ``python -m hoplite_mpi.sim --seeds 1-1000`` (soak) or ``--seed S`` (replay one, verbose).
"""
from .simulator import SimResult, simulate, simulate_sure

__all__ = ["SimResult", "simulate", "simulate_sure"]

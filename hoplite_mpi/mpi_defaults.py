"""MPI settings this runtime needs, applied to the process environment before MPI is initialised.

Imported first by the package (``hoplite_mpi/__init__.py``), so under ``python -m hoplite_mpi``
every rank applies them before ``mpi4py`` initialises MPI.  A value the user set (environment,
``mpirun --mca``/``-x``) is never overridden.  A program that initialises MPI itself before
importing hoplite_mpi does not get them.

- ``btl_tcp_flags`` without ``put``: Open MPI 5.0.x's ob1 PML moves large messages over the TCP
  BTL by an emulated RDMA put, after which the sender sends a FIN fragment.  When the peer is
  SIGKILLed mid-transfer, the failing ``writev`` closes the endpoint *holding its send lock*,
  fails the pending put, and the put's completion sends the FIN to the same endpoint: the rank's
  progress thread waits on a lock it holds, forever (seen under ULFM across simulated hosts: a
  live rank stops answering and is declared dead 10 s later; native stacks in
  tests/test_multihost.py's history, upstream fix open-mpi/ompi#11262 is not in 5.0.11).  With
  send-only flags ob1 uses its pipelined send protocol, which has no FIN.  Bandwidth over TCP is
  unchanged within noise (benchmarks/RESULTS.md, issue 14 section).
"""
from __future__ import annotations

import os

#: Open MPI MCA parameters (name without the ``OMPI_MCA_`` prefix) and the values set by default
DEFAULTS = {
    "btl_tcp_flags": "send,inplace,need-ack,need-csum",
}


def apply(environ: "os._Environ | dict | None" = None) -> dict:
    """Set each of :data:`DEFAULTS` in ``environ`` (default ``os.environ``) as ``OMPI_MCA_<name>``
    unless it is set already; returns what was set.  Has no effect once MPI is initialised."""
    env = os.environ if environ is None else environ
    done = {}
    for name, value in DEFAULTS.items():
        key = "OMPI_MCA_" + name
        if key not in env:
            env[key] = value
            done[key] = value
    return done

"""Launch mode 2: ``mpirun -n N python launch_init.py``; only rank 0 passes init()."""
import sys

from mpi4py import MPI

import hoplite_mpi as hm

world_rank = MPI.COMM_WORLD.Get_rank()
hm.init()
hm.init()   # idempotent
assert world_rank == 0, "code after init() ran on a worker rank"


@hm.remote
def double(x):
    return 2 * x


print("RESULT", sum(hm.get([double.remote(i) for i in range(100)], timeout=120)), flush=True)
if len(sys.argv) > 1 and sys.argv[1] == "--no-shutdown":
    sys.exit(0)   # atexit must still stop the workers
hm.shutdown()

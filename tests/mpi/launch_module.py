"""Launch mode 1: ``mpirun -n N python -m hoplite_mpi launch_module.py ARG``."""
import sys

import hoplite_mpi as hm

assert __name__ == "__main__"
assert hm.rank() == 0


@hm.remote
def add(a, b):
    return a + b


print("ARGS", sys.argv[1:], "RESULT", hm.get(add.remote(int(sys.argv[1]), 1), timeout=120), flush=True)
if len(sys.argv) > 2:
    sys.exit(int(sys.argv[2]))

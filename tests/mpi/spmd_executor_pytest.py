"""Launch mode 3 inside pytest-mpi: ``mpirun -n N python -m pytest --with-mpi THIS_FILE``."""
import pytest
from mpi4py import MPI

import hoplite_mpi as hm


@pytest.mark.mpi(min_size=1)
def test_executor_on_comm_world():
    comm = MPI.COMM_WORLD
    with hm.Executor(comm=comm, root=0) as ex:
        if comm.Get_rank() == 0:
            assert ex is not None
            assert list(ex.map(abs, range(-20, 0))) == list(range(20, 0, -1))
            assert ex.submit(pow, 3, 3).result(timeout=120) == 27
        else:
            assert ex is None
    # every rank gets here after the root left the block; the program goes on in SPMD
    total = comm.allreduce(1)
    assert total == comm.Get_size()


@pytest.mark.mpi(min_size=2)
def test_executor_nonzero_root_twice():
    comm = MPI.COMM_WORLD
    root = comm.Get_size() - 1
    for _ in range(2):   # a second runtime after the first one shut down
        with hm.Executor(comm=comm, root=root) as ex:
            if comm.Get_rank() == root:
                assert ex.submit(sum, [1, 2, 3]).result(timeout=120) == 6
            else:
                assert ex is None
    assert not hm.is_initialized()

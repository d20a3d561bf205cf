"""``mpirun -n N python -m hoplite_mpi script.py [args]`` (or ``-m module [args]``, ``-c code``).

Rank 0 runs the script as ``__main__`` with the runtime started; the other ranks serve tasks and
exit with status 0 when the script ends (like ``python -m mpi4py.futures``).  The exit status of
rank 0 is the script's.
"""
from __future__ import annotations

import runpy
import sys

USAGE = "usage: python -m hoplite_mpi (script.py | -m module | -c code) [args ...]"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        sys.exit(2 if not argv else 0)
    if argv[0] in ("-m", "-c") and len(argv) < 2:
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    import os

    import hoplite_mpi
    from hoplite_mpi.errors import Drained
    from hoplite_mpi.jobwatch import EXIT_DRAINED

    if argv[0] not in ("-m", "-c"):
        # on every rank, before init(): workers unpickle functions from modules next to the script
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
    hoplite_mpi.init()  # non-driver ranks serve here and exit
    status = 0
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1]] + argv[2:]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            sys.argv = ["-c"] + argv[2:]
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
        else:
            sys.argv = argv
            runpy.run_path(argv[0], run_name="__main__")
    except Drained:
        status = EXIT_DRAINED     # (the drain logged why and what is left)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:
        status = 1
        raise
    finally:
        hoplite_mpi.shutdown()
        from hoplite_mpi import session
        from hoplite_mpi.jobwatch import write_status
        write_status(status)     # (hoplite-mpi run: the driver finished; see jobwatch)
        if session.ranks_died():  # a rank died: exit without MPI_Finalize (see session.exit_now)
            if status == 1 and sys.exc_info()[0] is not None:
                import traceback
                traceback.print_exc()
            session.exit_now(status)
    sys.exit(status)


if __name__ == "__main__":
    main()

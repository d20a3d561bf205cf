"""The SLURM job scripts (``jobscripts/*.sbatch``) under a real SLURM started by this module.

A one-node cluster on this host, private to the test: its own ``slurm.conf`` in a temporary
directory (ports picked free, state/spool/log/pid files there too), its own ``munged`` with its
own key and socket (so a system munge, if any, is neither needed nor touched), and ``slurmctld``
and ``slurmd`` in the foreground as child processes.  Each script is submitted with its small
flag (``sbatch -n 4 --overcommit``) from the repository root, like a user would, and must end
with exit code 0 and the program's success line in its output file.  ``durable.sbatch`` is
drained mid-workflow (``scancel -b -s USR1``), must requeue itself once and finish in its second
allocation with nothing executed twice (``--slurm-slow``: drained by SLURM's own ``--signal``
before a 2-minute time limit instead).  The daemons are stopped
(process groups, TERM then KILL) when the module ends, also when something failed.

Needs root and Debian's ``slurm-wlm`` + ``munge`` (``.ci/run`` installs them); skipped otherwise.
Every subprocess has a timeout and every wait a deadline: nothing here can hang.
"""
from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import pytest

from conftest import ROOT
from test_durable_mpi import executions
from hoplite_mpi.durable import storage as S

JOBSCRIPTS = os.path.join(ROOT, "jobscripts")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
NEEDED = ("slurmctld", "slurmd", "sbatch", "munged", "scontrol", "sinfo", "squeue", "scancel")
BIN = {name: shutil.which(name, path=SEARCH_PATH) for name in NEEDED}
MISSING = sorted(name for name, path in BIN.items() if path is None)

START_TIMEOUT = 90      # s: daemons up and the node idle
JOB_TIMEOUT = 600       # s: one job, submit to end (the small runs take 10-30 s alone)
CMD_TIMEOUT = 30        # s: any one SLURM/munge client command
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"}

SLURM_MARKS = (
    pytest.mark.skipif(bool(MISSING), reason=f"SLURM not installed (no {', '.join(MISSING)}): "
                       "apt-get install slurm-wlm munge (done by .ci/run)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the test SLURM cluster runs as root "
                       "(SlurmUser=root, munged with a private key); run as root"),
)


def needs_slurm(fn):
    for mark in SLURM_MARKS:
        fn = mark(fn)
    return fn


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: str, n: int = 4000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError as exc:
        return f"<{path}: {exc}>"


@dataclass
class Cluster:
    """A one-node SLURM cluster in ``base``; :meth:`start`, :meth:`submit`, :meth:`stop`."""

    base: str
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    procs: dict = field(default_factory=dict)     # name -> Popen (own process group)
    jobs: list = field(default_factory=list)

    def path(self, *parts: str) -> str:
        return os.path.join(self.base, *parts)

    @property
    def conf(self) -> str:
        return self.path("slurm.conf")

    @property
    def env(self) -> dict:
        """The environment for daemons, clients and jobs: no SLURM_* of an outer job."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = self.conf
        # the jobs must find this Python's hoplite-mpi / mpirun first
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), SEARCH_PATH])
        env["PYTHONUNBUFFERED"] = "1"
        if sys.prefix != sys.base_prefix:     # in a virtualenv: exercise the scripts' HOPLITE_VENV
            env["HOPLITE_VENV"] = sys.prefix
        return env

    def write_conf(self) -> None:
        for d in ("state", "spool", "log", "munge", "run"):
            os.makedirs(self.path(d), exist_ok=True)
        os.chmod(self.path("munge"), 0o700)
        os.chmod(self.path("run"), 0o755)    # munged wants its socket's directory open to all
        cpus = os.cpu_count() or 1
        conf = f"""\
# one-node test cluster written by tests/test_slurm.py
ClusterName=hoplitetest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job is eligible again after this many seconds (default 120, min 5;
# test_durable_sbatch_requeue).  It is also how old a launch credential may be when slurmd
# checks it: 10 s, not the minimum 5, leaves room for a busy machine.
AuthInfo=socket={self.path("run", "munge.sock")},cred_expire=10
StateSaveLocation={self.path("state")}
SlurmdSpoolDir={self.path("spool")}
SlurmctldPidFile={self.path("run", "slurmctld.pid")}
SlurmdPidFile={self.path("run", "slurmd.pid")}
SlurmctldLogFile={self.path("log", "slurmctld.log")}
SlurmdLogFile={self.path("log", "slurmd.log")}
# no cgroups in a container: plain process tracking, no task binding, no accounting
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# trust the CPUs/RealMemory below even if slurmd counts sockets/threads differently
SlurmdParameters=config_overrides
ReturnToService=2
# schedule pending jobs every 1-2 s (defaults 30 and 60 s): a requeued job starts ~2 s after
# it is eligible again, not up to a minute later
SchedulerParameters=bf_interval=1,sched_interval=2
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=600
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""
        with open(self.conf, "w") as f:
            f.write(conf)

    def spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.path("log", f"{name}.out"), "wb")
        try:
            self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=self.env,
                                                cwd=self.base, start_new_session=True)
        finally:
            log.close()

    def run(self, *cmd: str, timeout: float = CMD_TIMEOUT, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env)
        return subprocess.run([BIN.get(cmd[0], cmd[0]), *cmd[1:]], capture_output=True, text=True,
                              timeout=timeout, **kw)

    def logs(self) -> str:
        names = sorted(os.listdir(self.path("log"))) if os.path.isdir(self.path("log")) else []
        return "\n".join(f"--- {n}:\n{tail(self.path('log', n), 2000)}" for n in names)

    def wait_for(self, what: str, check, deadline: float) -> None:
        """Poll ``check()`` (true when done) until ``deadline``; fail early if a daemon died."""
        while True:
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            if dead:
                pytest.fail(f"{what}: daemon(s) exited {dead}\n{self.logs()}")
            try:
                if check():
                    return
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not within {START_TIMEOUT} s\n{self.logs()}")
            time.sleep(0.2)

    def start(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        self.write_conf()
        # a private munge key: the system one (/etc/munge/munge.key) belongs to the munge user
        key = self.path("munge", "munge.key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400), "wb") as f:
            f.write(os.urandom(1024))
        sock = self.path("run", "munge.sock")
        # --force: pytest's base temp dir is 0700, which munged would refuse for its socket
        self.spawn("munged", [BIN["munged"], "--foreground", "--force", f"--socket={sock}",
                              f"--key-file={key}", f"--pid-file={self.path('run', 'munged.pid')}",
                              f"--seed-file={self.path('munge', 'munged.seed')}"])
        munge = shutil.which("munge", path=SEARCH_PATH)
        if munge:
            self.wait_for("munged", lambda: self.run(munge, "-n", f"--socket={sock}",
                                                     timeout=5).returncode == 0, deadline)
        else:
            self.wait_for("munged", lambda: os.path.exists(sock), deadline)
        self.spawn("slurmctld", [BIN["slurmctld"], "-D", "-i", "-f", self.conf])
        self.wait_for("slurmctld", lambda: "UP" in self.run("scontrol", "ping", timeout=10).stdout,
                      deadline)
        self.spawn("slurmd", [BIN["slurmd"], "-D", "-N", self.node, "-f", self.conf])
        self.wait_for("node idle", lambda: self.run("sinfo", "-h", "-N", "-o", "%t",
                                                    timeout=10).stdout.strip() == "idle", deadline)

    def job(self, job: str) -> dict:
        """The fields of ``scontrol show job`` (empty if the command timed out)."""
        try:
            show = self.run("scontrol", "-o", "show", "job", job, timeout=10)
        except subprocess.TimeoutExpired:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", show.stdout))

    def sbatch(self, script: str, *args: str, sbatch_args: tuple = ("-n", "4", "--overcommit"),
               env: dict | None = None) -> tuple[str, str]:
        """sbatch ``script args`` from the repository root (``env``: more environment for the
        job); returns (job id, output file)."""
        out = self.path(f"{os.path.splitext(os.path.basename(script))[0]}-%j.out")
        more = {"env": dict(self.env, **env)} if env else {}   # (NodesCluster.run sets env itself)
        proc = self.run("sbatch", "--parsable", f"--output={out}", "--time=20", *sbatch_args,
                        script, *args, cwd=ROOT, **more)
        assert proc.returncode == 0, f"sbatch failed: {proc.stderr}\n{self.logs()}"
        job = proc.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job, out.replace("%j", job)

    def wait_job(self, job: str, out: str, timeout: float = JOB_TIMEOUT,
                 seen: list | None = None, what: str = "") -> tuple[dict, str]:
        """Wait for the job's end; returns (its fields, the output file's text).  ``seen``
        collects the states passed through.  On timeout the job is cancelled and the test fails
        with its output so far."""
        deadline = time.monotonic() + timeout
        fields: dict = {}
        while time.monotonic() < deadline:
            fields = self.job(job) or fields
            state = fields.get("JobState")
            if seen is not None and state and (not seen or seen[-1] != state):
                seen.append(state)
            if state in TERMINAL:
                return fields, tail(out, 100_000)
            time.sleep(0.5)
        self.run("scancel", job)
        pytest.fail(f"job {job}{what} did not end within {timeout} s (state {fields.get('JobState')}); "
                    f"output so far:\n{tail(out)}\n{self.logs()}")

    def submit(self, script: str, *args: str, sbatch_args: tuple = ("-n", "4", "--overcommit"),
               timeout: float = JOB_TIMEOUT) -> tuple[dict, str]:
        """sbatch ``script args`` from the repository root and wait for the job's end.

        Polls ``scontrol show job`` (sbatch --wait polls at 2, 8, 32 s... and would add up to half
        a minute per job).  Returns (the job's fields, the output file's text).  On timeout the
        job is cancelled and the test fails with its output so far.
        """
        job, out = self.sbatch(script, *args, sbatch_args=sbatch_args)
        return self.wait_job(job, out, timeout, what=f" ({script} {' '.join(args)})")

    def stop(self) -> None:
        """Cancel our jobs, then TERM (after 15 s KILL) each daemon's process group."""
        if self.jobs and "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                self.run("scancel", *self.jobs, timeout=10)
                end = time.monotonic() + 30
                while time.monotonic() < end and self.run("squeue", "-h", timeout=10).stdout.strip():
                    time.sleep(0.5)
            except subprocess.TimeoutExpired:
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue


@pytest.fixture(scope="module")
def slurm(request, tmp_path_factory) -> Cluster:
    cluster = Cluster(str(tmp_path_factory.mktemp("slurm")))
    request.addfinalizer(cluster.stop)      # registered first: runs even if start() fails
    cluster.start()
    return cluster


def example_present(module: str) -> bool:
    return os.path.exists(os.path.join(ROOT, *module.split(".")) + ".py")


def check_job(fields: dict, output: str, *success: str) -> None:
    info = f"job {fields.get('JobId')}: state {fields.get('JobState')}, exit {fields.get('ExitCode')}\n{output[-6000:]}"
    assert fields.get("JobState") == "COMPLETED" and fields.get("ExitCode") == "0:0", info
    assert re.search(r"^job \d+ on \S+: 4 ranks", output, re.M), info   # ran as a 4-task job
    if sys.prefix != sys.base_prefix:   # the script activated this virtualenv (HOPLITE_VENV)
        assert f"venv {sys.prefix}" in output, info
    for line in success:
        assert line in output, f"missing {line!r} in the output of {info}"


# --- static checks: run everywhere ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["async_sgd", "collectives", "durable", "wordcount"])
def test_jobscript_is_valid_bash_with_sbatch_lines(name):
    script = os.path.join(JOBSCRIPTS, f"{name}.sbatch")
    proc = subprocess.run(["bash", "-n", script], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    text = open(script).read()
    for opt in ("--job-name=", "--nodes=", "--ntasks=", "--time=", "--output="):
        assert re.search(rf"^#SBATCH {opt}", text, re.M), f"{name}.sbatch has no #SBATCH {opt}"
    assert '"$@"' in text and "srun --mpi=pmix" in text and "module load" in text
    if name == "durable":
        for line in ("#SBATCH --signal=B:USR1@", "#SBATCH --requeue", "#SBATCH --open-mode=append"):
            assert re.search(rf"^{line}", text, re.M), f"durable.sbatch has no {line}"
        assert "scontrol requeue" in text and "wait " in text


# --- under SLURM ---------------------------------------------------------------------------------

@needs_slurm
def test_collectives_sbatch(slurm):
    fields, out = slurm.submit(os.path.join("jobscripts", "collectives.sbatch"),
                               "--sizes", "1K,1M", "--stagger-sizes", "1M", "--iters", "2")
    check_job(fields, out, "collectives, hoplite_mpi vs MPI: 4 ranks", "hoplite_mpi phase:")


@needs_slurm
@pytest.mark.skipif(not example_present("hoplite_mpi.examples.wordcount"), reason="example not present")
def test_wordcount_sbatch(slurm):
    fields, out = slurm.submit(os.path.join("jobscripts", "wordcount.sbatch"), "--max-files", "50")
    check_job(fields, out, "wordcount: 50 files", "result matches the sequential collections.Counter")


@needs_slurm
@pytest.mark.skipif(not example_present("hoplite_mpi.examples.async_sgd"), reason="example not present")
def test_async_sgd_sbatch(slurm):
    fields, out = slurm.submit(os.path.join("jobscripts", "async_sgd.sbatch"), "--quick")
    check_job(fields, out, "async_sgd: 4 ranks (3 workers)", "hoplite / MPI: samples/s")


# --- durable workflows: drain, requeue, resume ---------------------------------------------------

DURABLE_WORKLOAD = os.path.join("tests", "mpi", "durable_workload.py")   # (from the repository root)


def _durable_space() -> str:
    base = tempfile.mkdtemp(prefix="hm-slurm-durable-",
                            dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    os.mkdir(os.path.join(base, "sidefx"))
    return base


def _check_durable_job(fields: dict, output: str, sidefx: str, root: str, result: str,
                       tasks: int, restarts: int, states: list) -> dict:
    """The checks common to the durable jobs (``states``: as seen while waiting); returns the
    executions."""
    info = (f"job {fields.get('JobId')}: state {fields.get('JobState')}, exit "
            f"{fields.get('ExitCode')}, restarts {fields.get('Restarts')}, states seen "
            f"{' '.join(states)}\n{output[-8000:]}")
    assert fields.get("JobState") == "COMPLETED" and fields.get("ExitCode") == "0:0", info
    assert fields.get("Restarts") == str(restarts), info
    starts = [m.start() for m in re.finditer(r"^restart (\d+)$", output, re.M)]
    assert re.findall(r"^restart (\d+)$", output, re.M) == [str(r) for r in range(restarts + 1)], info
    assert "Traceback" not in output, info
    # each allocation but the last drained and requeued
    for r in range(restarts):
        part = output[starts[r]:starts[r + 1]]
        assert "drained (" in part and f"durable.sbatch: drained (status 79): requeueing job " \
            f"{fields.get('JobId')} (restart {r + 1} of" in part, info
    assert "drained (" not in output[starts[-1]:], info

    got = json.load(open(result))
    assert [r[:2] for r in got["results"]] == got["reference"] and all(r[2] for r in got["results"])
    runs = executions(sidefx)      # (run = the allocation: SLURM_RESTART_COUNT)
    keys_of = collections.defaultdict(set)
    for i, key in runs:
        keys_of[i].add(key)
    assert set(keys_of) == set(range(tasks)), "a task never ran"
    assert all(len(k) == 1 for k in keys_of.values()), "a task's key changed between allocations"
    # drained allocations: every task that started finished and committed, none ran again
    twice = {i: where for (i, _), where in runs.items() if len(where) != 1}
    assert not twice, f"tasks executed more than once (task: allocations): {twice}"
    committed = S.committed_keys(root)
    assert {key for (_, key) in runs} == committed
    earlier = {key for (_, key), where in runs.items() if where[0] < restarts}
    assert earlier, "nothing ran before the last allocation"
    durable = got["durable"]
    assert durable["restored"] == durable["committed_at_start"] == len(earlier), durable
    assert durable["checkpointed"] == tasks - len(earlier) and durable["unkeyed"] == 0, durable
    return runs


@needs_slurm
def test_durable_sbatch_requeue(slurm):
    """jobscripts/durable.sbatch under SLURM: a workflow of slow checkpointed tasks; once some
    steps are committed, the batch shell gets SIGUSR1 (``scancel -b -s USR1``, as
    ``--signal=B:USR1@120`` would send it).  The job drains (exit 79), requeues itself, and the
    second allocation restores the committed steps and finishes: COMPLETED 0:0 with Restarts=1,
    the exact result, and no task executed twice (side-effect files)."""
    tasks = 80
    space = _durable_space()
    root, sidefx, result = (os.path.join(space, n) for n in ("st", "sidefx", "result.json"))
    try:
        submitted = time.time()
        job, out = slurm.sbatch(
            os.path.join("jobscripts", "durable.sbatch"), DURABLE_WORKLOAD, "--storage", root,
            "--sidefx", sidefx, "--seed", "5", "--tasks", str(tasks), "--json", result,
            sbatch_args=("-n", "3", "--overcommit"),
            env={"HOPLITE_MPI_STORAGE": root, "DURABLE_TASK_SECONDS": "0.15", "DURABLE_RUN": ""})
        deadline = time.monotonic() + 180
        while len(S.committed_keys(root)) < 8:
            state = slurm.job(job).get("JobState")
            if state in TERMINAL or time.monotonic() > deadline:
                slurm.run("scancel", job)
                pytest.fail(f"job {job}: fewer than 8 steps committed (state {state}):\n"
                            f"{tail(out)}\n{slurm.logs()}")
            time.sleep(0.1)
        before = S.committed_keys(root)
        sig = slurm.run("scancel", "-b", "-s", "USR1", job)
        assert sig.returncode == 0, sig.stderr
        seen: list = []
        fields, output = slurm.wait_job(job, out, timeout=300, seen=seen)
        runs = _check_durable_job(fields, output, sidefx, root, result, tasks, 1, seen)
        assert "durable.sbatch: SIGUSR1: asking the workflow to drain" in output, output[-8000:]
        assert "draining (SIGUSR1 to hoplite-mpi run)" in output, output[-8000:]
        first = {key for (_, key), where in runs.items() if where == [0]}
        assert before <= first and len(first) < tasks, (len(before), len(first))
        # each allocation's end time (from squeue on this SLURM 22.05): its start + --time=20
        ends = [int(e) for e in re.findall(r"^storage \S+; ends (\d+);", output, re.M)]
        assert len(ends) == 2 and all(submitted + 1195 <= e <= time.time() + 1205 for e in ends), \
            (ends, submitted, output[-8000:])
    finally:
        shutil.rmtree(space, ignore_errors=True)


@needs_slurm
def test_durable_sbatch_time_limit(slurm, request):
    """The real thing, slow (``--slurm-slow``): a 2-minute time limit and SLURM's own
    ``--signal=B:USR1@60`` (sent 60-120 s before the end); ~75 s of tasks on 2 workers.  Each
    allocation that runs out of time drains and requeues; the job ends COMPLETED 0:0 with the
    exact result, and no task was executed twice."""
    if not request.config.getoption("--slurm-slow"):
        pytest.skip("slow (2-minute time limits, ~4 min): run with --slurm-slow")
    tasks = 100
    space = _durable_space()
    root, sidefx, result = (os.path.join(space, n) for n in ("st", "sidefx", "result.json"))
    try:
        # HOPLITE_MPI_DRAIN_MARGIN 10 s: the signal, not the end time, makes rank 0 drain
        job, out = slurm.sbatch(
            os.path.join("jobscripts", "durable.sbatch"), DURABLE_WORKLOAD, "--storage", root,
            "--sidefx", sidefx, "--seed", "8", "--tasks", str(tasks), "--json", result,
            sbatch_args=("-n", "3", "--overcommit", "--time=2", "--signal=B:USR1@60"),
            env={"HOPLITE_MPI_STORAGE": root, "DURABLE_TASK_SECONDS": "1.5", "DURABLE_RUN": "",
                 "HOPLITE_MPI_DRAIN_MARGIN": "10"})
        seen: list = []
        fields, output = slurm.wait_job(job, out, timeout=900, seen=seen)
        assert fields.get("TimeLimit") == "00:02:00", fields
        restarts = int(fields.get("Restarts") or 0)
        assert restarts >= 1, f"never drained: states {seen}\n{output[-8000:]}"
        _check_durable_job(fields, output, sidefx, root, result, tasks, restarts, seen)
        assert "durable.sbatch: SIGUSR1: asking the workflow to drain" in output, output[-8000:]
    finally:
        shutil.rmtree(space, ignore_errors=True)

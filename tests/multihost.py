"""Simulated hosts for the multi-host tests: network namespaces joined by a bridge (tests/hosts/,
root needed), and the ``mpirun`` command line that runs one Open MPI job across them over TCP.

mpirun runs in the bridge's namespace (the "head") and starts one PRRTE daemon per host through
``tests/hosts/agent.sh`` (PRRTE's rsh agent); every rank talks TCP (``--mca btl self,tcp``),
ranks of one host share its network namespace (so the runtime's doorbells, abstract UNIX
sockets, reach only ranks of the same host).  Hosts are ``{PREFIX}-h1..``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "hosts", "hosts.sh")
AGENT = os.path.join(HERE, "hosts", "agent.sh")
PREFIX = os.environ.get("HM_NETNS_PREFIX", "hmt")
NET = os.environ.get("HM_NETNS_NET", "198.18.77")
BRIDGE_NS = f"{PREFIX}-br"


def host(k: int) -> str:
    """The name of simulated host ``k`` (1-based)."""
    return f"{PREFIX}-h{k}"


def unavailable() -> str:
    """Why simulated hosts cannot be made here ("" if they can)."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    for tool in ("ip", "unshare", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian: iproute2 / util-linux)"
    return ""


def hosts(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``tests/hosts/hosts.sh ARGS`` (up N, down, shape RATE, kill-host HOST, ...)."""
    env = dict(os.environ, HM_NETNS_PREFIX=PREFIX, HM_NETNS_NET=NET)
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def up(n: int) -> str:
    """Make hosts 1..n; returns "" or why it failed (e.g. a kernel without netns/veth)."""
    proc = hosts("up", str(n))
    if proc.returncode != 0:
        hosts("down")
        return f"hosts.sh up {n} failed: {proc.stderr.strip()[-500:]}"
    probe = subprocess.run(["ip", "netns", "exec", host(1), "ping", "-c", "1", "-W", "2", f"{NET}.10"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0 and shutil.which("ping") is not None:
        hosts("down")
        return f"{host(1)} cannot reach the head over the bridge: {probe.stdout[-300:]}{probe.stderr[-300:]}"
    return ""


def down() -> None:
    hosts("down")


def _options(placement: dict[str, int], map_by: str = "slot") -> list[str]:
    """mpirun's options for a job across the simulated hosts (besides -n and ULFM); ``map_by``
    "node" places ranks round robin over the hosts instead of filling them in turn."""
    spec = ",".join(f"{h}:{k}" for h, k in placement.items())
    return ["--host", spec, "--map-by", map_by, "--bind-to", "none", "--oversubscribe",
            "--allow-run-as-root",
            "--mca", "plm_rsh_agent", AGENT,
            "--prtemca", "oob_tcp_if_include", f"{NET}.0/24",
            "--mca", "pml", "ob1", "--mca", "btl", "self,tcp", "--mca", "btl_tcp_if_include", f"{NET}.0/24"]


def hoplite_run_command(placement: dict[str, int], program: list[str]) -> list[str]:
    """``hoplite-mpi run`` (as a user types it, with our hosts' options) across the simulated
    hosts: ``program`` is what follows ``run`` (``script.py args`` or ``-m module args``)."""
    extra = [f"--mpirun-arg={a}" for a in _options(placement) if a not in ("--oversubscribe", "--allow-run-as-root")]
    return ["ip", "netns", "exec", BRIDGE_NS, sys.executable, "-m", "hoplite_mpi.cli", "run",
            "-n", str(sum(placement.values())), *extra, *program]


def mpirun_command(placement: dict[str, int], program: list[str], ft: bool = True,
                   mpirun: str | None = None, map_by: str = "slot") -> list[str]:
    """``mpirun`` across simulated hosts: ``placement`` maps host name -> ranks there (ranks are
    numbered in that order: the first host gets rank 0).  ``program``: what each rank runs
    (e.g. ``[sys.executable, "-m", "hoplite_mpi", script]``)."""
    from hoplite_mpi.cli import find_mpirun

    mpirun = mpirun or find_mpirun()
    cmd = ["ip", "netns", "exec", BRIDGE_NS, mpirun, "-n", str(sum(placement.values())),
           *_options(placement, map_by)]
    if ft:
        cmd += ["--with-ft", "ulfm"]
    return cmd + program


def job_env(base: dict | None = None) -> dict:
    """The environment for a job across hosts: each host's daemon gets a TMPDIR of its own
    under a fresh directory (agent.sh; removed by the caller), not the suite's one-session-dir
    setting (PRRTE would put every host's session directory in the same place)."""
    from hoplite_mpi.cli import SESSION_DIR_VAR

    env = dict(base if base is not None else os.environ)
    env.pop(SESSION_DIR_VAR, None)
    env["HM_HOSTS_TMP"] = tempfile.mkdtemp(prefix="hm-hosts-")
    env["TMPDIR"] = os.path.join(env["HM_HOSTS_TMP"], "head")
    os.makedirs(env["TMPDIR"], exist_ok=True)
    env["PYTHONUNBUFFERED"] = "1"
    return env

"""A job script across a three-node SLURM cluster (issue 13): ``slurmctld`` in the simulated
hosts' head namespace and one ``slurmd`` per simulated host (network namespaces, tests/hosts/),
each node with its own address and hostname, all private to this module (its own slurm.conf,
munge key and socket, state in a temporary directory).  ``sbatch -N 3 -n 6
jobscripts/async_sgd.sbatch --quick`` must then span the three nodes: the script's
``hoplite-mpi run`` starts Open MPI's daemons on the other nodes through SLURM (``srun``) and the
ranks talk TCP between nodes.

Needs root, iproute2 and Debian's ``slurm-wlm`` + ``munge`` (``.ci/run`` installs them); skipped
otherwise.  Every subprocess has a timeout and every wait a deadline.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import multihost as M
from conftest import ROOT
from test_slurm import BIN, CMD_TIMEOUT, MISSING, Cluster, needs_slurm

pytestmark = [pytest.mark.multihost,
              pytest.mark.skipif(bool(M.unavailable()), reason=M.unavailable() or "-")]

NODES = 3


class NodesCluster(Cluster):
    """:class:`test_slurm.Cluster` spread over the simulated hosts: the controller in the head
    namespace (hostname ``{PREFIX}-head``), ``slurmd -N host`` in each host's namespace."""

    head = f"{M.PREFIX}-head"

    def in_ns(self, ns: str, hostname: str | None, cmd: list[str]) -> list[str]:
        if hostname is None:
            return ["ip", "netns", "exec", ns, *cmd]
        return ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c",
                'hostname "$0"; exec "$@"', hostname, *cmd]

    def write_conf(self) -> None:
        super().write_conf()
        text = open(self.conf).read()
        nodes = [M.host(k) for k in range(1, NODES + 1)]
        text = re.sub(r"^SlurmctldHost=.*$", f"SlurmctldHost={self.head}({M.NET}.10)", text, flags=re.M)
        text = re.sub(r"^SlurmctldPort=.*$", "SlurmctldPort=6817", text, flags=re.M)
        text = re.sub(r"^SlurmdPort=.*$", "SlurmdPort=6818", text, flags=re.M)
        text = re.sub(r"^SlurmdSpoolDir=.*$", f"SlurmdSpoolDir={self.path('spool')}-%n", text, flags=re.M)
        text = re.sub(r"^SlurmdPidFile=.*$", f"SlurmdPidFile={self.path('run', 'slurmd-%n.pid')}", text, flags=re.M)
        text = re.sub(r"^SlurmdLogFile=.*$", f"SlurmdLogFile={self.path('log', 'slurmd-%n.log')}", text, flags=re.M)
        text = re.sub(r"^NodeName=.*$", "\n".join(
            f"NodeName={h} NodeAddr={M.NET}.{10 + k} NodeHostname={h} CPUs=2 RealMemory=1000 State=UNKNOWN"
            for k, h in enumerate(nodes, 1)), text, flags=re.M)
        text = re.sub(r"^PartitionName=.*$", f"PartitionName=test Nodes={','.join(nodes)} Default=YES "
                      "MaxTime=INFINITE State=UP OverSubscribe=YES", text, flags=re.M)
        with open(self.conf, "w") as f:
            f.write(text)
        for h in nodes:
            os.makedirs(f"{self.path('spool')}-{h}", exist_ok=True)
        # several slurmd share one kernel: no cgroup autodetection in a namespace
        with open(self.path("cgroup.conf"), "w") as f:
            f.write("CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n")

    def run(self, *cmd: str, timeout: float = CMD_TIMEOUT, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.in_ns(M.BRIDGE_NS, None, [BIN.get(cmd[0], cmd[0]), *cmd[1:]]),
                              capture_output=True, text=True, env=self.env, timeout=timeout, **kw)

    def start(self) -> None:
        import time
        deadline = time.monotonic() + 90
        self.write_conf()
        key = self.path("munge", "munge.key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400), "wb") as f:
            f.write(os.urandom(1024))
        sock = self.path("run", "munge.sock")      # (a path: reachable from every namespace)
        self.spawn("munged", [BIN["munged"], "--foreground", "--force", f"--socket={sock}",
                              f"--key-file={key}", f"--pid-file={self.path('run', 'munged.pid')}",
                              f"--seed-file={self.path('munge', 'munged.seed')}"])
        self.wait_for("munged", lambda: os.path.exists(sock), deadline)
        self.spawn("slurmctld", self.in_ns(M.BRIDGE_NS, self.head,
                                           [BIN["slurmctld"], "-D", "-i", "-f", self.conf]))
        self.wait_for("slurmctld", lambda: "UP" in self.run("scontrol", "ping", timeout=10).stdout,
                      deadline)
        for k in range(1, NODES + 1):
            h = M.host(k)
            self.spawn(f"slurmd-{h}", self.in_ns(h, h, [BIN["slurmd"], "-D", "-N", h, "-f", self.conf]))
        self.wait_for("nodes idle", lambda: self.run("sinfo", "-h", "-N", "-o", "%t", timeout=10)
                      .stdout.split() == ["idle"] * NODES, deadline)

    def stop(self) -> None:
        """What :class:`Cluster` stops (jobs cancelled, controller, munged), then each node's
        slurmd (TERM, then KILL)."""
        import signal
        names = [n for n in self.procs if n.startswith("slurmd-")]
        super().stop()
        for n in names:
            proc = self.procs.pop(n, None)
            if proc is None:
                continue
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture(scope="module")
def nodes(request, tmp_path_factory):
    why = M.up(NODES)
    if why:
        pytest.skip(why)
    request.addfinalizer(M.down)
    cluster = NodesCluster(str(tmp_path_factory.mktemp("slurm-nodes")))
    request.addfinalizer(cluster.stop)
    cluster.start()
    return cluster


@needs_slurm
def test_async_sgd_sbatch_spans_three_nodes(nodes):
    fields, out = nodes.submit(os.path.join("jobscripts", "async_sgd.sbatch"), "--quick",
                               sbatch_args=("-N", str(NODES), "-n", "6", "--overcommit"))
    info = f"job {fields.get('JobId')}: state {fields.get('JobState')}, exit {fields.get('ExitCode')}\n{out[-6000:]}\n{nodes.logs()[-4000:]}"
    assert fields.get("JobState") == "COMPLETED" and fields.get("ExitCode") == "0:0", info
    assert re.search(rf"^job \d+ on {M.PREFIX}-h\[1-3\]: 6 ranks", out, re.M), info
    assert "async_sgd: 6 ranks (5 workers)" in out and "hoplite / MPI: samples/s" in out, info
    assert fields.get("NumNodes") == str(NODES), info

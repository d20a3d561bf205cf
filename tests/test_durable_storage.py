"""The storage format of durable workflows (hoplite_mpi/durable/storage.py): round trips,
zero-copy reads, atomic commits under SIGKILL, first commit wins, damage detected."""
from __future__ import annotations

import os
import random
import signal
import time

import numpy as np
import pytest

from hoplite_mpi import faults
from hoplite_mpi.durable import storage as S
from hoplite_mpi.serialization import deserialize, serialize

KEY = "0f" * 16


def _returns(values):
    return [serialize(v, "value") for v in values]


def test_round_trip_inline_npy_and_bin(tmp_path):
    root = S.open_root(str(tmp_path / "st"))
    big = np.arange(1 << 18, dtype=np.float32).reshape(512, 512)
    mixed = {"a": np.ones(1 << 16), "b": np.zeros(1 << 16, dtype=np.int8), "s": "text"}
    values = [42, big, mixed]
    ok, nbytes = S.commit(root, KEY, _returns(values), {"name": "t"}, values=values)
    assert ok and nbytes > big.nbytes
    assert S.committed_keys(root) == {KEY}
    got = S.load(root, KEY, verify=True)
    assert deserialize(got[0]) == 42
    arr = deserialize(got[1])
    assert np.array_equal(arr, big) and not arr.flags.writeable       # read-only memory map
    m = deserialize(got[2])
    assert np.array_equal(m["a"], mixed["a"]) and np.array_equal(m["b"], mixed["b"]) and m["s"] == "text"
    npy = [p for p in (tmp_path / "st" / "steps" / KEY[:2]).rglob("*.npy")]
    assert len(npy) == 1 and np.array_equal(np.load(npy[0], mmap_mode="r"), big)   # outside tools
    assert os.listdir(tmp_path / "st" / "tmp") == []


def test_the_first_commit_wins(tmp_path):
    root = S.open_root(str(tmp_path))
    assert S.commit(root, KEY, _returns([np.ones(1 << 17)]), {})[0]
    assert S.commit(root, KEY, _returns([np.zeros(1 << 17)]), {}) == (False, 0)
    assert deserialize(S.load(root, KEY)[0])[0] == 1.0
    assert len(list((tmp_path / "steps" / KEY[:2]).iterdir())) == 2   # manifest + one attempt dir


def test_an_uncommitted_key_loads_as_none_and_damage_is_detected(tmp_path):
    root = S.open_root(str(tmp_path))
    assert S.load(root, KEY) is None
    S.commit(root, KEY, _returns([b"x" * 1000, np.ones(1 << 17)]), {})
    path = S.manifest_path(root, KEY)
    data = bytearray(open(path, "rb").read())
    data[-10] ^= 0xFF                       # an inline frame's byte
    open(path, "wb").write(bytes(data))
    with pytest.raises(S.StorageError, match="crc32"):
        S.load(root, KEY)


def test_another_format_is_refused(tmp_path):
    (tmp_path / "hoplite-storage.json").write_text('{"format": 99}')
    with pytest.raises(S.StorageError, match="format 99"):
        S.open_root(str(tmp_path))


@pytest.mark.parametrize("seed", range(12))
def test_a_writer_killed_at_any_step_leaves_no_visible_partial_step(tmp_path, seed):
    """Fork a writer armed to SIGKILL itself at the N-th ``persist`` point (after a frame file;
    after the manifest is written, before the link); the step is then absent, and a later
    attempt commits it whole."""
    root = S.open_root(str(tmp_path))
    rng = random.Random(seed)
    values = [np.full(rng.choice((1 << 15, 1 << 17)), i, dtype=np.int64) for i in range(3)]
    files = sum(v.nbytes > S.FILE_FRAME for v in values)
    n = rng.randint(1, files + 1)           # files + 1: the manifest is written, not linked
    pid = os.fork()
    if pid == 0:                            # the writer
        try:
            faults.arm(0, f"0:persist:{n}")
            S.commit(root, KEY, _returns(values), {}, values=values)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert S.committed_keys(root) == set() and S.load(root, KEY) is None
    faults.arm(0, "")
    assert S.commit(root, KEY, _returns(values), {}, values=values)[0]
    got = S.load(root, KEY, verify=True)
    assert [int(deserialize(f)[0]) for f in got] == [0, 1, 2]


def test_crc_of_a_file_frame_is_checked_with_verify(tmp_path):
    root = S.open_root(str(tmp_path))
    S.commit(root, KEY, _returns([np.ones(1 << 17)]), {})
    f = next((tmp_path / "steps" / KEY[:2]).rglob("r0.f1.bin"))
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    S.load(root, KEY)                       # lazy: not read
    with pytest.raises(S.StorageError, match="crc32"):
        S.load(root, KEY, verify=True)


def test_storage_cli_ls_gc_rm_verify(tmp_path, capsys):
    """``hoplite-mpi storage``: gc keeps what the latest run used and what was committed since
    it started, removes older steps, orphan attempts and tmp files; rm --all empties it."""
    from hoplite_mpi.cli import main
    from hoplite_mpi.durable.workflow import Workflow
    root = str(tmp_path / "st")
    keys = {name: name * 32 for name in "abc"}
    run1 = Workflow(root)
    for k in ("a", "b"):
        S.commit(run1.root, keys[k], _returns([np.full(1 << 15, ord(k))]), {"name": f"step-{k}"})
        run1.used(keys[k])
    run1.close("ended")
    old = time.time() - 7200
    for k in ("a", "b"):
        os.utime(S.manifest_path(run1.root, keys[k]), (old, old))
    orphan = tmp_path / "st" / "steps" / "aa" / f"{keys['a']}.host-1-9"
    orphan.mkdir()
    (orphan / "r0.f1.bin").write_bytes(b"x")
    os.utime(orphan, (old, old))
    (tmp_path / "st" / "tmp" / "left.m.tmp").write_bytes(b"x")
    time.sleep(0.01)
    run2 = Workflow(root)
    assert run2.committed == {keys["a"], keys["b"]}
    S.commit(run2.root, keys["c"], _returns([np.ones(10)]), {"name": "step-c"})
    run2.used(keys["b"])
    run2.used(keys["c"])
    run2.close("ended")

    assert main(["storage", "ls", root, "--steps"]) == 0
    out = capsys.readouterr().out
    assert "3 step(s)" in out and out.count("run ") == 2 and "step-a" in out
    assert main(["storage", "gc", root, "--grace", "0", "--dry-run"]) == 0
    assert S.committed_keys(root) == set(keys.values())         # a dry run removes nothing
    assert main(["storage", "gc", root, "--grace", "0"]) == 0
    assert S.committed_keys(root) == {keys["b"], keys["c"]}
    assert not orphan.exists() and os.listdir(tmp_path / "st" / "tmp") == []
    assert len(os.listdir(tmp_path / "st" / "runs")) == 2       # run 1's record and keys went
    assert main(["storage", "verify", root]) == 0
    assert main(["storage", "rm", root, "--all"]) == 0
    assert S.committed_keys(root) == set()
    assert main(["storage", "ls", str(tmp_path)]) == 2          # not a storage directory


def test_gc_refuses_while_a_run_is_running(tmp_path):
    from hoplite_mpi.durable import admin
    from hoplite_mpi.durable.workflow import Workflow
    Workflow(str(tmp_path))                       # never closed: "running"
    with pytest.raises(RuntimeError, match="running"):
        admin.gc(str(tmp_path), grace=60)
    assert admin.gc(str(tmp_path), grace=60, force=True) == []


def test_the_persister_uses_the_sync_each_step_was_submitted_with(tmp_path, monkeypatch):
    """The driver's storage_sync travels with each checkpointed task (TaskSpec.durable): a
    worker's persister must fsync per step as told, not per its own Config (a script run by
    ``python -m hoplite_mpi`` calling ``hm.init(storage=D, storage_sync=False)`` fsynced anyway)."""
    from hoplite_mpi.durable.persister import Persister
    calls = []
    real = os.fsync
    monkeypatch.setattr(S.os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    root = S.open_root(str(tmp_path))
    p = Persister(lambda *a: None, sync=True)
    p.submit(1, root, "aa" + "0" * 30, _returns([7]), {}, None, sync=False)
    assert p.flush(10) and calls == []
    p.submit(2, root, "bb" + "0" * 30, _returns([8]), {}, None)      # None: the default (True)
    assert p.close(10) and len(calls) >= 2

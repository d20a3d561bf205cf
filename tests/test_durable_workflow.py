"""The driver's durable-workflow state (hoplite_mpi/durable/workflow.py), without MPI: keys by
lineage and occurrence, restores of committed steps, the commit bookkeeping a drain waits on,
run records."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from hoplite_mpi.durable import keys as K
from hoplite_mpi.durable import storage as S
from hoplite_mpi.durable.workflow import Workflow, attach
from hoplite_mpi.serialization import deserialize, serialize


class Ref:
    """Stands for an ObjectRef (the key pickler matches the type's name)."""

    def __init__(self, id):
        self.id = id


Ref.__name__ = Ref.__qualname__ = "ObjectRef"
FK = K.function_key(len)


def test_occurrences_and_lineage_make_the_same_keys_in_a_second_run(tmp_path):
    def run():
        wf = Workflow(str(tmp_path))
        a1 = wf.call_key(FK, (1,), {}, None)
        a2 = wf.call_key(FK, (1,), {}, None)          # the same call again: its own key
        wf.made(100, a1, 2)
        b = wf.call_key(FK, (Ref(101),), {"x": 1}, None)   # consumes a1's second return value
        wf.put(200, np.arange(5))
        c = wf.call_key(FK, (Ref(200),), {}, None)
        return a1, a2, b, c
    first, second = run(), run()
    assert first == second and len(set(first)) == 4
    wf = Workflow(str(tmp_path))
    with pytest.raises(K.UnstableKey):
        wf.call_key(FK, (Ref(999),), {}, None)         # a ref without a producer key


def test_named_steps_ignore_arguments_and_count_occurrences(tmp_path):
    wf = Workflow(str(tmp_path))
    assert wf.call_key(FK, (1,), {}, "s") == K.named_key("s", 0)
    assert wf.call_key(FK, (2,), {}, "s") == K.named_key("s", 1)


def test_restore_reads_committed_steps_and_logs_them(tmp_path):
    root = str(tmp_path)
    wf = Workflow(root)
    key = wf.call_key(FK, (1,), {}, None)
    assert wf.restore(key) is None                      # nothing committed before this run
    S.commit(wf.root, key, [serialize(np.ones(1 << 15), "v")], {"name": "n", "named": True})
    wf.close("ended")
    again = Workflow(root)
    frames = again.restore(key)
    assert np.array_equal(deserialize(frames[0]), np.ones(1 << 15))
    assert again.stats["restored"] == 1
    again.close("ended")
    with open(again._path(".keys")) as f:
        assert f.read().split() == [key]
    with open(again._path(".json")) as f:
        rec = json.load(f)
    assert rec["status"] == "ended" and rec["restored"] == 1 and rec["committed_at_start"] == 1


def test_a_drain_waits_for_commits_of_finished_checkpointed_tasks(tmp_path):
    wf = Workflow(str(tmp_path))
    wf.submitted(10)
    wf.submitted(20)
    wf.task_done(10, ok=True)
    wf.task_done(20, ok=False)          # an error result: nothing will be committed
    assert wf.unpersisted == {10} and not wf.running
    wf.persisted(10, "k", ok=True, committed=False)      # another attempt had committed it
    assert not wf.unpersisted and wf.stats["persist_dups"] == 1


def test_attach_keeps_one_directory(tmp_path):
    made = []
    wf = attach(None, str(tmp_path / "a"), True, made.append)
    assert made == [wf] and attach(wf, str(tmp_path / "a"), True, made.append) is wf
    with pytest.raises(ValueError, match="cannot change"):
        attach(wf, str(tmp_path / "b"), True, made.append)
    assert os.path.isfile(tmp_path / "a" / "hoplite-storage.json")


def test_a_second_loss_report_after_the_read_back_is_not_a_second_read_back(tmp_path):
    """Rank 0 reads a lost committed result back from storage once (Driver._reread): the
    ObjectLost that a second shard rank or a DirCheck sends after it is answered by the copy
    already here (a CI run counted two read-backs of one object)."""
    import types

    from hoplite_mpi import protocol as P
    from hoplite_mpi.roles.driver import Driver
    from hoplite_mpi.scheduler import TaskSpec

    root = S.open_root(str(tmp_path / "st"))
    key = "ab" + "0" * 62
    assert S.commit(root, key, [serialize(np.arange(7))], {})[0]
    kept, puts = {}, []

    def put(frames, oid):
        puts.append(oid)
        kept[oid] = frames
        return oid

    config = types.SimpleNamespace(tasks_per_worker=2, worker_deps=True, worker_threads=1)
    ctx = types.SimpleNamespace(config=config, shard_ranks=[1, 2], shards=[1, 2],
                                catalog=types.SimpleNamespace(put=put), store={},
                                workflow=Workflow(root))
    driver = Driver(ctx, [1, 2])
    task = TaskSpec(task_id=1000, num_returns=1, fn_id=b"f", fn_blob=None, args_blob=b"",
                    deps=(), owner=0, name="make", durable=(root, key, False, False))
    oid = task.return_ids[0]
    driver.scheduler.lineage[oid] = task
    for _ in range(3):
        driver.on_object_lost(1, P.ObjectLost(oid, 1))
    assert puts == [oid] and ctx.workflow.stats["reread"] == 1
    assert deserialize(kept[oid]).tolist() == list(range(7))

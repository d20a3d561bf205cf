"""ObjectStore and chunk_plan: pure, one process."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hoplite_mpi.serialization import deserialize, serialize
from hoplite_mpi.store import ObjectStore, chunk_plan


# --- chunk_plan -----------------------------------------------------------------------------

def test_chunk_plan_example():
    assert chunk_plan([10, 0, 3], 4) == [(0, 0, 4), (0, 4, 8), (0, 8, 10), (2, 0, 3)]


def test_chunk_plan_frame_exactly_one_chunk_and_empty_inputs():
    assert chunk_plan([4, 4], 4) == [(0, 0, 4), (1, 0, 4)]
    assert chunk_plan([], 4) == []
    assert chunk_plan([0, 0], 4) == []


def test_chunk_plan_rejects_zero_chunk_size():
    with pytest.raises(ValueError):
        chunk_plan([5], 0)


@settings(max_examples=200, deadline=None, database=None)
@given(sizes=st.lists(st.integers(min_value=0, max_value=1000), max_size=6),
       chunk=st.integers(min_value=1, max_value=400))
def test_chunk_plan_covers_every_byte_exactly_once(sizes, chunk):
    plan = chunk_plan(sizes, chunk)
    ends = [0] * len(sizes)  # per frame: bytes covered so far, in order, without gap or overlap
    for frame, start, stop in plan:
        assert start == ends[frame]
        assert 0 < stop - start <= chunk  # no empty chunk, none too long
        assert frame == 0 or ends[frame - 1] == sizes[frame - 1]  # frames in transfer order
        ends[frame] = stop
    assert ends == list(sizes)
    assert len(plan) == sum(-(-size // chunk) for size in sizes)


# --- ObjectStore ----------------------------------------------------------------------------

def test_put_stores_a_complete_entry_and_counts_bytes():
    store = ObjectStore()
    frames = [b"head", np.zeros(10, dtype=np.uint8), b""]
    entry = store.put(1, frames)
    assert 1 in store and len(store) == 1 and store.get(1) is entry
    assert entry.sizes == (4, 10, 0)
    assert entry.nbytes == entry.progress == 14
    assert entry.complete
    assert store.bytes_used == 14
    assert store.ids() == [1]


def test_put_of_a_present_id_keeps_the_existing_entry():
    store = ObjectStore()
    first = store.put(1, [b"abc"])
    again = store.put(1, [b"a much longer value"])
    assert again is first
    assert first.frames == [b"abc"]
    assert store.bytes_used == 3 and len(store) == 1


def test_put_completes_an_entry_still_being_received_in_place():
    # a pull whose sender died left an incomplete entry; the object is then made on this rank
    # (lineage re-run): the bytes go into the SAME buffers (a stream serving them from its
    # progress on keeps reading them) and whoever waited for completion is told
    store = ObjectStore()
    entry = store.allocate(9, [3, 5])
    view = memoryview(entry.frames[1])           # what a serving stream holds
    store.advance(9, 2)
    done = []
    entry.on_complete.append(done.append)
    value = np.arange(5, dtype=np.uint8) + 10
    got = store.put(9, [b"abc", value])
    assert got is entry and entry.complete
    assert bytes(entry.frames[0]) == b"abc" and bytes(view) == bytes(value)
    assert done == [entry]
    assert store.bytes_used == 8 and len(store) == 1


def test_put_of_other_sizes_over_an_incomplete_entry_replaces_it():
    store = ObjectStore()
    entry = store.allocate(9, [3, 5])
    done = []
    entry.on_complete.append(done.append)
    got = store.put(9, [b"a longer head", b"xy"])
    assert got is not entry and got.complete and store.get(9) is got
    assert got.frames == [b"a longer head", b"xy"] and done == [got]
    assert store.bytes_used == 15 and len(store) == 1


def test_allocate_creates_an_empty_receiving_entry():
    store = ObjectStore()
    entry = store.allocate(7, [5, 0, 3])
    assert entry.sizes == (5, 0, 3)
    assert [f.nbytes for f in entry.frames] == [5, 0, 3]
    assert all(f.dtype == np.uint8 for f in entry.frames)
    assert entry.progress == 0 and not entry.complete
    assert store.bytes_used == 8


def test_allocate_of_a_present_id_raises_and_leaves_the_store_unchanged():
    store = ObjectStore()
    entry = store.allocate(7, [5])
    store.advance(7, 2)
    with pytest.raises(KeyError):
        store.allocate(7, [100])
    assert store.get(7) is entry and entry.progress == 2
    assert store.bytes_used == 5 and len(store) == 1


def test_advance_counts_progress_and_runs_callbacks_once_on_completion():
    store = ObjectStore()
    entry = store.allocate(7, [5, 3])
    calls = []
    entry.on_complete.append(lambda e: calls.append(("a", e)))
    entry.on_complete.append(lambda e: calls.append(("b", e)))
    assert store.advance(7, 4) is False
    assert entry.progress == 4 and calls == []
    assert store.advance(7, 4) is True
    assert entry.progress == 8 and entry.complete
    assert calls == [("a", entry), ("b", entry)]
    assert entry.on_complete == []
    assert store.advance(7, 0) is True  # already complete: no second run
    assert len(calls) == 2


def test_advance_never_counts_past_the_object_size():
    store = ObjectStore()
    entry = store.allocate(7, [5])
    assert store.advance(7, 50) is True
    assert entry.progress == 5


def test_advance_of_an_unknown_id_raises_key_error():
    store = ObjectStore()
    with pytest.raises(KeyError):
        store.advance(99, 1)
    assert len(store) == 0 and store.bytes_used == 0


def test_empty_object_is_complete_at_once():
    store = ObjectStore()
    entry = store.allocate(3, [0])
    assert entry.complete
    assert store.advance(3, 0) is True


def test_delete_accounting():
    store = ObjectStore()
    store.put(1, [b"x" * 10])
    store.allocate(2, [20, 5])
    assert store.bytes_used == 35
    deleted = store.delete(2)
    assert deleted is not None and deleted.object_id == 2
    assert 2 not in store and store.get(2) is None
    assert store.bytes_used == 10 and len(store) == 1
    assert store.delete(2) is None  # twice: no change
    assert store.bytes_used == 10
    store.delete(1)
    assert store.bytes_used == 0 and len(store) == 0 and store.ids() == []


def test_delete_then_allocate_again_is_allowed():
    store = ObjectStore()
    store.put(1, [b"abc"])
    store.delete(1)
    entry = store.allocate(1, [3])
    assert entry.progress == 0 and store.bytes_used == 3


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_receiving_by_chunk_plan_rebuilds_the_value(chunk):
    value = {"a": np.arange(100, dtype=np.float64), "b": np.array([], dtype=np.int8), "c": "text"}
    source = ObjectStore().put(1, serialize(value))
    store = ObjectStore()
    entry = store.allocate(1, source.sizes)
    plan = chunk_plan(source.sizes, chunk)
    for i, (frame, start, stop) in enumerate(plan):
        entry.frames[frame][start:stop] = np.frombuffer(source.frames[frame], dtype=np.uint8)[start:stop]
        done = store.advance(1, stop - start)
        assert done is (i == len(plan) - 1)
    out = deserialize(entry.frames)
    np.testing.assert_array_equal(out["a"], value["a"])
    assert out["b"].size == 0 and out["c"] == "text"


def test_freed_receive_buffers_are_reused_only_when_nobody_else_holds_them():
    import numpy as np

    store = ObjectStore()
    size = ObjectStore.MIN_POOLED
    first = store.allocate(1, (16, size))
    store.advance(1, first.nbytes)
    store.delete(1)
    del first
    # a buffer still visible to someone (a value handed out, a transfer in flight) is not reused
    second = store.allocate(2, (16, size))
    view = np.frombuffer(memoryview(second.frames[1]).toreadonly(), np.uint8)
    store.delete(2)
    third = store.allocate(3, (16, size))
    assert not np.shares_memory(third.frames[1], view)
    # a buffer nobody holds is reused for an object of the same size
    buf = third.frames[1]
    addr = buf.__array_interface__["data"][0]
    del buf
    store.delete(3)
    fourth = store.allocate(4, (16, size))
    assert fourth.frames[1].__array_interface__["data"][0] == addr


def test_object_chunk_size_adaptive():
    from hoplite_mpi.store import ADAPTIVE_MAX, object_chunk_size, object_plan
    from hoplite_mpi.config import Config
    MiB = 1 << 20
    assert object_chunk_size((100, 16 * MiB), MiB, False) == MiB
    assert object_chunk_size((100, MiB), MiB, True) == MiB              # never below chunk_size
    assert object_chunk_size((100, 8 * MiB), MiB, True) == 4 * MiB      # 2**ceil(log2(S / 4))
    assert object_chunk_size((100, 16 * MiB), MiB, True) == 4 * MiB     # (at most ADAPTIVE_MAX)
    assert object_chunk_size((100, 6 * MiB), MiB, True) == 2 * MiB
    assert object_chunk_size((100, 1 << 30), MiB, True) == ADAPTIVE_MAX
    assert object_chunk_size((0,), 64, True) == 64
    cfg = Config(chunk_size=MiB, adaptive_chunks=True)
    assert object_plan((100, 16 * MiB), cfg) == chunk_plan((100, 16 * MiB), 4 * MiB)

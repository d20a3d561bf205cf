"""DirectoryShard state machine: feed messages, compare the emitted (rank, message) lists."""
from __future__ import annotations

from collections import Counter

import pytest

from hoplite_mpi.directory import DirectoryShard, shard_map
from hoplite_mpi.ids import IdGenerator, format_id, origin_rank, shard_of
from hoplite_mpi.protocol import (DirAdd, DirDelete, DirLookup, DirReply, DirSender, Free, ObjectInfo,
                                  ObjectLost, Pull)

X = 1001
Y = 1002


def info(holders=(1,), oid=X, sizes=(100, 4000), inline=None, error=False):
    return ObjectInfo(oid, sizes, tuple(holders), inline, error)


@pytest.fixture
def shard():
    return DirectoryShard(rank=0)


# --- lookup / add ---------------------------------------------------------------------------

def test_lookup_waits_until_add_then_replies_to_every_waiter(shard):
    assert shard.lookup(X, 3) == []
    assert shard.lookup(X, 4) == []
    assert shard.lookup(Y, 5) == []  # another object: not answered by X's add
    assert len(shard) == 0 and shard.info(X) is None
    i = info(holders=(1,))
    assert shard.add(i) == [(3, DirReply(X, i)), (4, DirReply(X, i))]
    assert len(shard) == 1 and shard.info(X) == i
    # the waiters were answered once: a second add answers nobody
    assert shard.add(info(holders=(1,))) == []


def test_lookup_of_a_known_object_is_answered_at_once(shard):
    i = info(holders=(2,), inline=(b"x",), sizes=(1,))
    assert shard.add(i) == []
    assert shard.lookup(X, 6) == [(6, DirReply(X, i))]
    assert shard.lookup(X, 6) == [(6, DirReply(X, i))]


def test_same_rank_waiting_twice_gets_two_replies(shard):
    shard.lookup(X, 3)
    shard.lookup(X, 3)
    i = info()
    assert shard.add(i) == [(3, DirReply(X, i)), (3, DirReply(X, i))]


def test_add_merges_holders_in_order_without_duplicates(shard):
    first = info(holders=(1,))
    shard.add(first)
    shard.add(info(holders=(2, 1)))
    shard.add(info(holders=(3,)))
    merged = info(holders=(1, 2, 3))
    assert shard.info(X) == merged
    assert shard.lookup(X, 9) == [(9, DirReply(X, merged))]
    assert len(shard) == 1


def test_add_merge_keeps_sizes_and_inline_of_the_first_registration(shard):
    shard.add(info(holders=(1,), sizes=(3,), inline=(b"abc",)))
    shard.add(info(holders=(2,), sizes=(3,), inline=None))
    assert shard.info(X) == info(holders=(1, 2), sizes=(3,), inline=(b"abc",))


def test_waiters_get_the_merged_info(shard):
    shard.add(info(holders=(1,)))
    shard.add(info(holders=(2,)))
    assert shard.lookup(X, 5) == [(5, DirReply(X, info(holders=(1, 2))))]


# --- delete ---------------------------------------------------------------------------------

def test_delete_answers_waiters_with_none(shard):
    shard.lookup(X, 3)
    shard.lookup(X, 4)
    assert shard.delete(X) == [(3, DirReply(X, None)), (4, DirReply(X, None))]
    assert len(shard) == 0


def test_delete_frees_every_holder(shard):
    shard.add(info(holders=(1,)))
    shard.add(info(holders=(2,)))
    assert shard.delete(X) == [(1, Free(X)), (2, Free(X))]
    assert shard.info(X) is None and len(shard) == 0


def test_lookup_after_delete_answers_none_at_once(shard):
    shard.add(info(holders=(1,)))
    shard.delete(X)
    assert shard.lookup(X, 7) == [(7, DirReply(X, None))]


def test_late_add_after_delete_frees_the_late_copy(shard):
    shard.add(info(holders=(1,)))
    shard.delete(X)
    assert shard.add(info(holders=(2, 3))) == [(2, Free(X)), (3, Free(X))]
    assert shard.info(X) is None and len(shard) == 0
    assert shard.lookup(X, 4) == [(4, DirReply(X, None))]


def test_delete_of_an_unknown_object_still_marks_it_deleted(shard):
    assert shard.delete(X) == []
    assert shard.add(info(holders=(5,))) == [(5, Free(X))]
    assert shard.lookup(X, 1) == [(1, DirReply(X, None))]


def test_delete_twice_frees_only_once(shard):
    shard.add(info(holders=(1,)))
    assert shard.delete(X) == [(1, Free(X))]
    assert shard.delete(X) == []


def test_delete_does_not_touch_other_objects(shard):
    shard.add(info(holders=(1,)))
    other = info(holders=(2,), oid=Y)
    shard.add(other)
    shard.delete(X)
    assert shard.lookup(Y, 3) == [(3, DirReply(Y, other))]
    assert len(shard) == 1


# --- remove_holder / handle -----------------------------------------------------------------

def test_remove_holder(shard):
    shard.add(info(holders=(1, 2, 3)))
    assert shard.remove_holder(X, 2) == []
    assert shard.info(X) == info(holders=(1, 3))
    assert shard.remove_holder(X, 9) == []  # not a holder: no change
    assert shard.remove_holder(Y, 1) == []  # unknown object: no error
    assert shard.info(X) == info(holders=(1, 3))


def test_handle_dispatches_directory_messages(shard):
    i = info(holders=(2,))
    assert shard.handle(3, DirLookup(X, 3)) == []
    assert shard.handle(2, DirAdd(i)) == [(3, DirReply(X, i))]
    assert shard.handle(4, DirLookup(X, 4)) == [(4, DirReply(X, i))]
    assert shard.handle(4, DirDelete(X)) == [(2, Free(X))]
    assert shard.handle(5, DirLookup(X, 5)) == [(5, DirReply(X, None))]


def test_handle_rejects_other_messages(shard):
    with pytest.raises(TypeError, match="not a directory message"):
        shard.handle(1, Pull(X, 16))


# --- shard_map and shard_of -----------------------------------------------------------------

def test_shard_map_one_shard_per_rank():
    assert shard_map(4) == [(0,), (1,), (2,), (3,)]
    assert shard_map(1) == [(0,)]


def test_shard_map_replication_wraps_around():
    assert shard_map(4, 3) == [(0, 1, 2), (1, 2, 3), (2, 3, 0), (3, 0, 1)]
    assert shard_map(3, 3) == [(0, 1, 2), (1, 2, 0), (2, 0, 1)]


@pytest.mark.parametrize("num_ranks, replication", [(5, 1), (5, 2), (7, 7), (16, 3)])
def test_shard_map_every_rank_holds_replication_shards(num_ranks, replication):
    shards = shard_map(num_ranks, replication)
    assert len(shards) == num_ranks
    assert all(len(set(ranks)) == replication for ranks in shards)
    assert all(0 <= r < num_ranks for ranks in shards for r in ranks)
    counts = Counter(r for ranks in shards for r in ranks)
    assert counts == {r: replication for r in range(num_ranks)}


@pytest.mark.parametrize("num_ranks, replication", [(4, 0), (4, 5), (4, -1), (0, 1)])
def test_shard_map_rejects_replication_out_of_range(num_ranks, replication):
    with pytest.raises(ValueError, match="replication"):
        shard_map(num_ranks, replication)


def test_ids_are_unique_across_ranks_and_consecutive_per_call():
    gens = [IdGenerator(rank) for rank in range(3)]
    ids = [g.next() for g in gens for _ in range(100)]
    assert len(set(ids)) == 300
    assert [origin_rank(i) for i in ids[::100]] == [0, 1, 2]
    first = gens[1].next(3)
    assert gens[1].next() == first + 3
    assert format_id(first) == f"1:{101}"


def test_shard_of_is_in_range_and_spreads_ids():
    ids = [IdGenerator(rank).next() for rank in range(4)] + [IdGenerator(0).next(1) + k for k in range(400)]
    for n in (1, 3, 8):
        shards = [shard_of(i, n) for i in ids]
        assert all(0 <= s < n for s in shards)
        assert set(shards) == set(range(n))  # every shard gets some of 404 ids


def test_automatic_free_keeps_no_lasting_tombstone():
    from hoplite_mpi import directory as d

    shard = DirectoryShard(rank=0)
    assert shard.delete(1, permanent=False) == []
    # a copy registered after the free (it raced the free) is freed at once
    assert shard.add(ObjectInfo(1, (10,), (3,))) == [(3, Free(1))]
    for oid in range(2, d.FREED_MEMORY + 3):
        shard.delete(oid, permanent=False)
    assert 1 not in shard._freed and len(shard._freed) == d.FREED_MEMORY   # bounded
    assert not shard._deleted
    # a permanent delete is remembered for ever
    shard.delete(10**9)
    assert shard.lookup(10**9, requester=2) == [(2, DirReply(10**9, None))]


# --- rank loss (issue 5) -----------------------------------------------------------------------

def test_rank_lost_drops_it_as_holder_and_reports_objects_left_without_a_copy(shard):
    shard.add(info(holders=(1, 2)))                           # X: a copy survives on 2
    shard.add(info(holders=(1,), oid=Y))                      # Y: its only copy was on 1
    shard.add(info(holders=(1,), oid=Y + 1, sizes=(3,), inline=(b"abc",)))   # inline: kept here
    assert shard.rank_lost(1) == [Y]
    assert shard.info(X).holders == (2,)
    assert shard.info(Y).holders == ()
    assert shard.info(Y + 1).inline == (b"abc",)
    assert shard.rank_lost(1) == []                     # idempotent


def test_after_rank_loss_pulls_wait_for_a_rebuilt_copy_and_are_answered_by_its_add(shard):
    shard.add(info(holders=(1,)))
    shard.rank_lost(1)
    assert shard.lookup(X, 3) == []                           # no copy: both wait
    assert shard.pull(X, 4) == []
    rebuilt = info(holders=(2,))
    assert shard.add(rebuilt) == [(3, DirReply(X, rebuilt)), (4, DirSender(X, rebuilt))]


def test_a_dead_sender_is_not_chosen_again_and_its_receivers_are_re_placed(shard):
    shard.add(info(holders=(1, 2)))
    assert shard.pull(X, 3) == [(3, DirSender(X, info(holders=(1,))))]   # tail of chain at 1
    assert shard.pull(X, 4) == [(4, DirSender(X, info(holders=(2,))))]
    shard.rank_lost(1)
    # receiver 3 lost its sender and asks again: it gets rank 2's chain tail (rank 4) or rank 2
    (dest, reply), = shard.pull(X, 3)
    assert dest == 3 and reply.info.holders[0] in (2, 4)
    # the dead rank's own pending requests are forgotten
    shard.add(info(holders=(5,), oid=Y))
    assert shard.lookup(Y + 7, 1) == [] and shard.rank_lost(1) == []
    assert shard.add(info(holders=(5,), oid=Y + 7)) == []


def test_a_receiver_asking_again_is_never_placed_on_a_rank_it_feeds(shard):
    # chain 1 -> 3 -> 4 (rank 1 holds X, 2 holds a copy that feeds 5); rank 1 dies: 3 asks
    # again while 4 still hangs on it.  The chain tail preference would pick 4 (feeds nobody)
    # over 2 (feeds 5): 3 <- 4 <- 3 would never progress.
    shard.add(info(holders=(1, 2)))
    assert shard.pull(X, 3)[0][1].info.holders == (1,)
    assert shard.pull(X, 5)[0][1].info.holders == (2,)
    assert shard.pull(X, 4)[0][1].info.holders == (3,)        # the tail of 1's chain
    shard.rank_lost(1)
    (dest, reply), = shard.pull(X, 3)
    assert dest == 3 and reply.info.holders in ((2,), (5,))
    # with no copy left at all, whatever order they ask again in, no two receivers wait on each
    # other, and the rebuilt copy reaches every one of them
    shard.rank_lost(2)
    answered = {}
    for rank in (5, 3, 4):
        for dest, reply in shard.pull(X, rank):
            answered[dest] = reply.info.holders[0]
    entry = shard._entries[X]
    for rank in entry.partial:
        assert not shard._fed_by(entry, rank, rank), entry.partial
    for dest, reply in shard.add(info(holders=(6,))):
        answered[dest] = reply.info.holders[0]
    feeds = dict(answered)
    for rank in (3, 4, 5):            # every chain now ends at the rebuilt copy
        seen = set()
        while rank != 6:
            assert rank not in seen, feeds
            seen.add(rank)
            rank = feeds[rank]


def test_readers_of_a_small_value_are_told_when_it_goes(shard):
    # (issue 10.11) ranks that got an inline value cache it; deleting or freeing it must reach them
    small = info(holders=(1,), inline=(b"v",))
    shard.add(small)
    shard.lookup(X, 3)
    shard.pull(X, 4)
    out = shard.delete(X, permanent=False)
    assert sorted(r for r, m in out if m == Free(X)) == [1, 3, 4]


def test_check_reports_an_object_whose_maker_died_before_registering_it(shard):
    # rank 0 had the TaskDone of X (made on 1) but the shard never got its DirAdd
    assert shard.check(X, 1) == []                       # 1 is not dead here yet
    assert shard.rank_lost(1) == [X]                     # ... now it is: lost
    assert shard.check(Y, 1) == [(0, ObjectLost(Y, 1))]  # already dead here: at once
    shard.add(info(holders=(2,), oid=Y + 1))
    assert shard.check(Y + 1, 2) == []                   # registered: rank_lost's business
    shard.delete(Y + 2)
    assert shard.check(Y + 2, 1) == []                   # deleted: nothing
    # (seed 51205) registered, its loss reported before rank 0 had the TaskDone: again
    shard.add(info(holders=(1,), oid=Y + 3))
    assert Y + 3 in shard.rank_lost(1)
    assert shard.check(Y + 3, 1) == [(0, ObjectLost(Y + 3, 1))]


def test_a_pull_for_a_dead_rank_is_ignored(shard):
    # (simulation seed 5022) rank 0 pulls for a broadcast target that died meanwhile: it must
    # not become a partial copy, named as the sender of later receivers for ever
    shard.add(info(holders=(0,)))
    shard.rank_lost(1)
    assert shard.pull(X, 1) == []
    assert shard.pull(X, 3) == [(3, DirSender(X, info(holders=(0,))))]


def _chain_crossings(shard, order, hosts):
    """Pull X for each rank of ``order``; the host crossings of the resulting sender -> receiver
    edges."""
    edges = []
    for r in order:
        (dest, reply), = shard.pull(X, r)
        edges.append((reply.info.holders[0], r))
    return edges, sum(hosts[a] != hosts[b] for a, b in edges)


def test_host_aware_senders_cross_each_host_link_once():
    # ranks 0, 1 on host A; 2, 3 on B; 4, 5 on C; rank 0 holds X; receivers ask interleaved
    hosts = ["A", "A", "B", "B", "C", "C"]
    order = [2, 1, 4, 3, 5]
    flat = DirectoryShard(rank=0)
    flat.add(info(holders=(0,)))
    _, crossings_flat = _chain_crossings(flat, order, hosts)
    aware = DirectoryShard(rank=0, hosts=hosts)
    aware.add(info(holders=(0,)))
    edges, crossings = _chain_crossings(aware, order, hosts)
    assert crossings == 2 and crossings_flat > crossings, (edges, crossings_flat)
    assert (0, 1) in edges and (2, 3) in edges and (4, 5) in edges   # each host's copy is local
    # one host only: the hosts are ignored (the same choice as without them)
    one = DirectoryShard(rank=0, hosts=["A"] * 6)
    one.add(info(holders=(0,)))
    assert one.hosts is None and _chain_crossings(one, order, ["A"] * 6)[0] == \
        _chain_crossings(_fresh(), order, ["A"] * 6)[0]


def _fresh():
    s = DirectoryShard(rank=0)
    s.add(info(holders=(0,)))
    return s

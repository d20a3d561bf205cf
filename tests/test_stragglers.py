"""The straggler rule (hoplite_mpi/roles/stragglers.py) without MPI."""
from hoplite_mpi.roles.stragglers import MIN_TASKS, Stragglers


def test_a_rank_much_slower_than_the_median_is_named_once():
    s = Stragglers()
    for _ in range(MIN_TASKS):
        for rank, t in ((1, 0.010), (2, 0.011), (3, 0.035)):
            s.note(b"f", f"f-w{rank}", rank, t)
        s.note(b"g", "g", 1, 0.5)              # one rank only: nothing to compare
    new = s.check()
    assert [(r["rank"], r["function"], r["tasks"]) for r in new] == [(3, "f-w3", MIN_TASKS)]
    assert 3.0 < new[0]["ratio"] < 3.5
    assert s.check() == [] and len(s.reports()) == 1


def test_too_few_tasks_or_a_small_gap_name_nobody():
    s = Stragglers()
    for rank, t in ((1, 0.0001), (2, 0.0001), (3, 0.0009)):    # 9x, but under 5 ms apart
        for _ in range(MIN_TASKS):
            s.note(b"f", "f", rank, t)
    s.note(b"h", "h", 1, 1.0)
    s.note(b"h", "h", 2, 9.0)                                   # one task each: too few
    assert s.check() == []

"""The doorbells that wake a sleeping progress engine (transport/doorbell.py), in one process."""
from __future__ import annotations

import sys
import threading
import uuid

import pytest

from hoplite_mpi.transport.doorbell import Doorbell, EventBell, make_bell

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract UNIX sockets are Linux-only")


@pytest.fixture
def bells():
    key = uuid.uuid4().hex[:8]
    made = [Doorbell(key, r, [0, 1, 2]) for r in range(3)]
    yield made
    for b in made:
        b.close()


@linux
def test_wait_times_out_without_a_ring(bells):
    assert bells[0].wait(0.01) is False


@linux
def test_ring_wakes_exactly_the_peer(bells):
    bells[0].ring(1)
    assert bells[1].wait(5.0) is True
    assert bells[2].wait(0.01) is False      # not rung
    assert bells[1].wait(0.01) is False      # drained: one ring, one wake-up


@linux
def test_many_rings_before_a_wait_are_one_wake_up(bells):
    for _ in range(10_000):                  # more than the socket buffer holds: never raises
        bells[0].ring(2)
    assert bells[2].wait(5.0) is True
    assert bells[2].wait(0.01) is False


@linux
def test_wake_from_another_thread_ends_the_wait(bells):
    t = threading.Thread(target=bells[0].wake)
    t.start()
    assert bells[0].wait(5.0) is True
    t.join(5)


@linux
def test_ringing_a_rank_on_another_host_or_gone_is_a_no_op(bells):
    bells[0].ring(7)                         # not a same-host peer
    lonely = Doorbell(uuid.uuid4().hex[:8], 0, [0, 1])
    lonely.ring(1)                           # peer 1 never bound its socket
    lonely.close()


@linux
def test_the_same_address_cannot_be_bound_twice(bells):
    key = uuid.uuid4().hex[:8]
    first = Doorbell(key, 0, [0])
    with pytest.raises(OSError):
        Doorbell(key, 0, [0])
    first.close()


def test_event_bell_fallback(monkeypatch):
    monkeypatch.setenv("HOPLITE_MPI_DOORBELL", "0")
    bell = make_bell("x", 0, [0, 1])
    assert isinstance(bell, EventBell)
    bell.ring(1)
    assert bell.wait(0.01) is False
    bell.wake()
    assert bell.wait(5.0) is True
    assert bell.wait(0.01) is False

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


@linux
def test_a_rank_on_another_host_is_rung_by_udp():
    """Two "hosts" (different job keys: their abstract sockets cannot reach each other), whose
    doorbells also listen on UDP (here on the loopback address)."""
    a = Doorbell(uuid.uuid4().hex[:8], 0, [0], udp_host="127.0.0.1")
    b = Doorbell(uuid.uuid4().hex[:8], 1, [1], udp_host="127.0.0.1")
    try:
        assert a.udp_address[0] == "127.0.0.1" and a.udp_address[1] > 0
        b.ring(0)                              # not known yet: nothing happens
        assert a.wait(0.01) is False
        a.add_remote({1: b.udp_address})
        b.add_remote({0: a.udp_address, 1: b.udp_address})   # (its own address is ignored)
        b.ring(0)
        assert a.wait(5.0) is True
        assert a.wait(0.01) is False           # drained
        for _ in range(10_000):                # a full UDP buffer never raises
            a.ring(1)
        assert b.wait(5.0) is True
        b.wake()                               # the UNIX socket still works next to it
        assert b.wait(5.0) is True
    finally:
        a.close()
        b.close()


@linux
def test_without_a_usable_address_there_is_no_udp_bell():
    bell = Doorbell(uuid.uuid4().hex[:8], 0, [0], udp_host="192.0.2.1")   # not an address here
    try:
        assert bell.udp_address is None
        bell.add_remote({1: ("127.0.0.1", 9)})
        bell.ring(1)                            # sends to a port nobody listens on: no error
        assert bell.wait(0.01) is False
    finally:
        bell.close()
    assert EventBell.udp_address is None and EventBell().add_remote({1: ("127.0.0.1", 9)}) is None

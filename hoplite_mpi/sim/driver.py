"""Non-blocking driver operations: what a simulated driver program yields to wait.

The driver program is a generator run by the simulator on rank 0 (whose runtime is the API's
runtime outside tasks).  It submits work through the public API calls that do not block
(``f.remote``, ``put``, ``delete``, ``reduce``/``allreduce``) and, where a real program would
block, yields one of these waitables (or a list of them); the simulator resumes it once every one
is :meth:`Waitable.poll`-done, sending back the list of their ``result`` values.
"""
from __future__ import annotations

import concurrent.futures as cf
from typing import Any, Optional

from ..objectref import ObjectRef
from ..values import value_of
from ..errors import HopliteError, ObjectDeletedError
from ..ids import format_id


class Waitable:
    """One blocking point; ``result`` is set once :meth:`poll` returned True."""

    result: Any = None

    def poll(self, sim: Any) -> bool:
        raise NotImplementedError


class Sleep(Waitable):
    """Resume once ``seconds`` of virtual time have passed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.until: Optional[float] = None

    def poll(self, sim: Any) -> bool:
        if self.until is None:
            self.until = sim.net.now + self.seconds
        return sim.net.now >= self.until


class Ready(Waitable):
    """Resume once every ref is done (``hm.wait`` with ``num_returns=len(refs)``)."""

    def __init__(self, refs: list[ObjectRef]) -> None:
        self.refs = refs

    def poll(self, sim: Any) -> bool:
        return all(r.done() for r in self.refs)


class Get(Waitable):
    """``hm.get(ref)``: ``result`` is ``("ok", value)`` or ``("error", exception)``."""

    def __init__(self, ref: ObjectRef) -> None:
        self.ref = ref
        self._asked = False
        self._got: Any = None
        self._arrived = False

    def poll(self, sim: Any) -> bool:
        if self.result is not None:
            return True
        rt, ref = sim.rt0, self.ref
        if rt.is_deleted(ref.id):
            self.result = ("error", ObjectDeletedError(format_id(ref.id)))
            return True
        if not ref.done():
            return False
        exc = cf.Future.exception(ref, 0)
        if exc is not None:
            self.result = ("error", exc)
            return True
        if not self._asked:
            got = rt.local_frames(ref.id)
            if got is None:
                self._asked = True
                rt.call_soon(rt.fetch, ref.id, self._set)
                return False
            self._set(got)
        if not self._arrived:
            return False
        try:
            self.result = ("ok", value_of(ref.id, self._got))
        except Exception as exc:   # (an error object, a deleted object, a failed transfer)
            self.result = ("error", exc)
        return True

    def _set(self, got: Any) -> None:
        self._got, self._arrived = got, True


class Broadcast(Waitable):
    """``hm.broadcast(ref, ranks)``: ``result`` is None (done) or the exception it raises."""

    def __init__(self, sim: Any, ref: ObjectRef, ranks: list[int]) -> None:
        self.ref = ref
        self.errors: Optional[dict] = None
        rt = sim.rt0
        rt.call_soon(rt.start_broadcast, ref.id, list(ranks), self._done)
        self.finished = False

    def _done(self, errors: dict) -> None:
        self.errors = errors

    def poll(self, sim: Any) -> bool:
        if self.finished:
            return True
        if self.errors is None:
            return False
        if not self.errors and not self.ref.done():   # (as api.broadcast: wait for the ref too)
            return False
        self.finished = True
        if self.errors:
            if all(e == "deleted" for e in self.errors.values()):
                self.result = ObjectDeletedError(self.ref.hex())
            else:
                self.result = HopliteError(f"broadcast of {self.ref.hex()} failed on ranks {self.errors}")
        else:
            self.result = cf.Future.exception(self.ref, 0)
        return True

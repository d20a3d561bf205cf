"""Durable keys: the identity of a task across runs of a program (issue 14).

A task's key is SHA-256 over (schema, the function's key, the digest of its arguments, its
occurrence number), 32 hex digits.  Nothing of it comes from a run: ids, addresses, hash seeds
and the path the script was started by do not enter it, so running the same program again
computes the same keys (tests/test_durable_keys.py runs it in two processes with different
``PYTHONHASHSEED``).

- The **function key** of an importable function is its module, qualified name and code
  fingerprint; of a ``__main__`` function or a lambda, its qualified name, code fingerprint,
  defaults, closure and the globals it refers to (modules by name, functions by their own key,
  other values by digest).  The fingerprint covers the bytecode, constants, names and flags but
  not the file name or line numbers, so moving a function or running the script by another path
  keeps keys; editing its body changes them.  ``version=`` replaces the fingerprint (a refactor
  that keeps the results valid).  Editing a *callee* or an imported library does not change
  keys: use ``version=``.
- The **argument digest** comes from a pickler without memo (aliasing does not matter), sets
  hashed in sorted order, numpy arrays as (dtype, shape, SHA-256 of the data), functions and
  classes by key, and an ObjectRef as its producer's key (lineage): the key of the task that made
  it (``#i`` for its i-th return) or of the ``put`` value.
- The **occurrence** counts earlier submissions of the same (function, arguments) in the run:
  ``f(1)`` submitted twice gets two keys, both stable.

Values without a stable digest (locks, sockets, generators, an ObjectRef without a key) raise
:class:`UnstableKey`; the caller then runs the task without a checkpoint (and warns).
"""
from __future__ import annotations

import functools
import hashlib
import pickle
import sys
import types
from typing import Any, Callable, Optional

SCHEMA = b"hm-key-1"


class UnstableKey(Exception):
    """A value has no digest that is the same in every run (the message says which)."""


def _h(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.digest()


class _Sink:
    """A file-like object for the pickler that hashes what it is given."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def write(self, b: Any) -> int:
        self.h.update(b)
        return len(b)


_UNSTABLE = ("_thread.lock", "_thread.RLock", "socket", "generator", "coroutine", "_io.",
             "frame", "threading.", "multiprocessing.")


class _KeyPickler(pickle.Pickler):
    """Pickle protocol 5 into a hash, without memo; see the module docstring for what is hashed
    other than pickle's own bytes."""

    def __init__(self, sink: Any, ref_key: Optional[Callable[[Any], str]], seen: set) -> None:
        super().__init__(sink, protocol=5)
        self.fast = True               # no memo: f(s, s) and f(s, copy(s)) hash alike
        self.ref_key = ref_key
        self.seen = seen

    def persistent_id(self, obj: Any) -> Any:      # noqa: C901 (one dispatch on the type)
        t = type(obj)
        if t in (int, float, str, bytes, bool, type(None), tuple, list, dict):
            return None
        name = getattr(t, "__module__", "") + "." + getattr(t, "__qualname__", "")
        if t.__name__ == "ObjectRef" and hasattr(obj, "id"):
            if self.ref_key is None:
                raise UnstableKey("an ObjectRef (no lineage known here)")
            return ("ref", self.ref_key(obj))
        if t.__name__ == "RemoteFunction" and hasattr(obj, "__wrapped__"):
            # (its own state holds a cloudpickle blob, which names the script's path)
            options = getattr(obj, "_options", {})
            return ("remote", function_key(obj.__wrapped__, options.get("version"), self.seen),
                    sorted((k, repr(v)) for k, v in options.items()))
        if t in (set, frozenset):
            return ("set", t.__name__, sorted(value_digest(e, self.ref_key, self.seen) for e in obj))
        if isinstance(obj, (types.FunctionType, functools.partial, types.MethodType,
                            types.BuiltinFunctionType)):
            return ("fn", function_key(obj, seen=self.seen))
        if isinstance(obj, type):
            return ("cls", class_key(obj))
        if isinstance(obj, types.ModuleType):
            return ("mod", obj.__name__)
        if isinstance(obj, types.CodeType):
            return ("code", code_fingerprint(obj))
        np = sys.modules.get("numpy")
        if np is not None:
            if isinstance(obj, np.ndarray) and obj.dtype != object:
                return ("nd", obj.dtype.str, obj.shape, *_array_digest(np, obj))
            if isinstance(obj, np.generic):
                return ("np", obj.dtype.str, obj.tobytes())
        if name.startswith(_UNSTABLE):
            raise UnstableKey(f"a {name} object")
        return None


def _array_digest(np: Any, a: Any) -> tuple[str, bytes]:
    """(memory order, SHA-256 of the data in that order) of an array, without a copy when it
    is contiguous."""
    if a.flags.c_contiguous:
        order, data = "C", a
    elif a.flags.f_contiguous:
        order, data = "F", a.T
    else:
        order, data = "C", np.ascontiguousarray(a)
    try:
        view: Any = memoryview(data).cast("B")
    except (TypeError, ValueError):      # (dtypes the buffer protocol lacks, e.g. datetime64)
        view = data.tobytes()
    return order, hashlib.sha256(view).digest()


def value_digest(value: Any, ref_key: Optional[Callable[[Any], str]] = None,
                 seen: Optional[set] = None) -> bytes:
    """SHA-256 digest (32 bytes) of ``value`` that is the same in every process for equal
    values (see the module docstring); ``ref_key(ref)`` gives an ObjectRef's producer key.

    Raises UnstableKey: a part of ``value`` has no stable digest (the message names its type).
    """
    sink = _Sink()
    try:
        _KeyPickler(sink, ref_key, set() if seen is None else seen).dump(value)
    except UnstableKey:
        raise
    except RecursionError:
        raise UnstableKey("a self-referencing value") from None
    except ValueError as exc:     # fast mode: a cycle
        if "cyclic" not in str(exc) and "recursive" not in str(exc):
            raise UnstableKey(f"{type(value).__name__}: {exc}") from None
        raise UnstableKey("a self-referencing value") from None
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise UnstableKey(f"{type(value).__name__}: {exc}") from None
    return sink.h.digest()


def code_fingerprint(code: types.CodeType) -> bytes:
    """Digest of what a code object does: bytecode, constants (nested code recursively), names,
    argument counts, flags.  Not the file name, first line or line table, and never
    ``hash(code)`` (salted per process)."""
    parts = [code.co_code, getattr(code, "co_exceptiontable", b""),
             repr((code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars,
                   code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount,
                   code.co_flags)).encode()]
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            parts.append(b"c" + code_fingerprint(const))
        else:
            parts.append(b"k" + value_digest(const))
    return _h(*parts)


def _referenced_names(code: types.CodeType) -> list[str]:
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.extend(_referenced_names(const))
    return sorted(set(names))


def _importable(obj: Any) -> bool:
    """``obj`` is reachable as ``module.qualname`` of an imported module other than __main__."""
    module = getattr(obj, "__module__", None)
    if not module or module == "__main__" or module not in sys.modules:
        return False
    target: Any = sys.modules[module]
    for part in getattr(obj, "__qualname__", "<").split("."):
        target = getattr(target, part, None)
        if target is None:
            return False
    return target is obj


def class_key(cls: type) -> bytes:
    """A class: by module and qualified name (a __main__ class by its qualified name only)."""
    module = cls.__module__ if _importable(cls) else "__main__"
    return _h(b"cls", module.encode(), cls.__qualname__.encode())


def function_key(fn: Callable, version: Optional[str] = None, seen: Optional[set] = None) -> bytes:
    """The key (32-byte digest) of a callable; see the module docstring.  ``version``, if given,
    stands for the code.  Raises UnstableKey for a callable it cannot identify."""
    seen = set() if seen is None else seen
    if isinstance(fn, functools.partial):
        return _h(b"partial", function_key(fn.func, version, seen),
                  value_digest((fn.args, sorted(fn.keywords.items())), None, seen))
    if isinstance(fn, types.MethodType):
        return _h(b"method", function_key(fn.__func__, version, seen), value_digest(fn.__self__, None, seen))
    if isinstance(fn, types.BuiltinFunctionType) or not isinstance(fn, types.FunctionType):
        if isinstance(fn, (types.BuiltinFunctionType, type)) or _importable(fn):
            return _h(b"named", str(getattr(fn, "__module__", "")).encode(),
                      str(getattr(fn, "__qualname__", fn)).encode(), (version or "").encode())
        call = getattr(type(fn), "__call__", None)
        if call is None:
            raise UnstableKey(f"{fn!r} is not a function")
        return _h(b"callable", class_key(type(fn)), function_key(call, version, seen),
                  value_digest(fn, None, seen))
    body = ("v:" + version).encode() if version is not None else code_fingerprint(fn.__code__)
    qual = fn.__qualname__.encode()
    if _importable(fn):
        return _h(b"ref", fn.__module__.encode(), qual, body)
    if id(fn) in seen:                 # (a recursive function: its name is enough here)
        return _h(b"rec", qual)
    seen.add(id(fn))
    try:
        parts = [b"dyn", qual, body, _stable_or_opaque(fn.__defaults__, seen),
                 _stable_or_opaque(fn.__kwdefaults__, seen)]
        for cell in fn.__closure__ or ():
            try:
                parts.append(_stable_or_opaque(cell.cell_contents, seen))
            except ValueError:         # an empty cell
                parts.append(b"empty")
        if version is None:
            g = fn.__globals__
            for name in _referenced_names(fn.__code__):
                if name in g:
                    parts.append(name.encode() + b"=" + _stable_or_opaque(g[name], seen))
        return _h(*parts)
    finally:
        seen.discard(id(fn))


def _stable_or_opaque(value: Any, seen: set) -> bytes:
    """A value a function refers to: its digest, or (a lock, a logger...) its type's name only."""
    try:
        return value_digest(value, None, seen)
    except UnstableKey:
        t = type(value)
        return _h(b"opaque", t.__module__.encode(), t.__qualname__.encode())


def task_key(fn_key: bytes, args_digest: bytes, occurrence: int) -> str:
    """The key of the ``occurrence``-th submission of a call: 32 hex digits."""
    return _h(SCHEMA, b"task", fn_key, args_digest, str(occurrence).encode()).hex()[:32]


def call_digest(fn_key: bytes, args_digest: bytes) -> bytes:
    """What identifies a call before its occurrence number is known."""
    return _h(SCHEMA, b"call", fn_key, args_digest)


def named_key(name: str, occurrence: int) -> str:
    """The key of a step named by the user (``.options(name=..., checkpoint=True)``): the
    function and arguments do not enter it (the user asserts the step's identity)."""
    return _h(SCHEMA, b"name", name.encode(), str(occurrence).encode()).hex()[:32]


def output_key(key: str, index: int) -> str:
    """The key of a task's ``index``-th return value."""
    return f"{key}#{index}"


def put_key(digest: bytes) -> str:
    """The key of a ``put`` value with ``value_digest`` ``digest``."""
    return "put:" + _h(SCHEMA, b"put", digest).hex()[:32]


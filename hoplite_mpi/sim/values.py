"""Test values built from small specs, and their comparison: shared by the real-MPI
random-workload tester (tests/mpi/random_workload.py) and the simulation (:mod:`hoplite_mpi.sim`).

A spec (a tuple of plain values) stands for a value that :func:`build` makes the same on every
rank; :func:`apply` is what an ``apply`` task computes (run remotely, and sequentially by the
reference); :func:`compare` checks a result against the reference exactly (types, dtypes, shapes,
bytes) and raises :class:`Mismatch`.
"""
from __future__ import annotations

import hashlib

import numpy as np

from ..api import ObjectRef

# ==== values: built from a spec, deterministically, on any rank ==================================

INT_DTYPES = ["i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", ">i4", ">u2"]
FLOAT_DTYPES = ["f2", "f4", "f8", "g", ">f8"]
COMPLEX_DTYPES = ["c8", "c16", "G"]
OTHER_DTYPES = ["?", "S5", "U3", "M8[s]", "m8[ms]", "V6", "O",
                [("a", "<i4"), ("b", "<f8"), ("c", "S3")],
                [("x", ">u2"), ("y", "?", (2,))]]
REDUCIBLE = INT_DTYPES + FLOAT_DTYPES + COMPLEX_DTYPES + ["?"]


def _dtype(d):
    return np.dtype([tuple(f) for f in d]) if isinstance(d, list) else np.dtype(d)


def _array(dtype, n, seed, prod_safe=False):
    """A 1-d array of ``n`` elements of ``dtype`` with small exact values."""
    dt = _dtype(dtype)
    g = np.random.default_rng(seed)
    k = dt.kind
    if k in "iu":
        lo = 0 if k == "u" else -3
        return g.integers(lo, 4, size=n).astype(dt)
    if k == "f":
        vals = [-1.0, 1.0, 2.0, 0.5] if prod_safe else [-3, -2, -1, 0, 1, 2, 3]
        return np.asarray(g.choice(vals, size=n)).astype(dt)
    if k == "c":
        vals = [1, -1, 2, 0.5] if prod_safe else [-2, -1, 0, 1, 2]
        re, im = g.choice(vals, size=n), g.choice([0, 1, -1] if not prod_safe else [0], size=n)
        return (re + 1j * im).astype(dt)
    if k == "b":
        return g.integers(0, 2, size=n).astype(bool)
    if k == "O":
        return np.array([int(v) for v in g.integers(-9, 9, size=n)] if n else [], dtype=object)
    raw = g.integers(0, 256, size=n * dt.itemsize, dtype=np.uint8)
    if k in "SV" or dt.fields:
        if k == "S":
            raw = g.integers(97, 123, size=n * dt.itemsize, dtype=np.uint8)
        arr = raw.view(dt) if n else np.empty(0, dt)
        if dt.fields:   # no NaN payloads in float fields: keep them exact and comparable
            for name in dt.names:
                if _dtype(dt.fields[name][0]).kind == "f":
                    arr[name] = g.integers(-5, 5, size=(n,) + dt.fields[name][0].shape)
        return arr
    if k == "U":
        return np.array(["".join(chr(97 + int(c)) for c in g.integers(0, 26, size=3)) for _ in range(n)],
                        dtype=dt)
    if k in "Mm":
        return g.integers(0, 10**9, size=n).astype(np.int64).view(dt)
    raise ValueError(f"dtype {dt}")


def build(spec):
    """The value a spec stands for (the same on every rank)."""
    kind = spec[0]
    if kind == "lit":
        return spec[1]
    if kind == "bytes":
        return bytes(np.random.default_rng(spec[1]).integers(0, 256, size=spec[2], dtype=np.uint8))
    if kind == "str":
        g = np.random.default_rng(spec[1])
        return "".join(chr(int(c)) for c in g.choice([97, 98, 0xE9, 0x3B1, 0x1F600], size=spec[2]))
    if kind == "list":
        return [build(s) for s in spec[1]]
    if kind == "tuple":
        return tuple(build(s) for s in spec[1])
    if kind == "dict":
        return {k: build(s) for k, s in spec[1]}
    if kind == "npscalar":
        return _array(spec[1], 1, spec[2])[0]
    if kind == "nd":
        _, dtype, shape, order, seed, view, prod_safe = spec
        n = int(np.prod(shape))
        a = _array(dtype, n, seed, prod_safe).reshape(shape, order=order)
        if order == "F":
            a = np.asfortranarray(a)
        if view == "step" and a.ndim:
            a = a[::2]
        elif view == "rev" and a.ndim:
            a = a[::-1]
        elif view == "T":
            a = a.T
        elif view == "col" and a.ndim == 2:
            a = a[:, 1:]
        return a
    raise ValueError(f"spec {spec!r}")


# ==== what tasks do: the same function on the worker and in the reference ======================

class Boom(Exception):
    """A user exception defined in this module (raised by tasks)."""


EXCEPTIONS = {"KeyError": KeyError, "ValueError": ValueError, "ZeroDivisionError": ZeroDivisionError,
              "Boom": Boom, "RuntimeError": RuntimeError}


def canon(x, h):
    """Feed a canonical encoding of ``x`` into hash ``h`` (arrays: dtype, shape, bytes)."""
    if isinstance(x, np.ndarray):
        # byte order is not compared: numpy's own pickling of a non-contiguous non-native-order
        # array gives a native-order one (all pickle protocols), so values are what counts
        if x.dtype.kind != "O" and not x.dtype.isnative:
            x = x.astype(x.dtype.newbyteorder("="))
        if x.dtype.kind in "fc":
            # -0.0 == 0.0: the sign of a zero product depends on the reduce's (arrival) order
            x = x + x.dtype.type(0)
        h.update(b"nd" + x.dtype.str.encode() + repr(x.dtype.descr).encode() + repr(x.shape).encode())
        if x.dtype.kind == "O" or (x.dtype.kind in "fc" and x.dtype.itemsize > 8 and not x.dtype.fields):
            # objects; long doubles (x87: 10 of their 16 bytes are the value, the rest padding)
            for v in (x.ravel() if x.dtype.kind == "O" else x.ravel().tolist()):
                canon(v, h)
        else:
            h.update(np.ascontiguousarray(x).tobytes())
    elif isinstance(x, (list, tuple)):
        h.update(type(x).__name__.encode() + str(len(x)).encode())
        for v in x:
            canon(v, h)
    elif isinstance(x, dict):
        h.update(b"dict" + str(len(x)).encode())
        for k, v in x.items():
            canon(k, h)
            canon(v, h)
    elif isinstance(x, ObjectRef):
        h.update(b"ref" + x.hex().encode())
    elif isinstance(x, NodeRef):          # the reference's stand-in for a nested ref
        h.update(b"ref" + x.hex.encode())
    else:
        h.update(type(x).__name__.encode() + repr(x).encode())


def digest(x):
    h = hashlib.sha256()
    canon(x, h)
    return h.hexdigest()[:16]


def apply(fname, args):
    """The plain function of an ``apply`` task."""
    if fname == "id":
        return args[0]
    if fname == "view":
        x = args[0]
        if isinstance(x, np.ndarray) and x.ndim >= 1:
            return x[::2] if x.ndim == 1 else x.T[1:]
        return x
    if fname == "add1":
        x = args[0]
        if isinstance(x, np.ndarray) and x.dtype.kind in "iufc" and x.dtype.kind != "O":
            return x + x.dtype.type(1)
        if isinstance(x, (bytes, str)):
            return x[::-1]
        if isinstance(x, (int, float, complex)) and not isinstance(x, bool):
            return x * 3 + 1
        return ("wrapped", x)
    if fname == "pair":
        return tuple(args)
    if fname == "digest":
        return digest(args[0])
    if fname == "rank_digest":
        return digest(args[0])
    raise ValueError(fname)


class NodeRef:
    """In a reference value: the ref of node ``i`` (a ref nested in a container)."""
    __slots__ = ("i", "hex")

    def __init__(self, i, hex_):
        self.i, self.hex = i, hex_


class Mismatch(Exception):
    pass


def compare(got, want, nodes, path="value"):
    """Raise Mismatch if ``got`` is not ``want`` (types, dtypes, shapes and bytes exactly)."""
    if isinstance(want, NodeRef):
        if not isinstance(got, ObjectRef) or got.id != nodes[want.i].ref_id:
            raise Mismatch(f"{path}: expected the ref of node {want.i}, got {got!r}")
        return
    if type(got) is not type(want):
        raise Mismatch(f"{path}: type {type(got).__name__} != {type(want).__name__} ({got!r:.80} vs {want!r:.80})")
    if isinstance(want, np.ndarray):
        if (got.dtype.newbyteorder("=") != want.dtype.newbyteorder("=") or got.shape != want.shape):
            raise Mismatch(f"{path}: array {got.dtype}{got.shape} != {want.dtype}{want.shape}")
        if digest(got) != digest(want):
            bad = "?"
            if want.dtype.kind in "iufcb" and want.size:
                idx = np.flatnonzero(np.ascontiguousarray(got).ravel() != np.ascontiguousarray(want).ravel())
                bad = f"{idx.size} of {want.size} elements differ, first at {idx[:5]}"
            raise Mismatch(f"{path}: array values differ ({want.dtype}{want.shape}, "
                           f"C={got.flags.c_contiguous}/{want.flags.c_contiguous} "
                           f"F={got.flags.f_contiguous}/{want.flags.f_contiguous}): {bad}")
    elif isinstance(want, (list, tuple)):
        if len(got) != len(want):
            raise Mismatch(f"{path}: length {len(got)} != {len(want)}")
        for k, (g, w) in enumerate(zip(got, want)):
            compare(g, w, nodes, f"{path}[{k}]")
    elif isinstance(want, dict):
        if list(got) != list(want):
            raise Mismatch(f"{path}: keys {list(got)} != {list(want)}")
        for k in want:
            compare(got[k], want[k], nodes, f"{path}[{k!r}]")
    elif isinstance(want, np.generic):
        if digest(got) != digest(want):
            raise Mismatch(f"{path}: {got!r} != {want!r}")
    elif got != want and not (isinstance(want, float) and np.isnan(want) and np.isnan(got)):
        raise Mismatch(f"{path}: {got!r:.200} != {want!r:.200}")


def size_choices(cfg):
    """Byte sizes around the inline threshold and the chunk size (odd ones included)."""
    t, c = cfg.inline_threshold, cfg.chunk_size
    return ([0, 1, 7, 100, 4093] + [t + d for d in (-600, -200, -9, -1, 0, 1, 8, 300)]
            + [t // 4 + d for d in (-1, 1)]
            + [c + d for d in (-513, -1, 0, 1, 4097)] + [2 * c + 3, 3 * c - 7])


class Specs:
    """Random value specs (see :func:`build`), drawn from ``rng``: arrays of every dtype, shape,
    order and view, literals, bytes and str around ``cfg``'s inline threshold and chunk size,
    numpy scalars, nested containers.  ``seed``: the first value seed (each spec gets the next).
    ``max_bytes``: the largest array size drawn (None: every size of :func:`size_choices`);
    ``max_str``: the longest str; ``max_objects``: elements of an object array at most."""

    def __init__(self, rng, cfg, seed, max_bytes=None, max_str=20000, max_objects=3000):
        self.rng, self.cfg, self.seed = rng, cfg, seed
        self.max_bytes, self.max_str, self.max_objects = max_bytes, max_str, max_objects

    def next_seed(self):
        self.seed += 1
        return self.seed

    def array(self, dtype=None, nbytes=None, order=None, view=None, prod_safe=False, shape=None):
        """An ``("nd", ...)`` spec; arguments left None are drawn."""
        rng = self.rng
        if dtype is None:
            dtype = rng.choice(INT_DTYPES + FLOAT_DTYPES + COMPLEX_DTYPES + OTHER_DTYPES)
        item = _dtype(dtype).itemsize or 1
        if shape is None:
            if nbytes is None:
                sizes = size_choices(self.cfg)
                if self.max_bytes is not None:
                    sizes = [s for s in sizes if s <= self.max_bytes]
                nbytes = rng.choice(sizes)
            n = max(0, nbytes // item)
            if _dtype(dtype).kind == "O":
                n = min(n, self.max_objects)
            r = rng.random()
            if r < 0.1:
                shape = ()
            elif r < 0.5 and n >= 4:
                a = rng.choice([2, 3, 4, 5, 7])
                shape = (a, n // a)
            elif r < 0.55 and n >= 8:
                shape = (2, 2, n // 4)
            else:
                shape = (n,)
        if order is None:
            order = rng.choice(["C", "C", "F"])
        if view is None:
            view = rng.choice([None, None, None, "step", "rev", "T", "col"])
        return ("nd", dtype, tuple(shape), order, self.next_seed(), view, prod_safe)

    def value(self, depth=0):
        """A spec of any kind (containers nest up to depth 2)."""
        rng = self.rng
        r = rng.random()
        if r < 0.4:
            return self.array()
        if r < 0.5:
            return ("lit", rng.choice([0, -1, 7, 2**70, 1.5, float("inf"), -0.0, 1 + 2j, True, None,
                                       "", "x", b"", b"\x00\xff", (), [], {}]))
        if r < 0.6:
            return ("bytes", self.next_seed(), max(0, rng.choice(size_choices(self.cfg)[:12])))
        if r < 0.65:
            return ("str", self.next_seed(), rng.choice([0, 1, 5, self.max_str]))
        if r < 0.72:
            return ("npscalar", rng.choice(REDUCIBLE), self.next_seed())
        if depth < 2:
            kids = [self.value(depth + 1) for _ in range(rng.randint(0, 3))]
            kind = rng.choice(["list", "tuple", "dict"])
            if kind == "dict":
                return ("dict", [(f"k{j}", s) for j, s in enumerate(kids)])
            return (kind, kids)
        return ("lit", rng.randint(-5, 5))

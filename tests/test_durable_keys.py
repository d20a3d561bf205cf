"""Durable keys (hoplite_mpi/durable/keys.py): the same in every process for the same program
and arguments, different when an argument or the function's code differs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from hoplite_mpi.durable import keys as K

PROGRAM = textwrap.dedent('''
    import dataclasses, enum, functools, json, sys
    import numpy as np
    from hoplite_mpi.durable import keys as K

    SCALE = 3

    def helper(x):
        return x * SCALE

    def f(x, y=2):
        return helper(x) + y

    @dataclasses.dataclass
    class Point:
        x: int
        y: float

    class Color(enum.Enum):
        RED = 1

    class Ref:                       # stands for an ObjectRef (keys.py matches the type's name)
        def __init__(self, id): self.id = id
    Ref.__name__ = Ref.__qualname__ = "ObjectRef"

    import hoplite_mpi as hm

    @hm.remote
    def nested(x):
        return x

    def submits(x):
        return nested.remote(x)

    values = {
        "scalars": (1, 2.5, "s", b"b", None, True),
        "dict": {"b": 1, "a": [1, 2]},
        "set_of_str": {"alpha", "beta", "gamma", "delta"},
        "frozenset": frozenset({"x", "y", "z"}),
        "c_array": np.arange(12.0).reshape(3, 4),
        "f_array": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        "strided": np.arange(24).reshape(4, 6)[:, ::2],
        "np_scalar": np.float32(1.5),
        "dataclass": Point(1, 2.0),
        "enum": Color.RED,
        "function": f,
        "lambda": lambda z: z + 1,
        "partial": functools.partial(f, 1),
        "refs": [Ref(7), Ref(8)],
    }
    ref_keys = {7: "k7#0", 8: "k8#1"}
    out = {name: K.value_digest(v, lambda r: ref_keys[r.id]).hex() for name, v in values.items()}
    out["fn:f"] = K.function_key(f).hex()
    out["fn:lambda"] = K.function_key(values["lambda"]).hex()
    out["fn:np.sum"] = K.function_key(np.sum).hex()
    out["fn:version"] = K.function_key(f, version="2").hex()
    # a RemoteFunction's state holds a cloudpickle blob that names the script's path
    nested._identity = (b"id", b"<a blob naming " + sys.argv[0].encode() + b">")
    out["fn:submits"] = K.function_key(submits).hex()     # refers to a RemoteFunction
    json.dump(out, sys.stdout)
''')


def _keys(tmp_path, name: str, source: str, seed: str, cwd=None, path_arg=None) -> dict:
    script = tmp_path / name
    script.write_text(source)
    env = dict(os.environ, PYTHONHASHSEED=seed)
    proc = subprocess.run([sys.executable, path_arg or str(script)], capture_output=True,
                          text=True, env=env, timeout=120, cwd=cwd or str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_keys_are_the_same_in_every_process(tmp_path):
    a = _keys(tmp_path, "prog.py", PROGRAM, "1")
    b = _keys(tmp_path, "prog.py", PROGRAM, "2")
    c = _keys(tmp_path, "prog.py", PROGRAM, "3", path_arg="./prog.py")   # another path spelling
    assert a == b == c
    assert len(set(a.values())) == len(a)      # and no two different values collide


def test_moving_a_function_keeps_its_key_editing_it_changes_it(tmp_path):
    base = _keys(tmp_path, "p.py", PROGRAM, "1")
    moved = _keys(tmp_path, "p.py", PROGRAM.replace("SCALE = 3\n", "SCALE = 3\n\n\n# moved\n"), "1")
    assert moved["fn:f"] == base["fn:f"] and moved["function"] == base["function"]
    edited = _keys(tmp_path, "p.py", PROGRAM.replace("return helper(x) + y", "return helper(x) - y"), "1")
    assert edited["fn:f"] != base["fn:f"]
    callee_global = _keys(tmp_path, "p.py", PROGRAM.replace("SCALE = 3", "SCALE = 4"), "1")
    assert callee_global["fn:f"] != base["fn:f"]      # a global the function's callee reads
    assert edited["fn:version"] == base["fn:version"]   # version= stands for the code
    assert edited["fn:np.sum"] == base["fn:np.sum"]


def test_digests_follow_values_not_identity():
    s = "x" * 100
    assert K.value_digest((s, s)) == K.value_digest((s, "".join(["x"] * 100)))  # no memo
    assert K.value_digest({1: 2, 3: 4}) != K.value_digest({3: 4, 1: 2})      # dict order kept
    assert K.value_digest({"a", "b"}) == K.value_digest({"b", "a"})
    a = np.arange(10)
    assert K.value_digest(a) == K.value_digest(a.copy())
    assert K.value_digest(a) != K.value_digest(a.astype(np.int32))
    assert K.value_digest(a) != K.value_digest(a.reshape(2, 5))
    b = a.copy()
    b[3] = 99
    assert K.value_digest(a) != K.value_digest(b)
    assert K.value_digest(1) != K.value_digest(1.0) != K.value_digest(True)


@pytest.mark.parametrize("value", [threading.Lock(), (i for i in range(3))])
def test_values_without_a_stable_digest_raise_unstable_key(value):
    with pytest.raises(K.UnstableKey):
        K.value_digest(value)


def test_a_self_referencing_value_raises_unstable_key():
    x: list = [1]
    x.append(x)
    with pytest.raises(K.UnstableKey, match="self-referencing"):
        K.value_digest(x)


def test_a_ref_without_a_producer_key_is_unstable():
    class ObjectRef:
        id = 5
    with pytest.raises(K.UnstableKey):
        K.value_digest([ObjectRef()])


def test_task_keys_count_occurrences_and_names_stand_alone():
    fk = K.function_key(len)
    d = K.value_digest(((1,), []))
    assert K.task_key(fk, d, 0) != K.task_key(fk, d, 1)
    assert K.task_key(fk, d, 0) == K.task_key(fk, d, 0)
    assert len(K.task_key(fk, d, 0)) == 32
    assert K.named_key("train/epoch-3", 0) != K.named_key("train/epoch-4", 0)

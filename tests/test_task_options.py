"""Task options are checked at ``remote``/``options`` time, before anything is submitted."""
from __future__ import annotations

import pytest

import hoplite_mpi as hm


def f(x):
    return x


@pytest.mark.parametrize("options, error, match", [
    ({"num_returns": 0}, ValueError, "num_returns must be an int >= 1"),
    ({"num_returns": True}, ValueError, "num_returns"),
    ({"max_retries": -1}, ValueError, "max_retries must be an int >= 0"),
    ({"rank": "1"}, TypeError, "rank must be an int"),
    ({"inline_threshold": -1}, ValueError, r"inline_threshold must be an int >= 0 \(bytes\)"),
    ({"inline_threshold": 1.5}, ValueError, "inline_threshold"),
    ({"replicas": 0}, ValueError, r"replicas must be an int >= 1 \(copies of each result\)"),
    ({"replicas": "2"}, ValueError, "replicas"),
    ({"colour": "red"}, TypeError, r"unknown task option\(s\) \['colour'\]"),
])
def test_bad_options_raise_at_definition(options, error, match):
    with pytest.raises(error, match=match):
        hm.remote(**options)(f)
    with pytest.raises(error, match=match):
        hm.remote(f).options(**options)


def test_good_options_are_kept():
    g = hm.remote(num_returns=2)(f).options(inline_threshold=0, max_retries=0, rank=1, name="g",
                                            replicas=2)
    assert g._options == {"num_returns": 2, "inline_threshold": 0, "max_retries": 0, "rank": 1,
                          "name": "g", "replicas": 2}

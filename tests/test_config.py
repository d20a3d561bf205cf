"""Config: keyword > HOPLITE_MPI_* environment variable > default; validation of types and ranges."""
from __future__ import annotations

import dataclasses

import pytest

from hoplite_mpi.config import ENV_PREFIX, Config

DEFAULTS = Config()


def test_defaults_are_documented_values():
    assert (DEFAULTS.chunk_size, DEFAULTS.window, DEFAULTS.inline_threshold) == (1 << 20, 4, 64 << 10)
    assert (DEFAULTS.tasks_per_worker, DEFAULTS.worker_threads, DEFAULTS.replication) == (16, 1, 1)
    assert (DEFAULTS.backoff_max, DEFAULTS.shutdown_timeout, DEFAULTS.log_level) == (0.02, 30.0, "WARNING")


def test_from_sources_without_options_or_env_gives_defaults():
    assert Config.from_sources({}, environ={}) == DEFAULTS
    assert Config.from_sources(None, environ={"UNRELATED": "1"}) == DEFAULTS


def test_env_overrides_default_and_is_parsed_to_the_field_type():
    env = {
        "HOPLITE_MPI_CHUNK_SIZE": "262144",
        "HOPLITE_MPI_WINDOW": "8",
        "HOPLITE_MPI_INLINE_THRESHOLD": "0",
        "HOPLITE_MPI_BACKOFF_MAX": "0.01",
        "HOPLITE_MPI_SHUTDOWN_TIMEOUT": "5",
        "HOPLITE_MPI_LOG_LEVEL": "DEBUG",
    }
    config = Config.from_sources({}, environ=env)
    assert config == dataclasses.replace(DEFAULTS, chunk_size=262144, window=8, inline_threshold=0,
                                         backoff_max=0.01, shutdown_timeout=5.0, log_level="DEBUG")
    assert type(config.chunk_size) is int and type(config.shutdown_timeout) is float


def test_env_int_accepts_exponent_notation():
    assert Config.from_sources({}, environ={"HOPLITE_MPI_CHUNK_SIZE": "1e6"}).chunk_size == 1_000_000


def test_keyword_wins_over_env():
    env = {"HOPLITE_MPI_CHUNK_SIZE": "4096", "HOPLITE_MPI_WINDOW": "2"}
    config = Config.from_sources({"chunk_size": 8192}, environ=env)
    assert config.chunk_size == 8192  # keyword
    assert config.window == 2         # env, no keyword given


def test_keyword_wins_even_over_a_bad_env_value():
    # the env value of a field given as keyword is never parsed
    assert Config.from_sources({"window": 3}, environ={"HOPLITE_MPI_WINDOW": "lots"}).window == 3


def test_os_environ_is_the_default_source(monkeypatch):
    monkeypatch.setenv(ENV_PREFIX + "TASKS_PER_WORKER", "3")
    assert Config.from_sources().tasks_per_worker == 3
    assert Config.from_sources({"tasks_per_worker": 5}).tasks_per_worker == 5


@pytest.mark.parametrize("name, raw", [
    ("CHUNK_SIZE", "abc"),
    ("CHUNK_SIZE", ""),
    ("WINDOW", "nan"),
    ("BACKOFF_MAX", "fast"),
])
def test_unparsable_env_value_is_a_value_error_naming_the_variable(name, raw):
    with pytest.raises(ValueError, match=ENV_PREFIX + name):
        Config.from_sources({}, environ={ENV_PREFIX + name: raw})


@pytest.mark.parametrize("name, raw", [
    ("CHUNK_SIZE", "0"),
    ("WINDOW", "-1"),
    ("INLINE_THRESHOLD", "-5"),
    ("BACKOFF_MAX", "0"),
    ("SHUTDOWN_TIMEOUT", "-1"),
    ("SHUTDOWN_TIMEOUT", "nan"),
])
def test_out_of_range_env_value_is_a_value_error(name, raw):
    with pytest.raises(ValueError, match=name.lower()):
        Config.from_sources({}, environ={ENV_PREFIX + name: raw})


def test_non_integral_env_value_for_int_field_is_a_value_error():
    with pytest.raises(ValueError, match="HOPLITE_MPI_WINDOW"):
        Config.from_sources({}, environ={"HOPLITE_MPI_WINDOW": "1.5"})


def test_infinite_env_value_for_int_field_is_a_value_error():
    with pytest.raises(ValueError, match="HOPLITE_MPI_CHUNK_SIZE"):
        Config.from_sources({}, environ={"HOPLITE_MPI_CHUNK_SIZE": "inf"})


def test_unknown_keyword_is_a_type_error_listing_it():
    with pytest.raises(TypeError, match="chunksize"):
        Config.from_sources({"chunksize": 10}, environ={})


def test_unknown_env_variable_is_ignored():
    assert Config.from_sources({}, environ={"HOPLITE_MPI_NO_SUCH_OPTION": "1"}) == DEFAULTS


@pytest.mark.parametrize("field", ["chunk_size", "window", "tasks_per_worker", "worker_threads", "replication"])
@pytest.mark.parametrize("value", [0, -1, 1.0, "4", True, None])
def test_positive_int_fields_reject_bad_keyword_values(field, value):
    with pytest.raises(ValueError, match=field):
        Config(**{field: value})
    with pytest.raises(ValueError, match=field):
        Config.from_sources({field: value}, environ={})


@pytest.mark.parametrize("field", ["window", "tasks_per_worker", "worker_threads", "replication"])
def test_positive_int_fields_accept_one(field):
    assert getattr(Config(**{field: 1}), field) == 1


@pytest.mark.parametrize("value", [1, 100, 1000])
def test_chunk_size_must_hold_whole_array_elements(value):
    with pytest.raises(ValueError, match="multiple of 64"):
        Config(chunk_size=value)
    assert Config(chunk_size=64).chunk_size == 64


@pytest.mark.parametrize("value", [-1, 1.5, "0"])
def test_inline_threshold_range(value):
    with pytest.raises(ValueError, match="inline_threshold"):
        Config(inline_threshold=value)


def test_inline_threshold_zero_is_allowed():
    assert Config(inline_threshold=0).inline_threshold == 0


@pytest.mark.parametrize("field", ["backoff_max", "shutdown_timeout"])
@pytest.mark.parametrize("value", [0, -0.5, 0.0, float("nan")])
def test_durations_must_be_positive(field, value):
    with pytest.raises(ValueError, match=field):
        Config(**{field: value})


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULTS.chunk_size = 1  # type: ignore[misc]

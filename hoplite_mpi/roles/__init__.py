"""Roles of a rank: the directory shard (every rank), the driver and its reduce coordinator
(rank 0), task execution (worker ranks), rank-loss detection, shutdown."""

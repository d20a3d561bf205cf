"""Runnable examples: ``hoplite-mpi run -n 4 -m hoplite_mpi.examples.NAME``."""

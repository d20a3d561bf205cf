"""Transports: how bytes move between ranks.  ``mpi`` is the only module that calls MPI for data."""
from .base import PeerFailure, Transport

__all__ = ["PeerFailure", "Transport"]

"""Pallas kernels for ``backend="pallas"``, each beside its pure-jnp reference (same signature)."""

from flowssm.kernels.chunked import chunked_pallas
from flowssm.kernels.launch import Tuning

__all__ = ["Tuning", "chunked_pallas"]

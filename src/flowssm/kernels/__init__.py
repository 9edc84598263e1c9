"""Pallas kernels for ``backend="pallas"``, each beside its pure-jnp reference (same signature)."""

from flowssm.kernels.chunked import Tuning, chunked_pallas

__all__ = ["Tuning", "chunked_pallas"]

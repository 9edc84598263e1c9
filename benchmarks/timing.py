"""Timing and error helpers shared by the GPU benchmark scripts."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def rel(a, b) -> float:
    """Relative error ``||a - b|| / ||b||`` (Frobenius, float32)."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def timed(fn, *args, reps: int, batch: int = 10) -> float:
    """Median ms a call over ``reps`` batches of ``batch`` back-to-back calls (dispatch overlapped, like
    CUDA-event timing); compile and warm-up excluded."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(batch):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) * 1e3 / batch)
    return float(np.median(times))

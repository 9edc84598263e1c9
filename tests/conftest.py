"""Test session setup: 8 forced host devices (sequence-parallel tests) and float64 enabled.

x64 is on for the whole suite, so tests pass dtypes explicitly wherever float32/bfloat16 is meant.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# jax's CPU LAPACK calls (triangular solves) go through OpenBLAS, whose threads fight XLA's for the cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

"""Test session setup: 8 forced host devices (sequence-parallel tests), unoptimised CPU code, float64 enabled.

x64 is on for the whole suite, so tests pass dtypes explicitly wherever float32/bfloat16 is meant.
"""

import os

# XLA's CPU backend at optimisation level 0: the suite is compile-bound (tiny shapes, many programs, the kernels
# in interpret mode), and unoptimised code compiles about twice as fast (a kernel gradient test: 15.5 s -> 7.2 s)
# while the few run-bound tests (training runs) do not slow down. Processes the tests start inherit it.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# jax's CPU LAPACK calls (triangular solves) go through OpenBLAS, whose threads fight XLA's for the cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

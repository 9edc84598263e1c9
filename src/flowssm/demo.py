"""A quick tour: random tokens -> driving path -> every backend, scan and solver; agreement and timings.

    python -m flowssm.demo [--T 1024] [--rank 1]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import flowssm
from flowssm.testing import random_inputs


def main(argv=None):
    parser = argparse.ArgumentParser(description="flowssm demo: agreement and timings of every backend/scan/solver")
    parser.add_argument("--B", type=int, default=2)
    parser.add_argument("--T", type=int, default=1000)
    parser.add_argument("--H", type=int, default=4)
    parser.add_argument("--K", type=int, default=32)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=64)
    args = parser.parse_args(argv)
    B, T, H, K, R = args.B, args.T, args.H, args.K, args.rank
    q, k, v, beta, g, _ = random_inputs(0, B, T, H, K, K, R, beta_max=2.0, dtype=jnp.float32)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; B={B} T={T} H={H} K=V={K} R={R} chunk={args.chunk_size}")
    print("gated DeltaNet, beta in (0, 2); every row against the token loop (backend='reference')\n")
    o_ref, S_ref = flowssm.delta_rule(q, k, v, beta, g, backend="reference")
    rows = [("reference", "-", "exact")]
    rows += [("xla", s, "exact") for s in ("sequential", "associative")]
    rows += [("xla", "sequential", flowssm.Exact(method="doubling"))]
    rows += [("xla", "sequential", flowssm.Signature(depth=d)) for d in (1, 3, 7)]
    rows += [("xla", "sequential", "euler")]
    print(f"{'backend':<10}{'scan':<13}{'solver':<36}{'rel. error o':>14}{'rel. error S_T':>16}{'ms':>10}")
    for backend, scan, solver in rows:
        options = dict(backend=backend, solver=solver, chunk_size=args.chunk_size)
        if scan != "-":
            options["scan"] = scan
        fn = jax.jit(lambda *xs: flowssm.delta_rule(*xs, **options))
        jax.block_until_ready(fn(q, k, v, beta, g))
        t0 = time.perf_counter()
        o, S = jax.block_until_ready(fn(q, k, v, beta, g))
        ms = (time.perf_counter() - t0) * 1e3
        err_o = float(jnp.linalg.norm(o - o_ref) / jnp.linalg.norm(o_ref))
        err_S = float(jnp.linalg.norm(S - S_ref) / jnp.linalg.norm(S_ref))
        print(f"{backend:<10}{scan:<13}{str(solver):<36}{err_o:>14.2e}{err_S:>16.2e}{ms:>10.2f}")


if __name__ == "__main__":
    main()

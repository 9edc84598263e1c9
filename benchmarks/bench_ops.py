"""Time flowssm.delta_rule: xla/sequential, xla/associative and the token loop, forward and forward+backward.

    python benchmarks/bench_ops.py            # CPU, small shapes
    python benchmarks/bench_ops.py --gpu      # GPU shapes (4x4096x16x128x128 bf16, ...)

Checks each variant against the token loop on a prefix of the sequence first, then prints median
milliseconds (warm-up excluded, ``block_until_ready``) and writes JSON to $OUT (or --out) if given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

import flowssm
from flowssm.testing import random_inputs

GPU_SHAPES = [(4, 4096, 16, 128, 128), (1, 16384, 16, 128, 128), (8, 2048, 32, 64, 64)]
CPU_SHAPES = [(2, 512, 4, 32, 32), (1, 2048, 2, 64, 64)]
VARIANTS = {
    "xla/sequential": dict(backend="xla", scan="sequential"),
    "xla/associative": dict(backend="xla", scan="associative"),
    "xla/sequential doubling": dict(backend="xla", scan="sequential", solver=flowssm.Exact(method="doubling")),
    "token loop": dict(backend="reference"),
}


def median_ms(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def token_loop_residual_gb(B, T, H, K, V) -> float:
    """Reverse-mode through the token loop stores one float32 K x V state per token and head."""
    return B * T * H * K * V * 4 / 2**30


def make_fns(options):
    fwd = jax.jit(lambda q, k, v, b: flowssm.delta_rule(q, k, v, b, **options)[0])

    def loss(q, k, v, b):
        return jnp.sum(flowssm.delta_rule(q, k, v, b, **options)[0].astype(jnp.float32))

    fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    return fwd, fwd_bwd


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="GPU shapes in bfloat16")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--max-residual-gb", type=float, default=8.0, help="skip the token loop's fwd+bwd above this")
    args = parser.parse_args()
    shapes, dtype = (GPU_SHAPES, jnp.bfloat16) if args.gpu else (CPU_SHAPES, jnp.float32)
    print("jax", jax.__version__, jax.devices())
    results = {}
    for shape in shapes:
        q, k, v, beta = random_inputs(0, *shape, gated=False, dtype=dtype)[:4]
        check = [x[:, :256] for x in (q, k, v, beta)]
        ref = flowssm.delta_rule(*[x.astype(jnp.float32) for x in check], backend="reference")[0]
        row = {}
        for name, options in VARIANTS.items():
            fwd, fwd_bwd = make_fns(options)
            out = fwd(*check).astype(jnp.float32)
            row[f"{name} rel.err"] = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
            row[f"{name} fwd ms"] = median_ms(fwd, q, k, v, beta, reps=args.reps)
            if name == "token loop" and token_loop_residual_gb(*shape) > args.max_residual_gb:
                print(f"{name} fwd+bwd skipped at {shape}: it would store {token_loop_residual_gb(*shape):.0f} GiB of states")
                row[f"{name} fwd+bwd ms"] = float("nan")
                continue
            row[f"{name} fwd+bwd ms"] = median_ms(fwd_bwd, q, k, v, beta, reps=max(3, args.reps // 4))
        results["x".join(map(str, shape))] = row
        print(shape, {a: float(f"{b:.3g}") for a, b in row.items()}, flush=True)
    print(f"\nmedian ms, fwd / fwd+bwd\n{'B x T x H x K x V':<22}" + "".join(f"{n:>26}" for n in VARIANTS))
    for shape, row in results.items():
        cells = "".join(f"{row[f'{n} fwd ms']:>13.3f} / {row[f'{n} fwd+bwd ms']:<10.3f}" for n in VARIANTS)
        print(f"{shape:<22}{cells}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_ops.json"), "w") as f:
            json.dump({"device": str(jax.devices()[0]), "dtype": str(jnp.dtype(dtype)), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

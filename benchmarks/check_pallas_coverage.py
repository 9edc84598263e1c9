"""Pallas against xla over the kernels' coverage: dtypes, head sizes, rank, gates, forward and gradients.

    python benchmarks/check_pallas_coverage.py [--out /tmp/coverage.json] [--tiny]

For every (dtype, K = V, R, gated) of the grid, ``delta_rule(backend="pallas")`` and its gradient with
respect to q, k, v, beta, g and the initial state are compared with ``backend="xla"`` on float32 copies
of the same inputs, computed at highest matmul precision (relative error ``|a - b| / |b|`` over all outputs), and forward+backward is timed
(median of 5 calls after a warm-up). Prints one line a case as it goes, writes JSON, exits 1 if any
case fails (float32 needs 1e-4; bf16 operands 3e-2). Keys are random unit vectors (near-orthogonal), or
with ``keys="lm"`` L2-normalised ``SiLU(x + 1)`` features as the LM makes them (mean cosine about 0.5,
ungated, beta in (0, 1]): the case where a transfer that forms powers of ``L`` loses accuracy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import flowssm
from flowssm.testing import random_inputs

TOL = {"float32": 1e-4, "bfloat16": 3e-2}


def rel(a, b) -> float:
    a, b = (jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(t)]) for t in (a, b))
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def lm_keys(k):
    """L2-normalised ``SiLU(x + 1)`` with ``x`` the unit keys' noise scaled back to N(0, 1)."""
    x = jax.nn.silu(k * k.shape[-1] ** 0.5 + 1.0)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def case(dtype: str, K: int, R: int, gated: bool, B: int, T: int, H: int, keys: str = "unit") -> dict:
    q, k, v, beta, g, S0 = random_inputs(K + R, B, T, H, K, K, R, gated=gated, beta_max=1.0 if keys == "lm" else 2.0)
    k = lm_keys(k) if keys == "lm" else k
    low = lambda x: None if x is None else x.astype(dtype)
    args = (low(q), low(k), low(v), beta, g)

    def loss(backend, q, k, v, beta, g, S0):
        o, S = flowssm.delta_rule(q, k, v, beta, g, initial_state=S0, backend=backend, chunk_size=64 // R)
        return jnp.sum(o.astype(jnp.float32) * jnp.cos(jnp.arange(o.shape[-1]))) + jnp.sum(S), (o, S)

    run = {b: jax.jit(jax.value_and_grad(lambda *a, b=b: loss(b, *a), argnums=(0, 1, 2, 3, 4, 5), has_aux=True))
           for b in ("pallas", "xla")}
    up = lambda x: None if x is None else x.astype(jnp.float32)
    (_, out), grads = run["pallas"](*args, S0)
    with jax.default_matmul_precision("highest"):  # the reference in float32, not TF32 (GPU default)
        (_, ref_out), ref_grads = run["xla"](*map(up, args), S0)
    grads, ref_grads = [[x for x in gs if x is not None] for gs in (grads, ref_grads)]
    row = dict(dtype=dtype, K=K, R=R, gated=gated, keys=keys, shape=[B, T, H, K, K], fwd_err=rel(out, ref_out),
               grad_err=rel(grads, ref_grads))
    jax.block_until_ready(run["pallas"](*args, S0))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(run["pallas"](*args, S0))
        times.append(time.perf_counter() - t0)
    row["fwd_bwd_ms"] = 1e3 * statistics.median(times)
    row["ok"] = row["fwd_err"] < TOL[dtype] and row["grad_err"] < TOL[dtype]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/pallas_coverage.json")
    p.add_argument("--tiny", action="store_true", help="small shapes and a reduced grid (CPU, interpret mode)")
    p.add_argument("--dtypes", default="bfloat16,float32", help="the dtypes of the grid to run")
    p.add_argument("--keys", default="unit,lm", help="the key kinds of the grid to run")
    a = p.parse_args()
    B, T, H = (1, 128, 1) if a.tiny else (2, 2048, 8)
    grid = ([("bfloat16", K, 1, True) for K in (32, 64, 128, 256)] + [("bfloat16", 128, 2, True), ("bfloat16", 128, 1, False)]
            + [("float32", K, 1, True) for K in (64, 128)] + [("float32", 128, 2, False)]
            + [("bfloat16", 128, 1, False, "lm"), ("float32", 128, 1, False, "lm")])
    if a.tiny:
        grid = [("bfloat16", 32, 1, True), ("float32", 32, 2, False, "lm")]
    grid = [spec for spec in grid if spec[0] in a.dtypes.split(",") and (spec[4:] or ("unit",))[0] in a.keys.split(",")]
    rows = []
    for spec in grid:
        try:
            row = case(*spec[:4], B, T, H, *spec[4:])
        except Exception as e:  # a failing case is recorded and reported, the sweep goes on
            row = dict(zip(("dtype", "K", "R", "gated", "keys"), spec), ok=False, error=f"{type(e).__name__}: {e}"[:300])
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(bad)}/{len(rows)} cases pass")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

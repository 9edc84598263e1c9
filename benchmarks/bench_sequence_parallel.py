"""Throughput of one long sequence: flowssm.delta_rule on 1 device vs sequence_parallel_delta_rule on N.

    python benchmarks/bench_sequence_parallel.py                      # 1x262144x16x128x128 bf16, 1, 2, 4, .. GPUs
    python benchmarks/bench_sequence_parallel.py --shape 1 65536 16 128 128 --devices 1 2 --gated
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python benchmarks/bench_sequence_parallel.py --tiny

Every N-device run is first checked against the 1-device result (relative error of o and of the final
state); then median milliseconds (warm-up excluded, ``block_until_ready``) of the forward and of
forward+backward are printed with tokens/s and the speed-up over 1 device, and written as JSON to
$OUT (or --out) if given. Inputs are placed time-sharded, so each device holds only its part.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import flowssm
from flowssm.distributed import sequence_parallel_delta_rule

from bench_ops import median_ms  # benchmarks/ is on sys.path when one of its scripts runs

TINY_SHAPE = (1, 1024, 2, 16, 16)


def make_inputs(key, B, T, H, K, V, dtype, gated: bool):
    kq, kk, kv, kb, kg = jax.random.split(key, 5)
    k = jax.random.normal(kk, (B, T, H, K), jnp.float32)
    return (
        jax.random.normal(kq, (B, T, H, K), jnp.float32).astype(dtype),
        (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype),
        jax.random.normal(kv, (B, T, H, V), jnp.float32).astype(dtype),
        jax.random.uniform(kb, (B, T, H), jnp.float32, 0.0, 2.0).astype(dtype),
        -jax.random.uniform(kg, (B, T, H), jnp.float32, 0.0, 0.1).astype(dtype) if gated else None,
    )


def make_fns(op):
    """op(q, k, v, beta, g) -> (o, S); returns jitted forward and forward+backward (grads of every input)."""

    def loss(xs):
        o, S = op(*xs)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(S)

    return jax.jit(op), jax.jit(lambda *xs: jax.grad(loss)(xs))


def rel_err(a, b) -> float:
    """||a - b|| / ||b||, computed where ``a`` lives (``b`` is moved there, not to the host)."""
    a, b = a.astype(jnp.float32), jax.device_put(b, a.sharding).astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=5, default=[1, 262144, 16, 128, 128], metavar=("B", "T", "H", "K", "V"))
    parser.add_argument("--tiny", action="store_true", help=f"CPU smoke run: shape {TINY_SHAPE}, float32, 3 reps")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--devices", type=int, nargs="+", help="device counts (default: 1, 2, 4, .. up to all)")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--scan", choices=["sequential", "associative"], default="sequential")
    parser.add_argument("--gated", action="store_true", help="include a log-decay g")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args()
    shape, dtype, reps = (TINY_SHAPE, jnp.float32, 3) if args.tiny else (tuple(args.shape), jnp.dtype(args.dtype), args.reps)
    n_all = jax.device_count()
    counts = sorted({1, *(args.devices or [2**i for i in range(n_all.bit_length())])})  # 1 device: the baseline
    if counts[-1] > n_all or counts[0] < 1:
        parser.error(f"--devices: expected counts in [1, {n_all}] (devices available), got {args.devices}")
    tol = 1e-4 if dtype == jnp.float32 else 2e-2
    options = dict(chunk_size=args.chunk_size, scan=args.scan)
    print("jax", jax.__version__, jax.devices(), "shape B x T x H x K x V =", shape, jnp.dtype(dtype).name, options)

    host = make_inputs(jax.random.PRNGKey(0), *shape, dtype, args.gated)
    single = jax.device_put(host, jax.devices()[0])
    single_fns = make_fns(lambda q, k, v, b, g: flowssm.delta_rule(q, k, v, b, g, **options))
    o_ref, S_ref = single_fns[0](*single)
    rows = {}
    for D in counts:
        if D == 1:
            xs, (fwd, fwd_bwd) = single, single_fns
        else:
            mesh = Mesh(np.array(jax.devices()[:D]), ("seq",))
            xs = jax.device_put(host, NamedSharding(mesh, PartitionSpec(None, "seq")))
            fwd, fwd_bwd = make_fns(lambda q, k, v, b, g, mesh=mesh: sequence_parallel_delta_rule(q, k, v, b, g, mesh=mesh, **options))
        o, S = fwd(*xs)
        row = {"rel_err_o": rel_err(o, o_ref), "rel_err_state": rel_err(S, S_ref)}
        if max(row.values()) > tol:
            raise SystemExit(f"{D} devices disagree with 1 device beyond {tol}: {row}")
        row["fwd_ms"] = median_ms(fwd, *xs, reps=reps)
        row["fwd_bwd_ms"] = median_ms(fwd_bwd, *xs, reps=max(1, reps // 2))
        rows[D] = row
        print(D, {a: float(f"{b:.3g}") for a, b in row.items()}, flush=True)

    tokens = shape[0] * shape[1]
    print(f"\n{'devices':>7} {'fwd ms':>10} {'fwd Mtok/s':>11} {'speed-up':>9} {'fwd+bwd ms':>11} {'Mtok/s':>8} {'speed-up':>9} {'rel.err o':>10}")
    for D, r in rows.items():
        print(
            f"{D:>7} {r['fwd_ms']:>10.2f} {tokens / r['fwd_ms'] / 1e3:>11.3f} {rows[1]['fwd_ms'] / r['fwd_ms']:>9.2f}"
            f" {r['fwd_bwd_ms']:>11.2f} {tokens / r['fwd_bwd_ms'] / 1e3:>8.3f} {rows[1]['fwd_bwd_ms'] / r['fwd_bwd_ms']:>9.2f}"
            f" {r['rel_err_o']:>10.2e}"
        )
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        record = {"device": str(jax.devices()[0]), "shape_BTHKV": shape, "dtype": jnp.dtype(dtype).name, "gated": args.gated, **options, "results": rows}
        with open(os.path.join(args.out, "bench_sequence_parallel.json"), "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()

"""GPU benchmark of backend="pallas": correctness against the xla backend and fla, then timings.

    python3 benchmarks/bench_kernels.py [--reps 30] [--shapes 0,1,2,3] [--sweep]

One call checks (relative error vs the xla backend on float32 copies of the bf16 inputs, outputs,
final states and gradients; vs fla's chunk_delta_rule / chunk_gated_delta_rule outputs) and times
(median ms, warm-up excluded, block_until_ready / triton do_bench) flowssm pallas, flowssm xla and fla
on bf16 inputs. Also times the three pallas stages alone and, with --sweep, launch variants on the
first shape. Gradients, the xla backend's timings and the stage breakdown only on the first shape
listed (benchmarks/bench_ops.py times the xla backend). Prints a table, writes JSON to $OUT (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import flowssm
from flowssm.kernels import Tuning, chunked_pallas
from flowssm.kernels import chunked as kc
from flowssm.kernels import state_pass as sp
from flowssm.kernels.chunk_output import chunk_output_kernel, chunk_output_reference
from flowssm.kernels.chunk_transfer import chunk_transfer_kernel, chunk_transfer_reference
from flowssm.paths import make_path
from flowssm.solvers import get_solver

from bench_ops import median_ms  # benchmarks/ is on sys.path when one of its scripts runs

SHAPES = [(4, 4096, 16, 128, 128), (1, 16384, 16, 128, 128), (8, 2048, 32, 64, 64), (1, 65536, 16, 128, 128)]
CHUNK = 64
PEAK_TFLOPS, PEAK_TBPS = 811.0, 2.9  # measured through XLA on the H100 (shared/anchors)


def inputs(seed, B, T, H, K, V):
    """bf16 q, unit keys, v, beta in (0.5, 0.73) (fla's anchor inputs), log-decay g = log sigmoid(N(0,1)) (float32)."""
    kq, kk, kv, kb, kg, kd = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(kq, (B, T, H, K)).astype(jnp.bfloat16)
    k = jax.random.normal(kk, (B, T, H, K))
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(jnp.bfloat16)
    v = jax.random.normal(kv, (B, T, H, V)).astype(jnp.bfloat16)
    beta = jax.nn.sigmoid(jax.random.uniform(kb, (B, T, H))).astype(jnp.bfloat16)
    g = jax.nn.log_sigmoid(jax.random.normal(kg, (B, T, H)))
    do = jax.random.normal(kd, (B, T, H, V)).astype(jnp.bfloat16)
    return q, k, v, beta, g, do


def rel(a, b):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def fns(gated, **options):
    """jitted forward ``(o, S)`` and forward+backward (grads of ``sum(o * do)`` w.r.t. q, k, v, beta[, g])."""
    def run(q, k, v, b, g):
        return flowssm.delta_rule(q, k, v, b, g if gated else None, chunk_size=CHUNK, **options)

    def loss(q, k, v, b, g, do):
        return jnp.sum(run(q, k, v, b, g)[0].astype(jnp.float32) * do.astype(jnp.float32))

    argnums = (0, 1, 2, 3, 4) if gated else (0, 1, 2, 3)
    return jax.jit(run), jax.jit(jax.grad(loss, argnums=argnums))


def work(B, T, H, K, V, C=CHUNK, factors=6):
    """Matmul FLOPs of the three kernels (exact solver, doubling) and the bytes they move as designed."""
    N, n, BH = T // C, C, B * H
    flops = (2 * n * n * K + 4 * (factors - 1) * n**3 + 2 * n * n * (K + V)  # transfer
             + 4 * n * K * V  # state pass
             + 2 * n * K * V + 2 * C * n * K + 2 * C * K * V + 2 * C * n * V)  # output
    byts = (2 * T * (K + V) + 12 * T + 2 * T * (K + V)  # transfer: k, v, beta/alpha/g in; w, u out
            + 2 * T * (2 * K + V) + 4 * T + 2 * N * K * V  # state: k, w, u, G in; S_in out
            + 2 * T * (3 * K + V) + 8 * T + 2 * N * K * V + 2 * T * V)  # output
    floor_bytes = 2 * T * (2 * K + 2 * V) + 4 * T  # q, k, v in, o out, beta
    return flops * N * BH, byts * BH, floor_bytes * BH


def fla_times(q, k, v, beta, g, do, reps_ms=200):
    import torch
    from fla.ops.delta_rule import chunk_delta_rule
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from triton.testing import do_bench

    t = lambda x, grad=True: torch.from_numpy(np.asarray(x.astype(jnp.float32))).cuda().to(
        torch.bfloat16 if x.dtype == jnp.bfloat16 else torch.float32).requires_grad_(grad)
    tq, tk, tv, tb, tg, tdo = t(q), t(k), t(v), t(beta), t(g), t(do, False)
    out = {}
    fwd = lambda: chunk_delta_rule(tq, tk, tv, tb, output_final_state=True)
    gfwd = lambda: chunk_gated_delta_rule(tq, tk, tv, tg, tb, output_final_state=True)
    o, S = fwd()
    go, gS = gfwd()
    out["o"], out["S"] = (x.detach().float().cpu().numpy() for x in (o, S))
    out["go"], out["gS"] = (x.detach().float().cpu().numpy() for x in (go, gS))
    bench = lambda f: do_bench(f, warmup=50, rep=reps_ms, return_mode="median")
    out["fwd"] = bench(lambda: fwd()[0])
    out["fwdbwd"] = bench(lambda: fwd()[0].backward(tdo))
    out["gfwd"] = bench(lambda: gfwd()[0])
    del tq, tk, tv, tb, tg, tdo
    torch.cuda.empty_cache()
    return out


def stage_times(q, k, v, beta, g, reps, tuning=Tuning()):
    """Each pallas stage alone (gated, exact), on head-major bf16 inputs: where the forward time goes."""
    path = make_path(k, v, beta, g, dtype=jnp.bfloat16)
    B, H, T, R, K = path.keys.shape
    V = path.values.shape[-1]
    N, BH = T // CHUNK, B * H
    keys = path.keys.reshape(BH, N, CHUNK, 1, K)
    values = path.values.reshape(BH, N, CHUNK, 1, V)
    b = path.beta.astype(jnp.float32).reshape(BH, N, CHUNK, 1)
    ld = path.log_decay.astype(jnp.float32).reshape(BH, N, CHUNK)
    qc = jnp.moveaxis(q, 2, 1).reshape(BH, N, CHUNK, K)
    S0 = jnp.zeros((BH, K, V), jnp.float32)
    solver = get_solver("exact")
    transfer = jax.jit(lambda *a: chunk_transfer_kernel(*a, solver=solver, mode="tf32", num_warps=tuning.transfer_warps))
    w, u = transfer(keys, values, b, b, ld)
    G = kc.micro_log_decay(ld, 1)
    kf = keys.reshape(BH, N, CHUNK, K)
    state = jax.jit(lambda *a: sp.state_pass_kernel(*a, block_v=tuning.block_v, num_warps=tuning.state_warps,
                                                   num_stages=tuning.state_stages))
    S_in, _ = state(kf, G, w, u, S0)
    output = jax.jit(lambda *a: chunk_output_kernel(*a, rank=1, scale=K**-0.5, out_dtype=jnp.bfloat16,
                                                      num_warps=tuning.output_warps))
    assoc = jax.jit(lambda *a: jax.vmap(lambda f, s: kc.chunk_states(f, s, "associative"))(sp.chunk_flows(*a[:4]), a[4]))
    direct = jax.jit(lambda q_, p, s: chunked_pallas(q_, p, s, scale=K**-0.5, chunk_size=CHUNK, solver=solver,
                                                    scan="sequential", semantics="discrete", tuning=tuning)[0])
    S0b = jnp.zeros((B, H, K, V), jnp.float32)
    segmented = jax.jit(lambda *a: kc.segmented_states(*a, tuning))

    def backward(reference, args, **static):
        """A stage's backward: the vjp of ``reference`` (a jnp reference, recompute included, or a kernel with its own vjp)."""
        out = reference(*args, **static)
        cts = jax.tree.map(lambda x: jnp.ones_like(x), out)
        return jax.jit(lambda a, c: jax.vjp(lambda *x: reference(*x, **static), *a)[1](c)), (args, cts)

    times = {
        "transfer": median_ms(transfer, keys, values, b, b, ld, reps=reps),
        "state_pass": median_ms(state, kf, G, w, u, S0, reps=reps),
        "assoc_scan_xla": median_ms(assoc, kf, G, w, u, S0, reps=reps),
        "assoc_segmented": median_ms(segmented, kf, G, w, u, S0, reps=reps),
        "output": median_ms(output, qc, kf, G, w, u, S_in, reps=reps),
        "chunked_pallas_headmajor_bf16": median_ms(direct, q, path, S0b, reps=reps),
    }
    for name, ref, a, st in (
        ("transfer_bwd", chunk_transfer_reference, (keys, values, b, b, ld), dict(solver=solver)),
        ("state_pass_bwd_xla", sp.state_pass_reference, (kf, G, w, u, S0), {}),
        ("state_pass_bwd_kernel", sp.state_pass, (kf, G, w, u, S0), dict(block_v=tuning.block_v)),
        ("output_bwd", chunk_output_reference, (qc, kf, G, w, u, S_in), dict(rank=1, scale=K**-0.5, out_dtype=jnp.bfloat16)),
    ):
        fn, fargs = backward(ref, a, **st)
        times[name] = median_ms(fn, *fargs, reps=reps)
    return times


def bench_shape(shape, reps, sweep, fla_ok, first):
    B, T, H, K, V = shape
    q, k, v, beta, g, do = inputs(0, *shape)
    f32 = lambda xs: [x.astype(jnp.float32) for x in xs]
    row = {"shape": "x".join(map(str, shape))}
    long = T >= 65536
    # correctness: pallas (bf16) vs xla (float32 copies), gated and ungated, both scans
    for gated in (False, True):
        tag = "gated" if gated else "plain"
        xla_f, xla_b = fns(gated, backend="xla", scan="associative" if long else "sequential")
        o_ref, S_ref = xla_f(*f32((q, k, v, beta)), g)
        for scan in ("sequential", "associative"):
            pf, _ = fns(gated, backend="pallas", scan=scan)
            o, S = pf(q, k, v, beta, g)
            row[f"err_o_{tag}_{scan[:3]}"] = rel(o, o_ref)
            row[f"err_S_{tag}_{scan[:3]}"] = rel(S, S_ref)
        if first:
            _, pb = fns(gated, backend="pallas", scan="sequential")
            gp = pb(q, k, v, beta, g, do)
            gr = xla_b(*f32((q, k, v, beta)), g, do)
            row[f"err_grad_{tag}"] = max(rel(a, b) for a, b in zip(gp, gr))
    if fla_ok:
        fl = fla_times(q, k, v, beta, g, do)
        o_p, S_p = fns(False, backend="pallas")[0](q, k, v, beta, g)
        go_p, gS_p = fns(True, backend="pallas")[0](q, k, v, beta, g)
        row.update(err_o_vs_fla=rel(o_p, fl["o"]), err_S_vs_fla=rel(S_p, fl["S"]),
                   err_go_vs_fla=rel(go_p, fl["go"]), err_gS_vs_fla=rel(gS_p, fl["gS"]),
                   fla_fwd=fl["fwd"], fla_fwdbwd=fl["fwdbwd"], fla_gated_fwd=fl["gfwd"])
    # timings
    args = (q, k, v, beta, g)
    for name, opts in (("pallas_seq", dict(backend="pallas", scan="sequential")),
                       ("pallas_assoc", dict(backend="pallas", scan="associative")),
                       ("xla_seq", dict(backend="xla", scan="sequential")),
                       ("xla_assoc", dict(backend="xla", scan="associative"))):
        if name.startswith("xla") and not first:
            continue  # benchmarks/bench_ops.py times the xla backend on the other shapes
        f, fb = fns(False, **opts)
        row[f"{name}_fwd"] = median_ms(f, *args, reps=reps)
        row[f"{name}_fwdbwd"] = median_ms(fb, *args, do, reps=reps)
        if name.startswith("pallas"):
            row[f"{name}_gated_fwd"] = median_ms(fns(True, **opts)[0], *args, reps=reps)
    for solver in ("euler", {"name": "signature", "depth": 3}) if first else ():
        label = solver if isinstance(solver, str) else "signature3"
        row[f"pallas_seq_{label}_gated_fwd"] = median_ms(fns(True, backend="pallas", solver=solver)[0], *args, reps=reps)
    row["stages"] = stage_times(q, k, v, beta, g, reps) if first or long else {}
    if sweep:
        row["sweep"] = {}
        for tuning in (Tuning(transfer_mode="operand"), Tuning(state_stages=3), Tuning(segment_programs=1024)):
            try:
                row["sweep"][repr(tuning)] = stage_times(q, k, v, beta, g, reps, tuning)
            except Exception as e:  # a launch variant may not compile: record why
                row["sweep"][repr(tuning)] = repr(e)[:300]
    flops, byts, floor = work(*shape)
    t = row["pallas_seq_fwd"]
    row.update(tflops=flops / t / 1e9, gbps=byts / t / 1e6, flops=flops, kernel_bytes=byts, floor_bytes=floor,
               floor_ms=max(flops / PEAK_TFLOPS / 1e9, floor / PEAK_TBPS / 1e9))
    return row


def quick(reps, fla_ok):
    """Focused run, printing as it goes: forwards (and fla) on the 4x4096 and 65536 shapes, then fwd+bwd."""
    def say(*a):
        print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)

    scans = (("pallas_seq", dict(backend="pallas", scan="sequential")),
             ("pallas_assoc", dict(backend="pallas", scan="associative")))
    data = {i: inputs(0, *SHAPES[i]) for i in (0, 3)}
    for i, (q, k, v, beta, g, do) in data.items():
        for name, opts in scans:
            say(SHAPES[i], name, "fwd ms", median_ms(fns(False, **opts)[0], q, k, v, beta, g, reps=reps))
        if fla_ok and i == 3:
            fl = fla_times(q, k, v, beta, g, do)
            o = fns(False, backend="pallas", scan="associative")[0](q, k, v, beta, g)[0]
            say(SHAPES[i], "fla fwd / fwd+bwd / gated fwd ms", fl["fwd"], fl["fwdbwd"], fl["gfwd"], "err vs fla", rel(o, fl["o"]))
    for name, opts in scans:
        say(SHAPES[0], name, "fwd+bwd ms", median_ms(fns(False, **opts)[1], *data[0], reps=reps))
    q, k, v, beta, g, do = inputs(1, 1, 1024, 4, 128, 128)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, beta)]
    gp = fns(True, backend="pallas")[1](q, k, v, beta, g, do)
    gr = fns(True, backend="xla")[1](*f32, g, do)
    say("grad rel err pallas vs xla (1x1024x4x128x128, gated)", [rel(a, b) for a, b in zip(gp, gr)])


def table(rows):
    cols = [("shape", "B×T×H×K×V"), ("pallas_seq_fwd", "pallas seq fwd"), ("pallas_seq_fwdbwd", "pallas seq f+b"),
            ("pallas_assoc_fwd", "pallas assoc fwd"), ("pallas_assoc_fwdbwd", "pallas assoc f+b"),
            ("pallas_assoc_gated_fwd", "pallas assoc gated fwd"),
            ("pallas_seq_gated_fwd", "pallas gated fwd"), ("xla_seq_fwd", "xla seq fwd"), ("xla_seq_fwdbwd", "xla seq f+b"),
            ("xla_assoc_fwd", "xla assoc fwd"), ("xla_assoc_fwdbwd", "xla assoc f+b"), ("fla_fwd", "fla fwd"), ("fla_fwdbwd", "fla f+b"),
            ("fla_gated_fwd", "fla gated fwd"), ("tflops", "TFLOP/s (seq fwd)"), ("gbps", "GB/s (seq fwd)"),
            ("floor_ms", "floor ms")]
    fmt = lambda x: f"{x:.3f}" if isinstance(x, float) else str(x)
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c[0], "-")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--shapes", default="0,1,2,3")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--quick", action="store_true", help="focused timings printed as they come (see quick)")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args()
    print("jax", jax.__version__, jax.devices(), flush=True)
    try:
        import fla  # noqa: F401
        import torch

        fla_ok = torch.cuda.is_available()
    except ImportError as e:
        print("fla unavailable:", e)
        fla_ok = False
    if args.quick:
        return quick(args.reps, fla_ok)
    rows = []
    for j, i in enumerate(map(int, args.shapes.split(","))):
        row = bench_shape(SHAPES[i], args.reps, args.sweep and j == 0, fla_ok, j == 0)
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.out:
            with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
                json.dump(rows, f, indent=1)
    print(table(rows))


if __name__ == "__main__":
    main()

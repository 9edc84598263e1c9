"""GPU benchmark of backend="pallas": correctness against the xla backend and fla, then timings.

    python3 benchmarks/bench_kernels.py [--reps 30] [--shapes 0,1,2,3] [--sweep] [--no-check] [--no-xla]
        [--no-fla | --fla-only] [--fla-forward-only] [--lean] [--packed | --packed-only] [--tiny]
        [--stages packed,kda,gla,gdn,dn]
    python3 benchmarks/bench_kernels.py transitions [...]   (GLA / KDA / DPLR rows alone: bench_transitions.py)

One call checks correctness (relative error of pallas on bf16 inputs vs the xla backend on float32
copies: outputs, final states and gradients, on 1x1024x4x128x128, ungated and gated; vs fla's chunk_delta_rule /
chunk_gated_delta_rule outputs on every shape) and times (median ms a call, warm-up excluded;
batches of back-to-back calls for JAX, triton do_bench for fla) flowssm pallas (both scans, forward and
forward+backward), fla, and on the first shape the xla backend, the approximate solvers and every
kernel alone; ``--sweep`` times launch variants on the first shape (right after it). Prints as it goes and a table at the
end, writes JSON to $OUT (or --out) after every shape.

``--packed`` adds (``--packed-only``: runs only) the packed row: 16 documents of random lengths summing to
32768 tokens (``cu_seqlens``), H=16, K=V=128, bf16: flowssm pallas packed against the unpacked call of the
same total length and fla's ``chunk_(gated_)delta_rule(..., cu_seqlens=...)``, errors of outputs and
per-document final states against fla and the xla backend (float32 copies). ``--tiny``: that row at
1x64x2x16x16, 4 documents, chunk 16 (a CPU smoke test; interpret mode, no fla).

``--stages packed,kda,gla,gdn,dn`` times only each kernel alone (``stages.json``; with ``--sweep``, ``kda``,
``gla``, ``gdn`` and ``dn`` once a ``--sweep-tunings`` variant): ``packed`` on the packed row's
chunk-aligned layout (state passes per document), on the unpacked row of the same length, and the forward's
gathers (:func:`packed_stage_times`); ``kda`` with per-channel decays on the first ``--shapes`` shape, ``gla``
the same for linear attention (the additive path: no transfer kernel, ``w = 0`` never read), ``gdn`` the
delta rule with a scalar decay per token (the gated delta rule), ``dn`` the delta rule without decays (the
kernels' path without decays: no decays kernel, no decay cotangents).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import flowssm
from flowssm import varlen
from flowssm.kernels import Tuning, chunked_pallas
from flowssm.kernels import chunk_output as co
from flowssm.kernels import chunk_transfer as ct
from flowssm.kernels import cumulative_decay as cd
from flowssm.kernels import packed as pk
from flowssm.kernels import chunked as kc
from flowssm.kernels import state_pass as sp
from flowssm.kernels import state_pass_mosaic as sm
from flowssm.paths import make_path
from flowssm.solvers import Additive, get_solver
from flowssm.solvers.program import ADDITIVE, INVERSE
from timing import rel, timed  # noqa: F401  (bench_kernels.rel / .timed: used by other scripts)

SHAPES = [(4, 4096, 16, 128, 128), (1, 16384, 16, 128, 128), (8, 2048, 32, 64, 64), (1, 65536, 16, 128, 128),
          (1, 262144, 16, 128, 128), (1, 1048576, 16, 128, 128)]
PACKED = {"T": 32768, "H": 16, "K": 128, "V": 128, "documents": 16}  # the packed row (one packed sequence, B = 1)
PACKED_TINY = {"T": 64, "H": 2, "K": 16, "V": 16, "documents": 4}
CHUNK = 64
PEAK_TFLOPS, PEAK_TBPS = 811.0, 2.9  # measured through XLA on the H100 (shared/anchors)


def shape_of(entry: str) -> tuple[int, ...]:
    """A ``--shapes`` entry: an index into :data:`SHAPES` or ``BxTxHxKxV``."""
    return tuple(int(x) for x in entry.split("x")) if "x" in entry else SHAPES[int(entry)]


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


def correlated_keys(seed, B, T, H, K):
    """LM-like bf16 keys: L2-normalised SiLU features, mean cosine about 0.75 (where doubling's powers of L cancel)."""
    k = jax.nn.silu(jax.random.normal(jax.random.PRNGKey(seed), (B, T, H, K)) + 2.0)
    return (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(jnp.bfloat16)


def method_errors(shape, methods) -> dict[str, float]:
    """Each exact method's pallas output (bf16 inputs) against the xla backend in float32 at full precision, on
    :func:`correlated_keys`: ``err_o_correlated_<method>``."""
    q, _, v, beta, _, _ = inputs(1, *shape)
    k = correlated_keys(2, *shape[:4])
    ref, _ = highest(fns(False, backend="xla")[0])(*(x.astype(jnp.float32) for x in (q, k, v, beta)), None)
    return {f"err_o_correlated_{m.replace(':', '')}": rel(fns(False, backend="pallas", solver=exact_spec(m))[0](q, k, v, beta, None)[0], ref)
            for m in methods}


def exact_spec(method: str) -> dict:
    """``--methods`` entry -> solver mapping: an exact method's name, or ``name:block`` (e.g. ``merge:16``)."""
    name, _, block = method.partition(":")
    return {"name": "exact", "method": name} | ({"block": int(block)} if block else {})


def highest(fn):
    """``fn`` traced with float32 matmuls at full precision: the references (XLA's GPU default is TF32)."""
    def run(*args):
        with jax.default_matmul_precision("highest"):
            return fn(*args)
    return run


def fns(gated, **options):
    """jitted forward ``(o, S)`` and forward+backward (grads of ``sum(o * do)`` w.r.t. q, k, v, beta[, g])."""
    def run(q, k, v, b, g):
        return flowssm.delta_rule(q, k, v, b, g if gated else None, chunk_size=CHUNK, **options)

    def loss(q, k, v, b, g, do):
        return jnp.sum(run(q, k, v, b, g)[0].astype(jnp.float32) * do.astype(jnp.float32))

    argnums = (0, 1, 2, 3, 4) if gated else (0, 1, 2, 3)
    return jax.jit(run), jax.jit(jax.grad(loss, argnums=argnums))


def work(B, T, H, K, V, C=CHUNK, factors=6):
    """Matmul FLOPs of the three kernels (exact solver: 10 n x n products, merge or doubling) and the bytes they move
    as designed."""
    N, n, BH = T // C, C, B * H
    flops = (2 * n * n * K + 4 * (factors - 1) * n**3 + 2 * n * n * (K + V)  # transfer
             + 4 * n * K * V  # state pass
             + 2 * n * K * V + 2 * C * n * K + 2 * C * K * V + 2 * C * n * V)  # output
    byts = (2 * T * (K + V) + 12 * T + 2 * T * (K + V)  # transfer: k, v, beta/alpha/g in; w, u out
            + 2 * T * (2 * K + V) + 4 * T + 2 * N * K * V  # state: k, w, u, G in; S_in out
            + 2 * T * (3 * K + V) + 8 * T + 2 * N * K * V + 2 * T * V)  # output
    floor_bytes = 2 * T * (2 * K + 2 * V) + 4 * T  # q, k, v in, o out, beta
    return flops * N * BH, byts * BH, floor_bytes * BH


def fla_times(q, k, v, beta, g, do, reps_ms=200, backward=True, cu_seqlens=None):
    """fla's outputs, final states and median ms (``cu_seqlens``: packed sequences, B = 1)."""
    import torch
    from fla.ops.delta_rule import chunk_delta_rule
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from triton.testing import do_bench

    t = lambda x, grad=True: torch.from_numpy(np.asarray(x.astype(jnp.float32))).cuda().to(
        torch.bfloat16 if x.dtype == jnp.bfloat16 else torch.float32).requires_grad_(grad)
    tq, tk, tv, tb, tg, tdo = t(q), t(k), t(v), t(beta), t(g), t(do, False)
    packed = {} if cu_seqlens is None else {"cu_seqlens": torch.tensor(np.asarray(cu_seqlens), dtype=torch.long).cuda()}
    out = {}
    fwd = lambda: chunk_delta_rule(tq, tk, tv, tb, output_final_state=True, **packed)
    gfwd = lambda: chunk_gated_delta_rule(tq, tk, tv, tg, tb, output_final_state=True, **packed)
    o, S = fwd()
    go, gS = gfwd()
    out["o"], out["S"] = (x.detach().float().cpu().numpy() for x in (o, S))
    out["go"], out["gS"] = (x.detach().float().cpu().numpy() for x in (go, gS))
    bench = lambda f: do_bench(f, warmup=50, rep=reps_ms, return_mode="median")
    out["fwd"] = bench(lambda: fwd()[0])
    if backward:
        out["fwdbwd"] = bench(lambda: fwd()[0].backward(tdo))
    out["gfwd"] = bench(lambda: gfwd()[0])
    del tq, tk, tv, tb, tg, tdo
    torch.cuda.empty_cache()
    return out


def kernel_calls(q, k, v, beta, g, do, tuning=Tuning(), interpret=None, method: str = "merge", spans=None,
                 solver=None, packed_rows=None):
    """Each pallas kernel (gated, exact ``method``, see :func:`exact_spec`, or ``solver``: e.g. ``Additive()`` for
    linear attention, GLA: no transfer, no ``w``) as ``chunked_pallas`` calls it, on
    token-major bf16 operands:
    ``{name: (jitted fn, args)}``. Inputs are arrays (intermediates computed) or ``jax.ShapeDtypeStruct``s
    (intermediates by ``jax.eval_shape``; ``benchmarks/kernel_resources.py`` lowers them for the GPU).
    ``g``: ``[B, T, H]``, per key channel ``[B, T, H, K]`` (KDA) or None (no decays: the op's path for
    ``g=None``). ``spans`` (:class:`flowssm.varlen.Spans`,
    ``B = 1``, beta and g in the chunk-aligned layout): the state passes run one program per (head, sequence);
    q, k, v and do are in the layout too, or with ``packed_rows`` (:class:`flowssm.kernels.packed.ChunkTable`) the
    packed rows, read in place as the op does."""
    run = jax.eval_shape if isinstance(q, jax.ShapeDtypeStruct) else (lambda f, *a: f(*a))
    B, T, H, K = beta.shape[:3] + k.shape[-1:]
    V = v.shape[-1]
    N, BH, C = T // CHUNK, B * H, CHUNK
    per_channel = g is not None and len(g.shape) == 4
    token = (lambda x: run(lambda y: y.reshape(B, N, C, H, y.shape[-1]), x)) if packed_rows is None else (lambda x: x)
    head_major = lambda x: run(lambda y: jnp.moveaxis(y, 2, 1).reshape(BH, N, C, *y.shape[3:]).astype(jnp.float32), x)
    qc, keys, values, dO = map(token, (q, k, v, do))
    undecayed = g is None  # the op's path without decays: G = 0 without the decays kernel, no decay cotangents
    b = head_major(beta)
    ld = head_major(run(lambda x: jnp.zeros(x.shape, jnp.float32), beta) if undecayed else g)
    states = BH if spans is None else BH * spans.first.shape[0]
    S0 = run(lambda: jnp.zeros((states, K, V), jnp.float32))
    t = tuning.resolve(jnp.bfloat16, K, V, CHUNK, CHUNK, per_channel=per_channel)  # as chunked_pallas would
    solver, scale, bv = solver or get_solver(exact_spec(method)), K**-0.5, min(t.block_v, V)
    inverse = solver.program().structure == INVERSE  # the transfer saves T for its backward
    opts = dict(interpret=interpret, **({} if packed_rows is None else {"packed_rows": packed_rows}))
    packed = {} if spans is None else {"spans": spans}
    calls = {}

    def add(name, fn, *args):
        calls[name] = (jax.jit(fn), args)
        return run(calls[name][0], *args)

    additive = solver.program().structure == ADDITIVE  # no transfer: w = 0, u = v (token-major)
    decayed = per_channel and not additive  # the decays kernel also writes the keys decayed to the chunk end
    if decayed:
        G, state_keys = add("decays", lambda x, k: cd.cumulative_decay_kernel(x, 1, keys=k, heads=H, **opts), ld, keys)
    elif undecayed:
        G, state_keys = ld, keys
    else:
        G, state_keys = add("decays", lambda x: cd.cumulative_decay_kernel(x, 1, **opts), ld), keys
    if additive:  # u: the values, in the layout (the op gathers them for an additive path)
        w, u, Tm = None, values if packed_rows is None else run(lambda y: pk.to_layout(y, packed_rows, C), values), []
    else:
        w, u, *Tm = add("transfer", lambda *a: ct.chunk_transfer_kernel(
            *a[:5], solver=solver, mode=t.transfer_mode, save_transfer=inverse, heads=H, score_mode=t.score_mode,
            channel_block=t.channel_block, num_warps=t.transfer_warps, G=a[5], **opts),
            keys, values, b, b, ld, G)
    # the sequential passes on Mosaic GPU where the op runs them there, the output fused where it fuses it
    mosaic = spans is None and packed_rows is None and kc._use_mosaic(t, keys, G, C, V, additive)
    fused = mosaic and kc.fuse_output(t, BH * (V // bv))
    if mosaic:
        w_m, u_m = run(lambda w_, u_: kc._generators(w_, u_, keys, H), w, u)
        output = dict(scale=scale, save_corrected=not additive) if fused else {}
        S_in, _, *fused_out = add("state_pass (output fused)" if fused else "state_pass", lambda *a: sm.state_pass_mosaic(
            *a[:5], heads=H, block_v=t.block_v, num_stages=t.mosaic_stages, interpret=interpret,
            **({"q": a[5]} if fused else {}), **output), state_keys, G, w_m, u_m, S0, *([qc] if fused else []))
    else:
        S_in, _ = add("state_pass", lambda *a: sp.state_pass_kernel(
            *a, heads=H, block_v=bv, num_warps=t.state_warps, num_stages=t.state_stages, decayed_keys=decayed,
            **packed, **opts, rank=1), state_keys, G, w, u, S0)
    _, *saved = fused_out if fused else add("output", lambda *a: co.chunk_output_kernel(
        *a, rank=1, scale=scale, out_dtype=jnp.bfloat16, heads=H, save_corrected=not additive,
        save_scores=per_channel, score_mode=t.score_mode, channel_block=t.channel_block, num_warps=t.output_warps,
        **opts), qc, keys, G, w, u, S_in)
    corrected, scores = (u if additive else saved[0]), saved[-1:] if per_channel else []
    if mosaic:
        dS_out, dv, _ = add("state_pass_bwd", lambda *a: sm.state_pass_bwd_mosaic(
            *a, rank=1, scale=scale, heads=H, block_v=t.block_v, num_stages=t.mosaic_stages, interpret=interpret),
            qc, keys, G, w_m, dO, S0)
    else:
        dS_out, dv, _ = add("state_pass_bwd", lambda *a: sp.state_pass_bwd_kernel(  # a[6]: the saved scores
            *a[:6], rank=1, scale=scale, heads=H, block_v=bv, num_warps=t.state_warps, num_stages=t.state_bwd_stages,
            **packed, scores=a[6] if len(a) > 6 else None, **opts), qc, keys, G, w, dO, S0, *scores)
    _, dk, dG = add("output_bwd", lambda *a: co.chunk_output_bwd_kernel(
        *a, rank=1, scale=scale, heads=H, block_k=t.block_k, score_mode=t.score_mode,
        num_warps=t.backward_warps, decay_grads=not undecayed, **opts), qc, keys, G, corrected, S_in, dS_out, dO)
    if not additive:  # dw = -dv' S_in^T formed there
        add("transfer_bwd", lambda *a: ct.chunk_transfer_bwd_kernel(  # with the decays' one vjp (micro_log_decay)
            *a[:8], None, a[8], solver=solver, heads=H, score_mode=t.score_mode, num_warps=t.backward_warps,
            G=a[9], dG=a[10], dkeys=a[11], S_in=a[12], decay_grads=not undecayed, **opts),
            keys, values, b, b, ld, Tm[0] if inverse else None, w, u, dv, G, dG, dk, S_in)
    return calls


def stage_times(q, k, v, beta, g, do, reps, tuning=Tuning(), segmented=True, spans=None, solver=None,
                packed_rows=None):
    """Median ms of each kernel of :func:`kernel_calls` alone (``solver``, ``spans``, ``packed_rows`` as there),
    and (``segmented``) of the segmented associative scan."""
    calls = kernel_calls(q, k, v, beta, g, do, tuning, spans=spans, solver=solver, packed_rows=packed_rows)
    times = {name: timed(fn, *args, reps=reps) for name, (fn, args) in calls.items()}
    if not segmented:
        return times
    keys, G, w, u, S0 = next(args for name, (_, args) in calls.items() if name.startswith("state_pass"))[:5]
    t = tuning.resolve(jnp.bfloat16, k.shape[-1], v.shape[-1], CHUNK, CHUNK)
    N, programs = G.shape[1], G.shape[0] * (v.shape[-1] // min(t.block_v, v.shape[-1]))
    segments = kc.auto_segments("associative", N, programs, t)
    mosaic = kc._use_mosaic(t, keys, G, CHUNK, v.shape[-1])  # as the op decides
    segmented = jax.jit(lambda *a: kc.segmented_states(*a, segments, heads=k.shape[2], tuning=t, mosaic=mosaic))
    times[f"assoc_segmented ({segments} segments)"] = timed(segmented, keys, G, w, u, S0, reps=reps)
    return times


def packed_stage_times(T, H, K, V, documents, reps) -> dict:
    """Where the packed forward's time goes: each kernel alone as the op runs it (q, k, v, do read in place from
    the packed rows, beta and g gathered into the chunk-aligned layout, state passes per document), and the same
    kernels on the unpacked row (sequential, one program per head)."""
    q, k, v, beta, g, do = inputs(0, 1, T, H, K, V)
    cu = jnp.asarray(packing(0, T, documents))
    lay = varlen.layout(cu, T, CHUNK, chunks=varlen.pallas_chunks(varlen.num_chunks(T, documents, CHUNK)))
    slot = lambda x: varlen.to_slots(x, lay, 1)
    packed = stage_times(q, k, v, slot(beta), slot(g), do, reps, segmented=False, spans=lay.spans,
                         packed_rows=pk.table(lay, T, CHUNK))
    return {"packed": packed, "unpacked": stage_times(q, k, v, beta, g, do, reps, segmented=False),
            "chunks": {"packed": int(lay.resets.seq.shape[0]), "unpacked": T // CHUNK}}


def check(say):
    """Correctness on a small shape: pallas (bf16) vs the xla backend (float32 copies), outputs and gradients."""
    q, k, v, beta, g, do = inputs(1, 1, 1024, 4, 128, 128)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, beta)]
    out = {}
    for gated, scan in ((False, "sequential"), (True, "sequential"), (True, "associative")):
        pf, pb = fns(gated, backend="pallas", scan=scan)
        xf, xb = map(highest, fns(gated, backend="xla", scan=scan))
        o, S = pf(q, k, v, beta, g)
        o_r, S_r = xf(*f32, g)
        grads = [rel(a, b) for a, b in zip(pb(q, k, v, beta, g, do), xb(*f32, g, do))]
        tag = f"{'gated' if gated else 'plain'}_{scan[:3]}"
        out.update({f"err_o_{tag}": rel(o, o_r), f"err_S_{tag}": rel(S, S_r), f"err_grads_{tag}": grads})
        say(tag, "rel err o / S / grads(q, k, v, beta[, g])", out[f"err_o_{tag}"], out[f"err_S_{tag}"], grads)
    return out


def fla_row(row, args, do, say, backward=True):
    """fla's timings on the same inputs and the relative error of pallas's outputs against fla's."""
    fl = fla_times(*args, do, backward=backward)
    o_p, S_p = fns(False, backend="pallas")[0](*args)
    go_p, gS_p = fns(True, backend="pallas")[0](*args)
    row.update(err_o_vs_fla=rel(o_p, fl["o"]), err_S_vs_fla=rel(S_p, fl["S"]),
               err_go_vs_fla=rel(go_p, fl["go"]), err_gS_vs_fla=rel(gS_p, fl["gS"]),
               fla_fwd=fl["fwd"], fla_gated_fwd=fl["gfwd"], **({"fla_fwdbwd": fl["fwdbwd"]} if backward else {}))
    say(row["shape"], "fla", {key: round(val, 4) for key, val in row.items() if "fla" in key})


def peak_gb() -> float | None:
    """Peak device memory so far (GB), where the backend reports it."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 1e9 if "peak_bytes_in_use" in stats else None


def bench_shape(shape, reps, fla_ok, first, say, xla=True, flowssm_ok=True, lean=False, fla_backward=True,
                row=None, save=lambda: None, scans=("sequential", "associative"), methods=(), tuning=None):
    """One shape's row (filled into ``row``, ``save()`` after each variant); ``lean``: the ungated variants only;
    ``methods``: other exact methods' sequential rows (``pallas_seq_<method>``; the default is the merge);
    ``tuning``: the pallas rows' :class:`Tuning` (None: the default)."""
    q, k, v, beta, g, do = inputs(0, *shape)
    row = {} if row is None else row
    row["shape"] = "x".join(map(str, shape))
    args = (q, k, v, beta, g)
    if not flowssm_ok:
        fla_row(row, args, do, say, fla_backward)
        return row
    label = {"sequential": "seq", "associative": "assoc", "auto": "auto"}
    tuned = {} if tuning is None else dict(tuning=tuning)
    variants = [(f"pallas_{label[scan]}", dict(backend="pallas", scan=scan, **tuned)) for scan in scans]
    variants += [(f"pallas_seq_{m.replace(':', '')}", dict(backend="pallas", scan="sequential", solver=exact_spec(m)))
                 for m in methods]
    B, T, H, K, V = shape
    t = Tuning().resolve(jnp.bfloat16, K, V, CHUNK, CHUNK)
    row["auto_segments"] = kc.auto_segments("auto", T // CHUNK, B * H * (V // min(t.block_v, V)), t)
    row["assoc_segments"] = kc.auto_segments("associative", T // CHUNK, B * H * (V // min(t.block_v, V)), t)
    if first and xla:
        variants += [("xla_seq", dict(backend="xla", scan="sequential"))]
    for name, opts in variants:
        row[f"{name}_fwd"] = timed(fns(False, **opts)[0], *args, reps=reps)
        row[f"{name}_fwdbwd"] = timed(fns(False, **opts)[1], *args, do, reps=reps)
        if name.startswith("pallas") and not lean:
            row[f"{name}_gated_fwd"] = timed(fns(True, **opts)[0], *args, reps=reps)
        if name == "pallas_seq" and not lean:
            row[f"{name}_gated_fwdbwd"] = timed(fns(True, **opts)[1], *args, do, reps=reps)
        row["peak_gb"] = peak_gb()
        say(row["shape"], name, {key: round(val, 3) for key, val in row.items() if key.startswith(name)},
            "peak GB so far", row["peak_gb"])
        save()
    if methods:
        row.update(method_errors(shape, ("merge",) + tuple(methods)))
        say(row["shape"], "errors on correlated keys", {key: f"{val:.1e}" for key, val in row.items() if "correlated" in key})
        save()
    if first:
        for solver in ("euler", {"name": "signature", "depth": 3}):
            label = solver if isinstance(solver, str) else "signature3"
            row[f"pallas_seq_{label}_gated_fwd"] = timed(fns(True, backend="pallas", solver=solver)[0], *args, reps=reps)
        row["stages"] = stage_times(q, k, v, beta, g, do, reps)
        say(row["shape"], "stages", {key: round(val, 3) for key, val in row["stages"].items()})
    flops, byts, floor = work(*shape)
    t = min(row[f"{name}_fwd"] for name, _ in variants if name.startswith("pallas"))  # the faster scan
    row.update(tflops=flops / t / 1e9, gbps=byts / t / 1e6, flops=flops, kernel_bytes=byts, floor_bytes=floor,
               floor_ms=max(flops / PEAK_TFLOPS / 1e9, floor / PEAK_TBPS / 1e9))
    if fla_ok:
        fla_row(row, args, do, say, fla_backward)
    return row


def packing(seed: int, T: int, documents: int) -> np.ndarray:
    """``cu_seqlens`` (int32 ``[documents + 1]``) of ``documents`` non-empty documents of random lengths summing to T."""
    cuts = np.random.default_rng(seed).choice(np.arange(1, T), documents - 1, replace=False)
    return np.concatenate([[0], np.sort(cuts), [T]]).astype(np.int32)


def packed_row(T, H, K, V, documents, reps, fla_ok, say, fla_backward=True):
    """The packed row: flowssm pallas with ``cu_seqlens`` vs the unpacked call of the same total length (the
    target: within 10 %) and vs fla on the same packing (errors and timings); errors vs the xla backend."""
    q, k, v, beta, g, do = inputs(0, 1, T, H, K, V)
    cu = jnp.asarray(packing(0, T, documents))
    args = (q, k, v, beta, g)
    row = {"shape": f"packed 1x{T}x{H}x{K}x{V}", "documents": documents, "cu_seqlens": cu.tolist()}
    f32 = [x.astype(jnp.float32) for x in (q, k, v, beta)]
    for gated in (False, True):
        tag = "gated_" if gated else ""
        packed_fwd, packed_grad = fns(gated, backend="pallas", cu_seqlens=cu)
        o, S = packed_fwd(*args)
        o_x, S_x = highest(fns(gated, backend="xla", cu_seqlens=cu)[0])(*f32, g)
        row.update({f"{tag}err_o_vs_xla": rel(o, o_x), f"{tag}err_S_vs_xla": rel(S, S_x)})
        row[f"pallas_packed_{tag}fwd"] = timed(packed_fwd, *args, reps=reps)
        row[f"pallas_packed_{tag}fwdbwd"] = timed(packed_grad, *args, do, reps=reps)
        unpacked_fwd, unpacked_grad = fns(gated, backend="pallas")
        row[f"pallas_unpacked_{tag}fwd"] = timed(unpacked_fwd, *args, reps=reps)
        row[f"pallas_unpacked_{tag}fwdbwd"] = timed(unpacked_grad, *args, do, reps=reps)
        for mode in ("fwd", "fwdbwd"):
            row[f"packed_over_unpacked_{tag}{mode}"] = row[f"pallas_packed_{tag}{mode}"] / row[f"pallas_unpacked_{tag}{mode}"]
        say(row["shape"], "gated" if gated else "plain", {key: round(val, 4) for key, val in row.items()
                                                          if isinstance(val, float) and ("gated" in key) == gated})
        if fla_ok:
            if not gated:
                fl = fla_times(*args, do, backward=fla_backward, cu_seqlens=cu)
                row.update(fla_packed_fwd=fl["fwd"], fla_packed_gated_fwd=fl["gfwd"],
                           **({"fla_packed_fwdbwd": fl["fwdbwd"]} if fla_backward else {}))
                say(row["shape"], "fla", {key: round(val, 4) for key, val in row.items() if key.startswith("fla")})
            o_fla, S_fla = (fl["go"], fl["gS"]) if gated else (fl["o"], fl["S"])
            row.update({f"{tag}err_o_vs_fla": rel(o, o_fla), f"{tag}err_S_vs_fla": rel(S, S_fla)})
    return row


SWEEP = (Tuning(), Tuning(state_lowering="triton"), Tuning(mosaic_stages=2), Tuning(backward_warps=8),
         Tuning(block_k=32), Tuning(block_k=128), Tuning(output_warps=8), Tuning(state_stages=2),
         Tuning(transfer_mode="operand"))


def tunings(text: str) -> tuple[Tuning, ...]:
    """``--sweep-tunings``: ``;``-separated variants of ``,``-separated ``field=value`` (``default``: Tuning())."""
    def value(v: str):
        return int(v) if v.isdigit() else {"None": None, "true": True, "false": False}.get(v, v)
    return tuple(Tuning(**{k: value(v) for k, v in (kv.split("=") for kv in item.split(",") if kv != "default")})
                 for item in text.split(";"))


def label_of(tuning: Tuning) -> str:
    """The fields of ``tuning`` that differ from the defaults ("default" if none)."""
    return ", ".join(f"{name}={value!r}" for name, value in tuning.changes().items()) or "default"


def sweep(shape, reps, say, variants=SWEEP, scan: str = "sequential"):
    """Launch variants of the whole pallas forward and forward+backward (ungated, ``scan``) on ``shape``: ms of
    each, the relative difference of each variant's forward outputs (o, S) and gradients (q, k, v, beta) from
    the first variant's, and each variant's output error on LM-like keys (:func:`correlated_keys`) against the
    xla backend in float32 at full precision (``err_o_correlated``)."""
    q, k, v, beta, g, do = inputs(0, *shape)
    B, _, H, K, V = shape
    S0_shape = (B, H, K, V)
    lm_keys = correlated_keys(2, *shape[:4])
    reference, _ = highest(fns(False, backend="xla")[0])(*(x.astype(jnp.float32) for x in (q, lm_keys, v, beta)), None)
    out, first = {}, None
    for tuning in variants:
        label = label_of(tuning)
        try:
            f = lambda q_, k_, v_, b_: chunked_pallas(
                q_, make_path(k_, v_, b_), jnp.zeros(S0_shape, jnp.float32), scale=K**-0.5, chunk_size=CHUNK,
                solver=get_solver("exact"), scan=scan, semantics="discrete", tuning=tuning)
            loss = lambda *a: jnp.sum(f(*a[:4])[0].astype(jnp.float32) * a[4].astype(jnp.float32))
            grad, forward = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))), jax.jit(f)
            grads, (o, S) = grad(q, k, v, beta, do), forward(q, k, v, beta)  # o, S of the forward alone
            first = (grads, o, S) if first is None else first
            out[label] = dict(fwd=timed(forward, q, k, v, beta, reps=reps),
                              fwdbwd=timed(grad, q, k, v, beta, do, reps=reps),
                              err_o_vs_first=rel(o, first[1]), err_S_vs_first=rel(S, first[2]),
                              err_grads_vs_first=[rel(a, b) for a, b in zip(grads, first[0])],
                              err_o_correlated=rel(forward(q, lm_keys, v, beta)[0], reference))
            del grads, o, S
        except Exception as e:  # a launch variant may not compile: record why
            out[label] = repr(e)[:300]
        say("sweep", label, out[label])
    return out


def segment_sweep(shape, reps, say, targets=(128, 256, 512, 1024, 2048)):
    """The associative (segmented) scan's forward and forward+backward against ``Tuning.segment_programs``."""
    q, k, v, beta, g, do = inputs(0, *shape)
    B, T, H, K, V = shape
    out = {}
    for target in targets:
        tuning = Tuning(segment_programs=target)
        f = lambda q_, k_, v_, b_: chunked_pallas(
            q_, make_path(k_, v_, b_), jnp.zeros((B, H, K, V), jnp.float32), scale=K**-0.5, chunk_size=CHUNK,
            solver=get_solver("exact"), scan="associative", semantics="discrete", tuning=tuning)
        loss = lambda *a: jnp.sum(f(*a[:4])[0].astype(jnp.float32) * a[4].astype(jnp.float32))
        t = tuning.resolve(jnp.bfloat16, K, V, CHUNK, CHUNK)
        segments = kc.auto_segments("associative", T // CHUNK, B * H * (V // min(t.block_v, V)), t)
        out[str(target)] = dict(segments=segments, fwd=timed(jax.jit(f), q, k, v, beta, reps=reps),
                                fwdbwd=timed(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))), q, k, v, beta, do, reps=reps))
        say("segment sweep", "x".join(map(str, shape)), target, out[str(target)])
    return out


def table(rows):
    cols = [("shape", "B×T×H×K×V"), ("pallas_seq_fwd", "pallas seq fwd"), ("pallas_seq_fwdbwd", "pallas seq f+b"),
            ("pallas_seq_gated_fwdbwd", "pallas gated f+b"),
            ("pallas_assoc_fwd", "pallas assoc fwd"), ("pallas_assoc_fwdbwd", "pallas assoc f+b"),
            ("pallas_assoc_gated_fwd", "pallas assoc gated fwd"), ("pallas_auto_fwd", "pallas auto fwd"),
            ("pallas_auto_fwdbwd", "pallas auto f+b"),
            ("pallas_seq_gated_fwd", "pallas gated fwd"), ("xla_seq_fwd", "xla seq fwd"), ("xla_seq_fwdbwd", "xla seq f+b"),
("fla_fwd", "fla fwd"), ("fla_fwdbwd", "fla f+b"),
            ("fla_gated_fwd", "fla gated fwd"), ("tflops", "TFLOP/s (best fwd)"), ("gbps", "GB/s (best fwd)"),
            ("floor_ms", "floor ms"), ("auto_segments", "segments (auto)"), ("assoc_segments", "segments (assoc)"),
            ("peak_gb", "peak GB")]
    fmt = lambda x: f"{x:.3f}" if isinstance(x, float) else str(x)
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c[0], "-")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def stages_only(args, say) -> None:
    """``--stages``: per-kernel times only (written to ``stages.json`` after each part)."""
    global CHUNK
    out = {}
    for part in args.stages.split(","):
        if part == "packed":
            CHUNK = 16 if args.tiny else CHUNK
            size = PACKED_TINY if args.tiny else PACKED
            out["packed"] = packed_stage_times(**size, reps=args.reps)
        elif part in ("kda", "gla", "gdn", "dn"):  # per-channel decays (gla: linear attention, no transfer); gdn:
            B, T, H, K, V = (1, 64, 2, 16, 16) if args.tiny else shape_of(args.shapes.split(",")[0])  # scalar; dn: none
            q, k, v, beta, _, do = inputs(0, B, T, H, K, V)
            decays = (B, T, H) if part == "gdn" else (B, T, H, K)
            g = None if part == "dn" else jax.nn.log_sigmoid(jax.random.normal(jax.random.PRNGKey(5), decays) + 2.0)
            solver = Additive() if part == "gla" else None
            times = lambda t: stage_times(q, k, v, beta, g, do, args.reps, tuning=t, segmented=False, solver=solver)
            if args.sweep:  # one entry a launch variant
                out[part] = {"shape": f"{B}x{T}x{H}x{K}x{V}"}
                for tuning in args.sweep_tunings:
                    out[part][label_of(tuning)] = times(tuning)
                    say(part, label_of(tuning), json.dumps(out[part][label_of(tuning)]))
            else:
                out[part] = {"shape": f"{B}x{T}x{H}x{K}x{V}", **times(Tuning())}
        else:
            raise SystemExit(f"--stages: expected 'packed', 'kda', 'gla', 'gdn' or 'dn', got {part!r}")
        say(part, json.dumps(out[part]))
        if args.out:
            with open(os.path.join(args.out, "stages.json"), "w") as f:
                json.dump(out, f, indent=1)


def main():
    global CHUNK  # --tiny: chunk 16
    if sys.argv[1:2] == ["transitions"]:
        import bench_transitions

        return bench_transitions.main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--shapes", default="0,1,2,3", help="indices into SHAPES and/or BxTxHxKxV, e.g. 0,1x512x2x128x128")
    parser.add_argument("--sweep", action="store_true", help="launch variants on the first shape")
    parser.add_argument("--sweep-only", action="store_true",
                        help="launch variants on every shape of --shapes, no other rows (A/B of Tuning fields)")
    parser.add_argument("--sweep-scan", default="sequential", help="the scan of the launch variants (e.g. auto)")
    parser.add_argument("--sweep-tunings", type=tunings, default=SWEEP,
                        help="with --sweep: e.g. 'default;state_lowering=triton;mosaic_stages=2'")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--scans", default="sequential,associative", help="the pallas scans to time "
                        "(sequential, associative, auto)")
    parser.add_argument("--methods", default="",
                        help="other exact methods to time (sequential), e.g. substitution,doubling,merge:16")
    parser.add_argument("--no-xla", action="store_true", help="skip the xla backend's timings")
    parser.add_argument("--no-fla", action="store_true", help="skip fla (its autotuning takes minutes a shape)")
    parser.add_argument("--fla-only", action="store_true", help="fla's timings and the errors against it only")
    parser.add_argument("--fla-forward-only", action="store_true", help="skip fla's forward+backward")
    parser.add_argument("--lean", action="store_true", help="ungated pallas variants only (see bench_shape)")
    parser.add_argument("--kernels", type=json.loads, default={},
                        help='the pallas rows\' Tuning fields as JSON, e.g. \'{"transfer_mode": "f16"}\'')
    parser.add_argument("--fla-max-tokens", type=int, default=262144, help="skip fla on shapes with more B x T")
    parser.add_argument("--segment-sweep", action="store_true",
                        help="the segmented scan against Tuning.segment_programs on every shape (before fla)")
    parser.add_argument("--segment-targets", default="128,256,512,1024,2048",
                        help="the Tuning.segment_programs values of --segment-sweep")
    parser.add_argument("--packed", action="store_true", help="add the packed row (cu_seqlens) after the shapes")
    parser.add_argument("--packed-only", action="store_true", help="the packed row only (no check, no shapes)")
    parser.add_argument("--tiny", action="store_true", help="the packed row at a tiny shape, chunk 16 (CPU smoke test)")
    parser.add_argument("--stages", default="", help="only per-kernel times: 'packed' (packed_stage_times) and/or "
                        "'kda' / 'gla' (per-channel decays on the first shape of --shapes) / 'gdn' (scalar decays), "
                        "comma-separated")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args()
    t0 = time.time()
    say = lambda *a: print(f"[{time.time() - t0:6.1f}s]", *a, flush=True)
    say("jax", jax.__version__, jax.devices())
    try:
        import fla  # noqa: F401
        import torch

        fla_ok = torch.cuda.is_available() and not args.no_fla
    except ImportError as e:
        say("fla unavailable:", e)
        fla_ok = False
    packed_only = args.packed_only or args.tiny
    if args.stages:
        return stages_only(args, say)
    result = {"check": {} if args.no_check or args.fla_only or packed_only else check(say), "rows": [],
              "kernels": args.kernels}

    def save():
        if args.out:
            with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
                json.dump(result, f, indent=1)

    shapes = [] if packed_only else [shape_of(entry) for entry in args.shapes.split(",")]
    if args.sweep_only:
        for shape in shapes:
            result.setdefault("sweeps", {})["x".join(map(str, shape))] = sweep(shape, args.reps, say,
                                                                               args.sweep_tunings, args.sweep_scan)
            save()
        return
    for j, shape in enumerate(shapes):
        if args.segment_sweep:
            result.setdefault("segment_sweep", {})["x".join(map(str, shape))] = segment_sweep(
                shape, args.reps, say, tuple(int(x) for x in args.segment_targets.split(",")))
            save()
        result["rows"].append({})
        bench_shape(shape, args.reps, fla_ok and shape[0] * shape[1] <= args.fla_max_tokens, j == 0 and not args.lean, say, xla=not args.no_xla,
                    flowssm_ok=not args.fla_only, lean=args.lean, fla_backward=not args.fla_forward_only,
                    row=result["rows"][-1], save=save, scans=tuple(args.scans.split(",")),
                    methods=tuple(m for m in args.methods.split(",") if m),
                    tuning=Tuning(**args.kernels) if args.kernels else None)
        save()
        if args.sweep and j == 0:
            result["sweep"] = sweep(shape, args.reps, say, args.sweep_tunings, args.sweep_scan)
            save()
    if args.packed or packed_only:
        CHUNK = 16 if args.tiny else CHUNK
        result["packed"] = packed_row(**(PACKED_TINY if args.tiny else PACKED), reps=args.reps,
                                      fla_ok=fla_ok and not args.tiny, say=say, fla_backward=not args.fla_forward_only)
        save()
        print({key: val for key, val in result["packed"].items() if key != "cu_seqlens"})
    print(table(result["rows"]))


if __name__ == "__main__":
    main()

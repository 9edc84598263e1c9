"""The sequential state pass: Mosaic GPU (``state_pass_mosaic``) against the Triton lowering (``state_pass_kernel``).

    python3 -W ignore benchmarks/bench_state_pass.py [--out DIR] [--reps 30] [--shapes 0,1]
        [--mosaic 64:2,64:4,128:2,128:3] [--hang-s 240] [--tiny] [--backward 64:2,64:1,128:1]
        [--segments auto|S] [--flows]

Per shape (B x T x H x K x V, bf16, chunk 64): the pass's operands as ``chunked_pallas`` hands them over
(token-major unit keys, ``w, u`` from the exact transfer reference on fla's anchor inputs, cumulative
log-decays ``G`` of gates ``log sigmoid(N(4, 1))`` (mild: a chunk keeps ~30% of its entering state, so the
carried state is checked too), a random non-zero ``S0``), ``state_pass_reference`` (float32), then for each pass:

- check: relative errors of S_in and S_final against the reference (and, for Mosaic, against Triton), the
  worst chunk's S_in error, and whether the outputs are finite after output-sized NaN buffers were freed
  just before the call ("poison": a tile left unwritten shows up as NaN when the allocator hands the
  poisoned block back);
- time: median ms a call (``timing.timed``), µs a chunk, effective GB/s (k, w, u, G read and S_in written
  once; the kernels re-read k and w for every column block).

Triton (at ``Tuning``'s bf16 launch options) runs on every shape first, then each Mosaic pass
(``--mosaic``: block_v:stages items) on every shape. A pass that raises (lowering, compilation, launch) is
reported with its traceback and the others still run; one that takes longer than ``--hang-s`` ends the
process after saving. ``--tiny``: one 1x256x2x64x64 shape, both kernels in interpret mode on CPU. JSON goes
to ``DIR/bench_state_pass.json`` (``--out``, default ``$OUT``) after every step; a table is printed at the end.

``--backward`` (block_v:stages items): the backward pass instead (``state_pass_bwd_mosaic`` against
``state_pass_bwd_kernel``, rank 1, unit-norm token-major q, random do and dS_final), checked on
(dS_out, dv', dS0) against ``state_pass_bwd_reference`` (float32) and timed the same way. With
``--segments`` (a divisor of the chunks, or ``auto``: what ``scan="auto"`` splits the shape into, e.g. 8 at
1x65536x16x128x128) the segmented scan's backward instead (``chunked.segmented_cotangents``: both reverse
passes, on Triton or on Mosaic, and the scan over segments between them, with the reference's segment
transitions ``P``), checked against the same unsegmented reference.

``--flows``: the segmented scan's segment flows instead (flow mode: ``[P | Q]`` of every segment from
``[I | 0]``, ``--segments`` of them, column blocks ``min(block_v, K, V)``), Triton's and each ``--mosaic``
item's, checked on ``P`` and ``Q`` against ``state_pass_reference(..., flow=True)`` (float32) and timed the
same way (GB/s: k, w, u, G read once).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import threading
import time
import traceback

import jax
import jax.numpy as jnp

from flowssm.kernels import Tuning
from flowssm.kernels import chunk_transfer as ct
from flowssm.kernels import cumulative_decay as cd
from flowssm.kernels.chunked import segmented_cotangents
from flowssm.kernels.launch import auto_segments
from flowssm.kernels.state_pass import (state_pass_bwd_kernel, state_pass_bwd_reference, state_pass_kernel,
                                       state_pass_reference)
from flowssm.kernels.state_pass_mosaic import state_pass_bwd_mosaic, state_pass_mosaic
from flowssm.solvers import get_solver
from timing import rel, timed

SHAPES = [(4, 4096, 16, 128, 128), (1, 65536, 16, 128, 128)]
TINY = (1, 256, 2, 64, 64)
CHUNK = 64


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def operands(seed: int, B: int, T: int, H: int, K: int, V: int):
    """(keys token-major [B, N, C, H, K] bf16, G [BH, N, C] f32, w, u [BH, N, C, K|V] bf16, S0 [BH, K, V] f32)."""
    kk, kv, kb, kg, ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    N, BH = T // CHUNK, B * H
    k = jax.random.normal(kk, (B, T, H, K))
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(jnp.bfloat16)
    v = jax.random.normal(kv, (B, T, H, V)).astype(jnp.bfloat16)
    beta = jax.nn.sigmoid(jax.random.uniform(kb, (B, T, H)))
    g = jax.nn.log_sigmoid(jax.random.normal(kg, (B, T, H)) + 4.0)  # e^{G_end} ~ 0.3: states carry over chunks
    chunked = lambda x: x.reshape(B, N, CHUNK, H, x.shape[-1])
    head_major = lambda x: jnp.moveaxis(x.reshape(B, N, CHUNK, H), 3, 1).reshape(BH, N, CHUNK).astype(jnp.float32)
    keys, values, b, ld = chunked(k), chunked(v), head_major(beta), head_major(g)
    solver = get_solver("exact")
    w, u = ct.chunk_transfer_reference(keys, values, b, b, ld, solver=solver, heads=H)
    S0 = jax.random.normal(ks, (BH, K, V), jnp.float32)
    return keys, cd.micro_log_decay(ld, 1), w, u, S0


@functools.partial(jax.jit, static_argnums=(2, 3))
def queries_and_cotangents(seed: int, keys, H: int, V: int):
    """(unit q like ``keys``, do [B, N, C, H, V] bf16, dS_final [BH, K, V] f32): N(0, 1) cotangents."""
    kq, kd, ks = jax.random.split(jax.random.PRNGKey(seed + 1), 3)
    q = jax.random.normal(kq, keys.shape)
    q = (q / jnp.linalg.norm(q, axis=-1, keepdims=True)).astype(jnp.bfloat16)
    do = jax.random.normal(kd, (*keys.shape[:-1], V)).astype(jnp.bfloat16)
    return q, do, jax.random.normal(ks, (keys.shape[0] * H, keys.shape[-1], V), jnp.float32)


def bwd_operands(seed: int, B: int, T: int, H: int, K: int, V: int):
    """(q, keys token-major [B, N, C, H, K] bf16, G [BH, N, C] f32, w [BH, N, C, K] bf16, do token-major
    [B, N, C, H, V] bf16, dS_final [BH, K, V] f32): the forward's operands (``operands``, compiled once for
    both directions), unit q and N(0, 1) cotangents."""
    keys, G, w, _, _ = operands(seed, B, T, H, K, V)
    q, do, dS_final = queries_and_cotangents(seed, keys, H, V)
    return q, keys, G, w, do, dS_final


def poisoned(fn, *args):
    """``fn(*args)`` right after NaN buffers of its outputs' shapes were allocated and freed."""
    poison = [jnp.full(s.shape, jnp.nan, s.dtype) for s in jax.tree.leaves(jax.eval_shape(fn, *args))]
    jax.block_until_ready(poison)
    del poison
    return jax.block_until_ready(fn(*args))


def bwd_errors(out, ref) -> dict:
    """Relative errors of (dS_out, dv', dS0) against ``ref`` and finiteness."""
    return {**{name: rel(x, r) for name, x, r in zip(("dS_out", "dv", "dS0"), out, ref)},
            "finite": all(bool(jnp.isfinite(x.astype(jnp.float32)).all()) for x in out)}


def flow_errors(out, ref) -> dict:
    """Relative errors of the flows' ``P`` and ``Q`` column blocks ([., K, K + V]) against ``ref``, finiteness."""
    K = out.shape[1]
    return {"P": rel(out[..., :K], ref[..., :K]), "Q": rel(out[..., K:], ref[..., K:]),
            "finite": bool(jnp.isfinite(out).all())}


def errors(out, ref) -> dict:
    """Relative errors of (S_in, S_final) against ``ref``, the worst chunk's S_in error, finiteness."""
    S_in, S_final = out
    a, b = S_in.astype(jnp.float32), ref[0].astype(jnp.float32)
    norm = lambda x: jnp.sqrt(jnp.sum(x * x, axis=(0, 2, 3)))  # one norm per chunk
    worst = float(jnp.max(norm(a - b) / norm(b)))
    return {"S_in": rel(S_in, ref[0]), "S_final": rel(S_final, ref[1]), "worst_chunk_S_in": worst,
            "finite": bool(jnp.isfinite(S_in.astype(jnp.float32)).all() & jnp.isfinite(S_final).all())}


def column_block(block_v: int, K: int, V: int, options: dict) -> int:
    """The pass's column block: ``block_v`` capped at V (and at K for flows)."""
    return min(block_v, K, V) if options.get("flow") else min(block_v, V)


def triton_pass(H: int, K: int, V: int, **options):
    """(name, jitted Triton pass at ``Tuning``'s launch options for bf16); ``options``: more keyword arguments
    (segments, flow mode)."""
    t = Tuning().resolve(jnp.bfloat16, K, V, CHUNK, CHUNK)
    bv = column_block(t.block_v, K, V, options)
    return f"triton_bv{bv}_w{t.state_warps}_s{t.state_stages}", jax.jit(functools.partial(
        state_pass_kernel, heads=H, block_v=bv, num_warps=t.state_warps, num_stages=t.state_stages, **options))


def mosaic_passes(H: int, K: int, V: int, spec: str, **options) -> dict:
    """Jitted Mosaic passes by name, one per ``block_v:stages`` item of ``spec`` (``column_block``; the kernel
    runs fewer stages than asked where they do not fit in shared memory); ``options`` as in ``triton_pass``."""
    out = {}
    for item in spec.split(","):
        bv, stages = (int(x) for x in item.split(":"))
        bv = column_block(bv, K, V, options)
        out[f"mosaic_bv{bv}_s{stages}"] = jax.jit(functools.partial(state_pass_mosaic, heads=H, block_v=bv,
                                                                    num_stages=stages, **options))
    return out


def segment_choice(segments: str, B: int, T: int, H: int, K: int, V: int) -> int:
    """``--segments``: a count, or ``auto``: what ``scan="auto"`` splits the shape's chunks into."""
    if segments != "auto":
        return int(segments)
    t = Tuning().resolve(jnp.bfloat16, K, V, CHUNK, CHUNK)
    return auto_segments("associative", T // CHUNK, B * H * (V // min(t.block_v, V)), t)


@contextlib.contextmanager
def watchdog(seconds: float, on_timeout):
    """Calls ``on_timeout`` (which should end the process) if the block runs longer than ``seconds``: a hung
    kernel cannot be interrupted, but what was measured before it is saved."""
    timer = threading.Timer(seconds, on_timeout)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def measure(label: str, fn, args, ref, baseline, *, N: int, moved: int, reps: int, batch: int, say, entry: dict,
            save, hang_s: float, check=errors):
    """Errors (against the reference and ``baseline`` outputs, if any) and timing of one pass into ``entry``;
    returns its outputs, or None when it failed (reported with its traceback)."""
    def hung():
        entry["error"] = f"no result after {hang_s} s (hung kernel?): process ended"
        save()
        say(label, "HUNG:", entry["error"])
        os._exit(3)

    try:
        with watchdog(hang_s, hung):
            out = poisoned(fn, *args)
            entry["vs_reference"] = check(out, ref)
            if baseline is not None:
                entry["vs_triton"] = check(out, baseline)
            say(label, "errors", entry)
            save()
            ms = timed(fn, *args, reps=reps, batch=batch)
        entry.update(ms=ms, us_per_chunk=1e3 * ms / N, GBps=moved / ms / 1e6)
        say(label, f"{ms:.4f} ms, {1e3 * ms / N:.3f} us/chunk, {moved / ms / 1e6:.1f} GB/s")
        return out
    except Exception as e:  # report and go on: the other passes and shapes still run
        entry["error"] = f"{type(e).__name__}: {e}"
        entry["traceback"] = traceback.format_exc()
        say(label, "FAILED", entry["traceback"])
        return None
    finally:
        save()


def bench(shapes, *, reps: int, batch: int, mosaic: str, hang_s: float, say, rows: list, save, flows: bool = False,
          segments: str = "1"):
    """Every shape's operands, reference and Triton pass first, then the Mosaic passes on every shape (so
    a Mosaic failure that takes the process down leaves the Triton figures saved). ``flows``: the segment
    flows over ``segments`` (a count or ``"auto"``) instead of the forward pass."""
    kept = []
    for shape in shapes:
        B, T, H, K, V = shape
        N, BH = T // CHUNK, B * H
        S = segment_choice(segments, *shape) if flows else 1
        options = dict(segments=S, flow=True, write_states=False) if flows else {}
        row = {"shape": "x".join(map(str, shape)) + (f" flows segments={S}" if flows else ""), "variants": {}}
        rows.append(row)
        args = jax.block_until_ready(operands(0, *shape))
        args = (*args[:4], None) if flows else args  # flows start from [I | 0]
        ref = jax.block_until_ready(jax.jit(functools.partial(state_pass_reference, heads=H, **options))(*args))
        say(row["shape"], "operands and reference ready")
        moved = BH * N * CHUNK * ((2 * K + V) * 2 + 4) + (0 if flows else BH * N * K * V * 2)  # k, w, u, G in; S_in out
        common = dict(N=N, moved=moved, reps=reps, batch=batch, say=say, save=save, hang_s=hang_s,
                      check=flow_errors if flows else errors)
        name, fn = triton_pass(H, K, V, **options)
        out = measure(f"{row['shape']} {name}", fn, args, ref, None, entry=row["variants"].setdefault(name, {}),
                      **common)
        kept.append((shape, row, args, ref, out, common, options))
    for (_, _, H, K, V), row, args, ref, baseline, common, options in kept:
        for name, fn in mosaic_passes(H, K, V, mosaic, **options).items():
            measure(f"{row['shape']} {name}", fn, args, ref, baseline, entry=row["variants"].setdefault(name, {}),
                    **common)


@functools.partial(jax.jit, static_argnums=(3, 4))
def segment_transitions(keys, G, w, heads: int, segments: int):
    """P: [BH, segments, K, K], each segment's transition matrix (the forward's segment flows, by the
    float32 reference; they see no values)."""
    BH, N, C = G.shape
    K = w.shape[-1]
    no_values = jnp.zeros((BH, N, C, 0), w.dtype)
    flows = state_pass_reference(keys, G, w, no_values, None, heads=heads, segments=segments, flow=True,
                                 write_states=False)
    return flows.reshape(BH, segments, K, K)


def backward_passes(H: int, K: int, V: int, spec: str, segments: int) -> dict:
    """Jitted backward passes by name: Triton's at ``Tuning``'s bf16 launch options, then one Mosaic pass per
    ``block_v:stages`` item of ``spec``; with ``segments > 1`` each is the segmented scan's backward on those
    passes, a function of (q, keys, G, w, do, dS_final, P), else the sequential pass, without P."""
    kw = dict(rank=1, scale=K**-0.5, heads=H)
    t = Tuning().resolve(jnp.bfloat16, K, V, CHUNK, CHUNK)
    bv = min(t.block_v, V)
    lowerings = {f"triton_bv{bv}_w{t.state_warps}_s{t.state_stages}": (False, t)}
    for item in spec.split(","):
        bv, stages = (int(x) for x in item.split(":"))
        lowerings[f"mosaic_bv{min(bv, V)}_s{stages}"] = (True, dataclasses.replace(t, block_v=min(bv, V),
                                                                                   mosaic_stages=stages))

    def run(mosaic: bool, tuning: Tuning):
        if segments > 1:
            return functools.partial(segmented_cotangents, tuning=tuning, mosaic=mosaic, **kw)
        if mosaic:
            return functools.partial(state_pass_bwd_mosaic, block_v=tuning.block_v, num_stages=tuning.mosaic_stages,
                                     **kw)
        return functools.partial(state_pass_bwd_kernel, block_v=tuning.block_v, num_warps=tuning.state_warps,
                                 num_stages=tuning.state_stages, **kw)

    return {name: jax.jit(run(*lowering)) for name, lowering in lowerings.items()}


def bench_backward(shapes, *, reps: int, batch: int, spec: str, segments: str, hang_s: float, say, rows: list, save):
    """Per shape: the backward operands and reference, the Triton backward pass, then one Mosaic backward
    pass per ``block_v:stages`` item of ``spec``, each checked against the reference and Triton and timed;
    ``segments`` (``"1"``: sequential, a count, or ``"auto"``): the segmented scan's backward on each."""
    for shape in shapes:
        B, T, H, K, V = shape
        N, BH = T // CHUNK, B * H
        S = segment_choice(segments, *shape)
        row = {"shape": "x".join(map(str, shape)) + " bwd" + (f" segments={S}" if S > 1 else ""), "variants": {}}
        rows.append(row)
        try:
            args = jax.block_until_ready(bwd_operands(0, *shape))
            kw = dict(rank=1, scale=K**-0.5, heads=H)
            ref = jax.block_until_ready(jax.jit(functools.partial(state_pass_bwd_reference, **kw))(*args))
            if S > 1:
                args = (*args, jax.block_until_ready(segment_transitions(*args[1:4], H, S)))
        except Exception as e:  # report and go on with the next shape
            row["error"] = f"{type(e).__name__}: {e}"
            say(row["shape"], "operands / reference FAILED", traceback.format_exc())
            save()
            continue
        say(row["shape"], "operands and reference ready")
        reads = BH * N * CHUNK * ((3 * K + V) * 2 + 4)  # q, k, w, do, G: once a pass (twice when segmented)
        moved = reads * (2 if S > 1 else 1) + BH * N * (CHUNK * V + K * V) * 2  # dv', dS_out out
        common = dict(N=N, moved=moved, reps=reps, batch=batch, say=say, save=save, hang_s=hang_s, check=bwd_errors)
        (name, triton), *mosaic = backward_passes(H, K, V, spec, S).items()
        baseline = measure(f"{row['shape']} {name}", triton, args, ref, None,
                           entry=row["variants"].setdefault(name, {}), **common)
        for name, fn in mosaic:
            measure(f"{row['shape']} {name}", fn, args, ref, baseline, entry=row["variants"].setdefault(name, {}),
                    **common)


def table(rows: list[dict]) -> str:
    """Markdown table: ms a call and errors against the reference, one line per (shape, variant)."""
    lines = ["| shape | variant | ms | us/chunk | GB/s | rel err S_in / S_final (bwd: dS_out / dv', flows: P / Q; ref) "
             "| vs triton | finite |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for name, e in row.get("variants", {}).items():
            if "error" in e and "ms" not in e:
                lines.append(f"| {row['shape']} | {name} | FAILED: {e['error'][:80]} | | | | | |")
                continue
            r, t = e.get("vs_reference", {}), e.get("vs_triton")
            fmt = lambda x, key: f"{x[key]:.2e}" if x and key in x else "-"
            a, b = ("dS_out", "dv") if "dv" in r else ("P", "Q") if "P" in r else ("S_in", "S_final")
            lines.append(f"| {row['shape']} | {name} | {e.get('ms', float('nan')):.4f} | "
                         f"{e.get('us_per_chunk', float('nan')):.3f} | {e.get('GBps', float('nan')):.0f} | "
                         f"{fmt(r, a)} / {fmt(r, b)} | {fmt(t, a)} / {fmt(t, b)} | {r.get('finite')} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--shapes", default="0,1", help=f"indices into {SHAPES}")
    parser.add_argument("--mosaic", default="64:2,64:4,128:2,128:3", help="Mosaic passes to run, block_v:stages,...")
    parser.add_argument("--hang-s", type=float, default=240.0, help="end the process if one pass's check and "
                        "timing take longer (a hung kernel)")
    parser.add_argument("--tiny", action="store_true", help=f"{TINY} only, interpret mode on CPU (smoke test)")
    parser.add_argument("--backward", default="", help="backward passes instead: Mosaic block_v:stages,... "
                        "(Triton always), e.g. 64:2,64:3")
    parser.add_argument("--segments", default="1", help="with --backward: the segmented scan's backward over "
                        "this many segments (a divisor of the chunks; auto: as scan=auto splits); 1: sequential; "
                        "with --flows: the segments whose flows are computed")
    parser.add_argument("--flows", action="store_true", help="the segment flows (flow mode) instead of the forward "
                        "pass: Triton's and the --mosaic items'")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args(argv)
    if args.flows and args.backward:
        parser.error("--flows, --backward: one pass at a time, got both")
    t0 = time.time()
    say = lambda *a: print(f"[{time.time() - t0:7.1f}s]", *a, flush=True)
    say("jax", jax.__version__, jax.devices())
    result = {"jax": jax.__version__, "device": str(jax.devices()[0]), "chunk": CHUNK, "rows": []}

    def save():
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "bench_state_pass.json"), "w") as f:
                json.dump(result, f, indent=1)

    shapes = [TINY] if args.tiny else [SHAPES[int(i)] for i in args.shapes.split(",")]
    timing = dict(reps=1 if args.tiny else args.reps, batch=1 if args.tiny else 10, hang_s=args.hang_s, say=say,
                  rows=result["rows"], save=save)
    if args.backward:
        bench_backward(shapes, spec=args.backward, segments=args.segments, **timing)
    else:
        bench(shapes, mosaic=args.mosaic, flows=args.flows, segments=args.segments, **timing)
    print(table(result["rows"]), flush=True)
    return result


if __name__ == "__main__":
    main()

"""The sequential state pass of :mod:`flowssm.kernels.state_pass` written for Mosaic GPU (Hopper: TMA, wgmma).

Same recursion, for each chunk ``c`` (``G_end = G[-1]``, ``k~ = e^{G_end - G} k``):

    S_in[c] = S,    S <- e^{G_end} S + k~^T (u - w S)

One CTA (a single warpgroup) per (head, segment, block of ``V`` columns) carries ``S: [K, block_v]`` in
float32 registers (wgmma accumulator layout) across the segment's chunks (all ``N`` unsegmented). A ring of
``num_stages`` shared-memory slots holds the chunks in flight: TMA loads each chunk's ``k, w: [n, K]``,
``u: [n, block_v]`` and ``G: [n]`` into a slot (one barrier a slot), and a slot is refilled with the chunk
``num_stages`` ahead as soon as its wgmmas are done. A chunk is two wgmmas on bf16/f16 operands accumulated
in float32:

    wS = w @ bf16(S)            (bf16(S) in shared memory is also the S_in[c] tile, stored by TMA)
    S <- e^{G_end} S + k^T @ bf16(e^{G_end - G} (u - wS))      (k read transposed from shared memory)

the operands rounded as in the Triton kernel (``dot(..., operand_dtype=keys.dtype)``). Given ``q``, three more
wgmmas a chunk (``q k^T``, ``q bf16(S)``, ``A (u - wS)``) give the chunk's outputs ``o`` from the same state tile,
after the state update (the output kernel's work, without ``S_in`` written and read back). Segments as in the
Triton kernel (each program runs ``N / segments`` chunks from its own ``S0`` row), and its flow mode (the
segmented scan's segment flows ``[P | Q]``: ``S`` starts in registers at ``[I | 0]``'s column block, no
``S0`` load, and ``P``'s column blocks multiply the values by 0); no packed sequences; bf16/f16 operands;
``n``, ``K``, ``block_v`` multiples of 64.

:func:`state_pass_bwd_mosaic`: the backward pass (``state_pass_bwd_kernel`` unpacked, rank 1, with its
``segments`` and ``write_states=False``: both reverse passes of the segmented scan), the same ring of chunk
tiles (q, k, w, do, G) and one warpgroup carrying ``dS`` in registers, four wgmmas a chunk plus the
attention block's.
On CPU it runs in Mosaic GPU's interpret mode (``plgpu.InterpretGPUParams``: simulated shared memory, TMA,
barriers and wgmma).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from flowssm.kernels.common import layout_dims, resolve_interpret

SWIZZLE = 128  # bytes: the widest TMA / wgmma swizzle; rows of 64 bf16 or 32 float32 elements
OPERAND_DTYPES = (jnp.bfloat16, jnp.float16)
SHARED_BYTES = 227 * 1024 - 1024  # Hopper's shared memory a block, less room for barriers and alignment


def _tiled(dtype) -> tuple:
    """Shared-memory transforms of a wgmma / TMA tile of ``dtype``: (8, 128 bytes) tiles, 128-byte swizzle."""
    return plgpu.TilingTransform((8, SWIZZLE // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(SWIZZLE)


def _tiles_fit(n: int, K: int, V: int, bv: int) -> bool:
    """wgmma / swizzle tiles: ``n``, ``K`` and the column block multiples of 64, ``V`` a multiple of the block."""
    return not (n % 64 or K % 64 or bv % 64 or V % bv)


def mosaic_runs(dtype, g_dtype, n: int, K: int, V: int, block_v: int) -> bool:
    """Whether :func:`state_pass_mosaic` runs the plain pass for these operand / decay dtypes and sizes."""
    return (jnp.dtype(dtype) in map(jnp.dtype, OPERAND_DTYPES) and jnp.dtype(g_dtype) == jnp.float32
            and _tiles_fit(n, K, V, min(block_v, V)))


def _shared_bytes(dtype, n: int, K: int, bv: int, out: bool) -> tuple[int, int]:
    """Shared memory of :func:`state_pass_mosaic`: (bytes a pipeline stage, bytes of the state tiles)."""
    size = jnp.dtype(dtype).itemsize  # with ``out``: q (and G again) in flight, the corrected values' and A's tiles
    stage = (2 + out) * n * K * size + n * bv * size + 4 * n * (1 + out)  # k, w, u, G (q, G)
    # S0 / S_final (float32) share their bytes with the two S_in tiles and the decayed corrected values (align pad)
    return stage, max(4 * K * bv, (2 * K * bv + (1 + out) * n * bv + out * n * n) * size + 1024)


def flow_fits(dtype, n: int, K: int, bv: int) -> bool:
    """Whether the segment-flow pass (``flow=True``) at column block ``bv`` fits one pipeline stage."""
    return sum(_shared_bytes(dtype, n, K, bv, out=False)) <= SHARED_BYTES


def _pipeline(name, operands, *, dims, block_v, num_warps, num_stages, N, stage, state):
    """Checks shared by both passes (``operands``: name -> array that must be bf16/f16 alike, ``dims``:
    name -> size that must be a multiple of 64); returns the pipeline depth: the largest up to
    ``num_stages`` (and ``N``) whose ``stage``-byte chunk tiles fit in shared memory beside ``state`` bytes."""
    dtypes = {k: x.dtype for k, x in operands.items()}
    first = next(iter(dtypes.values()))
    if first not in map(jnp.dtype, OPERAND_DTYPES) or any(d != first for d in dtypes.values()):
        raise TypeError(f"{name}: {', '.join(dtypes)}: expected one dtype among bfloat16/float16 (wgmma operands), "
                        f"got {', '.join(map(str, dtypes.values()))}")
    if any(d % 64 for d in dims.values()):
        raise ValueError(f"{name}: expected {', '.join(dims)} multiples of 64 (wgmma / swizzle tiles), got "
                         + ", ".join(f"{k}={d}" for k, d in dims.items()))
    if num_stages < 1:
        raise ValueError(f"{name}: num_stages: expected at least 1, got {num_stages}")
    if num_warps != 4:
        raise ValueError(f"{name}: num_warps: one warpgroup (4 warps) a CTA, got {num_warps}")
    stages = min(num_stages, N, (SHARED_BYTES - state) // stage)
    if stages < 1:
        raise ValueError(f"{name}: block_v={block_v}: one stage's tiles ({stage} bytes) and the state tiles "
                         f"({state} bytes) exceed {SHARED_BYTES} bytes of shared memory; use a narrower block_v")
    return stages


def _segment_chunks(name: str, N: int, segments: int) -> int:
    """``M = N / segments``, the chunks each program runs; ValueError unless ``segments`` divides ``N``."""
    if segments < 1 or N % segments:
        raise ValueError(f"{name}: segments: expected a divisor of the number of chunks {N}, got {segments}")
    return N // segments


def _program(segments: int, M: int):
    """The running CTA's program ``p = head * segments + segment`` (the row of its initial and final state),
    its head and its segment's first chunk."""
    p = lax.axis_index("programs")
    return p, p // segments, p % segments * M


def _check(keys, G, w, u, S0, *, heads, write_states, block_v, num_warps, num_stages, segments, flow, resets, h0,
           q=None, save_corrected=False):
    """ValueError / TypeError for what the forward kernel does not run; returns (BH, N, n, K, V, bv, stages)."""
    name = "state_pass_mosaic"
    BH, N, n, K = layout_dims(keys, heads)
    V = u.shape[-1]
    if q is not None and (flow or layout_dims(q, heads) != (BH, N, n, K)):
        raise ValueError(f"{name}: q (the output in the pass): expected [BH, N, n, K] = {(BH, N, n, K)} like keys "
                         f"(one micro-step a token) and no flow mode, got q {q.shape}, flow={flow}")
    if save_corrected and q is None:
        raise ValueError(f"{name}: save_corrected=True needs q: the corrected values are saved by the output")
    if resets is not None or h0 is not None:
        raise ValueError(f"{name}: only unpacked passes (no resets / h0), got "
                         f"resets={'set' if resets is not None else None}, h0={'set' if h0 is not None else None}")
    if flow and (write_states or S0 is not None):
        raise ValueError(f"{name}: flow=True computes segment flows from [I | 0]: pass S0=None and "
                         f"write_states=False, got S0={'set' if S0 is not None else None}, write_states={write_states}")
    M = _segment_chunks(name, N, segments)
    if G.ndim != 3:
        raise ValueError(f"{name}: G: expected scalar decays [BH, N, n], got shape {G.shape} (per-channel "
                         f"decays run on the Triton state pass)")
    if G.dtype != jnp.float32 or not flow and (S0 is None or S0.dtype != jnp.float32):
        raise TypeError(f"{name}: G and S0: expected float32, got {G.dtype}, {None if S0 is None else S0.dtype}")
    bv = min(block_v, K, V) if flow else min(block_v, V)
    if V % bv or flow and K % bv:
        raise ValueError(f"{name}: expected V{' and K' if flow else ''} multiples of block_v, got K={K}, V={V}, "
                         f"block_v={bv}")
    out = q is not None
    stage, state = _shared_bytes(keys.dtype, n, K, bv, out)
    stages = _pipeline(name, dict(keys=keys, w=w, u=u, **({"q": q} if out else {})), dims=dict(n=n, K=K, block_v=bv),
                       block_v=bv, num_warps=num_warps, num_stages=num_stages, N=M, stage=stage, state=state)
    if (G.shape != (BH, N, n) or w.shape != (BH, N, n, K) or u.shape[:3] != (BH, N, n)
            or not flow and S0.shape != (BH * segments, K, V)):
        raise ValueError(f"{name}: expected G [BH, N, n] = {(BH, N, n)}, w [BH, N, n, K], u [BH, N, n, V], "
                         f"S0 [BH * segments, K, V]; got G {G.shape}, w {w.shape}, u {u.shape}, "
                         f"S0 {None if S0 is None else S0.shape}")
    return BH, N, n, K, V, bv, stages


def _product(a, b, shape):
    """``a @ b`` (shared-memory operands, float32 result ``shape``) by one wgmma into a zeroed accumulator."""

    def run(acc):
        plgpu.wgmma(acc, a, b)
        return acc[...]

    return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def _accumulate(init, *products, interpret: bool):
    """``init + sum a @ b`` over the ``(a, b)`` pairs of ``products``: compiled, the wgmmas accumulate into
    ``init``'s registers; the interpreter has no ``run_state``, so there the products are added afterwards."""
    if interpret:
        return init + sum(_product(a, b, init.shape) for a, b in products)

    def run(acc):
        for a, b in products:
            plgpu.wgmma(acc, a, b)

    return pl.run_state(run)(plgpu.ACC.init(init))


def _attention(q, k, G_t, G_column):
    """The chunk's attention block from shared-memory tiles q, k: [n, K] and G: [n] (``G_column``, loaded as a
    column vector; ``G_t`` the same decays as a row vector of the wgmma layout): ``A_tm = (q_t . k_m)
    e^{G_t - G_m}`` for ``m <= t``, else 0, float32 [n, n] in the wgmma layout."""
    n = q.shape[0]
    tile = lambda x: plgpu.layout_cast(x, plgpu.Layout.WGMMA)
    seen = tile(lax.broadcasted_iota(jnp.int32, (n, n), 1)) <= tile(lax.broadcasted_iota(jnp.int32, (n, n), 0))
    zeros = tile(jnp.zeros((n, n), jnp.float32))
    G_m = tile(lax.broadcast_in_dim(plgpu.load(G_column, layout=plgpu.Layout.WGMMA.reduce(0)), (n, n), (1,)))
    decay = jnp.exp(jnp.where(seen, tile(lax.broadcast_in_dim(G_t, (n, n), (0,))) - G_m, zeros))
    return jnp.where(seen, _product(q, k.T, (n, n)) * decay, zeros)


def _launch(kernel, name: str, out_type: list, scratch: list, grid: tuple, interpreted: bool, *operands):
    """``kernel`` on a ``(programs, columns)`` grid (programs: head * segments + segment; one warpgroup a
    CTA) -> its outputs, a tuple, or the only one alone."""
    run = plgpu.kernel(kernel, out_type=out_type, scratch_types=scratch, grid=grid,
                       grid_names=("programs", "columns"), kernel_name=name,
                       interpret=plgpu.InterpretGPUParams() if interpreted else None)
    out = run(*operands)
    return tuple(out) if len(out) > 1 else out[0]


def _head(ref, i, heads: int | None):
    """Head ``i``'s [N, r, d] view of a head-major [BH, N, r, d] or token-major [B, N, r, H, d] operand."""
    return ref.at[i] if heads is None else ref.at[i // heads, :, :, i % heads]


def state_pass_mosaic(keys, G, w, u, S0, *, heads: int | None = None, write_states: bool = True, segments: int = 1,
                      flow: bool = False, block_v: int = 64, num_warps: int = 4, num_stages: int = 2,
                      interpret: bool | None = None, resets=None, h0=None, q=None, scale: float = 1.0,
                      save_corrected: bool = False):
    """keys, w: [BH, N, n, K] (keys token-major [B, N, n, H, K] with ``heads=H``); G: [BH, N, n] float32;
    u: [BH, N, n, V]; S0: [BH * segments, K, V] float32 -> (S_in: [BH, N, K, V] in the dtype of ``keys``,
    S_final: [BH * segments, K, V] float32); with ``write_states=False`` only S_final.

    The contract of :func:`flowssm.kernels.state_pass.state_pass_kernel` without packed sequences:
    ``segments`` stretches of ``M = N / segments`` chunks, each run by its own programs from its own
    ``S0[head * segments + segment]``. ``flow=True`` (with ``write_states=False``, ``S0=None``; column blocks
    ``bv = min(block_v, K, V)``, a divisor of ``K``): each segment's flow ``[P | Q]``, S_final:
    [BH * segments, K, K + V] float32, the pass of ``[P | Q]`` from ``[I | 0]``: a ``P`` column block starts
    at the identity's columns and sees no values (``u`` times 0), a ``Q`` block starts at 0 and reads ``u``'s
    column block ``j - K / bv``. ``num_stages``: chunks in flight in the TMA pipeline, fewer where their tiles
    do not fit in shared memory; ``num_warps`` must be 4 (one warpgroup).

    ``q`` ([BH, N, n, K], token-major with ``heads`` as keys; one micro-step a token): the pass also computes
    :func:`flowssm.kernels.chunk_output.chunk_output_kernel`'s outputs with the same roundings, from the state
    tile it already holds, so ``S_in`` need not be written and read back (``write_states=False`` skips it):

        o = scale (e^{G} q @ bf16(S_in) + bf16(A) @ bf16(u - w S_in)),   A = q k^T on m <= t, times e^{G_t - G_m}

    o ([BH, N, n, V] in the dtype of ``keys``, token-major with ``heads``) follows S_final in the outputs, then
    with ``save_corrected`` the corrected values ``u - w S_in`` ([BH, N, n, V], the dtype of ``keys``). The
    products with ``q`` are off the carried state's chain (``S`` is updated before them).
    """
    BH, N, n, K, V, bv, stages = _check(keys, G, w, u, S0, heads=heads, write_states=write_states, block_v=block_v,
                                        num_warps=num_warps, num_stages=num_stages, segments=segments, flow=flow,
                                        resets=resets, h0=h0, q=q, save_corrected=save_corrected)
    M = N // segments
    out = q is not None
    p_blocks = K // bv if flow else 0  # column blocks of P (flow mode) before those of the state / Q
    dtype, f32 = keys.dtype, jnp.float32
    operand, state = _tiled(dtype), _tiled(f32)
    interpreted = resolve_interpret(interpret)
    rows = plgpu.Layout.WGMMA.reduce(1)  # a [rows] vector broadcast along the columns of a wgmma tile
    row_vector = lambda x, shape: lax.broadcast_in_dim(x, shape, (0,))
    tile = lambda x: plgpu.layout_cast(x, plgpu.Layout.WGMMA)  # guides layout inference
    stores = write_states + out + save_corrected  # TMA stores a chunk issues: S_in, then corrected values, o

    def kernel(k_ref, g_ref, w_ref, u_ref, *refs):
        q_ref, refs = (refs[0], refs[1:]) if out else (None, refs)
        s0_ref, refs = (None, refs) if flow else (refs[0], refs[1:])
        s_in_ref, refs = (refs[0], refs[1:]) if write_states else (None, refs)
        s_out_ref, refs = refs[0], refs[1:]
        o_ref, refs = (refs[0], refs[1:]) if out else (None, refs)
        c_ref, refs = (refs[0], refs[1:]) if save_corrected else (None, refs)
        (k_s, g_s, w_s, u_s, *q_tiles), loaded, (s32, (s_tiles, r_tile, *out_tiles)), *s0_loaded = refs
        p, i, base = _program(segments, M)
        j = lax.axis_index("columns")
        cols = pl.ds(j * bv, bv)
        u_cols = pl.ds(jnp.maximum(j - p_blocks, 0) * bv, bv) if flow else cols  # P blocks: Q's first, times 0
        head_keys = _head(k_ref, i, heads)
        if out:
            q_s, gc_s = q_tiles
            c_tile, a_tile = out_tiles
            head_q, head_o = _head(q_ref, i, heads), _head(o_ref, i, heads)

        def fetch(c, slot):
            """TMA of the segment's chunk ``c``'s k, G, w, u (and q, G as a column vector) tiles into ``slot``;
            ``loaded[slot]`` completes when all landed."""
            c = base + c
            tiles = [(head_keys.at[c], k_s), (g_ref.at[i, c], g_s), (w_ref.at[i, c], w_s),
                     (u_ref.at[i, c, :, u_cols], u_s)]
            if out:
                tiles += [(head_q.at[c], q_s), (g_ref.at[i, c], gc_s)]
            for src, dst in tiles:
                plgpu.copy_gmem_to_smem(src, dst.at[slot], loaded.at[slot])

        def output(slot, c, s_tile, G_t, corrected):
            """The chunk's o (and corrected values) from the S_in tile, stored by TMA."""
            c_tile[...] = corrected.astype(dtype)
            a_tile[...] = _attention(q_s.at[slot], k_s.at[slot], G_t, gc_s.at[slot]).astype(dtype)
            plgpu.commit_smem()
            if save_corrected:
                plgpu.copy_smem_to_gmem(c_tile, c_ref.at[i, base + c, :, cols])
            o = _accumulate(row_vector(jnp.exp(G_t), (n, bv)) * _product(q_s.at[slot], s_tile, (n, bv)),
                            (a_tile, c_tile), interpret=interpreted)
            r_tile[...] = tile(scale * o).astype(dtype)  # o's tile: the decayed values' (their wgmma is done)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(r_tile, head_o.at[base + c, :, cols])

        if not flow:
            plgpu.copy_gmem_to_smem(s0_ref.at[p, :, cols], s32, s0_loaded[0])
        for c in range(stages):
            fetch(c, c)
        if flow:  # [I | 0]: column j * bv + col of the identity, all zero in Q's columns (j * bv >= K)
            diagonal = (tile(lax.broadcasted_iota(jnp.int32, (K, bv), 0))
                        == tile(lax.broadcasted_iota(jnp.int32, (K, bv), 1)) + j * bv)
            start = jnp.where(diagonal, tile(jnp.ones((K, bv), f32)), tile(jnp.zeros((K, bv), f32)))
        else:
            plgpu.barrier_wait(s0_loaded[0])
            start = s32[...]

        def chunk(c, S):
            slot, s_tile = c % stages, s_tiles.at[c % 2]
            plgpu.barrier_wait(loaded.at[slot])
            if write_states:  # the S_in store issued two chunks ago has read this tile (2 stores - 1 came later)
                plgpu.wait_smem_to_gmem(2 * stores - 1, wait_read_only=True)
            s_tile[...] = S.astype(dtype)
            plgpu.commit_smem()  # written by threads, read by wgmma and TMA (async proxy)
            if write_states:
                plgpu.copy_smem_to_gmem(s_tile, s_in_ref.at[i, base + c, :, cols])
            wS = _product(w_s.at[slot], s_tile, (n, bv))
            G_end = g_s[slot, n - 1]
            G_t = plgpu.load(g_s.at[slot], layout=rows)
            decay = jnp.exp(G_end - G_t)
            values = u_s.at[slot][...].astype(f32)
            corrected = (jnp.where(j < p_blocks, 0.0, 1.0) * values if flow else values) - wS  # P columns: no values
            if out:  # the last chunk's o store (and its corrected values' before it) has read its tile
                plgpu.wait_smem_to_gmem(int(write_states), wait_read_only=True)  # only this chunk's S_in came later
            r_tile[...] = (row_vector(decay, (n, bv)) * corrected).astype(dtype)
            plgpu.commit_smem()
            S = _accumulate(jnp.exp(G_end) * S, (k_s.at[slot].T, r_tile), interpret=interpreted)
            if out:
                output(slot, c, s_tile, G_t, corrected)

            @pl.when(c + stages < M)
            def _():  # this slot's wgmmas are done: refill it
                fetch(c + stages, slot)

            return S

        S = lax.fori_loop(jnp.int32(0), jnp.int32(M), chunk, start)  # int32 indices under x64
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last S_in tiles are read: s32 overwrites them
        s32[...] = S
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(s32, s_out_ref.at[p, :, cols])
        plgpu.wait_smem_to_gmem(0)

    S_final = jax.ShapeDtypeStruct((BH * segments, K, K + V if flow else V), f32)
    values_like = lambda x: jax.ShapeDtypeStruct((*x.shape[:-1], V), dtype)  # o: q's layout, V columns
    out_type = ([jax.ShapeDtypeStruct((BH, N, K, V), dtype)] if write_states else []) + [S_final]
    out_type += ([values_like(q)] if out else []) + ([jax.ShapeDtypeStruct((BH, N, n, V), dtype)] if save_corrected
                                                     else [])
    rows_k = lambda: plgpu.SMEM((stages, n, K), dtype, transforms=operand)
    values_tile = lambda: plgpu.SMEM((n, bv), dtype, transforms=operand)
    chunk_tiles = [rows_k(), plgpu.SMEM((stages, n), f32), rows_k(),
                   plgpu.SMEM((stages, n, bv), dtype, transforms=operand),
                   *([rows_k(), plgpu.SMEM((stages, n), f32)] if out else [])]  # q, G as a column vector
    scratch = [chunk_tiles, plgpu.Barrier(num_arrivals=len(chunk_tiles), num_barriers=stages),
               plgpu.RefUnion(plgpu.SMEM((K, bv), f32, transforms=state),  # S0, S_final: before / after the loop
                              [plgpu.SMEM((2, K, bv), dtype, transforms=operand),  # S_in tiles
                               values_tile(),  # decayed corrected values, then o
                               *([values_tile(), plgpu.SMEM((n, n), dtype, transforms=operand)]
                                 if out else [])]),  # corrected values, A
               *([] if flow else [plgpu.Barrier()])]  # S0 loaded
    return _launch(kernel, "flowssm_segment_flows_mosaic" if flow else "flowssm_state_pass_mosaic", out_type, scratch,
                   (BH * segments, (K + V if flow else V) // bv), interpreted, keys, G, w, u,
                   *((q,) if out else ()), *(() if flow else (S0,)))


def _check_bwd(q, keys, G, w, do, dS_final, *, rank, heads, block_v, num_warps, num_stages, segments, resets,
               dfinals):
    """ValueError / TypeError for what the backward kernel does not run; returns (BH, N, n, K, V, bv, stages)."""
    name = "state_pass_bwd_mosaic"
    BH, N, C, K = layout_dims(q, heads)
    n, V = keys.shape[2], do.shape[-1]
    if rank != 1:
        raise ValueError(f"{name}: rank: only rank 1 (one micro-step a token, C = n), got {rank}")
    if resets is not None or dfinals is not None:
        raise ValueError(f"{name}: only unpacked passes (no resets / dfinals), got "
                         f"resets={'set' if resets is not None else None}, "
                         f"dfinals={'set' if dfinals is not None else None}")
    M = _segment_chunks(name, N, segments)
    if G.ndim != 3:
        raise ValueError(f"{name}: G: expected scalar decays [BH, N, n], got shape {G.shape} (per-channel decays run "
                         f"on the Triton state pass)")
    if G.dtype != jnp.float32 or dS_final.dtype != jnp.float32:
        raise TypeError(f"{name}: G and dS_final: expected float32, got {G.dtype}, {dS_final.dtype}")
    bv = min(block_v, V)
    if V % bv:
        raise ValueError(f"{name}: expected V a multiple of block_v, got V={V}, block_v={bv}")
    size = jnp.dtype(keys.dtype).itemsize
    # dS_final / dS0 (float32) share their bytes with the dS_out and dv' tile pairs, A and the decayed do
    stages = _pipeline(name, dict(q=q, keys=keys, w=w, do=do), dims=dict(n=n, K=K, block_v=bv), block_v=bv,
                       num_warps=num_warps, num_stages=num_stages, N=M,
                       stage=3 * n * K * size + n * bv * size + 8 * n,  # q, k, w, do, G (twice) of one chunk in flight
                       state=max(4 * K * bv, (2 * K * bv + 3 * n * bv + n * n) * size + 1024))
    if (C != n or G.shape != (BH, N, n) or w.shape != (BH, N, n, K) or layout_dims(keys, heads) != (BH, N, n, K)
            or layout_dims(do, heads) != (BH, N, n, V) or dS_final.shape != (BH * segments, K, V)):
        raise ValueError(f"{name}: expected q, keys, w [BH, N, n, K] = {(BH, N, C, K)}, G [BH, N, n], "
                         f"do [BH, N, n, V], dS_final [BH * segments, K, V] (q, keys, do token-major with heads); got "
                         f"q {q.shape}, keys {keys.shape}, G {G.shape}, w {w.shape}, do {do.shape}, "
                         f"dS_final {dS_final.shape}")
    return BH, N, n, K, V, bv, stages


def state_pass_bwd_mosaic(q, keys, G, w, do, dS_final, *, rank: int, scale: float, heads: int | None = None,
                          segments: int = 1, write_states: bool = True, block_v: int = 64, num_warps: int = 4,
                          num_stages: int = 2, interpret: bool | None = None, resets=None, dfinals=None):
    """q, keys, w: [BH, N, n, K]; G: [BH, N, n] float32 (cumulative); do: [BH, N, n, V] (q, keys, do token-major
    [B, N, n, H, .] with ``heads=H``); dS_final: [BH * segments, K, V] float32 -> (dS_out: [BH, N, K, V],
    dv': [BH, N, n, V] in the dtype of ``keys``, dS0: [BH * segments, K, V] float32); with
    ``write_states=False`` only dS0.

    The contract of :func:`flowssm.kernels.state_pass.state_pass_bwd_kernel` without packed sequences, rank 1
    (``C = n``): ``segments`` stretches of ``M = N / segments`` chunks, each run in reverse by its own
    programs from its own ``dS_final[head * segments + segment]``. Per chunk, in reverse, with ``dS`` in
    float32 registers (one warpgroup per (head, segment, block of ``V`` columns)), ``A = q k^T`` masked
    (``m <= t``) and decayed (``e^{G_t - G_m}``), operands rounded as in the Triton kernel:

        dS_out[c] = bf16(dS)                          (the shared-memory tile is also the k @ dS operand)
        dv' = scale A^T @ do + e^{G_end - G} (k @ bf16(dS))
        dS <- -(-e^{G_end} dS + w^T @ bf16(dv') + q^T @ bf16(-scale e^{G} do))    (one accumulator)

    q, k, w, do and G of ``num_stages`` chunks are in flight in a TMA ring (fewer where they do not fit);
    ``write_states=False`` (the segmented scan's first reverse pass) stores no chunk's dS_out or dv'.
    """
    BH, N, n, K, V, bv, stages = _check_bwd(
        q, keys, G, w, do, dS_final, rank=rank, heads=heads, block_v=block_v, num_warps=num_warps,
        num_stages=num_stages, segments=segments, resets=resets, dfinals=dfinals)
    M = N // segments
    dtype, f32 = keys.dtype, jnp.float32
    operand, state = _tiled(dtype), _tiled(f32)
    interpreted = resolve_interpret(interpret)
    rows = plgpu.Layout.WGMMA.reduce(1)
    row_vector = lambda x, shape: lax.broadcast_in_dim(x, shape, (0,))
    tile = lambda x: plgpu.layout_cast(x, plgpu.Layout.WGMMA)  # guides layout inference

    def kernel(q_ref, k_ref, g_ref, w_ref, do_ref, dsf_ref, *refs):
        (ds_out_ref, dv_ref, *refs) = refs if write_states else (None, None, *refs)
        ds0_ref, (q_s, k_s, g_s, gc_s, w_s, do_s), loaded, (s32, (ds_tiles, dv_tiles, a_tile, dd_tile)), s_loaded = refs
        p, i, base = _program(segments, M)
        cols = pl.ds(lax.axis_index("columns") * bv, bv)
        head_q, head_k, head_do = _head(q_ref, i, heads), _head(k_ref, i, heads), _head(do_ref, i, heads)

        def fetch(c, slot):
            """TMA of the segment's chunk ``c``'s q, k, G (twice: row and column vectors, two loads that cannot be
            merged), w, do tiles into ``slot``; ``loaded[slot]`` completes when all landed."""
            c = base + c
            for src, dst in ((head_q.at[c], q_s), (head_k.at[c], k_s), (g_ref.at[i, c], g_s), (g_ref.at[i, c], gc_s),
                             (w_ref.at[i, c], w_s), (head_do.at[c, :, cols], do_s)):
                plgpu.copy_gmem_to_smem(src, dst.at[slot], loaded.at[slot])

        plgpu.copy_gmem_to_smem(dsf_ref.at[p, :, cols], s32, s_loaded)
        for step in range(stages):
            fetch(M - 1 - step, step)
        plgpu.barrier_wait(s_loaded)

        def chunk(step, dS):
            c, slot, ds_tile, dv_tile = M - 1 - step, step % stages, ds_tiles.at[step % 2], dv_tiles.at[step % 2]
            plgpu.barrier_wait(loaded.at[slot])
            if write_states:  # the stores issued two chunks ago have read this pair of tiles
                plgpu.wait_smem_to_gmem(2, wait_read_only=True)
            ds_tile[...] = dS.astype(dtype)
            G_end = g_s[slot, n - 1]
            G_t = plgpu.load(g_s.at[slot], layout=rows)
            a_tile[...] = _attention(q_s.at[slot], k_s.at[slot], G_t, gc_s.at[slot]).astype(dtype)
            do = plgpu.load(do_s.at[slot], layout=plgpu.Layout.WGMMA).astype(f32)
            dd_tile[...] = tile(row_vector(-(scale * jnp.exp(G_t)), (n, bv)) * do).astype(dtype)
            plgpu.commit_smem()  # written by threads, read by wgmma and TMA (async proxy)
            if write_states:
                plgpu.copy_smem_to_gmem(ds_tile, ds_out_ref.at[i, base + c, :, cols])
            dv = (scale * _product(a_tile.T, do_s.at[slot], (n, bv))
                  + row_vector(jnp.exp(G_end - G_t), (n, bv)) * _product(k_s.at[slot], ds_tile, (n, bv)))
            dv_tile[...] = tile(dv).astype(dtype)
            plgpu.commit_smem()
            if write_states:
                plgpu.copy_smem_to_gmem(dv_tile, dv_ref.at[i, base + c, :, cols])
            dS = -_accumulate(-jnp.exp(G_end) * dS, (w_s.at[slot].T, dv_tile), (q_s.at[slot].T, dd_tile),
                              interpret=interpreted)

            @pl.when(step + stages < M)
            def _():  # this slot's wgmmas are done: refill it
                fetch(c - stages, slot)

            return dS

        dS = lax.fori_loop(jnp.int32(0), jnp.int32(M), chunk, tile(s32[...]))  # int32 indices under x64
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tiles are read: s32 overwrites them
        s32[...] = dS
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(s32, ds0_ref.at[p, :, cols])
        plgpu.wait_smem_to_gmem(0)

    dS0 = jax.ShapeDtypeStruct((BH * segments, K, V), f32)
    out_type = ([jax.ShapeDtypeStruct((BH, N, K, V), dtype), jax.ShapeDtypeStruct((BH, N, n, V), dtype), dS0]
                if write_states else [dS0])
    rows_k = lambda: plgpu.SMEM((stages, n, K), dtype, transforms=operand)
    chunk_tiles = [rows_k(), rows_k(), plgpu.SMEM((stages, n), f32), plgpu.SMEM((stages, n), f32), rows_k(),
                   plgpu.SMEM((stages, n, bv), dtype, transforms=operand)]
    scratch = [chunk_tiles, plgpu.Barrier(num_arrivals=len(chunk_tiles), num_barriers=stages),
               plgpu.RefUnion(plgpu.SMEM((K, bv), f32, transforms=state),  # dS_final, dS0: before / after the loop
                              [plgpu.SMEM((2, K, bv), dtype, transforms=operand),  # dS_out tiles
                               plgpu.SMEM((2, n, bv), dtype, transforms=operand),  # dv' tiles
                               plgpu.SMEM((n, n), dtype, transforms=operand),  # A
                               plgpu.SMEM((n, bv), dtype, transforms=operand)]),  # -scale e^{G} do
               plgpu.Barrier()]
    return _launch(kernel, "flowssm_state_pass_bwd_mosaic", out_type, scratch, (BH * segments, V // bv), interpreted,
                   q, keys, G, w, do, dS_final)

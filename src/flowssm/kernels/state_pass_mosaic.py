"""The sequential state pass of :mod:`flowssm.kernels.state_pass` written for Mosaic GPU (Hopper: TMA, wgmma).

Same recursion, for each chunk ``c`` (``G_end = G[-1]``, ``k~ = e^{G_end - G} k``):

    S_in[c] = S,    S <- e^{G_end} S + k~^T (u - w S)

One CTA (a single warpgroup) per (head, block of ``V`` columns) carries ``S: [K, block_v]`` in float32
registers (wgmma accumulator layout) across the ``N`` chunks. A ring of ``num_stages`` shared-memory slots
holds the chunks in flight: TMA loads each chunk's ``k, w: [n, K]``, ``u: [n, block_v]`` and ``G: [n]`` into
a slot (one barrier a slot), and a slot is refilled with the chunk ``num_stages`` ahead as soon as its
wgmmas are done. A chunk is two wgmmas on bf16/f16 operands accumulated in float32:

    wS = w @ bf16(S)            (bf16(S) in shared memory is also the S_in[c] tile, stored by TMA)
    S <- e^{G_end} S + k^T @ bf16(e^{G_end - G} (u - wS))      (k read transposed from shared memory)

the operands rounded as in the Triton kernel (``dot(..., operand_dtype=keys.dtype)``). Only the plain case:
no segments, no flow mode, no packed sequences, bf16/f16 operands, ``n``, ``K``, ``block_v`` multiples of 64.
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


def _check(keys, G, w, u, S0, *, heads, block_v, num_warps, num_stages, segments, flow, resets, h0):
    """ValueError / TypeError for what this kernel does not run; returns (BH, N, n, K, V, bv, stages): the
    pipeline depth is the largest up to ``num_stages`` (and ``N``) whose tiles fit in shared memory."""
    BH, N, n, K = layout_dims(keys, heads)
    V = u.shape[-1]
    if segments != 1 or flow or resets is not None or h0 is not None:
        raise ValueError("state_pass_mosaic: only the plain pass (segments=1, flow=False, no resets / h0), got "
                         f"segments={segments}, flow={flow}, resets={'set' if resets is not None else None}")
    if keys.dtype not in map(jnp.dtype, OPERAND_DTYPES) or w.dtype != keys.dtype or u.dtype != keys.dtype:
        raise TypeError(f"state_pass_mosaic: keys, w, u: expected one of bfloat16/float16 (wgmma operands), got "
                        f"{keys.dtype}, {w.dtype}, {u.dtype}")
    if G.dtype != jnp.float32 or S0 is None or S0.dtype != jnp.float32:
        raise TypeError(f"state_pass_mosaic: G and S0: expected float32, got {G.dtype}, "
                        f"{None if S0 is None else S0.dtype}")
    bv = min(block_v, V)
    if not _tiles_fit(n, K, V, bv):
        raise ValueError(f"state_pass_mosaic: expected n, K and block_v multiples of 64 (wgmma / swizzle tiles) "
                         f"and V a multiple of block_v, got n={n}, K={K}, V={V}, block_v={bv}")
    if num_stages < 1:
        raise ValueError(f"state_pass_mosaic: num_stages: expected at least 1, got {num_stages}")
    size = jnp.dtype(keys.dtype).itemsize
    stage = 2 * n * K * size + n * bv * size + 4 * n  # k, w, u, G of one chunk in flight
    # S0 / S_final (float32) share their bytes with the two S_in tiles and the corrected values (alignment pad)
    state = max(4 * K * bv, (2 * K * bv + n * bv) * size + 1024)
    stages = min(num_stages, N, (SHARED_BYTES - state) // stage)
    if stages < 1:
        raise ValueError(f"state_pass_mosaic: block_v={bv}: one stage's tiles ({stage} bytes) and the state tiles "
                         f"({state} bytes) exceed {SHARED_BYTES} bytes of shared memory; use a narrower block_v")
    if num_warps != 4:
        raise ValueError(f"state_pass_mosaic: num_warps: one warpgroup (4 warps) a CTA, got {num_warps}")
    if G.shape != (BH, N, n) or w.shape != (BH, N, n, K) or u.shape[:3] != (BH, N, n) or S0.shape != (BH, K, V):
        raise ValueError(f"state_pass_mosaic: expected G [BH, N, n] = {(BH, N, n)}, w [BH, N, n, K], "
                         f"u [BH, N, n, V], S0 [BH, K, V]; got G {G.shape}, w {w.shape}, u {u.shape}, S0 {S0.shape}")
    return BH, N, n, K, V, bv, stages


def _product(a, b, shape):
    """``a @ b`` (shared-memory operands, float32 result ``shape``) by one wgmma into a zeroed accumulator."""

    def run(acc):
        plgpu.wgmma(acc, a, b)
        return acc[...]

    return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def _accumulate(init, a, b, *, interpret: bool):
    """``init + a @ b``: compiled, the wgmma accumulates into ``init``'s registers; the interpreter has no
    ``run_state``, so there the product is added afterwards."""
    if interpret:
        return init + _product(a, b, init.shape)
    return pl.run_state(lambda acc: plgpu.wgmma(acc, a, b))(plgpu.ACC.init(init))


def state_pass_mosaic(keys, G, w, u, S0, *, heads: int | None = None, write_states: bool = True, segments: int = 1,
                      flow: bool = False, block_v: int = 64, num_warps: int = 4, num_stages: int = 2,
                      interpret: bool | None = None, resets=None, h0=None):
    """keys, w: [BH, N, n, K] (keys token-major [B, N, n, H, K] with ``heads=H``); G: [BH, N, n] float32;
    u: [BH, N, n, V]; S0: [BH, K, V] float32 -> (S_in: [BH, N, K, V] in the dtype of ``keys``, S_final:
    [BH, K, V] float32); with ``write_states=False`` only S_final.

    The contract of :func:`flowssm.kernels.state_pass.state_pass_kernel` in its plain case; ``num_stages``:
    chunks in flight in the TMA pipeline, fewer where their tiles do not fit in shared memory;
    ``num_warps`` must be 4 (one warpgroup).
    """
    BH, N, n, K, V, bv, stages = _check(keys, G, w, u, S0, heads=heads, block_v=block_v, num_warps=num_warps,
                                        num_stages=num_stages, segments=segments, flow=flow, resets=resets, h0=h0)
    dtype, f32 = keys.dtype, jnp.float32
    operand, state = _tiled(dtype), _tiled(f32)
    interpreted = resolve_interpret(interpret)
    rows = plgpu.Layout.WGMMA.reduce(1)  # a [rows] vector broadcast along the columns of a wgmma tile

    def kernel(k_ref, g_ref, w_ref, u_ref, s0_ref, *refs):
        (s_in_ref, *refs) = refs if write_states else (None, *refs)
        s_out_ref, (k_s, g_s, w_s, u_s), loaded, (s32, (s_tiles, r_tile)), s0_loaded = refs
        i, j = lax.axis_index("programs"), lax.axis_index("columns")
        cols = pl.ds(j * bv, bv)
        head_keys = k_ref.at[i] if heads is None else k_ref.at[i // heads, :, :, i % heads]

        def fetch(c, slot):
            """TMA of chunk ``c``'s k, G, w, u tiles into ``slot``; ``loaded[slot]`` completes when all landed."""
            for src, dst in ((head_keys.at[c], k_s), (g_ref.at[i, c], g_s), (w_ref.at[i, c], w_s),
                             (u_ref.at[i, c, :, cols], u_s)):
                plgpu.copy_gmem_to_smem(src, dst.at[slot], loaded.at[slot])

        plgpu.copy_gmem_to_smem(s0_ref.at[i, :, cols], s32, s0_loaded)
        for c in range(stages):
            fetch(c, c)
        plgpu.barrier_wait(s0_loaded)

        def chunk(c, S):
            slot, tile = c % stages, s_tiles.at[c % 2]
            plgpu.barrier_wait(loaded.at[slot])
            if write_states:  # the S_in store issued two chunks ago has read this tile
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)
            tile[...] = S.astype(dtype)
            plgpu.commit_smem()  # written by threads, read by wgmma and TMA (async proxy)
            if write_states:
                plgpu.copy_smem_to_gmem(tile, s_in_ref.at[i, c, :, cols])
            wS = _product(w_s.at[slot], tile, (n, bv))
            G_end = g_s[slot, n - 1]
            decay = jnp.exp(G_end - plgpu.load(g_s.at[slot], layout=rows))
            corrected = u_s.at[slot][...].astype(f32) - wS
            r_tile[...] = (lax.broadcast_in_dim(decay, (n, bv), (0,)) * corrected).astype(dtype)
            plgpu.commit_smem()
            S = _accumulate(jnp.exp(G_end) * S, k_s.at[slot].T, r_tile, interpret=interpreted)

            @pl.when(c + stages < N)
            def _():  # this slot's wgmmas are done: refill it
                fetch(c + stages, slot)

            return S

        S = lax.fori_loop(jnp.int32(0), jnp.int32(N), chunk, s32[...])  # int32 indices under x64
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last S_in tiles are read: s32 overwrites them
        s32[...] = S
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(s32, s_out_ref.at[i, :, cols])
        plgpu.wait_smem_to_gmem(0)

    S_final = jax.ShapeDtypeStruct((BH, K, V), f32)
    out_type = [jax.ShapeDtypeStruct((BH, N, K, V), dtype), S_final] if write_states else [S_final]
    chunk_tiles = [plgpu.SMEM((stages, n, K), dtype, transforms=operand), plgpu.SMEM((stages, n), f32),
                   plgpu.SMEM((stages, n, K), dtype, transforms=operand),
                   plgpu.SMEM((stages, n, bv), dtype, transforms=operand)]
    scratch = [chunk_tiles, plgpu.Barrier(num_arrivals=len(chunk_tiles), num_barriers=stages),
               plgpu.RefUnion(plgpu.SMEM((K, bv), f32, transforms=state),  # S0, S_final: before / after the loop
                              [plgpu.SMEM((2, K, bv), dtype, transforms=operand),  # S_in tiles, corrected values
                               plgpu.SMEM((n, bv), dtype, transforms=operand)]),
               plgpu.Barrier()]
    run = plgpu.kernel(kernel, out_type=out_type, scratch_types=scratch, grid=(BH, V // bv),
                       grid_names=("programs", "columns"), kernel_name="flowssm_state_pass_mosaic",
                       interpret=plgpu.InterpretGPUParams() if interpreted else None)
    out = run(keys, G, w, u, S0)
    return tuple(out) if write_states else out[0]


"""Cumulative decays of every micro-step, and their vjp: one program per (head, chunk).

For per-token log-decays ``g: [C, K]`` of a chunk (one per key channel) and ``R`` micro-steps a token:

    G_i = sum_{c <= i // R} g_c,        dg_c = sum_{i >= c R} dG_i  (0 on resets),

with hard resets (``g_c = -inf``) as in ``chunks.cumulative_log_decay``: the cumsum of ``g`` with resets as 0,
minus ``reset_gap`` times the cumsum of the reset indicator. Inside the kernels a cumsum is Triton's scan
along the rows of the tile (float32 adds); the vjp's reverse cumsum reads the rows in reverse order (a
gathered load), scans and writes them back in reverse (Triton's lowering has no reverse scan).

On an H200 at 4 x 4096 x 16 x 128 the cumsums in XLA took 0.37 ms, a quarter of KDA's forward (RESULTS.md,
run 13). Scalar decays (``g: [C]``, a few kB a chunk) stay in XLA.

Given the keys, the forward kernel also writes them decayed to their chunk's end, ``k~ = e^{G_end - G} * k``
(:func:`end_keys`), the state pass's operand: the pass then reads bf16 keys and ``G``'s last row instead of
exponentiating a float32 ``[n, K]`` tile in its serial loop (RESULTS.md, run 14).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from flowssm import chunks
from flowssm.kernels import packed
from flowssm.kernels.common import in_layout, pallas_call, resolve_interpret


def micro_log_decay(log_decay, rank: int):
    """Per-token log-decays ``[BH, N, C]`` (or ``[BH, N, C, K]`` per key channel) -> cumulative decay of each
    micro-step ``[BH, N, C R(, K)]`` (jnp: the reference, and the kernels' for scalar decays)."""
    dtype = jnp.promote_types(log_decay.dtype, jnp.float32)
    return jnp.repeat(chunks.cumulative_log_decay(log_decay.astype(dtype), axis=2), rank, axis=2)


def end_keys(keys, G):
    """The keys decayed to their chunk's end, ``e^{G_end - G} * k`` per key channel (``G_end``: the last row of
    ``G``), in the dtype of ``keys`` (jnp: the reference). keys, G: [BH, N, n, K]."""
    return (jnp.exp(G[:, :, -1:] - G) * keys.astype(G.dtype)).astype(keys.dtype)


def _rows(C: int, rank: int, r: int, reverse: bool = False):
    """Micro-step ``r`` of each token, tokens in order or ``reverse``d: int32 [C] row indices."""
    tokens = lax.broadcasted_iota(jnp.int32, (C,), 0)
    return ((C - 1 - tokens) if reverse else tokens) * rank + r


def _launch(kernel, out_shape, operands, interpret, name: str, heads: int | None = None,
            packed_rows: packed.ChunkTable | None = None):
    """One program per (head, chunk) over ``[BH, N, r, K]`` blocks (token-major operands of rank 5 with ``heads``);
    with ``packed_rows``, the last operand is packed rows ``[1, T R, H, K]`` read in place (``kernel`` gets the table
    first)."""
    BH, N, _, K = operands[0].shape
    block = lambda x: in_layout(pl.BlockSpec((None, None, x.shape[2], K), lambda i, c: (i, c, 0, 0)), x, heads)
    outs = out_shape if isinstance(out_shape, tuple) else (out_shape,)
    specs = tuple(block(x) for x in outs)
    in_specs = [block(x) for x in operands]
    if packed_rows is not None:
        in_specs = [*packed.table_specs(packed_rows), *in_specs[:-1],
                    packed.rows_spec(pl.BlockSpec((None, None, None, K), lambda i, c: (i, c, 0, 0)), heads,
                                     operands[-1].shape[1])]
        operands = (*packed.table_args(packed_rows), *operands)
    return pallas_call(kernel, out_shape=out_shape, grid=(BH, N), in_specs=in_specs,
                       out_specs=specs if isinstance(out_shape, tuple) else specs[0],
                       interpret=resolve_interpret(interpret), num_warps=4, num_stages=1, name=name)(*operands)


def cumulative_decay_kernel(log_decay, rank: int, *, keys=None, heads: int | None = None,
                            interpret: bool | None = None, packed_rows: packed.ChunkTable | None = None):
    """:func:`micro_log_decay` (same contract): a kernel for per-channel ``[BH, N, C, K]`` decays. With ``keys``
    ([BH, N, n, K], or token-major [B, N, n, H, K] with ``heads``; per-channel decays only) -> (G, :func:`end_keys`
    head-major in the dtype of ``keys``); ``packed_rows``: the keys are packed rows ``[1, T R, H, K]`` read in place
    (:mod:`.packed`)."""
    if log_decay.ndim == 3:
        if keys is not None:
            raise ValueError("keys: the keys decayed to the chunk end are formed for per-channel decays "
                             f"(log_decay [BH, N, C, K]), got log_decay of shape {tuple(log_decay.shape)}")
        return micro_log_decay(log_decay, rank)
    dtype = jnp.promote_types(log_decay.dtype, jnp.float32)
    BH, N, C, K = log_decay.shape
    gap = chunks.reset_gap(dtype)
    packed_rows = packed_rows if keys is not None else None  # the keys are the only token-major operand

    def kernel(*refs):
        if packed_rows is not None:
            table_ref, *refs = refs
            refs[1] = packed.chunk_rows(refs[1], table_ref, pl.program_id(1), C * rank, rank)
        g_ref, *refs = refs
        k_ref, G_ref, *e_ref = refs if keys is not None else (None, *refs)
        g = g_ref[...].astype(dtype)
        reset = jnp.isneginf(g)
        G = jnp.cumsum(jnp.where(reset, 0.0, g), axis=0) - gap * jnp.cumsum(reset.astype(dtype), axis=0)
        if e_ref:  # e^{G_end - G}: G's last row, exactly, by a masked sum
            last = lax.broadcasted_iota(jnp.int32, (C, K), 0) == C - 1
            to_end = jnp.exp(jnp.sum(jnp.where(last, G, 0.0), axis=0)[None, :] - G)
        for r in range(rank):  # each token's decay on its R micro-steps' rows
            rows = slice(None) if rank == 1 else _rows(C, rank, r)
            G_ref[rows, :] = G
            if e_ref:
                e_ref[0][rows, :] = (to_end * k_ref[rows, :].astype(dtype)).astype(e_ref[0].dtype)

    out = jax.ShapeDtypeStruct((BH, N, C * rank, K), dtype)
    if keys is None:
        return _launch(kernel, out, (log_decay,), interpret, "flowssm_cumulative_decay")
    decayed = jax.ShapeDtypeStruct((BH, N, C * rank, K), keys.dtype)
    return _launch(kernel, (out, decayed), (log_decay, keys), interpret, "flowssm_cumulative_decay", heads=heads,
                   packed_rows=packed_rows)


def cumulative_decay_vjp_kernel(log_decay, dG, rank: int, *, interpret: bool | None = None):
    """The cotangent of ``log_decay`` given ``dG`` (shaped like :func:`micro_log_decay`'s output), in ``dG``'s
    dtype: a kernel for per-channel decays (0 on resets, as autodiff of the reference gives)."""
    if log_decay.ndim == 3:
        return jax.vjp(lambda ld: micro_log_decay(ld, rank), log_decay)[1](dG)[0]
    BH, N, C, K = log_decay.shape
    dtype = dG.dtype

    def kernel(g_ref, dG_ref, dg_ref):
        last_first = _rows(C, 1, 0, reverse=True)
        per_token = sum(dG_ref[_rows(C, rank, r, reverse=True), :] for r in range(rank))  # tokens last first
        dg = jnp.cumsum(per_token, axis=0)  # row j: the sum over tokens C - 1 - j and later
        dg_ref[last_first, :] = jnp.where(jnp.isneginf(g_ref[last_first, :]), 0.0, dg).astype(dg_ref.dtype)

    out = jax.ShapeDtypeStruct(log_decay.shape, dtype)
    return _launch(kernel, out, (log_decay, dG), interpret, "flowssm_cumulative_decay_vjp")

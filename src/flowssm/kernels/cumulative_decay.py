"""Cumulative decays of every micro-step, and their vjp: one program per (head, chunk).

For per-token log-decays ``g: [C, K]`` of a chunk (one per key channel) and ``R`` micro-steps a token:

    G_i = sum_{c <= i // R} g_c = (P g)_i,    P_ic = [c <= i // R]: the [C R, C] prefix mask,

with hard resets (``g_c = -inf``) as in ``chunks.cumulative_log_decay``: ``G = P f - gap P r`` (``f``: ``g``
with resets as 0, ``r``: the reset indicator). The vjp is ``dg = P^T dG`` off the resets, 0 on them.

Both are products with the mask inside one kernel (float32 products at full precision: 3xTF32 on the GPU,
relative error about ``2^-22`` a term); on an H200 the cumsums in XLA took 0.37 ms at 4 x 4096 x 16 x 128
(RESULTS.md, run 13), a quarter of KDA's forward. Scalar decays (``g: [C]``, a few kB a chunk) stay in XLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from flowssm import chunks
from flowssm.kernels.common import dot, pallas_call, resolve_interpret


def micro_log_decay(log_decay, rank: int):
    """Per-token log-decays ``[BH, N, C]`` (or ``[BH, N, C, K]`` per key channel) -> cumulative decay of each
    micro-step ``[BH, N, C R(, K)]`` (jnp: the reference, and the kernels' for scalar decays)."""
    dtype = jnp.promote_types(log_decay.dtype, jnp.float32)
    return jnp.repeat(chunks.cumulative_log_decay(log_decay.astype(dtype), axis=2), rank, axis=2)


def _prefix(C: int, rank: int, dtype):
    """``P: [C R, C]``, ``P_ic = [c <= i // R]``."""
    rows, columns = (lax.broadcasted_iota(jnp.int32, (C * rank, C), axis) for axis in (0, 1))
    return (columns <= rows // rank).astype(dtype)


def _launch(kernel, out_shape, operands, interpret, name: str, num_warps: int):
    BH, N, _, K = operands[0].shape
    block = lambda r: pl.BlockSpec((None, None, r, K), lambda i, c: (i, c, 0, 0))
    return pallas_call(kernel, out_shape=out_shape, grid=(BH, N),
                       in_specs=[block(x.shape[2]) for x in operands], out_specs=block(out_shape.shape[2]),
                       interpret=resolve_interpret(interpret), num_warps=num_warps, num_stages=1, name=name)(*operands)


def cumulative_decay_kernel(log_decay, rank: int, *, interpret: bool | None = None):
    """:func:`micro_log_decay` (same contract): a kernel for per-channel ``[BH, N, C, K]`` decays."""
    if log_decay.ndim == 3:
        return micro_log_decay(log_decay, rank)
    dtype = jnp.promote_types(log_decay.dtype, jnp.float32)
    BH, N, C, K = log_decay.shape
    gap = chunks.reset_gap(dtype)
    counted = jnp.bfloat16 if dtype == jnp.float32 else dtype

    def kernel(g_ref, G_ref):
        g = g_ref[...].astype(dtype)
        reset = jnp.isneginf(g)
        P = _prefix(C, rank, dtype)
        finite = dot(P, jnp.where(reset, 0.0, g), operand_dtype=dtype, mode="f32")
        counts = dot(P, reset.astype(dtype), operand_dtype=counted)  # 0s and 1s, counts below 256: exact
        G_ref[...] = (finite - gap * counts).astype(G_ref.dtype)

    out = jax.ShapeDtypeStruct((BH, N, C * rank, K), dtype)
    return _launch(kernel, out, (log_decay,), interpret, "flowssm_cumulative_decay", num_warps=8)  # 4 spill


def cumulative_decay_vjp_kernel(log_decay, dG, rank: int, *, interpret: bool | None = None):
    """The cotangent of ``log_decay`` given ``dG`` (shaped like :func:`micro_log_decay`'s output), in ``dG``'s
    dtype: a kernel for per-channel decays (0 on resets, as autodiff of the reference gives)."""
    if log_decay.ndim == 3:
        return jax.vjp(lambda ld: micro_log_decay(ld, rank), log_decay)[1](dG)[0]
    BH, N, C, K = log_decay.shape
    dtype = dG.dtype

    def kernel(g_ref, dG_ref, dg_ref):
        P = _prefix(C, rank, dtype)
        dg = dot(P, dG_ref[...], operand_dtype=dtype, mode="f32", trans_a=True)
        dg_ref[...] = jnp.where(jnp.isneginf(g_ref[...]), 0.0, dg).astype(dg_ref.dtype)

    out = jax.ShapeDtypeStruct(log_decay.shape, dtype)
    return _launch(kernel, out, (log_decay, dG), interpret, "flowssm_cumulative_decay_vjp", num_warps=4)

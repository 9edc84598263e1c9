"""Cumulative decays of every micro-step, and their vjp: one program per (head, chunk).

For per-token log-decays ``g: [C, K]`` of a chunk (one per key channel) and ``R`` micro-steps a token:

    G_i = sum_{c <= i // R} g_c,        dg_c = sum_{i >= c R} dG_i  (0 on resets),

with hard resets (``g_c = -inf``) as in ``chunks.cumulative_log_decay``: the cumsum of ``g`` with resets as 0,
minus ``reset_gap`` times the cumsum of the reset indicator. Inside the kernels a cumsum is Triton's scan
along the rows of the tile (float32 adds); the vjp's reverse cumsum reads the rows in reverse order (a
gathered load), scans and writes them back in reverse (Triton's lowering has no reverse scan).

On an H200 at 4 x 4096 x 16 x 128 the cumsums in XLA took 0.37 ms, a quarter of KDA's forward (RESULTS.md,
run 13). Scalar decays (``g: [C]``, a few kB a chunk) stay in XLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from flowssm import chunks
from flowssm.kernels.common import pallas_call, resolve_interpret


def micro_log_decay(log_decay, rank: int):
    """Per-token log-decays ``[BH, N, C]`` (or ``[BH, N, C, K]`` per key channel) -> cumulative decay of each
    micro-step ``[BH, N, C R(, K)]`` (jnp: the reference, and the kernels' for scalar decays)."""
    dtype = jnp.promote_types(log_decay.dtype, jnp.float32)
    return jnp.repeat(chunks.cumulative_log_decay(log_decay.astype(dtype), axis=2), rank, axis=2)


def _rows(C: int, rank: int, r: int, reverse: bool = False):
    """Micro-step ``r`` of each token, tokens in order or ``reverse``d: int32 [C] row indices."""
    tokens = lax.broadcasted_iota(jnp.int32, (C,), 0)
    return ((C - 1 - tokens) if reverse else tokens) * rank + r


def _launch(kernel, out_shape, operands, interpret, name: str):
    BH, N, _, K = operands[0].shape
    block = lambda r: pl.BlockSpec((None, None, r, K), lambda i, c: (i, c, 0, 0))
    return pallas_call(kernel, out_shape=out_shape, grid=(BH, N),
                       in_specs=[block(x.shape[2]) for x in operands], out_specs=block(out_shape.shape[2]),
                       interpret=resolve_interpret(interpret), num_warps=4, num_stages=1, name=name)(*operands)


def cumulative_decay_kernel(log_decay, rank: int, *, interpret: bool | None = None):
    """:func:`micro_log_decay` (same contract): a kernel for per-channel ``[BH, N, C, K]`` decays."""
    if log_decay.ndim == 3:
        return micro_log_decay(log_decay, rank)
    dtype = jnp.promote_types(log_decay.dtype, jnp.float32)
    BH, N, C, K = log_decay.shape
    gap = chunks.reset_gap(dtype)

    def kernel(g_ref, G_ref):
        g = g_ref[...].astype(dtype)
        reset = jnp.isneginf(g)
        G = jnp.cumsum(jnp.where(reset, 0.0, g), axis=0) - gap * jnp.cumsum(reset.astype(dtype), axis=0)
        if rank == 1:
            G_ref[...] = G
        else:
            for r in range(rank):  # each token's decay on its R micro-steps' rows
                G_ref[_rows(C, rank, r), :] = G

    out = jax.ShapeDtypeStruct((BH, N, C * rank, K), dtype)
    return _launch(kernel, out, (log_decay,), interpret, "flowssm_cumulative_decay")


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

"""Per-channel decays: a chunk's decayed score blocks, formed by one kernel before the transfer and the output.

For a chunk with cumulative decays ``G: [n, K]`` (micro-steps) and ``G_t: [C, K]`` (tokens), ``n = C R``:

    A_tm  = sum_c q_tc k_mc e^{G_tc - G_mc}    (m // R <= t)     the output's attention block,
    q~_t  = e^{G_t} * q_t                                        the output's decayed queries,
    Gr_im = sum_c k_ic k_mc e^{G_ic - G_mc}    (m < i)           the transfer's key scores (``L = b Gr``),

each through ``decay.scores`` (whole chunk, factored blocks or loops, as inside the kernels). With
``Tuning(intra="apart")`` the output kernel and the transfer read these instead of forming them next to their
other tiles (the per-channel output kernel spills 880 B a thread and the transfer 1012 B in the offline sm_90
report; apart, the output kernel spills none: RESULTS.md, run 14). fla's KDA forward splits the work the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from flowssm import chunks
from flowssm.kernels import decay
from flowssm.kernels.chunk_output import attention_block
from flowssm.kernels.chunk_transfer import key_scores
from flowssm.kernels.common import (dot, head_major, layout_dims, pallas_call, reference_dot, resolve_interpret,
                                    token_spec)


def chunk_scores_kernel(q, keys, G, *, rank: int, heads: int | None = None, with_keys: bool = False,
                        score_mode: str = "operand", num_warps: int = 4, num_stages: int = 1,
                        interpret: bool | None = None):
    """One program per (head, chunk). q: [BH, N, C, K], keys: [BH, N, n, K] (token-major with ``heads``), G:
    [BH, N, n, K] -> (``A: [BH, N, C, n]``, ``q~: [BH, N, C, K]``) in the dtype of ``keys`` (the operand dtype of
    the output's products with them: the roundings of the output kernel's own), and with ``with_keys`` also the
    key scores ``Gr: [BH, N, n, n]`` in float32 (float64 for float64 ``G``), as the transfer forms them."""
    BH, N, C, K = layout_dims(q, heads)
    n = layout_dims(keys, heads)[2]
    if not decay.per_channel(G):
        raise ValueError(f"G: chunk_scores_kernel forms per-channel scores, expected [BH, N, n, K], got shape "
                         f"{tuple(G.shape)}")
    interpret = resolve_interpret(interpret)
    dtype = keys.dtype
    own_tokens = rank > 1  # for one micro-step a token the token decays are G itself: its block, read once

    def kernel(q_ref, k_ref, g_ref, *refs):
        gt_ref, (a_ref, qd_ref, *gr_ref) = (refs[0], refs[1:]) if own_tokens else (g_ref, refs)
        items = decay.ref_rows(k_ref, g_ref)
        a_ref[...] = attention_block(q_ref, k_ref, g_ref, gt_ref, rank=rank, matmul=dot, operand_dtype=dtype,
                                     rows=(decay.ref_rows(q_ref, gt_ref), items),
                                     score_mode=score_mode).astype(a_ref.dtype)
        qd_ref[...] = (jnp.exp(gt_ref[...]) * q_ref[...].astype(g_ref.dtype)).astype(qd_ref.dtype)
        if with_keys:
            gr_ref[0][...] = key_scores(k_ref, g_ref, blocks=chunks.score_blocks(n // rank), operand_dtype=dtype,
                                        rows=(items, items), score_mode=score_mode).astype(gr_ref[0].dtype)

    rows = lambda r, d: pl.BlockSpec((None, None, r, d), lambda i, c: (i, c, 0, 0))
    out_shape = [jax.ShapeDtypeStruct((BH, N, C, n), dtype), jax.ShapeDtypeStruct((BH, N, C, K), dtype)]
    out_shape += [jax.ShapeDtypeStruct((BH, N, n, n), G.dtype)] * with_keys
    return pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=(BH, N),
        in_specs=[token_spec(rows(C, K), heads), token_spec(rows(n, K), heads), rows(n, K)] + [rows(C, K)] * own_tokens,
        out_specs=(rows(C, n), rows(C, K)) + (rows(n, n),) * with_keys,
        interpret=interpret,
        num_warps=num_warps, num_stages=num_stages,
        name="flowssm_chunk_scores",
    )(q, keys, G, *(decay.token_decays(G, rank),) * own_tokens)


def chunk_scores_reference(q, keys, G, *, rank: int, heads: int | None = None, with_keys: bool = False,
                           score_mode: str = "operand", num_warps: int = 4, num_stages: int = 1,
                           interpret: bool | None = None):
    """Same contract as :func:`chunk_scores_kernel`, in plain jnp at full precision."""
    del score_mode, num_warps, num_stages, interpret
    q, keys = head_major(q, heads), head_major(keys, heads)
    G_tok = decay.token_decays(G, rank)
    block = lambda *a: attention_block(*a, rank=rank, matmul=reference_dot, operand_dtype=keys.dtype)
    out = (jax.vmap(jax.vmap(block))(q, keys, G, G_tok).astype(keys.dtype),
           (jnp.exp(G_tok) * q.astype(G.dtype)).astype(keys.dtype))
    if not with_keys:
        return out
    blocks = chunks.score_blocks(G.shape[2] // rank)
    gram = lambda k, g: key_scores(k, g, blocks=blocks, operand_dtype=keys.dtype, matmul=reference_dot)
    return (*out, jax.vmap(jax.vmap(gram))(keys, G).astype(G.dtype))

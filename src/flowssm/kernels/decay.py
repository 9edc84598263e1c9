"""Per-channel decays inside the kernels: decayed scores of two operands, formed stably, and their vjp.

A kernel block with per-channel cumulative decays (``G: [r, K]``) needs

    A_ip = sum_c left_ic right_pc exp(G_left_ic - G_right_pc)    for p < rank * i + shift, else 0

(``rank = 1, shift = 0``: the transfer's strictly lower ``L``; ``rank = R, shift = R``: the output's
token-sees-micro-step mask). Rows and items form ``blocks`` equal consecutive time blocks (16 tokens,
:func:`flowssm.chunks.score_blocks`) and ``G_right`` is non-increasing along items. Pairs across blocks
factor through the last item before the row block (``ref``): ``e^{G_left - ref} e^{ref - G_right}``,
both ``<= 1``, one matmul per row block; pairs inside a block run a loop over the items, each an
element-wise ``exp`` of a masked non-positive difference. ``exp`` never sees a positive number.

Everything is 2-D (rows and columns picked by ``iota`` masks and masked sums, no gathers or 3-D
broadcasts): what Pallas's Triton lowering supports. Inside kernels, the loop's item rows are loaded from
the operand refs (``item_rows``: one ``[1, K]`` load each) instead of masked sums over ``[nr, K]``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


def _iota(shape, axis: int):
    return lax.broadcasted_iota(jnp.int32, shape, axis)


def _row(x, i):
    """Row ``i`` (traced or static) of ``x: [r, K]`` as ``[1, K]``."""
    return jnp.sum(jnp.where(_iota(x.shape, 0) == i, x, 0.0), axis=0, keepdims=True)


def ref_rows(right_ref, g_ref, *index):
    """``item_rows`` of :func:`scores` from refs of ``right`` and ``G_right`` (``[..., nr, K]`` blocks, ``index``
    the leading indices): item ``p`` -> (right row, G_right row), each ``[1, K]``, one load each."""
    return lambda p: (right_ref[(*index, pl.ds(p, 1), slice(None))], g_ref[(*index, pl.ds(p, 1), slice(None))])


def _item_rows(right, G_right, item_rows):
    return item_rows or (lambda p: (_row(right, p), _row(G_right, p)))


def _layout(nl: int, nr: int, blocks: int, rank: int, shift: int):
    """(rows a block, items a block, visible mask [nl, nr])."""
    visible = _iota((nl, nr), 1) < rank * _iota((nl, nr), 0) + shift
    return nl // blocks, nr // blocks, visible


def _cross(left, G_left, right, G_right, a: int, sl: int, sr: int):
    """Row block ``a`` against the items before it: (left factor [nl, K], its decay, right factor [nr, K],
    its decay); zero outside the block and past its start."""
    ref = _row(G_right, a * sr - 1)
    rows = _iota((left.shape[0], 1), 0) // sl == a
    items = _iota((right.shape[0], 1), 0) < a * sr
    e_left = jnp.where(rows, jnp.exp(jnp.where(rows, G_left - ref, 0.0)), 0.0)
    e_right = jnp.where(items, jnp.exp(jnp.where(items, ref - G_right, 0.0)), 0.0)
    return left * e_left, e_left, right * e_right, e_right


def _inside(G_left, G_p, p, sl: int, sr: int, rank: int, shift: int):
    """Item ``p`` (decays ``G_p: [1, K]``) against the rows of its own block that see it: (``e^{G_left - G_p}``
    on those rows, else 0: [nl, K], the mask [nl, 1])."""
    i = _iota((G_left.shape[0], 1), 0)
    rows = (i // sl == p // sr) & (p < rank * i + shift)
    return jnp.where(rows, jnp.exp(jnp.where(rows, G_left - G_p, 0.0)), 0.0), rows


def scores(left, G_left, right, G_right, *, blocks: int, rank: int, shift: int, matmul, operand_dtype,
           item_rows=None):
    """left, G_left: [nl, K]; right, G_right: [nr, K] -> A: [nl, nr] (module docstring), float32 (float64).
    ``item_rows``: item ``p`` -> (its ``right`` and ``G_right`` rows, [1, K]) (:func:`ref_rows`); None: from
    the values."""
    item_rows = _item_rows(right, G_right, item_rows)
    acc = G_left.dtype  # left and right stay in their dtype (fewer live float32 tiles), upcast where used
    (nl, _), nr = left.shape, right.shape[0]
    sl, sr, visible = _layout(nl, nr, blocks, rank, shift)
    A = jnp.zeros((nl, nr), acc)
    for a in range(1, blocks):
        lf, _, rf, _ = _cross(left, G_left, right, G_right, a, sl, sr)
        A = A + matmul(lf, rf, operand_dtype=operand_dtype, trans_b=True)
    columns = _iota((1, nr), 1)

    def item(p, A):
        right_p, G_p = item_rows(p)
        e, _ = _inside(G_left, G_p, p, sl, sr, rank, shift)
        col = jnp.sum(left.astype(acc) * right_p.astype(acc) * e, axis=1, keepdims=True)
        return A + jnp.where(columns == p, col, 0.0)

    return jnp.where(visible, lax.fori_loop(0, nr, item, A), 0.0)


def scores_vjp(left, G_left, right, G_right, dA, *, blocks: int, rank: int, shift: int, matmul, operand_dtype,
               item_rows=None):
    """Cotangents of :func:`scores` given ``dA: [nl, nr]``: (dleft: [nl, K], dright: [nr, K]); those of the
    decays follow as ``dG_left = left * dleft``, ``dG_right = -right * dright``. ``item_rows`` as in
    :func:`scores`."""
    item_rows = _item_rows(right, G_right, item_rows)
    acc = G_left.dtype
    (nl, K), nr = left.shape, right.shape[0]
    sl, sr, visible = _layout(nl, nr, blocks, rank, shift)
    dA = jnp.where(visible, dA.astype(acc), 0.0)
    mm = lambda a, b, **kw: matmul(a, b, operand_dtype=operand_dtype, **kw)
    dleft, dright = jnp.zeros((nl, K), acc), jnp.zeros((nr, K), acc)
    for a in range(1, blocks):
        lf, e_left, rf, e_right = _cross(left, G_left, right, G_right, a, sl, sr)
        dleft = dleft + e_left * mm(dA, rf)
        dright = dright + e_right * mm(dA, lf, trans_a=True)
    columns, items = _iota((nl, nr), 1), _iota((nr, 1), 0)

    def item(p, carry):
        dleft, dright = carry
        right_p, G_p = item_rows(p)
        e, rows = _inside(G_left, G_p, p, sl, sr, rank, shift)
        d_col = jnp.sum(jnp.where(columns == p, dA, 0.0), axis=1, keepdims=True)
        d_col = jnp.where(rows, d_col, 0.0)
        dleft = dleft + d_col * right_p.astype(acc) * e
        d_item = jnp.sum(d_col * left.astype(acc) * e, axis=0, keepdims=True)
        return dleft, dright + jnp.where(items == p, d_item, 0.0)

    return lax.fori_loop(0, nr, item, (dleft, dright))


# Cumulative decays reach the kernels as G: [BH, N, n] (scalar) or [BH, N, n, K] (per key channel).


def per_channel(G) -> bool:
    """Whether kernel decays ``G: [BH, N, n(, K)]`` are per key channel."""
    return G.ndim == 4


def token_decays(G, rank: int):
    """The decay of each token (its last micro-step): [BH, N, n(, K)] -> [BH, N, C(, K)]."""
    return G[:, :, rank - 1 :: rank]

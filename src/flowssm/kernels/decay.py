"""Per-channel decays inside the kernels: decayed scores of two operands, formed stably, and their vjp.

A kernel block with per-channel cumulative decays (``G: [r, K]``) needs

    A_ip = sum_c left_ic right_pc exp(G_left_ic - G_right_pc)    for p < rank * i + shift, else 0

(``rank = 1, shift = 0``: the transfer's strictly lower ``L``; ``rank = R, shift = R``: the output's
token-sees-micro-step mask). Rows and items form ``blocks`` equal consecutive time blocks (16 tokens,
:func:`flowssm.chunks.score_blocks`) and ``G_right`` is non-increasing along items. Pairs across blocks
factor through the last item before the row block (``ref``): ``e^{G_left - ref} e^{ref - G_right}``,
both ``<= 1``, one matmul per row block; pairs inside a block run a loop over the items, each an
element-wise ``exp`` of a masked non-positive difference. ``exp`` never sees a positive number.

Each row block runs on its own ``[sl, K]`` rows (``sl`` rows a block), loaded from the kernel refs
(``rows``: :func:`ref_rows`); its item loop loads one ``[1, K]`` item row an iteration; the blocks'
results are placed in the ``[nl, .]`` outputs by one-hot matmuls at float32 precision. Everything is
2-D (no value slices, gathers or 3-D broadcasts): what Pallas's Triton lowering supports.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


def _iota(shape, axis: int):
    return lax.broadcasted_iota(jnp.int32, shape, axis)


def ref_rows(x_ref, g_ref, *index):
    """A row loader from refs of an operand and its decays (``[..., r, K]`` blocks, ``index`` the leading
    indices): ``(start, size)`` -> (rows ``[size, K]``, their decays ``[size, K]``), one load each."""
    return lambda start, size: tuple(ref[(*index, pl.ds(start, size), slice(None))] for ref in (x_ref, g_ref))


def array_rows(x, G):
    """The row loader of arrays (outside kernels: the jnp references)."""
    return lambda start, size: tuple(lax.dynamic_slice_in_dim(y, start, size) for y in (x, G))


def _loaders(left, G_left, right, G_right, rows):
    """``rows``: None (arrays) or the (left, right) loaders of a kernel."""
    return rows or (array_rows(left, G_left), array_rows(right, G_right))


def _place(x, a, blocks: int, matmul, transpose: bool = False):
    """Block ``a`` (traced or static) of ``blocks`` row blocks: ``[sl, m]`` -> its rows of ``[blocks sl, m]``
    (zero elsewhere), or with ``transpose`` ``[blocks sl, m]`` -> its ``[sl, m]`` rows; a one-hot matmul at
    float32 precision."""
    if blocks == 1:
        return x
    sl = x.shape[0] // blocks if transpose else x.shape[0]
    one_hot = (_iota((blocks * sl, sl), 0) == a * sl + _iota((blocks * sl, sl), 1)).astype(x.dtype)
    return matmul(one_hot, x, operand_dtype=x.dtype, mode="f32", trans_a=transpose)


def _block_start(left_rows, right_rows, right, G_right, a, sl: int, sr: int):
    """Row block ``a`` (traced): (its rows [sl, K], their decays, ``e^{G_left - ref}`` [sl, K] and ``right
    e^{ref - G_right}`` [nr, K] on the items before the block (none for ``a = 0``), their decays)."""
    left_a, G_left_a = left_rows(a * sl, sl)
    ref = right_rows(jnp.maximum(a * sr - 1, 0), 1)[1]  # block 0: item 0, whose decay bounds every row's
    before = _iota((right.shape[0], 1), 0) < a * sr
    e_right = jnp.where(before, jnp.exp(jnp.where(before, ref - G_right, 0.0)), 0.0)
    return left_a, G_left_a, jnp.exp(G_left_a - ref), right * e_right, e_right


def _inside(G_left_a, G_p, row, p, rank: int, shift: int):
    """Item ``p`` (decays ``G_p: [1, K]``) against the block's rows (global indices ``row: [sl, 1]``) that see
    it: (``e^{G_left - G_p}`` there, else 0: [sl, K], the mask [sl, 1])."""
    seen = p < rank * row + shift
    return jnp.where(seen, jnp.exp(jnp.where(seen, G_left_a - G_p, 0.0)), 0.0), seen


def scores(left, G_left, right, G_right, *, blocks: int, rank: int, shift: int, matmul, operand_dtype, rows=None):
    """left, G_left: [nl, K]; right, G_right: [nr, K] -> A: [nl, nr] (module docstring), float32 (float64).
    ``rows``: the kernel's (left, right) row loaders (:func:`ref_rows`); None: slices of the arrays."""
    acc = G_left.dtype
    left_rows, right_rows = _loaders(left, G_left, right, G_right, rows)
    (nl, _), nr = left.shape, right.shape[0]
    sl, sr = nl // blocks, nr // blocks
    right, columns = right.astype(acc), _iota((sl, nr), 1)

    def block(a, A):
        left_a, G_left_a, e_left, right_before, _ = _block_start(left_rows, right_rows, right, G_right, a, sl, sr)
        left_a = left_a.astype(acc)
        row = a * sl + _iota((sl, 1), 0)

        def item(j, A_a):
            p = a * sr + j
            right_p, G_p = right_rows(p, 1)
            e, _ = _inside(G_left_a, G_p, row, p, rank, shift)
            col = jnp.sum(left_a * right_p.astype(acc) * e, axis=1, keepdims=True)
            return A_a + jnp.where(columns == p, col, 0.0)

        A_a = matmul(left_a * e_left, right_before, operand_dtype=operand_dtype, trans_b=True)
        return A + _place(lax.fori_loop(0, sr, item, A_a), a, blocks, matmul)

    A = lax.fori_loop(0, blocks, block, jnp.zeros((nl, nr), acc))
    visible = _iota((nl, nr), 1) < rank * _iota((nl, nr), 0) + shift
    return jnp.where(visible, A, 0.0)


def scores_vjp(left, G_left, right, G_right, dA, *, blocks: int, rank: int, shift: int, matmul, operand_dtype,
               rows=None):
    """Cotangents of :func:`scores` given ``dA: [nl, nr]``: (dleft: [nl, K], dright: [nr, K]); those of the
    decays follow as ``dG_left = left * dleft``, ``dG_right = -right * dright``. ``rows`` as in
    :func:`scores`."""
    acc = G_left.dtype
    left_rows, right_rows = _loaders(left, G_left, right, G_right, rows)
    (nl, K), nr = left.shape, right.shape[0]
    sl, sr = nl // blocks, nr // blocks
    visible = _iota((nl, nr), 1) < rank * _iota((nl, nr), 0) + shift
    dA = jnp.where(visible, dA.astype(acc), 0.0)
    right = right.astype(acc)
    mm = lambda a, b, **kw: matmul(a, b, operand_dtype=operand_dtype, **kw)
    columns, items = _iota((sl, nr), 1), _iota((sr, 1), 0)

    def block(a, carry):
        dleft, dright = carry
        left_a, G_left_a, e_left, right_before, e_right = _block_start(left_rows, right_rows, right, G_right, a,
                                                                       sl, sr)
        left_a = left_a.astype(acc)
        dA_a = _place(dA, a, blocks, matmul, transpose=True)  # [sl, nr]
        row = a * sl + _iota((sl, 1), 0)

        def item(j, carry):
            dleft_a, dright_a = carry
            p = a * sr + j
            right_p, G_p = right_rows(p, 1)
            e, seen = _inside(G_left_a, G_p, row, p, rank, shift)
            d_col = jnp.where(seen, jnp.sum(jnp.where(columns == p, dA_a, 0.0), axis=1, keepdims=True), 0.0)
            d_item = jnp.sum(d_col * left_a * e, axis=0, keepdims=True)
            return dleft_a + d_col * right_p.astype(acc) * e, dright_a + jnp.where(items == j, d_item, 0.0)

        start = (e_left * mm(dA_a, right_before), jnp.zeros((sr, K), acc))
        dleft_a, dright_a = lax.fori_loop(0, sr, item, start)
        dright = dright + e_right * mm(dA_a, left_a * e_left, trans_a=True) + _place(dright_a, a, blocks, matmul)
        return dleft + _place(dleft_a, a, blocks, matmul), dright

    return lax.fori_loop(0, blocks, block, (jnp.zeros((nl, K), acc), jnp.zeros((nr, K), acc)))


# Cumulative decays reach the kernels as G: [BH, N, n] (scalar) or [BH, N, n, K] (per key channel).


def per_channel(G) -> bool:
    """Whether kernel decays ``G: [BH, N, n(, K)]`` are per key channel."""
    return G.ndim == 4


def token_decays(G, rank: int):
    """The decay of each token (its last micro-step): [BH, N, n(, K)] -> [BH, N, C(, K)]."""
    return G[:, :, rank - 1 :: rank]

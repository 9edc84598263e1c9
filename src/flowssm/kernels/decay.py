"""Per-channel decays inside the kernels: decayed scores of two operands, formed stably, and their vjp.

A kernel block with per-channel cumulative decays (``G: [r, K]``) needs

    A_ip = sum_c left_ic right_pc exp(G_left_ic - G_right_pc)    for p < rank * i + shift, else 0

(``rank = 1, shift = 0``: the transfer's strictly lower ``L``; ``rank = R, shift = R``: the output's
token-sees-micro-step mask). Rows and items form ``blocks`` equal consecutive time blocks (16 tokens,
:func:`flowssm.chunks.score_blocks`; ``nr = rank nl``, ``shift <= rank``) and ``G_right`` is non-increasing
along items, with ``G_left_i <= G_right_p`` wherever ``p`` is visible from ``i``.

Pairs across blocks factor through ``ref``, the decay of the last item before the row's block:
``e^{G_left - ref} e^{ref - G_right}``, both ``<= 1``; one ``[nl, K] x [K, nr]`` matmul per row block ``a``
(a loop over ``a``), whose ``[nl, nr]`` result is kept on block ``a``'s rows and the items before it. Pairs
inside a block run a loop over the item offset ``j`` in the block, all row blocks at once: row ``i`` of
block ``a`` meets item ``a sr + j`` (a gathered ``[nl, K]`` row load), an element-wise decay of their
difference, summed over ``K``, selected into column ``a sr + j``. No one-hot matmul places anything. The
vjp runs the same loops for the rows' cotangent, then the transposed ones for the items' (over the row
offset, all item blocks at once, on ``dA^T``).

Factored blocks: where every block's decay is small (``ref`` minus the block's last item at most
:data:`BLOCK_RANGE` = 40 nats in every channel, checked per chunk at run time, a ``lax.cond``), the pairs
inside a block factor through the same ``ref`` as those across blocks: ``e^{G_left - ref} <= 1`` times
``e^{ref - G_right}``, which is ``<= e^{40}`` on block ``a``'s own items. Row block ``a``'s scores, across and
inside, are then one matmul; no loop over item offsets: ``blocks`` matmuls and ``blocks + 1`` element-wise
decays of a tile in all, against ``nr / blocks`` steps of gathered loads and decays. On an H200 that took
KDA's output kernel from 1.49 to 0.54 ms at 4 x 4096 x 16 x 128 x 128 (RESULTS.md, run 12). Chunks with a
stronger decay run the loops.

Whole chunks: where a chunk decays by at most :data:`CHUNK_RANGE` = 80 nats in every channel (first item to
last, checked per chunk, an outer ``lax.cond``), every pair factors through one reference, the middle of the
chunk's decays (``ref = (G_first + G_last) / 2`` per channel): ``e^{G_left - ref} e^{ref - G_right}``, each
factor at most ``e^{40}``. The scores are then one ``[nl, K] x [K, nr]`` matmul and two element-wise decays; the
vjp two matmuls. Weaker checks come next: factored blocks, then the loops. On an H200 (KDA, 4 x 4096 x 16 x
128 x 128) the output kernel went from 0.436 to 0.363 ms and the transfer backward from 1.975 to 1.331 (RESULTS.md,
run 13).

Stability and accuracy: the loops' decays are ``2^{min(x, 0) log2 e}`` (:func:`_decay`): the exponent is
never positive, so nothing overflows; arguments that would be positive belong to pairs that are never
visible and are masked. The factored forms' exponents are clamped at ``BLOCK_RANGE`` instead: no factor
exceeds ``e^{40}`` times its operand, the visible products are ``e^{G_left - G_right} <= 1`` times the
operands, and pairs that are not visible (up to ``e^{80}`` times the operands, whole chunks; even an overflow
there) are selected away; the vjp's cotangents are masked before its matmuls. On the GPU a decay is one
``ex2.approx`` (relative error about ``2^-22``) after a rounded product, whose rounding adds at most
``|x| 2^-23`` relative error (``1e-5`` at ``x = -87``, below which float32 flushes to 0; ``1e-6`` for
``|x| < 8``); float64 keeps float64 accuracy. Terms are combined in float32 (float64) except the matmuls,
whose operands are rounded to the operand dtype (each visible term keeps that relative accuracy); the
loops' ``dA^T`` is an identity matmul at full precision (3xTF32 on the GPU: relative error ``2^-22``).

Row loaders (:class:`Rows`) read an operand and its decays (all rows, or the rows of an int32 index
vector) from the kernel refs where they are needed, or index arrays outside kernels. Every value is 2-D
(index vectors 1-D), no value slices: what Pallas's Triton lowering supports.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


class Rows(NamedTuple):
    """Loaders of an operand's rows ``x`` and of their decays ``G``: index (None: all rows; int32 ``[m]``: those
    rows), optional ``channels`` (None: all; ``(start, size)``, start traced: those key channels) -> ``[m, K]``
    (``[m, size]``)."""

    x: Callable
    G: Callable


def _at(index, rows, channels=None):
    return (*index, slice(None) if rows is None else rows,
            slice(None) if channels is None else pl.ds(channels[0], channels[1]))


def ref_rows(x_ref, g_ref, *index, scale_ref=None) -> Rows:
    """Loaders from kernel refs of an operand and its decays (``[..., r, K]`` blocks, ``index`` the leading
    indices), one load a call; ``scale_ref`` (``[..., r]``): the operand is ``scale[:, None] * x``."""

    def x(rows, channels=None):
        tile = x_ref[_at(index, rows, channels)]
        return tile if scale_ref is None else scale_ref[_at(index, rows)[:-1]].astype(g_ref.dtype)[:, None] * tile

    return Rows(x, lambda rows, channels=None: g_ref[_at(index, rows, channels)])


def array_rows(x, G) -> Rows:
    """The loaders of arrays (outside kernels: the jnp references)."""

    def load(y, rows, channels=None):
        y = y if rows is None else y[rows]
        return y if channels is None else lax.dynamic_slice_in_dim(y, channels[0], channels[1], axis=1)

    return Rows(*(lambda rows, channels=None, y=y: load(y, rows, channels) for y in (x, G)))


def in_channels(rows: Rows, channels) -> Rows:
    """``rows`` restricted to the key channels ``(start, size)``."""
    return Rows(lambda r: rows.x(r, channels), lambda r: rows.G(r, channels))


def _iota(shape, axis: int = 0):
    return lax.broadcasted_iota(jnp.int32, shape, axis)


def _block_of(size: int, per_block: int, vector: bool = False):
    """Block of each of ``size`` rows (``per_block`` a block): ``[size, 1]``, or ``[size]`` with ``vector``."""
    return lax.div(_iota((size,) if vector else (size, 1)), jnp.int32(per_block))


def _decay(x, limit: float = 0.0):
    """``e^x`` with the argument clamped at ``limit``: 0 (a decay, ``x <= 0``): the exponent is never positive;
    pairs with ``x > 0`` are never visible, they get 1 (finite) and the callers mask them. ``exp2``: one
    ``ex2.approx`` on the GPU (``exp`` adds a range reduction of ~9 instructions an element; accuracy: module
    docstring)."""
    return jnp.exp2(jnp.minimum(x, limit) * 1.4426950408889634)


# The largest decay (nats, any channel) from ``ref`` to a block's last item for which the block's own pairs
# are factored through ``ref`` (module docstring): factors up to e^40 ~ 2.4e17.
BLOCK_RANGE = 40.0


# The largest decay (nats, any channel) from a chunk's first item to its last for which all its pairs factor
# through the chunk's middle decay (module docstring): factors up to e^40 on either side.
CHUNK_RANGE = 2 * BLOCK_RANGE


def _ends(rrows: Rows, nr: int):
    """The decays of a chunk's first and last items: ([1, K], [1, K])."""
    return tuple(rrows.G(jnp.full((1,), i, jnp.int32)) for i in (0, nr - 1))


def whole(rrows: Rows, nr: int):
    """Whether a chunk's pairs factor through one reference (traced bool): ``G_first - G_last <= CHUNK_RANGE``
    in every channel."""
    first, last = _ends(rrows, nr)
    return jnp.max(first - last) <= CHUNK_RANGE


def _chunk_factors(lrows: Rows, rrows: Rows, nr: int):
    """``(e^{G_left - ref}: [nl, K], e^{ref - G_right}: [nr, K])``, each at most ``e^{BLOCK_RANGE}`` in a
    :func:`whole` chunk (clamped there otherwise)."""
    first, last = _ends(rrows, nr)
    ref = 0.5 * (first + last)
    return _decay(lrows.G(None) - ref, limit=BLOCK_RANGE), _decay(ref - rrows.G(None), limit=BLOCK_RANGE)


def _by_form(rrows: Rows, nr: int, blocks: int, at_once, by_blocks, looped):
    """The first form a chunk's decays allow (traced): one matmul (:func:`whole`), factored blocks
    (:func:`factored`), the loops."""
    return lax.cond(whole(rrows, nr), at_once, lambda: lax.cond(factored(rrows, nr, blocks), by_blocks, looped))


def _ref_index(size: int, per_block: int, items_per_block: int):
    """[size] index of ``ref`` for each of ``size`` rows, ``per_block`` a block: the last item before the row's
    block (``items_per_block`` items a block; item 0 for block 0)."""
    return jnp.maximum(_block_of(size, per_block, vector=True) * items_per_block - 1, 0)


def _left_to_ref(lrows: Rows, rrows: Rows, nl: int, sl: int, sr: int):
    """``e^{G_left - ref}`` ([nl, K], ``<= 1``): ``ref`` the decays of the last item before each row's block
    (item 0 for the rows of block 0, which meet no earlier block)."""
    return _decay(lrows.G(None) - rrows.G(_ref_index(nl, sl, sr)))


def _diagonal(target: Rows, other: Rows, j, *, size: int, per_block: int, other_block: int, target_is_left: bool):
    """Offset ``j`` of the diagonal blocks, one pair per ``target`` row (``size`` rows): row ``t`` of block ``b``
    meets row ``b other_block + j`` of ``other`` -> (that index: [size, 1], those ``other`` rows: [size, K],
    ``e^{G_left - G_right}`` (:func:`_decay`: the callers mask the pairs that are not visible): [size, K])."""
    gathered = _block_of(size, per_block, vector=True) * other_block + j
    G_mine, G_other = target.G(None), other.G(gathered)
    e = _decay(G_mine - G_other if target_is_left else G_other - G_mine)
    return _block_of(size, per_block) * other_block + j, other.x(gathered), e


def factored(rrows: Rows, nr: int, blocks: int):
    """Whether a chunk's blocks are factored (traced bool): ``max(ref - G_right) <= BLOCK_RANGE`` over every
    item of every block (``G_right`` non-increasing: the block's last item decides)."""
    return jnp.max(rrows.G(_ref_index(nr, nr // blocks, nr // blocks)) - rrows.G(None)) <= BLOCK_RANGE


def _ref_to_block(rrows: Rows, a, sr: int):
    """``e^{ref_a - G_right}`` (``ref_a`` of row block ``a``, traced): ``<= 1`` on the items before block ``a``,
    up to ``e^{BLOCK_RANGE}`` on its own; later items (never visible from it) get the clamped exponent."""
    ref = rrows.G(jnp.full((1,), jnp.maximum(a * sr - 1, 0), jnp.int32))
    return _decay(ref - rrows.G(None), limit=BLOCK_RANGE)


def _row_block(rows_i, columns, a, sl: int, sr: int):
    """The pairs row block ``a``'s matmul fills: its rows, the items of blocks ``<= a``."""
    return (lax.div(rows_i, jnp.int32(sl)) == a) & (columns < (a + 1) * sr)


def scores(left, G_left, right, G_right, *, blocks: int, rank: int, shift: int, matmul, operand_dtype,
           rows: tuple[Rows, Rows] | None = None, channels: int | None = None):
    """left, G_left: [nl, K]; right, G_right: [nr, K] -> A: [nl, nr] (module docstring), float32 (float64).
    ``rows``: the kernel's (left, right) loaders (:func:`ref_rows`; then ``left``, ``right`` give only shapes);
    None: the arrays. ``channels``: sum the scores of blocks of this many key channels (a loop; each block takes
    the form its own decays allow), which keeps ``[n, channels]`` tiles live instead of ``[n, K]`` ones; None:
    all channels at once."""
    acc = G_left.dtype
    lrows, rrows = rows or (array_rows(left, G_left), array_rows(right, G_right))
    (nl, K), nr = left.shape, right.shape[0]
    on = lambda cols: _scores(*(lr if cols is None else in_channels(lr, cols) for lr in (lrows, rrows)),
                              nl=nl, nr=nr, blocks=blocks, rank=rank, shift=shift, acc=acc, matmul=matmul,
                              operand_dtype=operand_dtype)
    if channels is None or channels >= K:
        return on(None)
    if K % channels:
        raise ValueError(f"channels: expected a divisor of the key channels K = {K}, got {channels}")
    return lax.fori_loop(0, K // channels, lambda j, A: A + on((j * channels, channels)), jnp.zeros((nl, nr), acc))


def _scores(lrows: Rows, rrows: Rows, *, nl: int, nr: int, blocks: int, rank: int, shift: int, acc, matmul,
            operand_dtype):
    """:func:`scores` from the loaders of its operands' rows."""
    sl, sr = nl // blocks, nr // blocks
    rows_i, columns = _iota((nl, nr)), _iota((nl, nr), 1)
    visible = columns < rank * rows_i + shift

    def at_once():
        e_left, e_right = _chunk_factors(lrows, rrows, nr)
        mm = matmul(lrows.x(None).astype(acc) * e_left, rrows.x(None).astype(acc) * e_right,
                    operand_dtype=operand_dtype, trans_b=True)
        return jnp.where(visible, mm, 0.0)

    def by_blocks():
        decayed_left = lrows.x(None).astype(acc) * _left_to_ref(lrows, rrows, nl, sl, sr)

        def row_block(a, A):
            rhs = rrows.x(None).astype(acc) * _ref_to_block(rrows, a, sr)
            mm = matmul(decayed_left, rhs, operand_dtype=operand_dtype, trans_b=True)
            return A + jnp.where(_row_block(rows_i, columns, a, sl, sr), mm, 0.0)

        return jnp.where(visible, lax.fori_loop(0, blocks, row_block, jnp.zeros((nl, nr), acc)), 0.0)

    return _by_form(rrows, nr, blocks, at_once, by_blocks,
                    lambda: _looped_scores(lrows, rrows, nl, nr, blocks, visible, acc, matmul, operand_dtype))


def _looped_scores(lrows: Rows, rrows: Rows, nl: int, nr: int, blocks: int, visible, acc, matmul, operand_dtype):
    """:func:`scores` with the pairs inside blocks in a loop over item offsets (any decay); ``visible``: the
    [nl, nr] mask."""
    sl, sr = nl // blocks, nr // blocks
    rows_i, columns = _iota((nl, nr)), _iota((nl, nr), 1)

    def inside(j, A):
        item, right_j, e = _diagonal(lrows, rrows, j, size=nl, per_block=sl, other_block=sr, target_is_left=True)
        col = jnp.sum(lrows.x(None).astype(acc) * right_j.astype(acc) * e, axis=1, keepdims=True)
        return A + jnp.where(columns == item, col, 0.0)

    A = lax.fori_loop(0, sr, inside, jnp.zeros((nl, nr), acc))
    if blocks > 1:
        decayed_left = lrows.x(None).astype(acc) * _left_to_ref(lrows, rrows, nl, sl, sr)

        def across(a, A):
            pairs = (lax.div(rows_i, jnp.int32(sl)) == a) & (columns < a * sr)
            rhs = rrows.x(None).astype(acc) * _ref_to_block(rrows, a, sr)
            return A + jnp.where(pairs, matmul(decayed_left, rhs, operand_dtype=operand_dtype, trans_b=True), 0.0)

        A = A + lax.fori_loop(1, blocks, across, jnp.zeros((nl, nr), acc))
    return jnp.where(visible, A, 0.0)


def scores_vjp(left, G_left, right, G_right, dA, *, blocks: int, rank: int, shift: int, matmul, operand_dtype,
               rows: tuple[Rows, Rows] | None = None):
    """Cotangents of :func:`scores` given ``dA: [nl, nr]``: (dleft: [nl, K], dright: [nr, K]); those of the
    decays follow as ``dG_left = left * dleft``, ``dG_right = -right * dright``. ``rows`` as in
    :func:`scores`."""
    acc = G_left.dtype
    lrows, rrows = rows or (array_rows(left, G_left), array_rows(right, G_right))
    (nl, K), nr = left.shape, right.shape[0]
    sl, sr = nl // blocks, nr // blocks
    rows_i, columns = _iota((nl, nr)), _iota((nl, nr), 1)
    dA = jnp.where(columns < rank * rows_i + shift, dA.astype(acc), 0.0)
    mm = lambda a, b, **kw: matmul(a, b, operand_dtype=operand_dtype, **kw)

    def at_once():
        e_left, e_right = _chunk_factors(lrows, rrows, nr)
        return (e_left * mm(dA, rrows.x(None).astype(acc) * e_right),
                e_right * mm(dA, lrows.x(None).astype(acc) * e_left, trans_a=True))

    def by_blocks():
        to_ref = _left_to_ref(lrows, rrows, nl, sl, sr)
        decayed_left = lrows.x(None).astype(acc) * to_ref

        def row_block(a, grads):
            through_right, dright = grads
            e = _ref_to_block(rrows, a, sr)
            dA_a = jnp.where(_row_block(rows_i, columns, a, sl, sr), dA, 0.0)
            return (through_right + mm(dA_a, rrows.x(None).astype(acc) * e),
                    dright + e * mm(dA_a, decayed_left, trans_a=True))

        zeros = (jnp.zeros((nl, K), acc), jnp.zeros((nr, K), acc))
        through_right, dright = lax.fori_loop(0, blocks, row_block, zeros)
        return to_ref * through_right, dright

    return _by_form(rrows, nr, blocks, at_once, by_blocks,
                    lambda: _looped_scores_vjp(lrows, rrows, dA, (nl, K, nr), blocks, acc, matmul, mm))


def _looped_scores_vjp(lrows: Rows, rrows: Rows, dA, shape: tuple[int, int, int], blocks: int, acc, matmul, mm):
    """:func:`scores_vjp` with the pairs inside blocks in loops over offsets (any decay); ``dA`` masked,
    ``shape``: (nl, K, nr)."""
    nl, K, nr = shape
    sl, sr = nl // blocks, nr // blocks
    rows_i, columns = _iota((nl, nr)), _iota((nl, nr), 1)

    def left_inside(j, dleft):
        item, right_j, e = _diagonal(lrows, rrows, j, size=nl, per_block=sl, other_block=sr, target_is_left=True)
        d_col = jnp.sum(jnp.where(columns == item, dA, 0.0), axis=1, keepdims=True)
        return dleft + d_col * (right_j.astype(acc) * e)  # one tile meets the cotangents (a layout change)

    # the rows' cotangent, then the items': one [., K] accumulator at a time through the loops
    before_a = lambda a: (lax.div(rows_i, jnp.int32(sl)) == a) & (columns < a * sr)  # block a's cross pairs
    dleft = lax.fori_loop(0, sr, left_inside, jnp.zeros((nl, K), acc))
    if blocks > 1:
        def left_across(a, through_right):
            rhs = rrows.x(None).astype(acc) * _ref_to_block(rrows, a, sr)
            return through_right + mm(jnp.where(before_a(a), dA, 0.0), rhs)

        through_right = lax.fori_loop(1, blocks, left_across, jnp.zeros((nl, K), acc))
        dleft = dleft + _left_to_ref(lrows, rrows, nl, sl, sr) * through_right
    # dA^T by a matmul with the identity at full precision: the transposed tile keeps the layout of a
    # matmul result (a transpose's layout spreads its rows' columns over warps: slow row reductions)
    eye = (_iota((nr, nr)) == _iota((nr, nr), 1)).astype(acc)
    dA_t, rows_t = matmul(eye, dA, operand_dtype=acc, mode="f32", trans_b=True), _iota((nr, nl), 1)

    def right_inside(j, dright):
        row, left_j, e = _diagonal(rrows, lrows, j, size=nr, per_block=sr, other_block=sl, target_is_left=False)
        d_row = jnp.sum(jnp.where(rows_t == row, dA_t, 0.0), axis=1, keepdims=True)
        return dright + d_row * (left_j.astype(acc) * e)

    dright = lax.fori_loop(0, sl, right_inside, jnp.zeros((nr, K), acc))
    if blocks > 1:
        decayed_left = lrows.x(None).astype(acc) * _left_to_ref(lrows, rrows, nl, sl, sr)

        def right_across(a, dright):
            d_items = mm(jnp.where(before_a(a), dA, 0.0), decayed_left, trans_a=True)
            return dright + _ref_to_block(rrows, a, sr) * d_items

        dright = lax.fori_loop(1, blocks, right_across, dright)
    return dleft, dright


# Cumulative decays reach the kernels as G: [BH, N, n] (scalar) or [BH, N, n, K] (per key channel).


def per_channel(G) -> bool:
    """Whether kernel decays ``G: [BH, N, n(, K)]`` are per key channel."""
    return G.ndim == 4


def token_decays(G, rank: int):
    """The decay of each token (its last micro-step): [BH, N, n(, K)] -> [BH, N, C(, K)]."""
    return G[:, :, rank - 1 :: rank]

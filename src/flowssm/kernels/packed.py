"""Packed sequences read in place: the kernels take a chunk's rows straight from the packed token axis.

The chunk-aligned layout (:mod:`flowssm.varlen`) starts every sequence on a chunk boundary. Instead of
gathering the token-major operands into it (a copy of q, k, v in and o out), a kernel given a
:class:`ChunkTable` reads chunk ``c`` of the layout as rows ``[start[c], start[c] + C)`` of the packed
``[1, T, H, d]`` operand, masked at ``stop[c]`` (the end of its sequence): the masked rows read as zeros,
identity tokens, and are never written. The operand's whole token axis is one block (the head and column
block picked by the ``BlockSpec``); the chunk is a masked load at a run-time row offset (flash-linear-
attention's scheme for ``cu_seqlens``). An operand with ``r`` rows a token (keys of rank ``R``:
``[1, T R, H, K]``) scales the table by ``r``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
from jaxtyping import Array, Float, Int

from flowssm import varlen
from flowssm.kernels.common import token_spec


class ChunkTable(NamedTuple):
    """Each chunk's tokens in the packed row, ``[start, stop)``, ``stop - start <= C`` (identity chunks past the
    last sequence: ``start = stop = T``): int32 ``bounds: [2, Nc]``, row 0 ``start``, row 1 ``stop``; and the
    layout's gather indices (``slot_token: [Nc C]``, ``token_slot: [T]``, as :class:`flowssm.varlen.Layout`) for
    the kernels that still read the layout (:func:`to_layout`)."""

    bounds: Int[Array, "2 Nc"]
    slot_token: Int[Array, " S"]
    token_slot: Int[Array, " T"]

    @property
    def chunks(self) -> int:
        return self.bounds.shape[1]


def table(lay: varlen.Layout, length: int, chunk_size: int) -> ChunkTable:
    """The table of a chunk-aligned layout of ``length`` tokens: a chunk's tokens are consecutive and fill its
    first slots (``slot_token == length`` marks an identity slot)."""
    slots = lay.slot_token.reshape(-1, chunk_size)
    real = slots < length
    start = jnp.where(real[:, 0], slots[:, 0], length)
    bounds = jnp.stack([start, start + jnp.sum(real, axis=1)]).astype(jnp.int32)
    return ChunkTable(bounds, lay.slot_token, lay.token_slot)


def to_layout(x: Float[Array, "1 L H d"], chunks: ChunkTable, size: int) -> Float[Array, "1 Nc n H d"]:
    """Packed rows (``r`` a token) gathered into the chunk-aligned layout, ``size = C r`` rows a chunk (identity
    rows: zeros)."""
    _, L, H, d = x.shape
    r = size * chunks.chunks // chunks.slot_token.shape[0]
    slots = varlen.to_slots(x.reshape(1, L // r, r, H, d), chunks, 1)
    return slots.reshape(1, chunks.chunks, size, H, d)


def from_layout(y: Float[Array, "1 Nc n H d"], chunks: ChunkTable) -> Float[Array, "1 L H d"]:
    """Inverse of :func:`to_layout`: the tokens' rows of a layout operand."""
    _, Nc, size, H, d = y.shape
    S = chunks.slot_token.shape[0]
    r = size * Nc // S
    rows = varlen.from_slots(y.reshape(1, S, r, H, d), chunks, 1)
    return rows.reshape(1, -1, H, d)


def table_specs(chunks: ChunkTable | None) -> list[pl.BlockSpec]:
    """The table as a kernel's first input, one block shared by every program (any grid); none unpacked."""
    return [] if chunks is None else [pl.BlockSpec(tuple(chunks.bounds.shape), lambda *ids: (0, 0))]


def table_args(chunks: ChunkTable | None) -> tuple:
    """The operands matching :func:`table_specs`."""
    return () if chunks is None else (chunks.bounds,)


def operand_spec(spec: pl.BlockSpec, heads: int | None, x, chunks: ChunkTable | None) -> pl.BlockSpec:
    """The ``BlockSpec`` of a token-major operand ``x`` from one written head-major: ``common.token_spec``, or with
    ``chunks`` :func:`rows_spec` over ``x``'s packed rows."""
    return token_spec(spec, heads) if chunks is None else rows_spec(spec, heads, x.shape[1])


def rows_spec(spec: pl.BlockSpec, heads: int, rows: int) -> pl.BlockSpec:
    """A ``BlockSpec`` written for a head-major ``[B H, N, r, d]`` operand, for the packed ``[1, rows, H, d]`` one:
    its whole token axis (``rows``), the head and column block of the original index map."""
    d = spec.block_shape[-1]
    index = spec.index_map

    def packed_index(*grid):
        bh, _, _, j = index(*grid)
        return bh // heads, 0, bh % heads, j

    return pl.BlockSpec((None, rows, None, d), packed_index)


class ChunkRows:
    """Rows ``[first, first + size)`` of a packed operand's ref (``[rows, d]``, the head squeezed): a view that
    kernels index like a ``[size, d]`` block. Rows at or past ``stop`` read as 0 and are not written. Indices:
    ``...``, or ``(rows, columns)`` with ``rows`` ``slice(None)``, an int32 vector or a scalar and ``columns``
    ``slice(None)`` or a ``pl.ds``."""

    def __init__(self, ref, first, stop, size: int):
        self.ref, self.first, self.stop, self.size = ref, first, stop, size
        self.shape = (size, ref.shape[-1])
        self.dtype = ref.dtype

    def _at(self, index):
        rows, cols = (slice(None), slice(None)) if index is Ellipsis else (index if isinstance(index, tuple)
                                                                           else (index, slice(None)))
        width = self.shape[1] if isinstance(cols, slice) else cols.size
        col0 = jnp.asarray(0 if isinstance(cols, slice) else cols.start, jnp.int32)  # one index dtype (x64 too)
        if isinstance(rows, slice):  # the whole chunk: a block at a run-time row offset
            local = lax.broadcasted_iota(jnp.int32, (self.size, width), 0)
            return (pl.ds(self.first, self.size), pl.ds(col0, width)), self.first + local < self.stop, (self.size, width)
        rows = jnp.asarray(rows, jnp.int32)
        if rows.ndim == 0:  # one row: [width]
            row = self.first + rows
            return (row, pl.ds(col0, width)), jnp.broadcast_to(row < self.stop, (width,)), (width,)
        # chosen rows: a gather (full index arrays: interpret mode has no masked load mixing arrays and slices)
        at = (self.first + rows)[:, None]
        cols_at = col0 + lax.broadcasted_iota(jnp.int32, (1, width), 1)
        return (at, cols_at), jnp.broadcast_to(at < self.stop, (rows.shape[0], width)), (rows.shape[0], width)

    def __getitem__(self, index):
        at, mask, _ = self._at(index)
        return plt.load(self.ref.at[at], mask=mask, other=0)

    def __setitem__(self, index, value):
        at, mask, shape = self._at(index)
        plt.store(self.ref.at[at], jnp.broadcast_to(value, shape).astype(self.dtype), mask=mask)


def chunk_rows(ref, table_ref, chunk, size: int, per_token: int = 1) -> ChunkRows:
    """Chunk ``chunk`` of the layout (``size`` rows, ``per_token`` of them a token) as a :class:`ChunkRows` view."""
    return ChunkRows(ref, table_ref[0, chunk] * per_token, table_ref[1, chunk] * per_token, size)


class Chunks:
    """A packed operand's ref indexed like a ``[M, size, d]`` block of chunks ``base + [0, M)`` (the state passes'
    ``x_ref[c]``, ``x_ref[c, rows]``)."""

    def __init__(self, ref, table_ref, base, size: int, per_token: int = 1):
        self.ref, self.table_ref, self.base, self.size, self.per_token = ref, table_ref, base, size, per_token
        self.dtype = ref.dtype

    def __getitem__(self, index):
        c, *rest = index if isinstance(index, tuple) else (index,)
        view = chunk_rows(self.ref, self.table_ref, self.base + c, self.size, self.per_token)
        return view[tuple(rest) if len(rest) > 1 else rest[0] if rest else ...]

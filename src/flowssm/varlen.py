"""Variable-length packed sequences: ``cu_seqlens``, flash-linear-attention's convention.

``N`` sequences are packed along the time axis of a ``B = 1`` batch; sequence ``i`` holds tokens
``[cu_seqlens[i], cu_seqlens[i + 1])``. Each starts from its own initial state (``[N, H, K, V]``) and
returns its own final state (``[N, H, K, V]``); a state never crosses a boundary.

Chunked backends run a *chunk-aligned layout*: every sequence is gathered so that it starts on a chunk
boundary, its last chunk filled with identity tokens (``k = v = 0``, ``beta = alpha = 0``, ``g = 0``:
exact), in a static length of :func:`num_chunks` chunks (``ceil(T / C) + N - 1``). The layout is data
(index arrays computed from ``cu_seqlens`` in the graph), not shapes, so one compiled function serves
every packing of the same ``T`` and ``N``. The chunk scan then carries :class:`Resets`: at a chunk that
starts sequence ``i`` the carried state is replaced by ``h0[i]``; sequence ``i``'s final state is the
state leaving its last chunk (its initial state when it is empty). The kernels' sequential pass instead
runs each sequence's :class:`Spans` as its own programs, and the Pallas kernels do not gather the token-major
operands: they read each chunk's rows of q, k, v (and write o and the gradients) in the packed row itself
(:mod:`flowssm.kernels.packed`); the xla backend gathers every field into the layout.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from flowssm import chunks
from flowssm import flows as F
from flowssm.paths import Path, check_float, chunk_path, map_path
from flowssm.reference import token_update
from flowssm.scan import SCANS


class Resets(NamedTuple):
    """Sequence boundaries at chunk level, int32 ``[Nc]`` each: ``seq`` the sequence a chunk belongs to
    (trailing identity chunks: the last non-empty sequence), ``start`` 1 where the chunk starts its
    sequence, ``end`` 1 where it is the last chunk of its sequence (always for the last chunk)."""

    seq: Int[Array, " Nc"]
    start: Int[Array, " Nc"]
    end: Int[Array, " Nc"]


class Spans(NamedTuple):
    """Each sequence's chunks ``[first, stop)``, int32 ``[N]`` each: ``stop`` is the next sequence's ``first``,
    ``Nc`` for the last sequence, which also owns the trailing identity chunks; an empty sequence has
    ``first == stop``. Every chunk belongs to exactly one span."""

    first: Int[Array, " N"]
    stop: Int[Array, " N"]


class Layout(NamedTuple):
    """Chunk-aligned layout of a packed row. ``slot_token: [Nc C]`` the token in each slot (``T`` for an
    identity slot); ``token_slot: [T]`` the slot of each token; ``resets``: the chunk-level boundaries;
    ``spans``: the same boundaries per sequence."""

    slot_token: Int[Array, " S"]
    token_slot: Int[Array, " T"]
    resets: Resets
    spans: Spans


def check_cu_seqlens(cu_seqlens, batch: int, length: int) -> Int[Array, " Np1"]:
    """Validate ``cu_seqlens`` for a packed ``[batch, length, ...]`` input; returns it as int32.

    Dtype, rank and ``B == 1`` are always checked; the values (first 0, last ``T``, non-decreasing) only
    when ``cu_seqlens`` is concrete: under a caller's ``jit`` they cannot be read, and invalid boundaries
    then give undefined results.
    """
    if not hasattr(cu_seqlens, "dtype") or not hasattr(cu_seqlens, "shape"):
        raise TypeError(f"cu_seqlens: expected an int array [N + 1], got {type(cu_seqlens).__name__}")
    if not jnp.issubdtype(cu_seqlens.dtype, jnp.integer):
        raise TypeError(f"cu_seqlens: expected an integer dtype (int32 or int64), got {cu_seqlens.dtype}")
    if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens: expected shape [N + 1] with N >= 1, got shape {tuple(cu_seqlens.shape)}")
    if batch != 1:
        raise ValueError(f"cu_seqlens: expected packed inputs with B = 1 (fla's convention), got B = {batch}")
    if not isinstance(cu_seqlens, jax.core.Tracer):
        cu = [int(x) for x in jax.device_get(cu_seqlens)]
        if cu[0] != 0 or cu[-1] != length:
            raise ValueError(f"cu_seqlens: expected first 0 and last T = {length}, got first {cu[0]} and last {cu[-1]}")
        drops = [i for i in range(len(cu) - 1) if cu[i + 1] < cu[i]]
        if drops:
            i = drops[0]
            raise ValueError(f"cu_seqlens: expected non-decreasing values, got {cu[i]} then {cu[i + 1]} at index {i}")
    return jnp.asarray(cu_seqlens, jnp.int32)


def initial_states(state, path: Path, num_seqs: int) -> Float[Array, "N H K V"]:
    """``initial_state`` of a packed call: ``[N, H, K, V]`` (zeros when None), in the path dtype."""
    _, H, _, _, K = path.keys.shape
    V = path.values.shape[-1]
    if state is None:
        return jnp.zeros((num_seqs, H, K, V), path.keys.dtype)
    check_float("initial_state", state)
    if tuple(state.shape) != (num_seqs, H, K, V):
        raise ValueError(f"initial_state: expected shape [N, H, K, V] = {(num_seqs, H, K, V)} (one per sequence of "
                         f"cu_seqlens), got shape {tuple(state.shape)}")
    return state.astype(path.keys.dtype)


def num_chunks(length: int, num_seqs: int, chunk_size: int) -> int:
    """Chunks of the chunk-aligned layout: ``sum_i ceil(L_i / C) <= ceil(T / C) + N - 1``."""
    return -(-length // chunk_size) + num_seqs - 1


def token_sequences(cu: Int[Array, " Np1"], length: int) -> tuple[Int[Array, " T"], Int[Array, " T"]]:
    """(sequence of each token, its position inside the sequence), int32 ``[T]``."""
    t = jnp.arange(length, dtype=jnp.int32)
    seq = jnp.searchsorted(cu, t, side="right").astype(jnp.int32) - 1
    return seq, t - cu[seq]


def layout(cu: Int[Array, " Np1"], length: int, chunk_size: int, chunks: int | None = None) -> Layout:
    """The chunk-aligned layout of ``T = length`` tokens packed as ``cu`` in chunks of ``chunk_size``, in
    ``chunks`` chunks (default and minimum :func:`num_chunks`; the extra ones are identity chunks)."""
    C, N = chunk_size, cu.shape[0] - 1
    Nc = max(chunks or 0, num_chunks(length, N, C))
    lengths = cu[1:] - cu[:-1]
    chunk_end = jnp.cumsum(-(-lengths // C))  # [N]: one past each sequence's last chunk
    chunk_begin = chunk_end - (-(-lengths // C))
    seq, pos = token_sequences(cu, length)
    token_slot = chunk_begin[seq] * C + pos
    slot_token = jnp.full((Nc * C,), length, jnp.int32).at[token_slot].set(jnp.arange(length, dtype=jnp.int32))
    c = jnp.arange(Nc, dtype=jnp.int32)
    used = chunk_end[-1]
    last_nonempty = jnp.max(jnp.where(lengths > 0, jnp.arange(N, dtype=jnp.int32), 0))
    chunk_seq = jnp.where(c < used, jnp.searchsorted(chunk_end, c, side="right"), last_nonempty).astype(jnp.int32)
    start = (c < used) & (chunk_begin[chunk_seq] == c)
    end = (c == Nc - 1) | jnp.append(start[1:], False)
    spans = Spans(chunk_begin.astype(jnp.int32), jnp.append(chunk_begin[1:], Nc).astype(jnp.int32))
    return Layout(slot_token, token_slot, Resets(chunk_seq, start.astype(jnp.int32), end.astype(jnp.int32)), spans)


def span_resets(spans: Spans, chunks: int) -> Resets:
    """The chunk-level boundaries of ``spans`` over ``chunks`` chunks (each chunk's sequence is the one whose
    span holds it; an empty sequence owns no chunk)."""
    c = jnp.arange(chunks, dtype=jnp.int32)
    seq = jnp.searchsorted(spans.stop, c, side="right").astype(jnp.int32)
    return Resets(seq, (c == spans.first[seq]).astype(jnp.int32), (c == spans.stop[seq] - 1).astype(jnp.int32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _move(x: Array, index: Int[Array, " M"], inverse: Int[Array, " L"], axis: int) -> Array:
    """``x`` (with a zero entry appended along ``axis``) taken at ``index``; ``inverse`` maps back. Its vjp is
    the same gather the other way (each entry of ``x`` lands in exactly one place), not a scatter-add."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, 1)
    return jnp.take(jnp.pad(x, pad), index, axis=axis)


def _move_fwd(x, index, inverse, axis):
    return _move(x, index, inverse, axis), (index, inverse)


def _move_bwd(axis, saved, cotangent):
    index, inverse = saved
    return _move(cotangent, inverse, index, axis), None, None


_move.defvjp(_move_fwd, _move_bwd)


def to_slots(x: Array, lay: Layout, axis: int) -> Array:
    """Gather ``x``'s token axis (length ``T``) into the layout's slots; identity slots get zeros."""
    return _move(x, lay.slot_token, lay.token_slot, axis)


def from_slots(x: Array, lay: Layout, axis: int) -> Array:
    """The tokens' entries of a slot-axis array: ``[.., Nc C, ..] -> [.., T, ..]``."""
    return _move(x, lay.token_slot, lay.slot_token, axis)


def nonempty(resets: Resets, num_seqs: int) -> Bool[Array, " N"]:
    """Whether each sequence owns a chunk (has at least one token)."""
    return jnp.zeros((num_seqs,), bool).at[resets.seq].max(resets.start > 0)


def last_chunks(resets: Resets, num_seqs: int) -> Int[Array, " N"]:
    """The last chunk of each non-empty sequence (0 for empty ones)."""
    c = jnp.arange(resets.seq.shape[0], dtype=jnp.int32)
    return jnp.zeros((num_seqs,), jnp.int32).at[jnp.where(resets.end > 0, resets.seq, num_seqs)].set(c, mode="drop")


def after_chunks(flows: F.WYFlow, S_in: Float[Array, "Nc K V"], index: Int[Array, " M"]) -> Float[Array, "M K V"]:
    """The states leaving chunks ``index``: their flows applied to their entry states."""
    return F.apply(jax.tree.map(lambda x: x[index], flows), S_in[index])


def final_states(flows: F.WYFlow, S_in: Float[Array, "Nc K V"], h0: Float[Array, "N K V"], resets: Resets):
    """Each sequence's final state: the state leaving its last chunk (its initial state when it is empty).
    flows: leading axis ``Nc``."""
    N = h0.shape[0]
    after = after_chunks(flows, S_in.astype(h0.dtype), last_chunks(resets, N))
    return jnp.where(nonempty(resets, N)[:, None, None], after.astype(h0.dtype), h0)


def chunk_states(flows: F.WYFlow, h0: Float[Array, "N K V"], resets: Resets, scan: str, S0=None):
    """:func:`flowssm.scan.chunk_states` with sequence resets, one head.

    flows: WY flows with a leading chunk axis ``Nc``; h0: [N, K, V] -> (S_in: [Nc, K, V], finals: [N, K, V]).
    ``sequential``: ``lax.scan`` replacing the carry by ``h0[seq]`` at a start; ``associative``: a starting
    chunk's flow becomes the constant flow ``(0, P h0[seq] + Q)``, then the usual prefix scan. ``S0``
    ([K, V]): the state entering chunk 0 when it starts no sequence (a slice of a longer layout).
    """
    start = resets.start > 0
    carry = h0[0] if S0 is None else S0
    if scan in ("auto", "sequential"):  # "auto" is sequential off the kernels, as in flowssm.scan

        def step(S, x):
            flow, begins, seq = x
            S = jnp.where(begins, h0[seq], S)
            return F.apply(flow, S), S

        _, S_in = jax.lax.scan(step, carry, (flows, start, resets.seq))
    elif scan == "associative":
        dense = F.densify(flows)
        h0c = h0[resets.seq]  # [Nc, K, V]
        at_start = start[:, None, None]
        constant = F.DenseFlow(jnp.where(at_start, 0.0, dense.P), jnp.where(at_start, dense.P @ h0c + dense.Q, dense.Q))
        after = F.apply(jax.lax.associative_scan(lambda a, b: F.compose(b, a), constant), carry)
        S_in = jnp.where(at_start, h0c, jnp.concatenate([carry[None], after[:-1]], axis=0))
    else:
        raise ValueError(f"scan: expected one of {SCANS}, got {scan!r}")
    return S_in, final_states(flows, S_in, h0, resets)


def token_loop(path_h: Path, q: Float[Array, "T K"], h0: Float[Array, "N K V"], cu: Int[Array, " Np1"], scale,
               semantics: str):
    """The token loop of one head over a packed row (the reference backend). path_h: fields ``[T, R, .]``
    -> (o: [T, V], finals: [N, K, V]); the state is replaced by ``h0[i]`` at sequence ``i``'s first token."""
    seq, pos = token_sequences(cu, q.shape[0])

    def step(carry, xs):
        S, finals = carry
        qt, kt, vt, bt, at, gt, i, p, *rt = xs
        S = token_update(jnp.where(p == 0, h0[i], S), kt, vt, bt, at, gt, semantics, rt[0] if rt else None)
        return (S, finals.at[i].set(S)), scale * (qt @ S)

    readers = () if path_h.right_keys is None else (path_h.right_keys,)
    (_, finals), o = jax.lax.scan(step, (h0[0], h0), (q, *path_h[:2], path_h.beta, path_h.alpha, path_h.log_decay,
                                                      seq, pos, *readers))
    return o, finals


def xla_chunks(qh, path: Path, h0, lay: Layout, C: int, *, scale, solver, scan, semantics):
    """Chunked xla computation on the layout. qh: [H, S, K] and path fields ``[1, H, S, .]`` in slots
    (``S = Nc C``), h0: [H, N, K, V] -> (o: [H, S, V], finals: [H, N, K, V])."""
    H, S, K = qh.shape
    Nc = S // C
    systems, sols = chunks.solve_chunks(chunk_path(path, C), solver, semantics)
    S_in, finals = jax.vmap(lambda f, h: chunk_states(f, h, lay.resets, scan))(jax.tree.map(lambda x: x[0], sols.flow), h0)
    o = chunks.read_chunks(systems, qh.reshape(1, H, Nc, C, K), sols, S_in[None], scale)
    return o.reshape(H, S, -1), finals


def slots_path(path: Path, lay: Layout) -> Path:
    """:func:`to_slots` of every field of a head-major path."""
    return map_path(path, lambda x: to_slots(x, lay, 2))


def pallas_chunks(Nc: int) -> int:
    """Chunks of the kernels' layout: from 64 chunks on, a multiple of 16, so that the segmented scan (which
    splits the chunks evenly, ``kernels.launch.segment_count``) can cut them into up to 16 segments (527
    chunks, a product of two primes, would get a single segment; 528 get 8 or 16)."""
    return Nc if Nc < 64 else -(-Nc // 16) * 16

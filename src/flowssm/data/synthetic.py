"""Synthetic tasks as pure numpy functions of a ``np.random.Generator``.

Each returns ``(inputs, targets, mask)``: ``int32 [B, T]``, ``int32 [B, T]``, ``float32 [B, T]``;
the loss and accuracy read only positions where ``mask == 1``.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np


def mqar(rng: np.random.Generator, batch: int, seq_len: int, num_kv_pairs: int, num_keys: int,
         num_values: int, num_queries: int):
    """Multi-query associative recall (Zoology-style).

    Layout: ``k_1 v_1 ... k_N v_N`` (distinct keys), then a query region of 2-token slots; ``Q`` random
    slots hold ``k v`` for ``Q`` distinct earlier keys, the rest hold the filler token 0. The target at a
    queried key is its value (mask 1 there only). Tokens: 0 filler, keys ``1..num_keys``, values
    ``num_keys+1..num_keys+num_values``.
    """
    B, N, Q, T = batch, num_kv_pairs, num_queries, seq_len
    keys = np.argsort(rng.random((B, num_keys)), axis=1)[:, :N] + 1
    values = rng.integers(0, num_values, (B, N)) + 1 + num_keys
    inputs = np.zeros((B, T), np.int32)
    targets = np.zeros((B, T), np.int32)
    mask = np.zeros((B, T), np.float32)
    inputs[:, 0 : 2 * N : 2], inputs[:, 1 : 2 * N : 2] = keys, values
    which = np.argsort(rng.random((B, N)), axis=1)[:, :Q]  # queried pairs
    slots = np.sort(np.argsort(rng.random((B, (T - 2 * N) // 2)), axis=1)[:, :Q], axis=1)
    pos = 2 * N + 2 * slots  # [B, Q] positions of the queried keys
    rows = np.arange(B)[:, None]
    qk, qv = np.take_along_axis(keys, which, 1), np.take_along_axis(values, which, 1)
    inputs[rows, pos], inputs[rows, pos + 1] = qk, qv
    targets[rows, pos], mask[rows, pos] = qv, 1.0
    return inputs, targets, mask


@functools.lru_cache(maxsize=None)
def permutation_table(n: int) -> np.ndarray:
    """``table[a, b]`` = index of the permutation ``a ∘ b`` (apply ``b``, then ``a``) among the ``n!``
    permutations of ``range(n)`` in lexicographic order (index 0 is the identity)."""
    perms = list(itertools.permutations(range(n)))
    index = {p: i for i, p in enumerate(perms)}
    return np.array([[index[tuple(a[j] for j in b)] for b in perms] for a in perms], np.int32)


def word_problem(rng: np.random.Generator, batch: int, seq_len: int, n: int):
    """State tracking on the symmetric group ``S_n``: token ``x_t`` is a random permutation; the
    target at every position is the prefix product ``x_t ∘ ... ∘ x_1`` (mask 1 everywhere).
    ``n = 2`` is parity (tokens and targets in {0, 1})."""
    table = permutation_table(n)
    inputs = rng.integers(0, len(table), (batch, seq_len)).astype(np.int32)
    targets = np.empty_like(inputs)
    state = np.zeros(batch, np.int32)
    for t in range(seq_len):
        state = table[inputs[:, t], state]
        targets[:, t] = state
    return inputs, targets, np.ones((batch, seq_len), np.float32)

"""Tasks: shapes, dtypes, labels and (seed, step) determinism."""

import itertools

import numpy as np
import pytest

from flowssm.data import Task, corpus, synthetic
from flowssm.train.config import DataConfig

MQAR = DataConfig(task="mqar", seq_len=64, num_kv_pairs=8, num_keys=16, num_values=16, num_queries=5)


def test_mqar_targets_are_the_values_bound_to_the_queried_keys():
    b = Task(MQAR).batch(3, "train", 7, 32)
    assert b.inputs.shape == b.targets.shape == b.mask.shape == (32, 64)
    assert b.inputs.dtype == b.targets.dtype == np.int32 and b.mask.dtype == np.float32
    N = MQAR.num_kv_pairs
    for x, y, m in zip(b.inputs, b.targets, b.mask):
        keys, values = x[0 : 2 * N : 2], x[1 : 2 * N : 2]
        assert len(set(keys)) == N and keys.min() >= 1 and keys.max() <= 16 and values.min() >= 17
        bound = dict(zip(keys, values))
        (pos,) = np.nonzero(m)
        assert len(pos) == MQAR.num_queries and pos.min() >= 2 * N
        assert all(y[p] == bound[x[p]] for p in pos)
        assert len(set(x[pos])) == MQAR.num_queries  # distinct queried keys


def _compose(a, b):  # a ∘ b: apply b, then a
    return tuple(a[j] for j in b)


@pytest.mark.parametrize("task,n", [("parity", 2), ("s3", 3), ("s5", 5)])
def test_word_problem_targets_are_prefix_products(task, n):
    perms = list(itertools.permutations(range(n)))
    b = Task(DataConfig(task=task, seq_len=20)).batch(0, "train", 0, 6)
    assert b.inputs.max() < len(perms) and np.all(b.mask == 1)
    for x, y in zip(b.inputs, b.targets):
        state = perms[0]
        for t in range(len(x)):
            state = _compose(perms[x[t]], state)
            assert perms[y[t]] == state


def test_parity_is_running_xor():
    b = Task(DataConfig(task="parity", seq_len=64)).batch(1, "train", 2, 8)
    np.testing.assert_array_equal(b.targets, np.cumsum(b.inputs, axis=1) % 2)


def test_s5_table_is_a_group_table():
    table = synthetic.permutation_table(5)
    assert table.shape == (120, 120)
    assert all(sorted(row) == list(range(120)) for row in table)  # Latin square
    assert np.array_equal(table[0], np.arange(120))  # index 0 is the identity


def test_lm_batches_are_next_byte_windows_from_the_right_split():
    cfg = DataConfig(task="lm", seq_len=32)
    task = Task(cfg)
    b = task.batch(0, "train", 5, 4)
    np.testing.assert_array_equal(b.inputs[:, 1:], b.targets[:, :-1])
    text = corpus.split("shakespeare", cfg.val_fraction)
    train, val = text["train"].tobytes(), text["val"].tobytes()
    assert all(bytes(row.astype(np.uint8)) in train for row in b.inputs)
    v = task.batch(0, "val", 0, 4)
    assert all(bytes(row.astype(np.uint8)) in val for row in v.inputs)


def test_embedded_corpora_and_unigram_baseline():
    data = corpus.load_bytes("shakespeare")
    assert len(data) > 4_000_000 and b"To be, or not to be" in data.tobytes() and b"**" not in data.tobytes()
    assert len(corpus.load_bytes("pydoc")) > 400_000
    bpb = Task(DataConfig(task="lm")).baselines()["unigram_bpb"]
    assert 4.0 < bpb < 5.5  # English bytes: about 4.5-4.8 bits under a unigram model


def test_batches_are_pure_functions_of_seed_split_and_index():
    task = Task(MQAR)
    a, b = task.batch(0, "train", 11, 4), task.batch(0, "train", 11, 4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a.inputs, task.batch(0, "train", 12, 4).inputs)
    assert not np.array_equal(a.inputs, task.batch(1, "train", 11, 4).inputs)
    assert not np.array_equal(a.inputs, task.batch(0, "val", 11, 4).inputs)

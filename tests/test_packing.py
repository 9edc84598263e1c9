"""Packed documents in the layers, the LM and the runner: no document sees another."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flowssm.train import config as C  # first: flowssm.data and flowssm.train import each other
from flowssm.train.config import DataConfig
from flowssm import varlen  # noqa: I001
from flowssm.data import Task, corpus
from flowssm.models.config import MixerConfig, ModelConfig
from flowssm.models.lm import LanguageModel, make_mixer

D, T = 32, 19
CU = jnp.array([0, 3, 11, 19], jnp.int32)  # a document shorter than the conv width (4) and ragged chunks (8)


def mixer(family="gated_deltanet"):
    return make_mixer(D, MixerConfig(family=family, num_heads=2, chunk_size=8), max_len=32, rngs=nnx.Rngs(0))


def positions(cu=CU):
    return varlen.token_sequences(cu, int(cu[-1]))[1][None]


@pytest.mark.parametrize("family", ["deltanet", "gated_deltanet"])
def test_mixer_sees_each_document_alone_and_caches_the_last(family):
    m = mixer(family)
    x = jax.random.normal(jax.random.key(1), (1, T, D), jnp.float32)
    y, cache = m.prefill(x, positions())
    docs = [m.prefill(x[:, a:b]) for a, b in zip(CU[:-1].tolist(), CU[1:].tolist())]
    np.testing.assert_allclose(y, jnp.concatenate([d[0] for d in docs], axis=1), rtol=2e-5, atol=2e-5)
    for a, b in zip(cache, docs[-1][1]):  # the state and the conv tail of the last document alone
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    y_next, _ = m.step(x[:, 0], cache)
    np.testing.assert_allclose(y_next, m.step(x[:, 0], docs[-1][1])[0], rtol=2e-5, atol=2e-5)


def test_conv_tail_of_a_document_shorter_than_the_window_holds_no_earlier_input():
    m = mixer()
    x = jax.random.normal(jax.random.key(2), (1, 12, m.conv.kernel.shape[1]), jnp.float32)
    tail = m.conv.tail(x, positions(jnp.array([0, 10, 12], jnp.int32)))  # last document: 2 tokens, W - 1 = 3 slots
    np.testing.assert_array_equal(tail[0, 0], 0.0)
    np.testing.assert_array_equal(tail[0, 1:], x[0, 10:])


def test_mixer_refuses_bad_positions():
    m = mixer()
    x = jnp.zeros((1, T, D), jnp.float32)
    with pytest.raises(ValueError, match=r"positions: expected shape \[B, T\] = \(1, 19\), got shape \(1, 18\)"):
        m.prefill(x, positions()[:, :18])
    with pytest.raises(TypeError, match="positions: expected an int array"):
        m.prefill(x, positions().astype(jnp.float32))


def test_lm_losses_with_positions_equal_documents_scored_alone():
    model = LanguageModel(ModelConfig(vocab_size=16, d_model=D, n_layers=1, mlp_hidden=32,
                                      mixer=MixerConfig(num_heads=2, chunk_size=8)), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(3), (1, T), 0, 16)
    nll, _ = model.losses(tokens, tokens, positions=positions())
    alone = [model.losses(tokens[:, a:b], tokens[:, a:b])[0] for a, b in zip(CU[:-1].tolist(), CU[1:].tolist())]
    np.testing.assert_allclose(nll, jnp.concatenate(alone, axis=1), rtol=2e-5, atol=2e-5)


def test_packed_lm_batches_carry_document_positions():
    task = Task(DataConfig(task="lm", corpus="pydoc", seq_len=256, packing=True))
    starts = corpus.document_starts("pydoc")
    data = corpus.load_bytes("pydoc")
    for split in ("train", "val"):
        b = task.batch(0, split, 3, 8)
        assert b.positions.shape == (8, 256) and b.positions.dtype == np.int32
        for row, pos in zip(b.inputs, b.positions):
            resets = np.flatnonzero(pos == 0)
            assert resets[0] == 0 and np.all(np.diff(pos)[np.diff(pos) != 1] == -pos[:-1][np.diff(pos) != 1])
            for r in resets[1:]:  # every reset inside the window is a document start of the corpus
                assert np.any([bytes(data[s : s + 32]) == bytes(row[r : r + 32].astype(np.uint8)) for s in starts])
    assert Task(DataConfig(task="lm", corpus="pydoc", seq_len=256)).batch(0, "train", 3, 8).positions is None


@pytest.mark.parametrize("overrides, message", [
    (["data.packing=maybe"], "data.packing: expected bool"),
    (["data.packing=true", "data.task=parity"], "data.packing: expected false for task 'parity'"),
    (["data.packing=true", "model.mixer.family=attention"], "data.packing: expected false with model.mixer.family"),
    (["data.packing=true", "model.mixer.semantics=continuous"], "data.packing: expected false with model.mixer.semantics"),
])
def test_bad_packing_config_is_refused_naming_the_key(overrides, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load(None, overrides)

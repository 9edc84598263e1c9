"""Token mixers: shapes, chunked forward vs recurrent step, gradients, transforms, config knobs, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flowssm.layers import DeltaMixer
from flowssm.models.config import FAMILIES, MixerConfig
from flowssm.models.lm import make_mixer

D, B, T = 32, 2, 19  # T is not a multiple of the chunk size 8: the ragged last chunk is exercised


def mixer_config(family: str, **kw) -> MixerConfig:
    rank = 2 if "product" in family else 1
    return MixerConfig(family=family, num_heads=2, rank=rank, chunk_size=8, **kw)


def build(config: MixerConfig, seed: int = 0):
    return make_mixer(D, config, max_len=32, rngs=nnx.Rngs(seed))


def inputs(seed: int = 1):
    return jax.random.normal(jax.random.key(seed), (B, T, D), jnp.float32)


@nnx.jit
def decode(mixer, x):
    """Run ``mixer.step`` over the time axis of x: [B, T, D] -> [B, T, D]."""
    step = lambda cache, x_t: mixer.step(x_t, cache)[::-1]
    _, ys = jax.lax.scan(step, mixer.init_cache(x.shape[0]), jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(ys, 0, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_chunked_forward_matches_step_by_step_decode(family):
    mixer, x = build(mixer_config(family)), inputs()
    y = nnx.jit(lambda m, x: m(x))(mixer, x)
    assert y.shape == (B, T, D) and y.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y)))
    np.testing.assert_allclose(decode(mixer, x), y, atol=1e-5, rtol=1e-5)


def test_continuous_semantics_decode_matches_forward_and_differs_from_discrete():
    config = mixer_config("gated_deltaproduct", semantics="continuous", allow_neg_eigval=True)
    mixer, x = build(config), inputs()
    y = mixer(x)
    np.testing.assert_allclose(decode(mixer, x), y, atol=1e-5, rtol=1e-5)
    discrete = build(dataclasses.replace(config, semantics="discrete"))(x)
    assert float(jnp.max(jnp.abs(discrete - y))) > 1e-3


@pytest.mark.parametrize("family", ["gated_deltaproduct", "gated_linear_attention"])
def test_gradients_reach_every_parameter_and_are_finite(family):
    mixer, x = build(mixer_config(family, allow_neg_eigval="delta" in family)), inputs()
    grads = nnx.jit(nnx.grad(lambda m: jnp.mean(m(x) ** 2)))(mixer)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert bool(jnp.all(jnp.isfinite(g))), path
        assert float(jnp.max(jnp.abs(g))) > 0, path


def test_jit_and_vmap_over_batch_match_eager():
    mixer, x = build(mixer_config("gated_deltanet")), inputs()
    y = mixer(x)  # |y| ~ 3: jit's fusions and vmap's batched matmuls round differently, ~1e-6 in float32
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(mixer, x), y, atol=1e-5)
    per_example = jax.vmap(lambda xi: mixer(xi[None])[0])(x)
    np.testing.assert_allclose(per_example, y, atol=1e-5)


@pytest.mark.parametrize(
    "change, atol",
    [
        (dict(backend="reference"), 1e-5),
        (dict(scan="associative"), 1e-5),
        (dict(solver={"name": "signature", "depth": 15}), 1e-5),  # n = C R = 16 micro-steps: exact
        (dict(chunk_size=16), 1e-5),
    ],
)
def test_solver_scan_backend_chunk_knobs_change_only_numerics(change, atol):
    base = mixer_config("gated_deltaproduct", allow_neg_eigval=True)
    x = inputs()
    np.testing.assert_allclose(build(dataclasses.replace(base, **change))(x), build(base)(x), atol=atol, rtol=atol)


def test_euler_solver_is_wired_through_and_differs_from_exact():
    base, x = mixer_config("deltaproduct"), inputs()
    euler = build(dataclasses.replace(base, solver="euler"))(x)
    assert float(jnp.max(jnp.abs(euler - build(base)(x)))) > 1e-4


def test_allow_neg_eigval_maps_beta_to_zero_two():
    for neg, high in ((False, 1.0), (True, 2.0)):
        mixer = build(mixer_config("deltanet", allow_neg_eigval=neg))
        x = 100.0 * inputs()
        _, _, _, beta, _ = mixer._features(x, mixer.qkv_proj(x))
        assert float(beta.min()) >= 0 and float(beta.max()) <= high
        assert float(beta.max()) > 0.9 * high


@pytest.mark.parametrize(
    "field, kw",
    [
        ("mixer.num_heads", dict(num_heads=3)),
        ("mixer.family", dict(family="mamba")),
        ("mixer.chunk_size", dict(chunk_size=0)),
        ("mixer.rank", dict(rank=0)),
        ("mixer.rank", dict(family="deltanet", rank=2)),
        ("mixer.solver", dict(solver="rk4")),
        ("mixer.solver", dict(solver={"name": "signature", "depth": -1})),
        ("mixer.scan", dict(scan="parallel")),
        ("mixer.backend", dict(backend="triton")),
        ("mixer.semantics", dict(semantics="stochastic")),
        ("mixer.conv_size", dict(conv_size=-1)),
        ("mixer.allow_neg_eigval", dict(family="linear_attention", allow_neg_eigval=True)),
    ],
)
def test_bad_mixer_config_is_a_value_error_naming_the_field(field, kw):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make_mixer(D, MixerConfig(**kw), max_len=32, rngs=nnx.Rngs(0))


def test_delta_mixer_rejects_the_attention_family():
    with pytest.raises(ValueError, match="mixer.family"):
        DeltaMixer(D, MixerConfig(family="attention"), rngs=nnx.Rngs(0))

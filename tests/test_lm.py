"""Language model: logits, parameter count, recurrent decoding and generation, training gradients, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flowssm.models import LanguageModel, MixerConfig, ModelConfig

VOCAB, D = 40, 32


def config(family: str = "gated_deltanet", **kw) -> ModelConfig:
    mixer = MixerConfig(family=family, num_heads=2, rank=2 if "product" in family else 1, chunk_size=8)
    return ModelConfig(**(dict(vocab_size=VOCAB, d_model=D, n_layers=2, max_len=32, mixer=mixer) | kw))


def tokens(shape=(2, 19), seed: int = 0):
    return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB, jnp.int32)


@nnx.jit
def decode_all(model, toks):
    """Feed toks [B, T] through decode_step: logits [B, T, vocab]."""
    step = lambda cache, tok: model.decode_step(tok, cache)[::-1]
    _, logits = jax.lax.scan(step, model.init_cache(toks.shape[0]), toks.T)
    return jnp.swapaxes(logits, 0, 1)


@pytest.mark.parametrize("family", ["gated_deltaproduct", "attention"])  # every mixer: tests/test_layers.py
def test_forward_logits_match_recurrent_decode(family):
    model, toks = LanguageModel(config(family), rngs=nnx.Rngs(0)), tokens()
    logits = nnx.jit(lambda m, t: m(t))(model, toks)
    assert logits.shape == (2, 19, VOCAB) and logits.dtype == jnp.float32
    np.testing.assert_allclose(decode_all(model, toks), logits, atol=1e-4, rtol=1e-4)


def test_num_params_counts_head_only_when_untied():
    tied = LanguageModel(config(), rngs=nnx.Rngs(0)).num_params()
    untied = LanguageModel(config(tie_embeddings=False), rngs=nnx.Rngs(0)).num_params()
    assert untied - tied == VOCAB * D
    # embedding + final norm + per layer: 2 norms, mixer, SwiGLU (hidden 64 * ceil(8 * 32 / 3 / 64) = 128)
    model = LanguageModel(config(), rngs=nnx.Rngs(0))
    mixers = sum(x.size for x in jax.tree.leaves(nnx.state(model.blocks.mixer, nnx.Param)))  # both layers
    assert tied == VOCAB * D + D + mixers + 2 * (2 * D + 3 * D * 128)


def test_bf16_model_feeds_bf16_to_the_ops_keeps_float32_weights_and_logits(monkeypatch):
    import flowssm

    seen = []
    delta_rule = flowssm.delta_rule
    monkeypatch.setattr(flowssm, "delta_rule", lambda *a, **kw: seen.append([x.dtype for x in a]) or delta_rule(*a, **kw))
    model = LanguageModel(config("gated_deltanet", dtype="bfloat16"), rngs=nnx.Rngs(0))
    logits = model(tokens())
    q, k, v, beta, g = seen[0]
    assert (q, k, v) == (jnp.bfloat16,) * 3 and (beta, g) == (jnp.float32,) * 2
    assert logits.dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
    exact = LanguageModel(config("gated_deltanet"), rngs=nnx.Rngs(0))(tokens())
    assert float(jnp.max(jnp.abs(logits - exact))) < 0.05 * float(jnp.max(jnp.abs(exact)))


def test_head_logits_backward_runs_in_the_operands_dtype():
    """float32 operands: the plain gradient; bf16: both gradient products take bf16 operands (the plain
    rule would promote them to float32 by the float32 cotangent) and stay close to the float32 gradient."""
    from flowssm.models.lm import head_logits

    h, table = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 16)), jax.random.normal(jax.random.PRNGKey(1), (40, 16))
    loss = lambda f: lambda h, t: jnp.sum(jnp.sin(f(h, t)))
    plain = jax.grad(loss(lambda h, t: jnp.einsum("...d,vd->...v", h, t)), (0, 1))(h, table)
    for a, b in zip(jax.grad(loss(head_logits), (0, 1))(h, table), plain):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    low = (h.astype(jnp.bfloat16), table.astype(jnp.bfloat16))
    grads = jax.grad(loss(head_logits), (0, 1))(*low)
    assert head_logits(*low).dtype == jnp.float32 and all(g.dtype == jnp.bfloat16 for g in grads)
    for a, b in zip(grads, plain):
        assert float(jnp.max(jnp.abs(a.astype(jnp.float32) - b))) < 0.05 * float(jnp.max(jnp.abs(b)))
    def dots(jaxpr):  # every dot_general, also inside the custom_vjp's own jaxprs
        for e in jaxpr.eqns:
            yield from [e] if e.primitive.name == "dot_general" else []
            for p in e.params.values():
                yield from dots(p.jaxpr if hasattr(p, "jaxpr") else p) if hasattr(p, "eqns") or hasattr(p, "jaxpr") else []

    dots = list(dots(jax.make_jaxpr(jax.grad(loss(head_logits), (0, 1)))(*low).jaxpr))
    assert len(dots) == 3 and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)


def test_losses_match_the_cross_entropy_of_the_logits_and_remat_keeps_gradients():
    model, toks = LanguageModel(config(), rngs=nnx.Rngs(0)), tokens()
    nll, correct = model.losses(toks[:, :-1], toks[:, 1:], chunk=7)  # 36 positions: a ragged last chunk
    logits = model(toks[:, :-1])
    np.testing.assert_allclose(nll, optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]), atol=1e-5)
    np.testing.assert_array_equal(correct, jnp.argmax(logits, -1) == toks[:, 1:])
    remat = LanguageModel(config(remat=True), rngs=nnx.Rngs(0))
    grad = lambda m: nnx.grad(lambda m: m.losses(toks[:, :-1], toks[:, 1:])[0].mean())(m)
    for a, b in zip(jax.tree.leaves(grad(model)), jax.tree.leaves(grad(remat))):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_layers_are_traced_once_whatever_the_depth():
    size = lambda n: len(jax.make_jaxpr(lambda t: LanguageModel(config(n_layers=n), rngs=nnx.Rngs(0))(t))(tokens()).eqns)
    assert size(2) == size(6)


def test_prefill_then_decode_matches_the_forward():
    model, toks = LanguageModel(config("gated_deltaproduct"), rngs=nnx.Rngs(0)), tokens()
    last, cache = model.prefill(toks[:, :11])
    logits = model(toks)
    np.testing.assert_allclose(last, logits[:, 10], atol=1e-4)
    for t in range(11, 14):
        last, cache = model.decode_step(toks[:, t], cache)
        np.testing.assert_allclose(last, logits[:, t], atol=1e-4)


def test_greedy_generation_continues_with_the_forward_argmax():
    model, prompt = LanguageModel(config(), rngs=nnx.Rngs(0)), tokens((2, 5))
    out = model.generate(prompt, 6, temperature=0.0)
    assert out.shape == (2, 11)
    np.testing.assert_array_equal(out[:, :5], prompt)
    np.testing.assert_array_equal(jnp.argmax(model(out)[:, 4:-1], axis=-1), out[:, 5:])
    np.testing.assert_array_equal(model.generate(prompt, 6, temperature=1.0, top_k=1, seed=3), out)


def test_sampling_is_seeded_and_stays_in_top_k():
    model, prompt = LanguageModel(config("attention"), rngs=nnx.Rngs(0)), tokens((2, 3))
    a = model.generate(prompt, 8, temperature=1.5, top_k=3, seed=1)
    np.testing.assert_array_equal(a, model.generate(prompt, 8, temperature=1.5, top_k=3, seed=1))
    top3 = jax.lax.top_k(model(a)[:, 2:-1], 3)[1]
    assert bool(jnp.all(jnp.any(top3 == a[:, 3:, None], axis=-1)))


def test_training_step_lowers_the_loss_with_finite_gradients():
    model, toks = LanguageModel(config("gated_deltaproduct", n_layers=1), rngs=nnx.Rngs(0)), tokens((4, 17))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, opt, toks):
        def loss_fn(model):
            logits = model(toks[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss, grads

    first, grads = train_step(model, opt, toks)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    for _ in range(10):
        last, _ = train_step(model, opt, toks)
    assert float(last) < float(first) - 0.5


@pytest.mark.parametrize(
    "field, kw",
    [
        ("model.vocab_size", dict(vocab_size=0)),
        ("model.n_layers", dict(n_layers=0)),
        ("model.mlp_hidden", dict(mlp_hidden=-4)),
        ("mixer.num_heads", dict(d_model=30)),
    ],
)
def test_bad_model_config_is_a_value_error_naming_the_field(field, kw):
    base = dict(vocab_size=VOCAB, d_model=D, mixer=MixerConfig(num_heads=4)) | kw
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        LanguageModel(ModelConfig(**base), rngs=nnx.Rngs(0))


def test_bad_tokens_and_generation_arguments_are_value_errors():
    model = LanguageModel(config("attention"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="tokens"):
        model(jnp.zeros((2, 5), jnp.float32))
    with pytest.raises(ValueError, match="max_len"):
        model.generate(tokens((1, 30)), 5)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(tokens((1, 3)), 2, top_k=VOCAB + 1)

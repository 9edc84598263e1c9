"""Decoder-only language model with DeltaNet-family (or softmax-attention) token mixers.

    h_0 = E[tokens];  h <- h + mixer(RMSNorm(h));  h <- h + SwiGLU(RMSNorm(h))   (n_layers times)
    logits = RMSNorm(h) E^T   (tied) or  RMSNorm(h) W_head   (float32)

Recurrent decoding carries one cache per layer (constant memory for the SSM mixers).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

# Module import (not ``from flowssm.layers import ...``): flowssm.layers imports flowssm.models.config,
# which runs this package's __init__, so the names are looked up at call time.
from flowssm import layers
from flowssm.models.attention import Attention
from flowssm.models.config import MixerConfig, ModelConfig, validate


def make_mixer(d_model: int, config: MixerConfig, *, max_len: int, rngs: nnx.Rngs) -> nnx.Module:
    """The token mixer a config names: :class:`Attention` for "attention", else :class:`DeltaMixer`."""
    if config.family == "attention":
        return Attention(d_model, config, max_len=max_len, rngs=rngs)
    return layers.DeltaMixer(d_model, config, rngs=rngs)


class SwiGLU(nnx.Module):
    """``W_2 (SiLU(x W_1) * x W_3)``. x: [.., D] -> [.., D]."""

    def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs):
        self.w13 = nnx.Linear(d_model, 2 * hidden, use_bias=False, rngs=rngs)
        self.w2 = nnx.Linear(hidden, d_model, use_bias=False, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        a, b = jnp.split(self.w13(x), 2, axis=-1)
        return self.w2(jax.nn.silu(a) * b)


class Block(nnx.Module):
    """Pre-norm residual block: ``h + mixer(norm(h))``, then ``h + mlp(norm(h))``."""

    def __init__(self, config: ModelConfig, hidden: int, *, rngs: nnx.Rngs):
        d = config.d_model
        self.norm1, self.norm2 = nnx.RMSNorm(d, rngs=rngs), nnx.RMSNorm(d, rngs=rngs)
        self.mixer = make_mixer(d, config.mixer, max_len=config.max_len, rngs=rngs)
        self.mlp = SwiGLU(d, hidden, rngs=rngs)

    def __call__(self, h: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        h = h + self.mixer(self.norm1(h))
        return h + self.mlp(self.norm2(h))

    def step(self, h: Float[Array, "B D"], cache):
        y, cache = self.mixer.step(self.norm1(h), cache)
        h = h + y
        return h + self.mlp(self.norm2(h)), cache


class LanguageModel(nnx.Module):
    """Token LM. ``__call__(tokens [B, T]) -> logits [B, T, vocab]``; ``decode_step`` / ``generate`` recur."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        validate(config)
        self.vocab_size, self.max_len = config.vocab_size, config.max_len
        d = config.d_model
        hidden = config.mlp_hidden or 64 * math.ceil(8 * d / 3 / 64)
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Embed(config.vocab_size, d, embedding_init=init, rngs=rngs)
        self.blocks = nnx.List([Block(config, hidden, rngs=rngs) for _ in range(config.n_layers)])
        self.norm = nnx.RMSNorm(d, rngs=rngs)
        self.head = None if config.tie_embeddings else nnx.Linear(d, config.vocab_size, use_bias=False, rngs=rngs)

    def _logits(self, h: Array) -> Array:
        h = self.norm(h)
        logits = self.embed.attend(h) if self.head is None else self.head(h)
        return logits.astype(jnp.float32)

    def _check_tokens(self, tokens, ndim: int, names: str) -> None:
        """Shape and dtype always; ids in ``[0, vocab_size)`` when ``tokens`` is concrete (eager calls).

        Under ``jit`` the ids cannot be checked: an id >= vocab_size embeds as NaN (so do the logits) and a
        negative id wraps around; the runner checks every batch on the host instead.
        """
        if tokens.ndim != ndim or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"tokens: expected an int array {names}, got shape {tuple(tokens.shape)} dtype {tokens.dtype}"
            )
        if tokens.size and not isinstance(tokens, jax.core.Tracer):
            low, high = int(jnp.min(tokens)), int(jnp.max(tokens))
            if low < 0 or high >= self.vocab_size:
                raise ValueError(
                    f"tokens: expected ids in [0, vocab_size={self.vocab_size}), got ids in [{low}, {high}]"
                )

    def _check_cache(self, cache, batch: int) -> None:
        """``cache`` must have the structure, shapes and dtypes of ``init_cache(batch)``."""
        expected = jax.eval_shape(functools.partial(self.init_cache, batch))
        spec = lambda tree: [(tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", type(x).__name__)))
                             for x in jax.tree.leaves(tree)]
        same_tree = jax.tree.structure(expected) == jax.tree.structure(cache)
        if not same_tree or spec(expected) != spec(cache):
            got = f"{len(cache)} layer caches" if isinstance(cache, tuple) else type(cache).__name__
            shapes = lambda tree: [s for s, _ in spec(tree)]
            raise ValueError(
                f"cache: expected this model's init_cache(batch={batch}) ({len(self.blocks)} layer caches, "
                f"leaf shapes {shapes(expected)}), got {got} with leaf shapes {shapes(cache)}"
            )

    def __call__(self, tokens: Int[Array, "B T"]) -> Float[Array, "B T vocab"]:
        self._check_tokens(tokens, 2, "[B, T]")
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self._logits(h)

    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))

    def init_cache(self, batch: int) -> tuple:
        """One cache per layer (:class:`flowssm.layers.MixerCache` or :class:`KVCache`)."""
        return tuple(block.mixer.init_cache(batch) for block in self.blocks)

    def decode_step(self, token: Int[Array, " B"], cache: tuple) -> tuple[Float[Array, "B vocab"], tuple]:
        """Feed one token per sequence; returns the next-token logits (float32) and the new cache."""
        self._check_tokens(token, 1, "[B]")
        self._check_cache(cache, token.shape[0])
        h, new = self.embed(token), []
        for block, c in zip(self.blocks, cache, strict=True):
            h, c = block.step(h, c)
            new.append(c)
        return self._logits(h), tuple(new)

    def generate(
        self, prompt: Int[Array, "B T0"], n: int, temperature: float = 1.0, top_k: int | None = None, seed: int = 0
    ) -> Int[Array, "B T0+n"]:
        """Feed ``prompt`` token by token, then sample ``n`` tokens (``temperature = 0``: greedy;
        ``top_k``: sample among the k most likely). Returns ``[B, T0 + n]`` (prompt included)."""
        self._check_tokens(prompt, 2, "[B, T0]")
        if prompt.shape[1] < 1:
            raise ValueError(f"prompt: expected at least one token per sequence, got shape {tuple(prompt.shape)}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n: expected an int >= 0, got {n!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature: expected >= 0, got {temperature!r}")
        if top_k is not None and not 1 <= top_k <= self.vocab_size:
            raise ValueError(f"top_k: expected None or 1..{self.vocab_size}, got {top_k!r}")
        total = prompt.shape[1] + n
        if any(isinstance(b.mixer, Attention) for b in self.blocks) and total > self.max_len:
            raise ValueError(f"n: expected T0 + n <= max_len = {self.max_len} (attention KV cache), got {total}")
        graphdef, state = nnx.split(self)
        temperature, greedy = jnp.float32(temperature), temperature == 0
        return _generate(graphdef, state, prompt, jax.random.key(seed), temperature, n=n, top_k=top_k, greedy=greedy)


def _sample(logits: Array, key, temperature, top_k: int | None, greedy: bool) -> Array:
    if greedy:
        return jnp.argmax(logits, axis=-1)
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits / temperature, axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "n", "top_k", "greedy"))
def _generate(graphdef, state, prompt, key, temperature, *, n: int, top_k: int | None, greedy: bool):
    model = nnx.merge(graphdef, state)
    step = lambda c, tok: model.decode_step(tok, c)[::-1]
    cache, logits = jax.lax.scan(step, model.init_cache(prompt.shape[0]), prompt.T)

    def sample(carry, key):
        cache, last = carry
        tok = _sample(last, key, temperature, top_k, greedy).astype(prompt.dtype)
        logits, cache = model.decode_step(tok, cache)
        return (cache, logits), tok

    _, new = jax.lax.scan(sample, (cache, logits[-1]), jax.random.split(key, n))
    return jnp.concatenate([prompt, new.T.reshape(prompt.shape[0], n)], axis=1)

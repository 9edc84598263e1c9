"""Decoder-only language model with DeltaNet-family (or softmax-attention) token mixers.

    h_0 = E[tokens];  h <- h + mixer(RMSNorm(h));  h <- h + SwiGLU(RMSNorm(h))   (n_layers times)
    logits = RMSNorm(h) E^T   (tied) or  RMSNorm(h) W_head   (float32)

The ``n_layers`` identical blocks are stored stacked (a leading layer axis on every parameter) and run
by one ``nnx.scan``, so compile time does not grow with depth; ``remat`` recomputes each block in the
backward pass. Dtypes follow Flax: ``dtype`` for activations and matmuls, ``param_dtype`` for the master
weights and the residual stream; norm statistics, logits and the loss in float32 (the head's gradient
products in ``dtype``: :func:`head_logits`).
Recurrent decoding carries one cache per layer (stacked; constant memory for the SSM mixers).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

# Module import (not ``from flowssm.layers import ...``): flowssm.layers imports flowssm.models.config,
# which runs this package's __init__, so the names are looked up at call time.
from flowssm import layers
from flowssm.models.attention import Attention
from flowssm.models.config import MixerConfig, ModelConfig, validate

WHOLE_LOGITS = 2**25  # logits elements above which LanguageModel.losses scores in chunks by default


@jax.custom_vjp
def head_logits(h: Float[Array, "... D"], table: Float[Array, "vocab D"]) -> Float[Array, "... vocab"]:
    """``logits = h table^T`` in float32 from ``h`` and ``table`` as they are (e.g. bf16), float32 accumulation.

    The backward multiplies by the cotangent rounded to ``h``'s dtype: with bf16 operands both gradient
    products (``dh = g table``, ``dtable = g^T h``) run on bf16 tensor cores, where the plain rule would
    promote them to float32 products (TF32 on a GPU; run 24: 6.6 ms of a 48.8 ms LM step on an H100)."""
    return jnp.einsum("...d,vd->...v", h, table, preferred_element_type=jnp.float32)


def _head_fwd(h, table):
    return head_logits(h, table), (h, table)


def _head_bwd(saved, g):
    h, table = saved
    g = g.astype(h.dtype)
    dh = jnp.einsum("...v,vd->...d", g, table, preferred_element_type=jnp.float32)
    dtable = jnp.einsum("...v,...d->vd", g, h, preferred_element_type=jnp.float32)
    return dh.astype(h.dtype), dtable.astype(table.dtype)


head_logits.defvjp(_head_fwd, _head_bwd)


def make_mixer(d_model: int, config: MixerConfig, *, max_len: int, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs) -> nnx.Module:
    """The token mixer a config names: :class:`Attention` for "attention", else :class:`DeltaMixer`."""
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if config.family == "attention":
        return Attention(d_model, config, max_len=max_len, **kw)
    return layers.DeltaMixer(d_model, config, **kw)


class SwiGLU(nnx.Module):
    """``W_2 (SiLU(x W_1) * x W_3)``. x: [.., D] -> [.., D]."""

    def __init__(self, d_model: int, hidden: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        lin = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.w13, self.w2 = lin(d_model, 2 * hidden), lin(hidden, d_model)

    def __call__(self, x: Array) -> Array:
        a, b = jnp.split(self.w13(x), 2, axis=-1)
        return self.w2(jax.nn.silu(a) * b)


class Block(nnx.Module):
    """Pre-norm residual block: ``h + mixer(norm(h))``, then ``h + mlp(norm(h))``."""

    def __init__(self, config: ModelConfig, hidden: int, *, rngs: nnx.Rngs):
        d = config.d_model
        kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
        self.norm1, self.norm2 = nnx.RMSNorm(d, **kw), nnx.RMSNorm(d, **kw)
        self.mixer = make_mixer(d, config.mixer, max_len=config.max_len, **kw)
        self.mlp = SwiGLU(d, hidden, **kw)

    def prefill(self, h: Float[Array, "B T D"], positions: Int[Array, "B T"] | None = None):
        """The block over a sequence (packed documents with ``positions``), and the mixer's decode cache after it."""
        y, cache = self.mixer.prefill(self.norm1(h)) if positions is None else self.mixer.prefill(self.norm1(h), positions)
        h = h + y
        return h + self.mlp(self.norm2(h)), cache

    def __call__(self, h: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        return self.prefill(h)[0]

    def step(self, h: Float[Array, "B D"], cache):
        y, cache = self.mixer.step(self.norm1(h), cache)
        h = h + y
        return h + self.mlp(self.norm2(h)), cache


class LanguageModel(nnx.Module):
    """Token LM. ``__call__(tokens [B, T]) -> logits [B, T, vocab]``; ``losses`` scores without full logits;
    ``prefill`` / ``decode_step`` / ``generate`` recur."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        validate(config)
        self.vocab_size, self.max_len, self.remat = config.vocab_size, config.max_len, config.remat
        self.n_layers = config.n_layers
        self.dtype, self.param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        d = config.d_model
        hidden = config.mlp_hidden or 64 * math.ceil(8 * d / 3 / 64)
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Embed(config.vocab_size, d, embedding_init=init, dtype=self.param_dtype,
                               param_dtype=self.param_dtype, rngs=rngs)

        @nnx.split_rngs(splits=config.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(config, hidden, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.norm = nnx.RMSNorm(d, dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)
        self.head = None if config.tie_embeddings else nnx.Linear(  # its kernel [D, vocab], read by _logits
            d, config.vocab_size, use_bias=False, param_dtype=self.param_dtype, rngs=rngs)

    def _logits(self, h: Array) -> Float[Array, "... vocab"]:
        """Final norm and output head; float32 logits from ``dtype`` operands (:func:`head_logits`)."""
        h = self.norm(h).astype(self.dtype)
        table = self.embed.embedding[...] if self.head is None else self.head.kernel[...].T  # [vocab, D]
        return head_logits(h, table.astype(self.dtype))

    def _over_layers(self, apply, h, xs=None, remat: bool = False):
        """``lax.scan`` of ``apply(block, h, x) -> (h, y)`` over the stacked blocks (and ``xs``, stacked
        per layer); works inside any outer jax transform (the blocks are merged from their state)."""
        graphdef, state = nnx.split(self.blocks)

        def body(h, layer):
            layer_state, x = layer
            return apply(nnx.merge(graphdef, layer_state), h, x)

        # On CPU, XLA fuses across layers only in straight-line code: unrolling a shallow stack there was
        # ~10 % faster a training step (make train's model); GPUs keep the rolled loop (one layer compiled).
        unroll = self.n_layers <= 4 and jax.default_backend() == "cpu"
        return jax.lax.scan(jax.checkpoint(body) if remat else body, h, (state, xs), unroll=unroll)

    def _hidden(self, tokens: Int[Array, "B T"], positions: Int[Array, "B T"] | None = None):
        """Final hidden states [B, T, D] and the stacked decode caches."""
        if positions is not None and isinstance(self.blocks.mixer, Attention):
            raise ValueError("positions: packed documents need a DeltaNet-family mixer, got family 'attention'")
        apply = lambda block, h, _: block.prefill(h, positions)
        return self._over_layers(apply, self.embed(tokens), remat=self.remat)

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
            shapes = lambda tree: [s for s, _ in spec(tree)]
            raise ValueError(
                f"cache: expected this model's init_cache(batch={batch}) (stacked over {self.n_layers} layers, "
                f"leaf shapes {shapes(expected)}), got {type(cache).__name__} with leaf shapes {shapes(cache)}"
            )

    def __call__(self, tokens: Int[Array, "B T"], positions: Int[Array, "B T"] | None = None
                 ) -> Float[Array, "B T vocab"]:
        """Logits; ``positions`` (packed documents, see :meth:`losses`)."""
        self._check_tokens(tokens, 2, "[B, T]")
        return self._logits(self._hidden(tokens, positions)[0])

    def _score(self, h: Array, targets: Array) -> tuple[Array, Array]:
        """Cross-entropy (nats, float32) and argmax == target at every position of ``h: [..., D]``."""
        logits = self._logits(h)
        nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return nll, jnp.argmax(logits, axis=-1) == targets

    def losses(self, tokens: Int[Array, "B T"], targets: Int[Array, "B T"], chunk: int | None = None,
               positions: Int[Array, "B T"] | None = None) -> tuple[Float[Array, "B T"], Bool[Array, "B T"]]:
        """Per-position cross-entropy (nats, float32) and whether the argmax is the target. With ``chunk``
        (default: 4096 when the logits would exceed 2^25 elements) the head and the loss run over ``chunk``
        positions at a time and are recomputed in the backward pass: peak memory ``chunk x vocab`` instead
        of ``B T x vocab``; small problems score the whole batch at once (no recompute).

        ``positions`` (packed documents): each token's position in its document, 0 where one starts; no
        token sees another document (:meth:`flowssm.layers.DeltaMixer.prefill`)."""
        self._check_tokens(tokens, 2, "[B, T]")
        if targets.shape != tokens.shape:
            raise ValueError(f"targets: expected shape {tuple(tokens.shape)} (from tokens), got {tuple(targets.shape)}")
        h = self._hidden(tokens, positions)[0]
        B, T, D = h.shape
        rows = B * T
        if chunk is None and rows * self.vocab_size <= WHOLE_LOGITS:
            return self._score(h, targets)
        size = min(chunk or 4096, rows)
        pad = -rows % size
        h = jnp.pad(h.reshape(rows, D), [(0, pad), (0, 0)]).reshape(-1, size, D)
        t = jnp.pad(targets.reshape(rows), [(0, pad)]).reshape(-1, size)
        nll, correct = jax.lax.map(jax.checkpoint(lambda x: self._score(*x)), (h, t))
        return nll.reshape(-1)[:rows].reshape(B, T), correct.reshape(-1)[:rows].reshape(B, T)

    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))

    def init_cache(self, batch: int):
        """The stacked decode caches (a leading layer axis on :class:`flowssm.layers.MixerCache` or
        :class:`KVCache`), empty."""
        one = self.blocks.mixer.init_cache(batch)  # reads static sizes only
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (self.n_layers, *x.shape)), one)

    def prefill(self, prompt: Int[Array, "B T0"], positions: Int[Array, "B T0"] | None = None):
        """The prompt through the chunked ops in one pass: (next-token logits [B, vocab], stacked caches);
        with ``positions`` (packed documents) the caches continue the last document only."""
        self._check_tokens(prompt, 2, "[B, T0]")
        h, cache = self._hidden(prompt, positions)
        return self._logits(h[:, -1]), cache

    def decode_step(self, token: Int[Array, " B"], cache) -> tuple[Float[Array, "B vocab"], object]:
        """Feed one token per sequence; returns the next-token logits (float32) and the new caches."""
        self._check_tokens(token, 1, "[B]")
        self._check_cache(cache, token.shape[0])
        h, cache = self._over_layers(lambda block, h, c: block.step(h, c), self.embed(token), cache)
        return self._logits(h), cache

    def generate(
        self, prompt: Int[Array, "B T0"], n: int, temperature: float = 1.0, top_k: int | None = None, seed: int = 0
    ) -> Int[Array, "B T0+n"]:
        """:meth:`prefill` the prompt, then sample ``n`` tokens with :meth:`decode_step` inside one jitted
        ``lax.scan`` (state on the device; ``temperature = 0``: greedy; ``top_k``: sample among the k most
        likely). Returns ``[B, T0 + n]`` (prompt included)."""
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
        if isinstance(self.blocks.mixer, Attention) and total > self.max_len:
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
    last, cache = model.prefill(prompt)

    def sample(carry, key):
        cache, last = carry
        tok = _sample(last, key, temperature, top_k, greedy).astype(prompt.dtype)
        logits, cache = model.decode_step(tok, cache)
        return (cache, logits), tok

    _, new = jax.lax.scan(sample, (cache, last), jax.random.split(key, n))
    return jnp.concatenate([prompt, new.T.reshape(prompt.shape[0], n)], axis=1)

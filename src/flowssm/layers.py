"""Flax NNX token mixers of the DeltaNet family: hidden states ``[B, T, D]`` -> driving path -> outputs.

Per token ``x_t`` (``D``) and head ``h``:

    q, k_j, v_j = SiLU(conv(x W_qkv))            (short causal depthwise conv, optional)
    q, k_j      <- q / |q|, k_j / |k_j|            (L2 norm per head)
    beta_j      = sigmoid(x W_beta)  (x 2 with allow_neg_eigval: beta in (0, 2))
    g           = -exp(A_log) softplus(x W_a + dt_bias)   (gated families only)
    o           = delta_rule(q, k, v, beta, g)  or  linear_attention(q, k, v, g)
    y           = W_o [RMSNorm(o) * SiLU(x W_gate)]   (the gate only with output_gate)

``j = 1..R`` (DeltaProduct rank). Families "gla", "kda" and "rwkv7" have a per-channel decay
(``g: [.., H, K]``, ``A_log`` per head, ``dt_bias`` per channel). "rwkv7" is an RWKV-7-style
diagonal-plus-low-rank mixer: ``beta = sigmoid(x W_beta): [.., H, K]`` is the in-context learning rate
``a_rwkv`` and ``o = dplr_delta_rule(q, beta k, v, a=-k, b=beta k, g)``, i.e.
``S <- (diag(e^g) - (beta k) k^T) S + (beta k) v^T`` with unit removal keys ``k``.
Every knob comes from :class:`flowssm.models.config.MixerConfig`.

Dtypes (Flax's ``dtype`` / ``param_dtype`` convention): parameters are stored in ``param_dtype``; the
projections, the convolution and q, k, v run in ``dtype`` (bf16 q, k, v reach the ops, which accumulate
in float32); the L2 norms, beta, the log-decay g and the norms' statistics are computed in float32.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

import flowssm
from flowssm.models.config import (DELTA_FAMILIES, DPLR_FAMILIES, GATED_FAMILIES, PER_CHANNEL_FAMILIES, MixerConfig,
                                   head_dim, validate_mixer)


class ShortConv(nnx.Module):
    """Causal depthwise convolution ``y_t = sum_{i < W} w_i * x_{t - W + 1 + i}``, no bias. x: [B, T, C]."""

    def __init__(self, channels: int, width: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.width, self.dtype = width, dtype
        bound = 1.0 / math.sqrt(width)
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (width, channels), param_dtype, -bound, bound))

    def __call__(self, x: Float[Array, "B T C"], positions: Int[Array, "B T"] | None = None) -> Float[Array, "B T C"]:
        """With ``positions`` (each token's position in its document) a token sees no input of an earlier
        document: the term of lag ``d`` counts only where ``positions >= d``."""
        T, W = x.shape[1], self.width
        xp = jnp.pad(x.astype(self.dtype), [(0, 0), (W - 1, 0), (0, 0)])
        kernel = self.kernel[...].astype(self.dtype)
        term = lambda i: xp[:, i : i + T] * kernel[i]
        if positions is None:
            return sum(term(i) for i in range(W))
        return sum(jnp.where((positions >= W - 1 - i)[..., None], term(i), 0) for i in range(W))

    def tail(self, x: Float[Array, "B T C"], positions: Int[Array, "B T"] | None = None) -> Float[Array, "B Wm1 C"]:
        """The decode state after ``x``: its last ``W - 1`` inputs (zeros before the first token and, with
        ``positions``, before the last token's document)."""
        W = self.width
        window = jnp.pad(x, [(0, 0), (W - 1, 0), (0, 0)])[:, x.shape[1] :]
        if positions is None:
            return window
        lag = jnp.arange(W - 1, 0, -1)  # of each slot, seen from the next token
        return jnp.where((positions[:, -1:] + 1 >= lag)[..., None], window, 0)

    def step(self, x_t: Float[Array, "B C"], state: Float[Array, "B Wm1 C"]):
        """One token; ``state`` holds the last ``W - 1`` inputs. Returns (y_t: [B, C], state)."""
        window = jnp.concatenate([state, x_t[:, None].astype(state.dtype)], axis=1)
        y = jnp.einsum("bwc,wc->bc", window.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return y, window[:, 1:]


def check_positions(positions, shape: tuple, semantics: str) -> None:
    """``positions``: an int array of ``shape`` ([B, T]); resets need the discrete recurrence."""
    if not hasattr(positions, "dtype") or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise TypeError(f"positions: expected an int array [B, T], got {getattr(positions, 'dtype', type(positions))}")
    if tuple(positions.shape) != tuple(shape):
        raise ValueError(f"positions: expected shape [B, T] = {tuple(shape)}, got shape {tuple(positions.shape)}")
    if semantics != "discrete":
        raise ValueError(f"positions: document resets (g = -inf) need semantics 'discrete', got {semantics!r}")


class MixerCache(NamedTuple):
    """Recurrent cache of one :class:`DeltaMixer`: state [B, H, K, V]; conv: last W - 1 inputs [B, W - 1, C]."""

    state: Float[Array, "B H K V"]
    conv: Float[Array, "B Wm1 C"] | None


def _l2norm(x: Array, eps: float = 1e-6) -> Array:
    """``x / |x|`` over the last axis, computed in float32, returned in the dtype of ``x``."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def _dplr_keys(k: Array, rate: Array):
    """RWKV-7-style dplr keys from unit keys ``k`` and the per-channel rate: (write key, a, b) =
    ``(rate k, -k, rate k)``; returned in the dtype of ``k``, and of ``q`` at the op."""
    written = (rate * k.astype(rate.dtype)).astype(k.dtype)
    return written, -k, written


class DeltaMixer(nnx.Module):
    """(Gated) DeltaNet / DeltaProduct / (gated) linear attention token mixer. x: [B, T, D] -> [B, T, D]."""

    def __init__(self, d_model: int, config: MixerConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        validate_mixer(config, d_model, jnp.dtype(dtype).name)
        if config.family == "attention":
            raise ValueError("mixer.family: expected a DeltaNet or linear-attention family, got 'attention'")
        self.delta = config.family in DELTA_FAMILIES
        self.dplr = config.family in DPLR_FAMILIES
        self.gated = config.family in GATED_FAMILIES
        self.per_channel = config.family in PER_CHANNEL_FAMILIES
        self.H, self.R, self.K = config.num_heads, config.rank, head_dim(config, d_model)
        self.solver = config.solver
        self.chunk_size, self.scan, self.backend = config.chunk_size, config.scan, config.backend
        self.kernels = config.kernels
        self.semantics, self.beta_max = config.semantics, 2.0 if config.allow_neg_eigval else 1.0
        H, R, K = self.H, self.R, self.K
        self.qkv_dims = (H * K, H * R * K, H * R * K)  # q, k, v widths (V = K)
        lin = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv_proj = lin(d_model, sum(self.qkv_dims))
        self.conv = (ShortConv(sum(self.qkv_dims), config.conv_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                     if config.conv_size > 0 else None)
        self.beta_proj = lin(d_model, H * R) if self.delta else lin(d_model, H * K) if self.dplr else None
        if self.gated:
            decays = H * K if self.per_channel else H  # one log-decay per head, or per key channel
            self.a_proj = lin(d_model, decays)
            k1, k2 = jax.random.split(rngs.params())
            self.A_log = nnx.Param(jnp.log(jax.random.uniform(k1, (H,), jnp.float32, 1.0, 16.0)).astype(param_dtype))
            dt = jnp.exp(jax.random.uniform(k2, (decays,), jnp.float32, math.log(1e-3), math.log(1e-1)))
            self.dt_bias = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(param_dtype))  # softplus(dt_bias) = dt
        self.gate_proj = lin(d_model, H * K) if config.output_gate else None
        self.o_norm = nnx.RMSNorm(K, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.o_proj = lin(H * K, d_model)

    def _features(self, x: Array, qkv: Array):
        """Post-conv features -> (q [.., H, K], k, v, beta [.., H, R] ([.., H, K] for dplr) or None,
        g [.., H] ([.., H, K] per channel) or None).

        Rank-R layout (k: [.., H, R, K]) for the delta rule, rank-1 for linear attention and dplr.
        """
        lead, (H, R, K) = x.shape[:-1], (self.H, self.R, self.K)
        q, k, v = jnp.split(jax.nn.silu(qkv), [self.qkv_dims[0], sum(self.qkv_dims[:2])], axis=-1)
        shape = (*lead, H, R, K) if self.delta else (*lead, H, K)
        q, k, v = _l2norm(q.reshape(*lead, H, K)), _l2norm(k.reshape(shape)), v.reshape(shape)
        f32 = lambda a: a.astype(jnp.float32)
        beta = None
        if self.beta_proj is not None:
            beta = self.beta_max * jax.nn.sigmoid(f32(self.beta_proj(x))).reshape(*lead, H, K if self.dplr else R)
        if self.gated:
            rate = jax.nn.softplus(f32(self.a_proj(x)) + f32(self.dt_bias[...]))
            if self.per_channel:
                g = -jnp.exp(f32(self.A_log[...]))[:, None] * rate.reshape(*lead, H, K)
            else:
                g = -jnp.exp(f32(self.A_log[...])) * rate
        else:
            g = None
        return q, k, v, beta, g

    def _output(self, x: Array, o: Array) -> Array:
        """o: [.., H, V] -> y: [.., D] through the per-head RMSNorm, the SiLU gate and W_o."""
        o = self.o_norm(o)
        if self.gate_proj is not None:
            o = o * jax.nn.silu(self.gate_proj(x)).reshape(o.shape)
        return self.o_proj(o.reshape(*o.shape[:-2], -1))

    def prefill(self, x: Float[Array, "B T D"], positions: Int[Array, "B T"] | None = None
                ) -> tuple[Float[Array, "B T D"], MixerCache]:
        """The chunked forward over ``x`` and the decode cache after its last token.

        ``positions`` (packed documents): each token's position in its document, 0 where one starts. The
        state restarts from zero there (``g = -inf``, an exact reset) and the convolution does not reach
        back across the start, so no document sees another; the cache is the last document's. From
        ``cu_seqlens`` (``B = 1``): ``flowssm.varlen.token_sequences(cu_seqlens, T)[1][None]``.
        """
        if positions is not None:
            check_positions(positions, x.shape[:2], self.semantics)
        pre = self.qkv_proj(x)
        qkv = pre if self.conv is None else self.conv(pre, positions)
        q, k, v, beta, g = self._features(x, qkv)
        if positions is not None:
            g = self._document_resets(g, positions)
        kw = dict(chunk_size=self.chunk_size, scan=self.scan, backend=self.backend)
        if self.delta:
            o, state = flowssm.delta_rule(q, k, v, beta, g, solver=self.solver, semantics=self.semantics,
                                          tuning=self.kernels, **kw)
        elif self.dplr:
            write, a, b = _dplr_keys(k, beta)
            o, state = flowssm.dplr_delta_rule(q, write, v, a, b, g, solver=self.solver, **kw)
        else:
            o, state = flowssm.linear_attention(q, k, v, g, tuning=self.kernels, **kw)
        conv = None if self.conv is None else self.conv.tail(pre, positions).astype(jnp.float32)
        return self._output(x, o), MixerCache(state.astype(jnp.float32), conv)

    def _document_resets(self, g, positions) -> Float[Array, "B T H"]:
        """``g`` (or zeros) with ``-inf`` at every document start."""
        g = jnp.zeros((*positions.shape, self.H), jnp.float32) if g is None else g
        return jnp.where((positions == 0)[..., None], -jnp.inf, g)

    def __call__(self, x: Float[Array, "B T D"], positions: Int[Array, "B T"] | None = None) -> Float[Array, "B T D"]:
        return self.prefill(x, positions)[0]

    def init_cache(self, batch: int) -> MixerCache:
        state = jnp.zeros((batch, self.H, self.K, self.K), jnp.float32)
        conv = None if self.conv is None else jnp.zeros((batch, self.conv.width - 1, sum(self.qkv_dims)), jnp.float32)
        return MixerCache(state, conv)

    def step(self, x_t: Float[Array, "B D"], cache: MixerCache) -> tuple[Float[Array, "B D"], MixerCache]:
        """One token in constant memory: ``delta_rule_step`` / ``linear_attention_step``."""
        qkv, conv = self.qkv_proj(x_t), cache.conv
        if self.conv is not None:
            qkv, conv = self.conv.step(qkv, conv)
        q, k, v, beta, g = self._features(x_t, qkv)
        if self.delta:
            state, o = flowssm.delta_rule_step(cache.state, q, k, v, beta, g, semantics=self.semantics)
        elif self.dplr:
            write, a, b = _dplr_keys(k, beta)
            state, o = flowssm.dplr_delta_rule_step(cache.state, q, write, v, a, b, g)
        else:
            state, o = flowssm.linear_attention_step(cache.state, q, k, v, g)
        return self._output(x_t, o), MixerCache(state, conv)

"""Softmax-attention baseline mixer: causal multi-head attention with rotary positions and a KV cache.

    q, k, v = x W_qkv (per head, RoPE on q and k);  o_t = sum_{s <= t} softmax_s(q_t . k_s / sqrt(K)) v_s;  y = W_o o
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from flowssm.models.config import MixerConfig, head_dim, validate_mixer


class KVCache(NamedTuple):
    """k, v: [B, max_len, H, K] (filled up to ``pos``); pos: [] int32, the next position to write."""

    k: Float[Array, "B L H K"]
    v: Float[Array, "B L H K"]
    pos: Int[Array, ""]


def rope(x: Float[Array, "... T H K"], positions: Array, theta: float = 10000.0) -> Array:
    """Rotary embedding (rotate-half form) at ``positions: [T]``: pairs ``(x_i, x_{i + K/2})`` turn by
    ``p * theta^(-2i/K)``. An odd last feature is left as is."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / max(half, 1))
    angle = positions.astype(jnp.float32)[:, None, None] * freqs  # [T, 1, half]
    cos, sin = jnp.cos(angle).astype(x.dtype), jnp.sin(angle).astype(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


class Attention(nnx.Module):
    """Causal softmax attention (``jax.nn.dot_product_attention``). x: [B, T, D] -> [B, T, D], T <= max_len."""

    def __init__(self, d_model: int, config: MixerConfig, *, max_len: int, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        validate_mixer(config, d_model, jnp.dtype(dtype).name)
        self.H, self.K, self.max_len = config.num_heads, head_dim(config, d_model), max_len
        lin = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv_proj = lin(d_model, 3 * self.H * self.K)
        self.o_proj = lin(self.H * self.K, d_model)

    def _qkv(self, x: Array, positions: Array):
        q, k, v = jnp.split(self.qkv_proj(x).reshape(*x.shape[:-1], 3 * self.H, self.K), 3, axis=-2)
        return rope(q, positions), rope(k, positions), v

    def prefill(self, x: Float[Array, "B T D"]) -> tuple[Float[Array, "B T D"], KVCache]:
        """Causal attention over ``x`` (softmax in float32) and the KV cache holding its ``T`` positions."""
        B, T = x.shape[:2]
        if T > self.max_len:
            raise ValueError(f"x: expected at most max_len = {self.max_len} tokens, got T = {T}")
        q, k, v = self._qkv(x, jnp.arange(T))
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        pad = lambda a: jnp.pad(a.astype(jnp.float32), [(0, 0), (0, self.max_len - T), (0, 0), (0, 0)])
        return self.o_proj(o.reshape(B, T, -1)), KVCache(pad(k), pad(v), jnp.asarray(T, jnp.int32))

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        return self.prefill(x)[0]

    def init_cache(self, batch: int) -> KVCache:
        kv = jnp.zeros((batch, self.max_len, self.H, self.K), jnp.float32)
        return KVCache(kv, kv, jnp.zeros((), jnp.int32))

    def step(self, x_t: Float[Array, "B D"], cache: KVCache) -> tuple[Float[Array, "B D"], KVCache]:
        """One token: write k, v at ``pos`` and attend over positions ``<= pos`` (past max_len: undefined)."""
        q, k, v = self._qkv(x_t[:, None], cache.pos[None])
        ks = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), cache.pos, axis=1)
        vs = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), cache.pos, axis=1)
        lengths = jnp.full((x_t.shape[0],), cache.pos + 1, jnp.int32)
        o = jax.nn.dot_product_attention(q, ks.astype(q.dtype), vs.astype(q.dtype), key_value_seq_lengths=lengths)
        return self.o_proj(o.reshape(o.shape[0], -1)), KVCache(ks, vs, cache.pos + 1)

"""Tokens -> driving path.

Token ``t`` acts on the state ``S`` (``K x V``) by the affine map

    S <- exp(g_t) S;  for j in 1..R:  S <- (I - beta_{t,j} k_{t,j} k_{t,j}^T) S + alpha_{t,j} k_{t,j} v_{t,j}^T

The delta rule has ``alpha = beta``; linear attention has ``beta = 0, alpha = 1``. The path keeps these
factors (rank ``R`` keys, step sizes, a scalar log-decay) and never forms a dense ``K x K`` increment.
Internally the path is head-major: ``[B, H, T, R, .]``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float


class Path(NamedTuple):
    """Structured driving path, head-major.

    keys: [B, H, T, R, K], values: [B, H, T, R, V], beta (multiplicative step): [B, H, T, R],
    alpha (additive step): [B, H, T, R], log_decay g <= 0: [B, H, T].
    """

    keys: Float[Array, "B H T R K"]
    values: Float[Array, "B H T R V"]
    beta: Float[Array, "B H T R"]
    alpha: Float[Array, "B H T R"]
    log_decay: Float[Array, "B H T"]

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    @property
    def rank(self) -> int:
        return self.keys.shape[3]


def _shape(x) -> str:
    return f"shape {tuple(x.shape)} dtype {x.dtype}"


def check_float(name: str, x) -> None:
    """Raise TypeError unless ``x`` is a floating-point array."""
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"{name}: expected a floating-point array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating dtype (float32, bfloat16, float64), got {x.dtype}")


def compute_dtype(*xs) -> jnp.dtype:
    """float32 accumulation for bf16/f16/f32 inputs, float64 when any input is float64."""
    return jnp.promote_types(jnp.float32, jnp.result_type(*[x.dtype for x in xs if x is not None]))


def _expect(name: str, x, shape: tuple, names: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {names} = {tuple(shape)}, got {_shape(x)}")


def make_path(k, v, beta=None, g=None, *, alpha=None, dtype=None) -> Path:
    """Validate fla-layout inputs and build the head-major driving path.

    k: [B, T, H, K] (rank 1) or [B, T, H, R, K] (rank R); v: [B, T, H, V] or [B, T, H, R, V];
    beta, alpha: [B, T, H] or [B, T, H, R] (``None`` means 0 for beta, beta for alpha);
    g: [B, T, H] or None (no decay). Returns a :class:`Path` in ``dtype`` (default: float32, or
    float64 for float64 inputs).
    """
    check_float("k", k)
    check_float("v", v)
    if k.ndim not in (4, 5):
        raise ValueError(f"k: expected rank-1 keys [B, T, H, K] or rank-R keys [B, T, H, R, K], got {_shape(k)}")
    rank1 = k.ndim == 4
    if rank1:
        B, T, H, K = k.shape
        R = 1
        if v.ndim != 4:
            raise ValueError(f"v: expected [B, T, H, V] to match rank-1 k {tuple(k.shape)}, got {_shape(v)}")
    else:
        B, T, H, R, K = k.shape
        if v.ndim != 5:
            raise ValueError(f"v: expected [B, T, H, R, V] to match rank-R k {tuple(k.shape)}, got {_shape(v)}")
    if tuple(v.shape[:-1]) != tuple(k.shape[:-1]):
        what = "[B, T, H]" if rank1 else "[B, T, H, R]"
        raise ValueError(f"v: expected leading dims {what} = {tuple(k.shape[:-1])} (from k), got {_shape(v)}")
    if 0 in k.shape or v.shape[-1] == 0:
        raise ValueError(f"k, v: expected non-empty B, T, H, R, K and V, got k {_shape(k)}, v {_shape(v)}")
    step_shape = (B, T, H) if rank1 else (B, T, H, R)
    step_names = "[B, T, H]" if rank1 else "[B, T, H, R]"
    for name, s in (("beta", beta), ("alpha", alpha)):
        if s is not None:
            check_float(name, s)
            _expect(name, s, step_shape, step_names + " (from k)")
    if g is not None:
        check_float("g", g)
        _expect("g", g, (B, T, H), "[B, T, H] (from k)")
    dtype = dtype or compute_dtype(k, v, beta, alpha, g)

    def head_major(x, trailing):
        x = x.astype(dtype)
        if rank1:
            x = jnp.expand_dims(x, 3) if trailing else x[..., None]
        return jnp.moveaxis(x, 2, 1)  # [B, T, H, R, ...] -> [B, H, T, R, ...]

    keys = head_major(k, True)
    values = head_major(v, True)
    beta_ = head_major(beta, False) if beta is not None else jnp.zeros(keys.shape[:-1], dtype)
    alpha_ = head_major(alpha, False) if alpha is not None else beta_
    log_decay = jnp.moveaxis(g.astype(dtype), 2, 1) if g is not None else jnp.zeros((B, H, T), dtype)
    return Path(keys, values, beta_, alpha_, log_decay)


def linear_attention_path(k, v, g=None) -> Path:
    """The path of (decayed) linear attention, ``S <- e^{g} S + k v^T``: ``beta = 0``, ``alpha = 1``."""
    check_float("k", k)
    return make_path(k, v, None, g, alpha=jnp.ones(k.shape[:-1], k.dtype))


def pad_path(path: Path, length: int) -> Path:
    """Append identity tokens (k = v = 0, beta = alpha = 0, g = 0) up to ``length``: exact, no effect on S."""
    extra = length - path.length
    if extra == 0:
        return path
    return Path(*(jnp.pad(x, [(0, 0), (0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 3)) for x in path))


def chunk_path(path: Path, chunk_size: int) -> Path:
    """Reshape a path whose length is a multiple of ``chunk_size`` to ``[B, H, N, C, ...]``."""
    B, H, T = path.log_decay.shape
    N = T // chunk_size
    return Path(*(x.reshape(B, H, N, chunk_size, *x.shape[3:]) for x in path))

"""Tokens -> driving path.

Token ``t`` acts on the state ``S`` (``K x V``) by the affine map

    S <- diag(exp(g_t)) S;  for j in 1..R:  S <- (I - beta_{t,j} k_{t,j} k_{t,j}^T) S + alpha_{t,j} k_{t,j} v_{t,j}^T

The delta rule has ``alpha = beta``; linear attention has ``beta = 0, alpha = 1``. The path keeps these
factors (rank ``R`` keys, step sizes, the log-decay) and never forms a dense ``K x K`` increment.
The log-decay is a scalar per token (``[B, H, T]``: ``diag(e^g) = e^g I``, the fast path) or one per key
channel (``[B, H, T, K]``: GLA, KDA).

Paths with separate *reading* keys ``r`` (``right_keys``, diagonal-plus-low-rank transitions) act by
micro-steps that read the state entering them, before their decay (``D = diag(e^{g_t})`` for the first
micro-step of token ``t``, ``I`` for the others):

    S <- D S + k (alpha v - beta r^T S)^T

(the delta rule is ``r = D k``). ``dplr_path`` writes fla's ``S <- (D + b a^T) S + k v^T`` as two such
micro-steps: ``(k, r, beta, alpha, v) = (b, a, -1, 0, 0)`` then ``(k, 0, 0, 1, v)``.
Internally the path is head-major: ``[B, H, T, R, .]``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float


class Path(NamedTuple):
    """Structured driving path, head-major.

    keys (the columns written): [B, H, T, R, K], values: [B, H, T, R, V], beta (multiplicative step):
    [B, H, T, R], alpha (additive step): [B, H, T, R], log_decay g <= 0: [B, H, T] (scalar) or
    [B, H, T, K] (per key channel); right_keys: None (the delta rule) or [B, H, T, R, K] (reading keys,
    module docstring).
    """

    keys: Float[Array, "B H T R K"]
    values: Float[Array, "B H T R V"]
    beta: Float[Array, "B H T R"]
    alpha: Float[Array, "B H T R"]
    log_decay: Float[Array, "B H T"] | Float[Array, "B H T K"]
    right_keys: Float[Array, "B H T R K"] | None = None

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    @property
    def rank(self) -> int:
        return self.keys.shape[3]

    @property
    def per_channel(self) -> bool:
        """Whether the log-decay has a key-channel axis (``[..., T, K]``)."""
        return self.log_decay.ndim == self.keys.ndim - 1

    @property
    def transition(self) -> str:
        """"scalar" (scalar decay, delta-rule keys), "per_channel" (per-channel decay) or "dplr" (reading keys)."""
        return "dplr" if self.right_keys is not None else "per_channel" if self.per_channel else "scalar"


TRANSITIONS = ("scalar", "per_channel", "dplr")


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


def make_path(k, v, beta=None, g=None, *, alpha=None, right_keys=None, dtype=None) -> Path:
    """Validate fla-layout inputs and build the head-major driving path.

    k: [B, T, H, K] (rank 1) or [B, T, H, R, K] (rank R); v: [B, T, H, V] or [B, T, H, R, V];
    beta, alpha: [B, T, H] or [B, T, H, R] (``None`` means 0 for beta, beta for alpha);
    g: [B, T, H] (scalar), [B, T, H, K] (per key channel) or None (no decay); right_keys: None or
    like ``k``. Returns a :class:`Path` in ``dtype`` (default: float32, or float64 for float64 inputs).
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
        if tuple(g.shape) not in ((B, T, H), (B, T, H, K)):
            raise ValueError(f"g: expected shape [B, T, H] = {(B, T, H)} (scalar decay) or [B, T, H, K] = "
                             f"{(B, T, H, K)} (per key channel) (from k), got {_shape(g)}")
    if right_keys is not None:
        check_float("right_keys", right_keys)
        _expect("right_keys", right_keys, k.shape, "like k")
    dtype = dtype or compute_dtype(k, v, beta, alpha, g, right_keys)

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
    readers = head_major(right_keys, True) if right_keys is not None else None
    return Path(keys, values, beta_, alpha_, log_decay, readers)


def linear_attention_path(k, v, g=None) -> Path:
    """The path of (decayed) linear attention, ``S <- e^{g} S + k v^T``: ``beta = 0``, ``alpha = 1``."""
    check_float("k", k)
    return make_path(k, v, None, g, alpha=jnp.ones(k.shape[:-1], k.dtype))


def dplr_path(k, v, a, b, gk) -> Path:
    """fla's diagonal-plus-low-rank path ``S <- (diag(e^{gk}) + b a^T) S + k v^T`` as rank-2 micro-steps
    (module docstring). k, a, b, gk: [B, T, H, K]; v: [B, T, H, V]."""
    for name, x in (("k", k), ("v", v), ("a", a), ("b", b), ("gk", gk)):
        check_float(name, x)
    if k.ndim != 4:
        raise ValueError(f"k: expected [B, T, H, K], got {_shape(k)}")
    for name, x in (("a", a), ("b", b), ("gk", gk)):
        _expect(name, x, k.shape, "[B, T, H, K] (from k)")
    if v.ndim != 4 or tuple(v.shape[:3]) != tuple(k.shape[:3]):
        raise ValueError(f"v: expected [B, T, H, V] with [B, T, H] = {tuple(k.shape[:3])} (from k), got {_shape(v)}")
    dtype = compute_dtype(k, v, a, b, gk)
    pair = lambda first, second: jnp.stack([first.astype(dtype), second.astype(dtype)], axis=3)
    steps = lambda first, second: jnp.broadcast_to(jnp.asarray([first, second], dtype), (*k.shape[:3], 2))
    return make_path(pair(b, k), pair(jnp.zeros_like(v), v), steps(-1.0, 0.0), gk, alpha=steps(0.0, 1.0),
                     right_keys=pair(a, jnp.zeros_like(a)), dtype=dtype)


def map_path(path: Path, fn) -> Path:
    """``fn`` applied to every array field (``right_keys=None`` stays None)."""
    return Path(*(None if x is None else fn(x) for x in path))


def pad_path(path: Path, length: int) -> Path:
    """Append identity tokens (k = v = 0, beta = alpha = 0, g = 0) up to ``length``: exact, no effect on S."""
    extra = length - path.length
    if extra == 0:
        return path
    return map_path(path, lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 3)))


def chunk_path(path: Path, chunk_size: int) -> Path:
    """Reshape a path whose length is a multiple of ``chunk_size`` to ``[B, H, N, C, ...]``."""
    B, H, T = path.keys.shape[:3]
    N = T // chunk_size
    return map_path(path, lambda x: x.reshape(B, H, N, chunk_size, *x.shape[3:]))

"""One chunk of the driving path as a unit-lower-triangular system for its corrected values.

Flatten a chunk's ``C`` tokens x ``R`` sub-steps into ``n = C R`` micro-steps with keys ``k_m``,
values ``v_m`` and the cumulative log-decay ``G_m`` of their token. Every prefix state has the form

    S_t = exp(G_t) S_in + sum_{m <= t} exp(G_t - G_m) k_m u_m^T,

where the corrected values ``u: [n, V]`` solve ``(I + L) u = rhs_v - rhs_k S_in`` with ``L`` strictly
(block-)lower. Solvers differ only in how they apply ``T = (I + L)^{-1}``.

* discrete semantics (the recurrence): ``L_im = beta_i (k_i . k_m) exp(G_i - G_m)`` for ``m < i``,
  ``rhs_v = alpha v``, ``rhs_k = beta exp(G) k``.
* continuous semantics (piecewise-linear path, token flow ``exp([[g I - K^T B K, K^T A V], [0, 0]])``):
  token ``t`` acts as ``S~ + K_t^T (Acore_t V_t - Bcore_t K_t S~)`` on ``S~ = exp(g_t) S`` with the
  ``R x R`` cores ``Bcore = phi1(-B Gram) B``, ``Acore = phi1(g I - B Gram) A``,
  ``phi1(X) = (e^X - I) / X``; ``L`` is block-strictly-lower over tokens.

Per-channel decays (``G_m: [K]``) and reading keys ``r`` (:mod:`flowssm.paths`) keep the same system
with ``exp(G_t - G_m)`` a diagonal: ``S_t = D(G_t) S_in + sum_{m <= t} D(G_t - G_m) k_m u_m^T`` and
``L_im = beta_i sum_c r_ic k_mc exp(Gr_ic - G_mc)``, ``rhs_k = beta exp(Gr) r``, with ``Gr_i`` the decay
the reader sees (``G_i`` for the delta rule, ``r = k``; the decay before micro-step ``i`` for reading
keys). Such scores are formed by :func:`decayed_scores`, which never exponentiates a positive number:
discrete semantics only (the continuous token flow of a per-channel decay has no ``R x R`` core form).
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from flowssm.flows import WYFlow
from flowssm.paths import Path

SEMANTICS = ("discrete", "continuous")
SUB_CHUNK = 16  # tokens per block of decayed_scores (fla's sub-chunk)


def cumulative_log_decay(log_decay: Float[Array, "... C"], axis: int = -1) -> Float[Array, "... C"]:
    """``G_t = sum_{s <= t} g_s`` along ``axis``, finite where a ``g_s = -inf`` (a hard reset) occurs.

    Each reset contributes ``-reset_gap`` (``exp(-reset_gap) = 0`` in the dtype) instead of ``-inf``, added
    after the finite cumsum: ``exp(G_i - G_m)`` is exactly 0 across a reset (for ``g <= 0``) and equals
    ``exp(g_{m+1} + ... + g_i)`` up to one rounding at magnitude ``reset_gap`` otherwise, where
    ``-inf - (-inf)`` would give NaN. Gradients through reset positions are 0.
    """
    # the barrier keeps XLA from constant-folding the cumsums for an ungated path (constant zeros): folding
    # a [BH, N, C] constant took 8 s of compile time per call at 1 x 65536 x 16 heads. Both cumsums must see
    # the barrier's output (``where(reset, 0, zeros)`` simplifies back to the constant)
    log_decay = jax.lax.optimization_barrier(log_decay)
    reset = jnp.isneginf(log_decay)
    finite = jnp.cumsum(jnp.where(reset, 0.0, log_decay), axis=axis)
    return finite - reset_gap(log_decay.dtype) * jnp.cumsum(reset, axis=axis).astype(log_decay.dtype)


def reset_gap(dtype) -> int:
    """The decay (nats) a hard reset stands for: ``exp(-reset_gap)`` is 0 in ``dtype``."""
    return math.ceil(-math.log(jnp.finfo(dtype).smallest_subnormal)) + 1


def decayed_scores(left, G_left, right, G_right, visible, blocks: int):
    """``A_ip = sum_c left_ic right_pc exp(G_left_ic - G_right_pc)`` where ``visible[i, p]``, else 0.

    left, G_left: [nl, K]; right, G_right: [nr, K]; visible: [nl, nr]; rows and items form ``blocks``
    equal consecutive time blocks, ``G_right`` non-increasing along items, and rows of block ``a`` see
    no item past block ``a`` and have ``G_left <= G_ref(a)``, the ``G_right`` of the last item before
    block ``a``. Pairs in one block take ``exp`` of the masked difference (``<= 0``); pairs across
    blocks factor through ``G_ref(a)``: ``exp(G_left - G_ref) exp(G_ref - G_right)``, both ``<= 1``.
    """
    (nl, K), nr = left.shape, right.shape[0]
    sl, sr = nl // blocks, nr // blocks
    lb, Gl = left.reshape(blocks, sl, K), G_left.reshape(blocks, sl, K)
    rb, Gr = right.reshape(blocks, sr, K), G_right.reshape(blocks, sr, K)
    vis = jnp.moveaxis(jnp.diagonal(visible.reshape(blocks, sl, blocks, sr), axis1=0, axis2=2), -1, 0)[..., None]
    diff = jnp.where(vis, Gl[:, :, None] - Gr[:, None], 0.0)  # [blocks, sl, sr, K]
    diag = jnp.einsum("aik,apk,aipk->aip", lb, rb, jnp.where(vis, jnp.exp(diff), 0.0))
    ref = jnp.concatenate([jnp.zeros_like(Gr[:1, 0]), Gr[:-1, -1]])  # [blocks, K]
    earlier = (jnp.arange(blocks)[:, None] > jnp.arange(blocks)[None, :])[:, :, None, None]
    to_ref = jnp.where(earlier, ref[:, None, None] - Gr[None], 0.0)  # [a, b, sr, K]
    off = jnp.einsum("aik,abpk->aibp", lb * jnp.exp(Gl - ref[:, None]), jnp.where(earlier, rb[None] * jnp.exp(to_ref), 0.0))
    full = off + jnp.einsum("ab,aip->aibp", jnp.eye(blocks, dtype=diag.dtype), diag)
    return jnp.where(visible, full.reshape(nl, nr), 0.0)


def score_blocks(C: int) -> int:
    """Blocks of :func:`decayed_scores` for a chunk of ``C`` tokens: ``SUB_CHUNK`` tokens each where it divides."""
    return C // math.gcd(C, SUB_CHUNK)


class ChunkSystem(eqx.Module):
    """``(I + L) u = rhs_v - rhs_k S_in`` for one chunk of ``n = C R`` micro-steps.

    L: [n, n] strictly lower; rhs_k: [n, K]; rhs_v: [n, V]; keys: [n, K]; log_decay: [n] or [n, K]
    (cumulative ``G`` of each micro-step's token, per key channel for per-channel paths); path: the
    chunk itself (``[C, R, .]``), for solvers that need it; semantics: "discrete" or "continuous".
    """

    L: Float[Array, "n n"]
    rhs_k: Float[Array, "n K"]
    rhs_v: Float[Array, "n V"]
    keys: Float[Array, "n K"]
    log_decay: Float[Array, " n"] | Float[Array, "n K"]
    path: Path
    semantics: str = eqx.field(static=True)

    def end_flow(self, w: Float[Array, "n K"], u: Float[Array, "n V"]) -> WYFlow:
        """The chunk flow read off the corrected-value generators: ``P = D(G_n) - K~^T w, Q = K~^T u``,
        ``K~_m = D(G_n - G_m) k_m``."""
        end = self.log_decay[-1]
        to_end = jnp.exp(end - self.log_decay)
        return WYFlow(end, (to_end if to_end.ndim == 2 else to_end[:, None]) * self.keys, w, u)


def phi1(X: Float[Array, "... r r"]) -> Float[Array, "... r r"]:
    """``phi1(X) = sum_{m>=0} X^m / (m+1)!``, the top-right block of ``expm([[X, I], [0, 0]])``."""
    r = X.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(r, dtype=X.dtype), X.shape)
    top = jnp.concatenate([X, eye], axis=-1)
    aug = jnp.concatenate([top, jnp.zeros_like(top)], axis=-2)
    return jax.scipy.linalg.expm(aug)[..., :r, r:]


def continuous_cores(keys, beta, alpha, log_decay):
    """Per-token cores of the continuous-time token flow.

    keys: [..., R, K], beta, alpha: [..., R], log_decay: [...] -> (Acore, Bcore): [..., R, R].
    """
    R = keys.shape[-2]
    gram = keys @ jnp.swapaxes(keys, -1, -2)
    bg = beta[..., :, None] * gram
    eye = jnp.eye(R, dtype=keys.dtype)
    bcore = phi1(-bg) * beta[..., None, :]
    acore = phi1(log_decay[..., None, None] * eye - bg) * alpha[..., None, :]
    return acore, bcore


def block_diagonal(blocks: Float[Array, "C R R"]) -> Float[Array, "n n"]:
    """Dense ``[C R, C R]`` block-diagonal matrix of ``C`` blocks of size ``R x R``."""
    C, R, _ = blocks.shape
    eye = jnp.eye(C, dtype=blocks.dtype)
    return jnp.einsum("ts,tjl->tjsl", eye, blocks).reshape(C * R, C * R)


def _general_system(chunk: Path) -> ChunkSystem:
    """Discrete system of a per-channel or reading-key chunk (module docstring), via :func:`decayed_scores`."""
    C, R, K = chunk.keys.shape
    n = C * R
    keys = chunk.keys.reshape(n, K)
    decay = chunk.log_decay if chunk.per_channel else jnp.broadcast_to(chunk.log_decay[:, None], (C, K))
    G_tok = cumulative_log_decay(decay, axis=0)  # [C, K]
    G = jnp.repeat(G_tok, R, axis=0)
    if chunk.right_keys is None:
        readers, G_read = keys, G
    else:  # a reader sees the state before its micro-step's decay (the first of its token)
        readers = chunk.right_keys.reshape(n, K)
        before = jnp.repeat(jnp.concatenate([jnp.zeros_like(G_tok[:1]), G_tok[:-1]]), R, axis=0)
        G_read = jnp.where((jnp.arange(n) % R == 0)[:, None], before, G)
    item = jnp.arange(n)
    beta = chunk.beta.reshape(n)
    L = beta[:, None] * decayed_scores(readers, G_read, keys, G, item[:, None] > item[None, :], score_blocks(C))
    rhs_v = chunk.alpha.reshape(n)[:, None] * chunk.values.reshape(n, -1)
    rhs_k = beta[:, None] * readers * jnp.exp(G_read)
    return ChunkSystem(L, rhs_k, rhs_v, keys, G, chunk, "discrete")


def build_system(chunk: Path, semantics: str) -> ChunkSystem:
    """The lower-triangular system of one chunk (``chunk`` fields ``[C, R, .]``, ``[C]`` or ``[C, K]`` for decay)."""
    if chunk.transition != "scalar":
        if semantics != "discrete":
            raise ValueError(f"semantics: {chunk.transition} transitions run 'discrete' semantics only, got {semantics!r}")
        return _general_system(chunk)
    C, R, K = chunk.keys.shape
    n = C * R
    keys = chunk.keys.reshape(n, K)
    values = chunk.values.reshape(n, -1)
    token_log_decay = cumulative_log_decay(chunk.log_decay)
    G = jnp.repeat(token_log_decay, R)
    item = jnp.arange(n)
    token = item // R
    if semantics == "discrete":
        below = item[:, None] > item[None, :]
    else:
        below = token[:, None] > token[None, :]
    diff = jnp.where(below, G[:, None] - G[None, :], 0.0)
    decay = jnp.where(below, jnp.exp(diff), 0.0)
    gram = keys @ keys.T
    if semantics == "discrete":
        beta = chunk.beta.reshape(n)
        L = beta[:, None] * gram * decay
        rhs_v = chunk.alpha.reshape(n)[:, None] * values
        rhs_k = (beta * jnp.exp(G))[:, None] * keys
    else:
        acore, bcore = continuous_cores(chunk.keys, chunk.beta, chunk.alpha, chunk.log_decay)
        A, Bm = block_diagonal(acore), block_diagonal(bcore)
        L = Bm @ (gram * decay)
        rhs_v = A @ values
        rhs_k = Bm @ (jnp.exp(G)[:, None] * keys)
    return ChunkSystem(L, rhs_k, rhs_v, keys, G, chunk, semantics)


def _over_leading(fn, ndim: int):
    for _ in range(ndim):
        fn = jax.vmap(fn)
    return fn


def solve_chunks(path: Path, solver, semantics: str):
    """Build and solve every chunk of a chunked path (fields ``[..., N, C, R, .]``).

    Returns (systems, solutions) with the path's leading dims ``[..., N]``.
    """
    lead = path.keys.ndim - 3
    systems = _over_leading(lambda c: build_system(c, semantics), lead)(path)
    return systems, _over_leading(solver.solve, lead)(systems)


def read_chunks(systems: ChunkSystem, q, solutions, S_in, scale):
    """:func:`readout` over leading dims: q: [..., N, C, K], S_in: [..., N, K, V] -> o: [..., N, C, V]."""
    lead = q.ndim - 2
    read = lambda sy, qq, w, u, s: readout(sy, qq, w, u, s, scale)
    return _over_leading(read, lead)(systems, q, solutions.w, solutions.u, S_in)


def readout(system: ChunkSystem, q: Float[Array, "C K"], w, u, S_in: Float[Array, "K V"], scale):
    """Outputs of the chunk's tokens: ``o_t = scale * S_t^T q_t`` from the prefix-state formula.

    q: [C, K]; w: [n, K]; u: [n, V] -> o: [C, V].
    """
    C = q.shape[0]
    n = system.keys.shape[0]
    R = n // C
    corrected = u - w @ S_in
    G_tok = system.log_decay[R - 1 :: R]  # [C] or [C, K]
    if G_tok.ndim == 2:  # per key channel
        seen = jnp.arange(C)[:, None] >= (jnp.arange(n) // R)[None, :]
        att = decayed_scores(q, G_tok, system.keys, system.log_decay, seen, score_blocks(C))
        return scale * ((q * jnp.exp(G_tok)) @ S_in + att @ corrected)
    token = jnp.arange(n) // R
    seen = jnp.arange(C)[:, None] >= token[None, :]
    att = (q @ system.keys.T) * jnp.where(seen, jnp.exp(jnp.where(seen, G_tok[:, None] - system.log_decay[None, :], 0.0)), 0.0)
    return scale * (jnp.exp(G_tok)[:, None] * (q @ S_in) + att @ corrected)

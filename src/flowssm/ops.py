"""Public ops: validation, padding to whole chunks, and dispatch to a backend.

Layout follows flash-linear-attention: ``q, k: [B, T, H, K]``, ``v: [B, T, H, V]``, ``beta: [B, T, H]``,
``g: [B, T, H]`` (scalar decay) or ``[B, T, H, K]`` (per key channel: GLA, KDA); rank ``R``:
``k: [B, T, H, R, K]``, ``v: [B, T, H, R, V]``, ``beta: [B, T, H, R]``; states ``[B, H, K, V]``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from flowssm import backends, chunks, reference, varlen
from flowssm.paths import Path, check_float, chunk_path, dplr_path, linear_attention_path, make_path, pad_path
from flowssm.scan import SCANS, chunk_states
from flowssm.solvers import Additive, FlowSolver, check_runnable, get_solver, logode
from flowssm.solvers.program import ADDITIVE

def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {tuple(allowed)}, got {value!r}")


def _check_chunk_size(chunk_size) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")


def _check_query(q, path: Path, name: str = "q", with_time: bool = True) -> None:
    check_float(name, q)
    B, H, T, R, K = path.keys.shape
    shape, names = ((B, T, H, K), "[B, T, H, K]") if with_time else ((B, H, K), "[B, H, K]")
    if tuple(q.shape) != shape:
        raise ValueError(f"{name}: expected shape {names} = {shape} (from k), got shape {tuple(q.shape)}")


def _initial_state(state, path: Path, name: str = "initial_state"):
    B, H, _, _, K = path.keys.shape
    V = path.values.shape[-1]
    if state is None:
        return jnp.zeros((B, H, K, V), path.keys.dtype)
    check_float(name, state)
    if tuple(state.shape) != (B, H, K, V):
        raise ValueError(f"{name}: expected shape [B, H, K, V] = {(B, H, K, V)}, got shape {tuple(state.shape)}")
    return state.astype(path.keys.dtype)


def _scale(scale, K: int) -> float:
    if scale is None:
        return K**-0.5
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float or None (default K**-0.5), got {scale!r}")
    return float(scale)


@functools.partial(jax.jit, static_argnames=("scale", "chunk_size", "solver", "scan", "backend", "semantics", "tuning",
                                             "has_decay"))
def _chunked(q, path: Path, S0, *, scale, chunk_size, solver: FlowSolver, scan, backend, semantics, tuning=None,
             has_decay=True):
    """q: [B, T, H, K] -> (o: [B, T, H, V] in the compute dtype, final state [B, H, K, V]); ``tuning``: the
    kernels' (backend "pallas"); ``has_decay=False``: the path's log-decay is zero (``g`` None; the kernels skip
    the decays)."""
    T = path.length
    qh = jnp.moveaxis(q.astype(path.keys.dtype), 2, 1)  # [B, H, T, K]
    if backend == "reference":
        run = lambda p, qq, s: reference.token_loop(p, qq, s, scale, semantics)
        o, S = jax.vmap(jax.vmap(run))(path, qh, S0)
        return jnp.moveaxis(o, 1, 2), S
    if backend == "pallas":
        from flowssm.kernels import chunked_pallas

        return chunked_pallas(q, path, S0, scale=scale, chunk_size=chunk_size, solver=solver, scan=scan, semantics=semantics,
                              tuning=tuning, has_decay=has_decay)
    C = min(chunk_size, T)
    N = -(-T // C)
    path = chunk_path(pad_path(path, N * C), C)  # padding tokens are the identity map: exact
    qc = jnp.pad(qh, [(0, 0), (0, 0), (0, N * C - T), (0, 0)]).reshape(*qh.shape[:2], N, C, -1)

    systems, sols = chunks.solve_chunks(path, solver, semantics)
    S_in, S = jax.vmap(jax.vmap(lambda f, s: chunk_states(f, s, scan)))(sols.flow, S0)
    o = chunks.read_chunks(systems, qc, sols, S_in, scale)
    o = o.reshape(*o.shape[:2], N * C, -1)[:, :, :T]
    return jnp.moveaxis(o, 1, 2), S


@functools.partial(jax.jit,
                   static_argnames=("scale", "chunk_size", "solver", "scan", "backend", "semantics", "zero_h0",
                                    "tuning", "has_decay"))
def _packed(q, path: Path, h0, cu, *, scale, chunk_size, solver, scan, backend, semantics, zero_h0=False, tuning=None,
            has_decay=True):
    """The packed computation behind the ops (validated arguments). q: [1, T, H, K], path: head-major,
    h0: [N, H, K, V], cu: int32 [N + 1] -> (o: [1, T, H, V] in the path dtype, finals: [N, H, K, V]).
    ``zero_h0``: no initial states were given (h0 is zeros; the kernels skip reading it); ``has_decay``: as
    :func:`_chunked`'s."""
    T = path.length
    qh = jnp.moveaxis(q[0].astype(path.keys.dtype), 1, 0)  # [H, T, K]
    h0h = jnp.moveaxis(h0, 0, 1)  # [H, N, K, V]
    if backend == "reference":
        one = jax.tree.map(lambda x: x[0], path)
        o, finals = jax.vmap(lambda p, qq, h: varlen.token_loop(p, qq, h, cu, scale, semantics))(one, qh, h0h)
        return jnp.moveaxis(o, 0, 1)[None], jnp.moveaxis(finals, 0, 1)
    if backend == "pallas":
        from flowssm.kernels.chunked import chunked_pallas

        chunks = varlen.pallas_chunks(varlen.num_chunks(T, cu.shape[0] - 1, chunk_size))
        lay = varlen.layout(cu, T, chunk_size, chunks=chunks)
        return chunked_pallas(q, path, None if zero_h0 else h0, scale=scale, chunk_size=chunk_size, solver=solver,
                              scan=scan, semantics=semantics, layout=lay, tuning=tuning, has_decay=has_decay)
    C = min(chunk_size, T)
    lay = varlen.layout(cu, T, C)
    o, finals = varlen.xla_chunks(varlen.to_slots(qh, lay, 1), varlen.slots_path(path, lay), h0h, lay, C, scale=scale,
                                  solver=solver, scan=scan, semantics=semantics)
    return jnp.moveaxis(varlen.from_slots(o, lay, 1), 0, 1)[None], jnp.moveaxis(finals, 0, 1)


def validate(q, path: Path, initial_state, scale, chunk_size, solver, scan, semantics):
    """Check the arguments every sequence entry point shares. Returns (solver, S0, scale)."""
    _check_query(q, path)
    _check_chunk_size(chunk_size)
    _check_choice("scan", scan, SCANS)
    _check_choice("semantics", semantics, chunks.SEMANTICS)
    solver = get_solver(solver)
    if path.transition != "scalar" and semantics != "discrete":
        raise ValueError(f"semantics: per-channel decays (g [B, T, H, K]) and dplr run 'discrete' semantics only "
                         f"(their continuous token flow has no low-rank core form), got {semantics!r}")
    check_runnable(solver, semantics=semantics, transition=path.transition)
    return solver, _initial_state(initial_state, path), _scale(scale, q.shape[-1])


def request(q, path: Path, solver: FlowSolver, chunk_size: int, semantics: str) -> backends.Request:
    """What this call asks of a backend (the kernels' operand dtype is the query's, float64 paths aside)."""
    B, H, T, R, K = path.keys.shape
    dtype = path.keys.dtype if path.keys.dtype == jnp.float64 else q.dtype
    return backends.Request(solver, semantics, chunk_size, R, K, path.values.shape[-1], dtype, path.transition)


def _refuse_additive(solver) -> None:
    """The additive solver assumes ``beta = 0`` (linear attention); a path with multiplicative steps is refused."""
    if isinstance(solver, FlowSolver) and solver.program().structure == ADDITIVE:
        raise ValueError(f"solver: {solver!r} is linear_attention's (it assumes beta = 0 and drops the "
                         f"multiplicative steps); use 'exact', 'euler', 'logode' or 'signature'")


def _check_logode_beta(solver: FlowSolver, path: Path, semantics: str) -> None:
    """LogODE under discrete semantics needs ``beta |k|^2 < 1``: a ValueError here when the inputs are
    concrete (eager calls). Under ``jit`` the solver's in-graph ``equinox.error_if`` raises at run time
    instead (on CPU a ``JaxRuntimeError`` whose text contains the same message)."""
    if solver.name != "logode" or semantics != "discrete" or isinstance(path.beta, jax.core.Tracer):
        return
    if bool(jnp.any(path.beta * jnp.sum(path.keys**2, axis=-1) >= 1)):
        raise ValueError(f"beta: {logode.DISCRETE_BETA_ERROR}")


def _check_tuning(tuning):
    """``tuning``: None or a :class:`flowssm.kernels.Tuning` (the kernels' launch and precision choices)."""
    from flowssm.kernels.launch import Tuning

    if tuning is not None and not isinstance(tuning, Tuning):
        raise TypeError(f"tuning: expected None or a flowssm.kernels.Tuning, got {tuning!r} ({type(tuning).__name__})")
    return tuning


def _run(q, path: Path, initial_state, scale, chunk_size, solver, scan, backend, semantics, cu_seqlens=None,
         names=backends.OP_NAMES, tuning=None, has_decay=True):
    if cu_seqlens is not None:
        return _run_packed(q, path, initial_state, scale, chunk_size, solver, scan, backend, semantics, cu_seqlens,
                           names, tuning, has_decay)
    solver, S0, scale = validate(q, path, initial_state, scale, chunk_size, solver, scan, semantics)
    backend = backends.check(backend, request(q, path, solver, chunk_size, semantics), names)
    _check_logode_beta(solver, path, semantics)
    o, S = _chunked(q, path, S0, scale=scale, chunk_size=chunk_size, solver=solver, scan=scan, backend=backend,
                    semantics=semantics, tuning=_check_tuning(tuning), has_decay=has_decay)
    return o.astype(q.dtype), S


def _run_packed(q, path: Path, initial_state, scale, chunk_size, solver, scan, backend, semantics, cu_seqlens, names,
                tuning=None, has_decay=True):
    """:func:`_run` for packed sequences (see :mod:`flowssm.varlen`): final states ``[N, H, K, V]``."""
    solver, _, scale = validate(q, path, None, scale, chunk_size, solver, scan, semantics)
    cu = varlen.check_cu_seqlens(cu_seqlens, q.shape[0], path.length)
    h0 = varlen.initial_states(initial_state, path, cu.shape[0] - 1)
    backend = backends.check(backend, request(q, path, solver, chunk_size, semantics), names)
    _check_logode_beta(solver, path, semantics)
    o, S = _packed(q, path, h0, cu, scale=scale, chunk_size=chunk_size, solver=solver, scan=scan,
                   backend=backend, semantics=semantics, zero_h0=initial_state is None, tuning=_check_tuning(tuning),
                   has_decay=has_decay)
    return o.astype(q.dtype), S


def delta_rule(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T H K"] | Float[Array, "B T H R K"],
    v: Float[Array, "B T H V"] | Float[Array, "B T H R V"],
    beta: Float[Array, "B T H"] | Float[Array, "B T H R"],
    g: Float[Array, "B T H"] | Float[Array, "B T H K"] | None = None,
    *,
    initial_state: Float[Array, "B H K V"] | None = None,
    scale: float | None = None,
    chunk_size: int = 64,
    solver="exact",
    scan: str = "auto",
    backend: str = "auto",
    semantics: str = "discrete",
    cu_seqlens: Int[Array, " Np1"] | None = None,
    tuning=None,
):
    """(Gated) DeltaNet / DeltaProduct: ``S <- diag(e^{g_t}) S``, then for each of the ``R`` keys
    ``S <- (I - beta k k^T) S + beta k v^T``; ``o_t = scale S_t^T q_t``. A per-channel ``g: [B, T, H, K]``
    gives Kimi Delta Attention (KDA), ``S_t = (I - beta k k^T) diag(e^{g_t}) S_{t-1} + beta k v^T``
    (discrete semantics; every solver but logode).

    Returns ``o: [B, T, H, V]`` (dtype of ``q``) and the final state ``[B, H, K, V]`` (float32, or
    float64 for float64 inputs). ``solver``: name, mapping or :class:`flowssm.solvers.FlowSolver`;
    ``scan``: "auto" (by shape: the segmented scan on the kernels when ``B H`` is small and ``T`` long,
    else sequential) | "sequential" | "associative"; ``backend``: "auto" (the kernels on a GPU when they can run
    the call, else xla) | "reference" | "xla" | "pallas" (see :mod:`flowssm.backends`);
    ``semantics``: "discrete" (the recurrence) | "continuous" (the CDE driven by the piecewise-linear
    token path). Any ``T``: a ragged last chunk is padded with identity tokens, which is exact.
    NaN/Inf inputs are not checked (that needs a host sync): they propagate to every output of their
    chunk and of later chunks of the same sequence and head.

    ``cu_seqlens`` (int ``[N + 1]``, fla's convention): ``N`` sequences packed in a ``B = 1`` batch,
    sequence ``i`` on tokens ``[cu_seqlens[i], cu_seqlens[i + 1])``; ``initial_state`` and the final state
    are then ``[N, H, K, V]``, one per sequence (empty sequences return their initial state). Every
    backend, scan, solver and semantics; one compilation serves every packing of the same ``T`` and ``N``
    (its values are checked only when concrete, see :func:`flowssm.varlen.check_cu_seqlens`).

    ``tuning``: a :class:`flowssm.kernels.Tuning`, the Pallas kernels' launch and precision choices (e.g.
    ``Tuning(score_mode="tf32")``: per-channel score products in TF32 instead of bf16); None: their
    defaults. Read where the call runs on the kernels (``backend`` "pallas", or "auto" on a GPU).
    """
    if beta is None:
        raise TypeError("beta: expected a floating-point array, got None")
    _refuse_additive(solver)
    path = make_path(k, v, beta, g)
    return _run(q, path, initial_state, scale, chunk_size, solver, scan, backend, semantics, cu_seqlens,
                tuning=tuning, has_decay=g is not None)


def linear_attention(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T H K"],
    v: Float[Array, "B T H V"],
    g: Float[Array, "B T H"] | Float[Array, "B T H K"] | None = None,
    *,
    initial_state: Float[Array, "B H K V"] | None = None,
    scale: float | None = None,
    chunk_size: int = 64,
    scan: str = "auto",
    backend: str = "auto",
    cu_seqlens: Int[Array, " Np1"] | None = None,
    tuning=None,
):
    """(Decayed) linear attention: ``S <- diag(e^{g_t}) S + k_t v_t^T``, ``o_t = scale S_t^T q_t``;
    ``g: [B, T, H]`` (scalar decay, fla's simple GLA) or ``[B, T, H, K]`` (per key channel: GLA).

    The path has no multiplicative keys (``beta = 0``, ``L = 0``), so every chunk solver is exact; the
    :class:`flowssm.solvers.Additive` solver tells the kernels so (no transfer, no products with ``w = 0``).
    ``cu_seqlens``: packed sequences and ``tuning``: the kernels' choices, as in :func:`delta_rule`.
    """
    path = linear_attention_path(k, v, g)
    return _run(q, path, initial_state, scale, chunk_size, Additive(), scan, backend, "discrete", cu_seqlens,
                tuning=tuning, has_decay=g is not None)


def _step(state, q_t, path: Path, scale, semantics):
    _check_query(q_t, path, "q_t", with_time=False)
    _check_choice("semantics", semantics, chunks.SEMANTICS)
    S = _initial_state(state, path, "state")
    scale = _scale(scale, q_t.shape[-1])

    def one(S, q, p):
        right = None if p.right_keys is None else p.right_keys[0]
        S = reference.token_update(S, p.keys[0], p.values[0], p.beta[0], p.alpha[0], p.log_decay[0], semantics, right)
        return S, scale * (q.astype(S.dtype) @ S)

    S, o = jax.vmap(jax.vmap(one))(S, q_t, path)
    return S, o.astype(q_t.dtype)


def _with_time(x, name: str, ndim: int):
    """Insert a length-1 time axis at position 1 so a single token validates like a sequence."""
    if x is None:
        return None
    check_float(name, x)
    if x.ndim not in (ndim, ndim + 1):
        raise ValueError(f"{name}: expected rank {ndim} or {ndim + 1} (rank-R), got shape {tuple(x.shape)}")
    return x[:, None]


def delta_rule_step(state, q_t, k_t, v_t, beta_t, g_t=None, *, scale=None, semantics: str = "discrete"):
    """One token of :func:`delta_rule` for decoding, constant memory.

    state: [B, H, K, V]; q_t, k_t: [B, H, K] (k_t: [B, H, R, K] for rank R); v_t: [B, H, V] or
    [B, H, R, V]; beta_t: [B, H] or [B, H, R]; g_t: [B, H], [B, H, K] (per channel) or None.
    Returns (state, o_t: [B, H, V]).
    """
    path = make_path(_with_time(k_t, "k_t", 3), _with_time(v_t, "v_t", 3), _with_time(beta_t, "beta_t", 2), _with_time(g_t, "g_t", 2))
    return _step(state, q_t, path, scale, semantics)


def linear_attention_step(state, q_t, k_t, v_t, g_t=None, *, scale=None):
    """One token of :func:`linear_attention`: ``S <- diag(e^{g}) S + k v^T``; g_t: [B, H], [B, H, K] or None.
    Returns (state, o_t: [B, H, V])."""
    path = linear_attention_path(_with_time(k_t, "k_t", 3), _with_time(v_t, "v_t", 3), _with_time(g_t, "g_t", 2))
    return _step(state, q_t, path, scale, "discrete")


DPLR_NAMES = {**backends.OP_NAMES, "transition": "dplr_delta_rule"}


def dplr_delta_rule(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T H K"],
    v: Float[Array, "B T H V"],
    a: Float[Array, "B T H K"],
    b: Float[Array, "B T H K"],
    gk: Float[Array, "B T H K"],
    *,
    initial_state: Float[Array, "B H K V"] | None = None,
    scale: float | None = None,
    chunk_size: int = 64,
    solver="exact",
    scan: str = "auto",
    backend: str = "auto",
    cu_seqlens: Int[Array, " Np1"] | None = None,
):
    """Diagonal plus low rank (fla's ``chunk_dplr_delta_rule``): ``S_t = (diag(e^{gk_t}) + b_t a_t^T) S_{t-1}
    + k_t v_t^T``, ``o_t = scale S_t^T q_t``. RWKV-7: ``a = -kappa``, ``b = kappa * a_rwkv``.

    Returns ``o: [B, T, H, V]`` (dtype of ``q``) and the final state ``[B, H, K, V]``. The path is two
    micro-steps a token (:func:`flowssm.paths.dplr_path`), so ``solver`` works as in :func:`delta_rule`
    (every solver but logode); discrete semantics; backends "reference" and "xla". ``cu_seqlens``: packed
    sequences as in :func:`delta_rule`.
    """
    _refuse_additive(solver)
    path = dplr_path(k, v, a, b, gk)
    return _run(q, path, initial_state, scale, chunk_size, solver, scan, backend, "discrete", cu_seqlens,
                names=DPLR_NAMES)


def dplr_delta_rule_step(state, q_t, k_t, v_t, a_t, b_t, gk_t, *, scale=None):
    """One token of :func:`dplr_delta_rule` for decoding: q_t, k_t, a_t, b_t, gk_t: [B, H, K], v_t: [B, H, V].
    Returns (state, o_t: [B, H, V])."""
    named = {"k_t": k_t, "v_t": v_t, "a_t": a_t, "b_t": b_t, "gk_t": gk_t}
    k_, v_, a_, b_, gk_ = (_with_time(x, name, 3) for name, x in named.items())
    return _step(state, q_t, dplr_path(k_, v_, a_, b_, gk_), scale, "discrete")

"""Generalised transitions: per-channel decay (GLA, KDA) and diagonal plus low rank (dplr).

Every chunked form is checked in float64 against the recurrences written out here (independent of the
library's token loop), for every exact solver and both scans; euler and signature against their
order; gradients; decode steps; strong decays in float32; the refusals.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import flowssm
from flowssm import chunks, flows
from flowssm.paths import Path
from flowssm.solvers import Euler, Exact, Signature
from flowssm.testing import random_inputs, rel_err

H, K, V = 2, 8, 6
KINDS = ("gla", "kda", "dplr")


def transition_inputs(seed, B, T, *, decay=(0.0, 0.5), H=H, K=K, V=V, dtype=jnp.float64):
    """(q, k, v, beta, gk, a, b, s0): unit keys, per-channel log-decays ``-U(decay)``, RWKV-7-like
    ``a = -k``, ``b = rate * k`` with ``rate`` in (0, 1)."""
    q, k, v, beta, _, s0 = random_inputs(seed, B, T, H, K, V)
    ks = jax.random.split(jax.random.PRNGKey(seed + 100), 2)
    gk = -jax.random.uniform(ks[0], (B, T, H, K), jnp.float64, *decay)
    b = k * jax.random.uniform(ks[1], (B, T, H, K), jnp.float64)
    return tuple(x.astype(dtype) for x in (q, k, v, beta, gk, -k, b, s0))


def run(kind, inputs, **options):
    q, k, v, beta, gk, a, b, s0 = inputs
    if kind == "gla":
        options.pop("solver", None)
        return flowssm.linear_attention(q, k, v, gk, initial_state=s0, **options)
    if kind == "kda":
        return flowssm.delta_rule(q, k, v, beta, gk, initial_state=s0, **options)
    return flowssm.dplr_delta_rule(q, k, v, a, b, gk, initial_state=s0, **options)


def token_step(kind, S, k, v, beta, gk, a, b):
    """The definitions, one (batch, head): S [K, V]."""
    D = jnp.exp(gk)[:, None]
    if kind == "gla":
        return D * S + jnp.outer(k, v)
    if kind == "kda":
        Sd = D * S
        return Sd - beta * jnp.outer(k, k @ Sd) + beta * jnp.outer(k, v)
    return D * S + jnp.outer(b, a @ S) + jnp.outer(k, v)


@functools.partial(jax.jit, static_argnums=0)
def explicit_recurrence(kind, inputs):
    q, k, v, beta, gk, a, b, s0 = inputs

    def one(q, k, v, beta, gk, a, b, S):  # [T, ...] of one (batch, head)
        def step(S, x):
            S = token_step(kind, S, *x[1:])
            return S, K**-0.5 * x[0] @ S

        S, o = jax.lax.scan(step, S, (q, k, v, beta, gk, a, b))
        return o, S

    heads = lambda x: jnp.moveaxis(x, 2, 1)
    o, S = jax.vmap(jax.vmap(one))(*map(heads, (q, k, v, beta, gk, a, b)), s0)
    return jnp.moveaxis(o, 1, 2), S


@pytest.fixture(scope="module")
def case():
    """T = 100: with chunk 64 a whole chunk of 4 sub-chunk blocks (decayed_scores' cross-block path)
    and a ragged one; chunk 16: whole chunks of one block."""
    return transition_inputs(0, 1, 100)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_forms_match_the_recurrence_to_1e10(case, kind):
    o_ref, S_ref = explicit_recurrence(kind, case)
    runs = [dict(backend="reference"), dict(chunk_size=64), dict(chunk_size=16, scan="associative")]
    if kind != "gla":
        runs += [dict(chunk_size=64, solver=Exact(method="doubling")), dict(chunk_size=16, solver=Exact(method="wavefront"))]
        runs += [dict(chunk_size=16, solver=Signature(depth=31 if kind == "dplr" else 15))]  # depth n - 1: exact
    for options in runs:
        o, S = run(kind, case, **options)
        assert rel_err(o, o_ref) < 1e-10 and rel_err(S, S_ref) < 1e-10, options


def chunk_of(kind, eps, seed=0):
    """One chunk (C = 4 tokens) as a path, its increments (beta, g; dplr: b, v, g) scaled by ``eps``."""
    q, k, v, beta, gk, a, b, _ = transition_inputs(seed, 1, 4)
    if kind == "dplr":
        path = flowssm.paths.dplr_path(k, eps * v, a, eps * b, eps * gk)
    else:
        path = flowssm.paths.make_path(k, v, eps * beta, eps * gk)
    return jax.tree.map(lambda x: x[0, 0], path)


@functools.partial(jax.jit, static_argnums=0)
def flow_error(solver, chunk: Path):
    """Max deviation of the solver's dense chunk flow from the exact one."""
    system = chunks.build_system(chunk, "discrete")
    exact, approx = (flows.densify(s.solve(system).flow) for s in (Exact(), solver))
    return jnp.max(jnp.abs(approx.P - exact.P)) + jnp.max(jnp.abs(approx.Q - exact.Q))


@pytest.mark.parametrize("kind", ["kda", "dplr"])
@pytest.mark.parametrize("solver", [Euler(), Signature(1), Signature(2)], ids=["euler", "sig1", "sig2"])
def test_approximate_solvers_converge_with_their_order(kind, solver):
    """Local error of the chunk flow ``O(eps^(order + 1))``: the log-log slope over eps = 0.05 .. 0.2."""
    eps = (0.05, 0.1, 0.2)
    errors = [float(flow_error(solver, chunk_of(kind, e))) for e in eps]
    slope = np.polyfit(np.log(eps), np.log(errors), 1)[0]
    assert abs(slope - (solver.order() + 1)) < 0.3, (errors, slope)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_finite_differences(kind):
    """T = 40, chunk 32: a chunk of two sub-chunk blocks and a ragged one."""
    inputs = transition_inputs(5, 1, 40, H=1, K=4, V=3)

    def f(*inputs):
        o, S = run(kind, inputs, chunk_size=32)
        return jnp.sum(jnp.sin(o)) + jnp.sum(S**2)

    check_grads(f, inputs, order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_decode_steps_equal_the_chunked_form(case, kind):
    q, k, v, beta, gk, a, b, s0 = inputs = (*(x[:, :37] for x in case[:-1]), case[-1])
    o_ref, S_ref = run(kind, inputs, chunk_size=16)
    S, outs = s0, []
    for t in range(37):
        if kind == "gla":
            S, o_t = flowssm.linear_attention_step(S, q[:, t], k[:, t], v[:, t], gk[:, t])
        elif kind == "kda":
            S, o_t = flowssm.delta_rule_step(S, q[:, t], k[:, t], v[:, t], beta[:, t], gk[:, t])
        else:
            S, o_t = flowssm.dplr_delta_rule_step(S, q[:, t], k[:, t], v[:, t], a[:, t], b[:, t], gk[:, t])
        outs.append(o_t)
    assert rel_err(jnp.stack(outs, axis=1), o_ref) < 1e-10 and rel_err(S, S_ref) < 1e-10


@pytest.mark.parametrize("kind", KINDS)
def test_strong_decays_are_stable_in_float32(kind):
    """g ~ -5 per token and channel, chunk 64: a naive ``exp(G_i) exp(-G_m)`` would overflow at exp(+320)."""
    inputs = transition_inputs(9, 1, 100, decay=(2.5, 7.5))
    o_ref, S_ref = explicit_recurrence(kind, inputs)
    o, S = run(kind, tuple(x.astype(jnp.float32) for x in inputs), chunk_size=64)
    assert bool(jnp.all(jnp.isfinite(o))) and rel_err(o, o_ref) < 1e-5 and rel_err(S, S_ref) < 1e-5


def test_hard_resets_per_channel():
    """``g = -inf`` in some channels forgets exactly those rows of the state."""
    inputs = list(transition_inputs(2, 1, 37))
    inputs[4] = inputs[4].at[:, 20, :, :3].set(-jnp.inf)
    o_ref, S_ref = explicit_recurrence("kda", tuple(inputs))
    o, S = run("kda", tuple(inputs), chunk_size=16)
    assert rel_err(o, o_ref) < 1e-10 and rel_err(S, S_ref) < 1e-10


def test_per_channel_compose_matches_dense():
    """WY composition of per-channel chunk flows equals the dense product."""
    _, k, v, beta, gk, *_ = transition_inputs(3, 1, 8)
    path = flowssm.paths.make_path(k, v, beta, gk)
    first, second = (Exact().solve(chunks.build_system(jax.tree.map(lambda x: x[0, 0, s], path), "discrete")).flow
                     for s in (slice(0, 4), slice(4, 8)))
    wy = flows.densify(flows.compose(second, first))
    dense = flows.compose(flows.densify(second), flows.densify(first))
    assert rel_err(wy.P, dense.P) < 1e-12 and rel_err(wy.Q, dense.Q) < 1e-12


def test_refusals_name_the_argument(case):
    q, k, v, beta, gk, a, b, s0 = case
    with pytest.raises(ValueError, match="semantics"):
        flowssm.delta_rule(q, k, v, beta, gk, semantics="continuous")
    with pytest.raises(ValueError, match="solver: LogODE"):
        flowssm.delta_rule(q, k, v, beta, gk, solver="logode")
    with pytest.raises(ValueError, match="solver: LogODE"):
        flowssm.dplr_delta_rule(q, k, v, a, b, gk, solver="logode")
    with pytest.raises(ValueError, match="dplr_delta_rule.*backend='pallas'"):
        flowssm.dplr_delta_rule(q, k, v, a, b, gk, backend="pallas")
    with pytest.raises(ValueError, match=r"g: expected shape \[B, T, H\]"):
        flowssm.delta_rule(q, k, v, beta, gk[..., :3])
    with pytest.raises(ValueError, match=r"gk: expected shape"):
        flowssm.dplr_delta_rule(q, k, v, a, b, gk[..., 0])
    assert isinstance(flowssm.paths.dplr_path(k, v, a, b, gk), Path)


@pytest.mark.parametrize("change, key", [
    (dict(family="kda", semantics="continuous"), "mixer.semantics"),
    (dict(family="rwkv7", solver="logode"), "mixer.solver"),
    (dict(family="rwkv7", backend="pallas"), "mixer.family"),
    (dict(family="gla", allow_neg_eigval=True), "mixer.allow_neg_eigval"),
])
def test_mixer_configs_refuse_naming_the_key(change, key):
    from flowssm.models.config import MixerConfig, validate_mixer

    with pytest.raises(ValueError, match=f"^{key}"):
        validate_mixer(MixerConfig(**{"num_heads": 2, "chunk_size": 16, **change}), 32)


@pytest.mark.parametrize("kind", ["dplr"])  # gla and kda run the same sharded path (make_path, no reading keys)
def test_sequence_parallel_matches_the_single_device_op(kind):
    """T = 37 over 2 devices (ragged), chunk 8: outputs, final state and gradients."""
    from jax.sharding import Mesh

    from flowssm import distributed

    mesh = Mesh(np.array(jax.devices()[:2]), ("seq",))
    sharded = {"gla": lambda q, k, v, beta, gk, a, b, s0, **o: distributed.sequence_parallel_linear_attention(
                   q, k, v, gk, initial_state=s0, **o),
               "kda": lambda q, k, v, beta, gk, a, b, s0, **o: distributed.sequence_parallel_delta_rule(
                   q, k, v, beta, gk, initial_state=s0, **o),
               "dplr": lambda q, k, v, beta, gk, a, b, s0, **o: distributed.sequence_parallel_dplr_delta_rule(
                   q, k, v, a, b, gk, initial_state=s0, **o)}[kind]
    inputs = transition_inputs(4, 1, 37, H=1, K=4, V=3)

    def loss(fn, inputs):
        o, S = fn(inputs)
        return jnp.sum(jnp.sin(o)) + jnp.sum(S**2)

    single = jax.value_and_grad(lambda x: loss(lambda x: run(kind, x, chunk_size=8), x))(inputs)
    parallel = jax.jit(jax.value_and_grad(lambda x: loss(lambda x: sharded(*x, mesh=mesh, chunk_size=8), x)))(inputs)
    for got, want in zip(jax.tree.leaves(parallel), jax.tree.leaves(single), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)

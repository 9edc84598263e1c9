"""Additive paths (linear attention, GLA: ``beta = 0``) on the kernels: no transfer kernel, ``w = 0`` never
formed or read, ``u = v`` read token-major. The stages against their references, the op and its gradients
against backend "xla" (float64, interpret mode on CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flowssm
from flowssm.kernels import Tuning
from flowssm.kernels.chunk_output import (chunk_output_bwd_kernel, chunk_output_bwd_reference, chunk_output_kernel,
                                          chunk_output_reference)
from flowssm.kernels.common import token_major
from flowssm.kernels.state_pass import (state_pass_bwd_kernel, state_pass_bwd_reference, state_pass_kernel,
                                        state_pass_reference)
from flowssm.solvers import Additive

B, T, H, K, V = 1, 64, 2, 16, 16
N, C = 4, 16


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def inputs(seed, per_channel: bool):
    """q, k, v, g (scalar [B, T, H] or per channel [B, T, H, K], log-decays in [-1, 0]), S0 in fla's layout."""
    r = np.random.default_rng(seed)
    g_shape = (B, T, H, K) if per_channel else (B, T, H)
    arrays = (r.normal(size=(B, T, H, K)), r.normal(size=(B, T, H, K)) / 4, r.normal(size=(B, T, H, V)),
              -r.uniform(0, 1, g_shape), r.normal(size=(B, H, K, V)))
    return tuple(jnp.asarray(x, jnp.float64) for x in arrays)


@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "per_channel"])
def test_stages_without_w_match_the_references_with_w_zero(per_channel):
    """``w=None`` and a token-major ``u`` (the values): the state pass, the output and both backward kernels equal
    their references run with ``w = 0`` and a head-major ``u``, and autodiff of the forward references."""
    r = np.random.default_rng(1)
    BH = B * H
    head = lambda *shape: jnp.asarray(r.normal(size=(BH, N, *shape)))
    tok = lambda x: token_major(x, H)
    q, keys, u, do = head(C, K), head(C, K) / 4, head(C, V), head(C, V)
    G = jnp.cumsum(-jnp.asarray(r.uniform(0, 1, (BH, N, C, K) if per_channel else (BH, N, C))), axis=2)
    S0, dS_final = jnp.asarray(r.normal(size=(BH, K, V))), jnp.asarray(r.normal(size=(BH, K, V)))
    zero = jnp.zeros_like(keys)
    static = dict(rank=1, scale=0.3)
    S_in, S_final = state_pass_kernel(tok(keys), G, None, tok(u), S0, heads=H, block_v=8)
    for a, b in zip((S_in, S_final), state_pass_reference(keys, G, zero, u, S0)):
        assert rel(a, b) < 1e-13
    o = chunk_output_kernel(tok(q), tok(keys), G, None, tok(u), S_in, heads=H, **static)
    assert rel(o, tok(chunk_output_reference(q, keys, G, zero, u, S_in, **static))) < 1e-13

    def forward(q, keys, G, u, S0):
        S_in, S_final = state_pass_reference(keys, G, zero, u, S0)
        return chunk_output_reference(q, keys, G, zero, u, S_in, **static), S_final

    dq, dk, dG, du, dS0 = jax.vjp(forward, q, keys, G, u, S0)[1]((do, dS_final))
    dS_out, dv, got_dS0 = state_pass_bwd_kernel(tok(q), tok(keys), G, None, tok(do), dS_final, heads=H, **static)
    for a, b in zip((dS_out, dv, got_dS0), state_pass_bwd_reference(q, keys, G, zero, do, dS_final, **static)):
        assert rel(a, b) < 1e-13
    assert rel(dv, du) < 1e-12 and rel(got_dS0, dS0) < 1e-12
    got = chunk_output_bwd_kernel(tok(q), tok(keys), G, tok(u), S_in, dS_out, tok(do), heads=H, block_k=8, **static)
    ref = chunk_output_bwd_reference(q, keys, G, u, S_in, dS_out, do, **static)
    for a, b, want in zip(got, (tok(ref[0]), tok(ref[1]), ref[2]), (tok(dq), tok(dk), dG)):
        assert rel(a, b) < 1e-13 and rel(a, want) < 1e-12


CASES = [("scalar", "sequential", None), ("per_channel", "sequential", None), ("scalar", "associative", None),
         ("per_channel", "associative", None), ("per_channel", "associative", Tuning(assoc="xla"))]


@pytest.mark.parametrize("decay, scan, tuning", CASES, ids=["scalar-seq", "channel-seq", "scalar-assoc",
                                                            "channel-assoc", "channel-assoc-xla"])
def test_linear_attention_on_the_kernels_matches_xla(decay, scan, tuning):
    """Outputs, final states and the gradients of q, k, v, g and the initial state equal backend "xla"
    (float64); ``associative`` runs the segmented scan (its segment flows with ``w = 0``)."""
    q, k, v, g, S0 = inputs(2, decay == "per_channel")
    r = np.random.default_rng(3)
    do, dS = jnp.asarray(r.normal(size=(B, T, H, V))), jnp.asarray(r.normal(size=(B, H, K, V)))

    def loss(backend, q, k, v, g, S0):
        o, S = flowssm.linear_attention(q, k, v, g, initial_state=S0, chunk_size=C, scan=scan, backend=backend,
                                        tuning=tuning if backend == "pallas" else None)
        return jnp.sum(o * do) + jnp.sum(S * dS), (o, S)

    got, want = (jax.grad(lambda *a: loss(b, *a), argnums=tuple(range(5)), has_aux=True)(q, k, v, g, S0)
                 for b in ("pallas", "xla"))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert rel(a, b) < 1e-10


@pytest.mark.parametrize("scan", ["sequential", "associative"])
def test_packed_linear_attention_on_the_kernels_matches_xla(scan):
    """Packed sequences (``cu_seqlens``, a boundary inside a chunk) with per-channel decays, gradients of the
    initial states included."""
    q, k, v, g, _ = inputs(4, True)
    cu = jnp.asarray([0, 20, 64], jnp.int32)
    h0 = jnp.asarray(np.random.default_rng(5).normal(size=(2, H, K, V)))
    do = jnp.asarray(np.random.default_rng(6).normal(size=(B, T, H, V)))

    def loss(backend, q, k, v, g, h0):
        o, S = flowssm.linear_attention(q, k, v, g, initial_state=h0, cu_seqlens=cu, chunk_size=C, scan=scan,
                                        backend=backend)
        return jnp.sum(o * do) + jnp.sum(S**2), (o, S)

    got, want = (jax.grad(lambda *a: loss(b, *a), argnums=tuple(range(5)), has_aux=True)(q, k, v, g, h0)
                 for b in ("pallas", "xla"))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert rel(a, b) < 1e-10


def test_linear_attention_runs_no_transfer_kernel():
    """The op's forward and backward on the kernels launch no transfer kernel (``w = 0`` is never formed)."""
    q, k, v, g, S0 = inputs(7, True)
    run = lambda q, k, v, g: flowssm.linear_attention(q, k, v, g, initial_state=S0, chunk_size=C, backend="pallas")
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(run(*a)[0]), argnums=(0, 1, 2, 3)))(q, k, v, g))
    assert "flowssm_state_pass" in jaxpr and "flowssm_chunk_output_bwd" in jaxpr
    assert "flowssm_chunk_transfer" not in jaxpr


def test_delta_rule_refuses_the_additive_solver():
    q, k, v, g, S0 = inputs(8, False)
    with pytest.raises(ValueError, match="solver: .*linear_attention"):
        flowssm.delta_rule(q, k, v, jnp.ones(q.shape[:3], q.dtype), g, solver=Additive())


def test_additive_steps_other_than_one_scale_the_values():
    """``u = a v`` with ``a != 1`` (the kernels' product and its vjp; linear attention itself has ``a = 1``): the
    kernels equal the xla path, gradients of the values and of ``a`` included."""
    from flowssm import ops
    from flowssm.paths import make_path

    q, k, v, g, S0 = inputs(9, True)
    a = jnp.asarray(np.random.default_rng(10).uniform(0.5, 2.0, q.shape[:3]))
    do = jnp.asarray(np.random.default_rng(11).normal(size=(B, T, H, V)))

    def loss(backend, k, v, a):
        path = make_path(k, v, jnp.zeros_like(a), g, alpha=a)
        o, S = ops._chunked(q, path, S0, scale=0.25, chunk_size=C, solver=Additive(), scan="sequential",
                            backend=backend, semantics="discrete")
        return jnp.sum(o * do) + jnp.sum(S**2)

    got, want = (jax.grad(lambda *x: loss(b, *x), argnums=(0, 1, 2))(k, v, a) for b in ("pallas", "xla"))
    for x, y in zip(got, want):
        assert rel(x, y) < 1e-10

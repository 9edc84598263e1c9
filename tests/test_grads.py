"""Gradients w.r.t. q, k, v, beta, g and initial_state match finite differences (float64)."""

import jax
import jax.numpy as jnp
import pytest
from jax.test_util import check_grads

import flowssm
from flowssm.testing import random_inputs


@pytest.mark.parametrize("R", [1, 2])
@pytest.mark.parametrize("scan", ["sequential", "associative"])
def test_grads_match_finite_differences(scan, R):
    q, k, v, beta, g, s0 = random_inputs(5, 1, 21, 1, 4, 3, R)

    def f(q, k, v, beta, g, s0):
        o, S = flowssm.delta_rule(q, k, v, beta, g, initial_state=s0, chunk_size=8, scan=scan)
        return jnp.sum(jnp.sin(o)) + jnp.sum(S**2)

    check_grads(f, (q, k, v, beta, g, s0), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_grads_continuous_semantics():
    q, k, v, beta, g, s0 = random_inputs(6, 1, 9, 1, 3, 2, 2)

    def f(k, beta, g, s0):
        o, S = flowssm.delta_rule(q, k, v, beta, g, initial_state=s0, chunk_size=4, semantics="continuous")
        return jnp.sum(jnp.sin(o)) + jnp.sum(S**2)

    check_grads(f, (k, beta, g, s0), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_vmap_over_an_extra_axis_equals_loop():
    q, k, v, beta, g, s0 = random_inputs(8, 3, 16, 1, 4, 3)
    f = lambda q, k, v, b, g, s: flowssm.delta_rule(q[None], k[None], v[None], b[None], g[None], initial_state=s[None], chunk_size=8)[0][0]
    batched = jax.vmap(f)(q, k, v, beta, g, s0)
    looped = jnp.stack([f(q[i], k[i], v[i], beta[i], g[i], s0[i]) for i in range(3)])
    assert jnp.allclose(batched, looped, atol=1e-12)

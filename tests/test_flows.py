"""The flow type: WY and dense representations agree, composition is associative and is the scan law."""

import jax
import jax.numpy as jnp

import flowssm
from flowssm import flows as F
from flowssm.chunks import build_system
from flowssm.paths import chunk_path, make_path
from flowssm.solvers import Exact
from flowssm.testing import random_inputs, rel_err

K, V = 5, 3


def random_wy(seed, n):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    return F.WYFlow(
        -jax.random.uniform(ks[0], ()),
        jax.random.normal(ks[1], (n, K)),
        jax.random.normal(ks[2], (n, K)) * 0.3,
        jax.random.normal(ks[3], (n, V)),
    )


def test_wy_apply_equals_dense_apply():
    f = random_wy(0, 4)
    S = jax.random.normal(jax.random.PRNGKey(9), (K, V))
    assert rel_err(F.apply(f, S), F.apply(F.densify(f), S)) < 1e-13


def test_wy_composition_equals_dense_composition():
    a, b = random_wy(1, 3), random_wy(2, 4)
    wy = F.compose(b, a)
    assert wy.keys.shape == (7, K)
    dense = F.compose(F.densify(b), F.densify(a))
    assert rel_err(F.densify(wy).P, dense.P) < 1e-13 and rel_err(F.densify(wy).Q, dense.Q) < 1e-13


def test_composition_is_associative():
    a, b, c = (F.densify(random_wy(s, 3)) for s in (3, 4, 5))
    left = F.compose(c, F.compose(b, a))
    right = F.compose(F.compose(c, b), a)
    assert rel_err(left.P, right.P) < 1e-13 and rel_err(left.Q, right.Q) < 1e-13


def test_identity_is_neutral():
    a = F.densify(random_wy(6, 3))
    e = F.identity((), K, V, jnp.float64)
    for c in (F.compose(a, e), F.compose(e, a)):
        assert rel_err(c.P, a.P) < 1e-15 and rel_err(c.Q, a.Q) < 1e-15


def test_composed_chunk_flows_give_the_final_state():
    """Compose the exact flows of 4 chunks by hand: S_T = (F_4 o F_3 o F_2 o F_1)(S_0)."""
    q, k, v, beta, g, s0 = random_inputs(12, 1, 32, 1, K, V, R=2)
    path = chunk_path(make_path(k, v, beta, g), 8)
    total = None
    for c in range(4):
        chunk = jax.tree.map(lambda x: x[0, 0, c], path)
        flow = Exact().solve(build_system(chunk, "discrete")).flow
        total = flow if total is None else F.compose(flow, total)
    _, S_ref = flowssm.delta_rule(q, k, v, beta, g, initial_state=s0, backend="reference")
    assert rel_err(F.apply(total, s0[0, 0]), S_ref[0, 0]) < 1e-12

"""Continuous semantics (CDE driven by the piecewise-linear token path) agrees with diffrax."""

import jax
import jax.numpy as jnp
import pytest

import flowssm
from flowssm.paths import make_path
from flowssm.reference import diffrax_solve
from flowssm.testing import random_inputs, rel_err


@pytest.mark.parametrize("R", [1, 3])
def test_continuous_semantics_matches_diffrax(R):
    T, K, V = 12, 3, 2
    q, k, v, beta, g, s0 = random_inputs(21, 1, T, 1, K, V, R)
    head = lambda x: x[0, 0]
    path = jax.tree.map(head, make_path(k, v, beta, g))
    o_dfx, S_dfx = diffrax_solve(path, q[0, :, 0], s0[0, 0], K**-0.5)
    for options in (dict(backend="reference"), dict(chunk_size=4), dict(chunk_size=4, scan="associative")):
        o, S = flowssm.delta_rule(q, k, v, beta, g, initial_state=s0, semantics="continuous", **options)
        assert rel_err(o[0, :, 0], o_dfx) < 1e-6 and rel_err(S[0, 0], S_dfx) < 1e-6, options


def test_continuous_rank1_is_householder_with_transformed_beta():
    """For one unit key, exp(-beta k k^T) = I - (1 - e^{-beta}) k k^T."""
    q, k, v, beta, g, s0 = random_inputs(22, 1, 16, 1, 4, 4, gated=False)
    o_c, S_c = flowssm.delta_rule(q, k, v, beta, initial_state=s0, semantics="continuous", chunk_size=8)
    beta_d = 1 - jnp.exp(-beta)
    # additive part: phi1(-beta) beta k v^T = (1 - e^{-beta}) k v^T, the same step size
    o_d, S_d = flowssm.delta_rule(q, k, v, beta_d, initial_state=s0, chunk_size=8)
    assert rel_err(S_c, S_d) < 1e-12 and rel_err(o_c, o_d) < 1e-12

"""Every backend x scan x rank x gate x beta range x T x chunk size agrees with the token loop.

Gates and beta ranges ride on the batch axis (rows: ungated/gated x beta in (0,1]/(0,2]) so each
compiled shape covers all four; ``g = None`` is checked to equal ``g = 0`` separately. At T = 37 (float64)
the recurrent step, iterated, is checked against the chunked op too.
"""

import jax.numpy as jnp
import pytest

import flowssm
from flowssm.testing import random_inputs, rel_err

TOL = {jnp.float64: 1e-10, jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
H, K, V = 2, 8, 6


def batch_of_cases(T, R, dtype):
    """B = 4 rows: (ungated, beta<=1), (ungated, beta<=2), (gated, beta<=1), (gated, beta<=2)."""
    q, k, v, beta, g, s0 = random_inputs(T * 10 + R, 4, T, H, K, V, R, dtype=jnp.float64)
    beta = beta.at[0::2].multiply(0.5)  # rows 0, 2: beta in (0, 1]
    g = g.at[:2].set(0.0)  # rows 0, 1: ungated
    return tuple(x.astype(dtype) for x in (q, k, v, beta, g, s0))


@pytest.fixture(scope="module")
def references():
    return {}


def reference(references, T, R, dtype):
    key = (T, R, dtype)
    if key not in references:
        q, k, v, beta, g, s0 = batch_of_cases(T, R, dtype)
        # the oracle: token loop in float64 on the (possibly rounded) inputs
        up = [x.astype(jnp.float64) for x in (q, k, v, beta, g, s0)]
        references[key] = flowssm.delta_rule(*up[:5], initial_state=up[5], backend="reference")
    return references[key]


# float64 runs every T (1 token; ragged, one chunk at C = 64; a multiple of both chunk sizes (rank 1: the rank
# changes no padding); many chunks, ragged). float32 and bfloat16 change the casts and tolerances, not the
# chunking: they run the ragged T = 37 only (long float32 sequences: tests/test_long_sequence.py).
CASES = [(R, T, dtype) for dtype in (jnp.float64, jnp.float32, jnp.bfloat16) for T in (1, 37, 64, 200) for R in (1, 3)
         if (dtype == jnp.float64 and (T, R) != (64, 3)) or T == 37]


NAMES = {jnp.float64: "f64", jnp.float32: "f32", jnp.bfloat16: "bf16"}


@pytest.mark.parametrize("R, T, dtype", CASES, ids=lambda x: NAMES.get(x, x))
def test_chunked_matches_token_loop(references, dtype, T, R):
    q, k, v, beta, g, s0 = batch_of_cases(T, R, dtype)
    o_ref, S_ref = reference(references, T, R, dtype)
    runs = [dict(backend="reference")]
    runs += [dict(backend="xla", scan=s, chunk_size=c) for s in ("sequential", "associative") for c in (16, 64)]
    for options in runs:
        o, S = flowssm.delta_rule(q, k, v, beta, g, initial_state=s0, **options)
        assert o.dtype == dtype and o.shape == (4, T, H, V)
        assert S.dtype == jnp.promote_types(dtype, jnp.float32)
        assert rel_err(o, o_ref) < TOL[dtype], options
        assert rel_err(S, S_ref) < TOL[dtype], options
    if dtype == jnp.float64 and T == 37:  # the recurrent step iterated equals the chunked op (the last run's)
        S_t, outs = s0, []
        for t in range(T):
            S_t, o_t = flowssm.delta_rule_step(S_t, q[:, t], k[:, t], v[:, t], beta[:, t], g[:, t])
            outs.append(o_t)
        assert rel_err(jnp.stack(outs, axis=1), o) < 1e-10 and rel_err(S_t, S) < 1e-10


def test_ungated_none_equals_zero_gate():
    q, k, v, beta, _, s0 = random_inputs(0, 1, 37, H, K, V)
    a = flowssm.delta_rule(q, k, v, beta, None, initial_state=s0, chunk_size=16)
    b = flowssm.delta_rule(q, k, v, beta, jnp.zeros(beta.shape), initial_state=s0, chunk_size=16)
    assert rel_err(a[0], b[0]) < 1e-14 and rel_err(a[1], b[1]) < 1e-14


@pytest.mark.parametrize("scan", ["sequential", "associative"])
def test_linear_attention_matches_its_token_loop(scan):
    q, k, v, _, g, s0 = random_inputs(3, 2, 37, H, K, V)
    o_ref, S_ref = flowssm.linear_attention(q, k, v, g, initial_state=s0, backend="reference")
    o, S = flowssm.linear_attention(q, k, v, g, initial_state=s0, chunk_size=16, scan=scan)
    assert rel_err(o, o_ref) < 1e-10 and rel_err(S, S_ref) < 1e-10
    # explicit definition: S_t = e^{g_t} S_{t-1} + k_t v_t^T
    Sd = s0[0, 0]
    for t in range(37):
        Sd = jnp.exp(g[0, t, 0]) * Sd + jnp.outer(k[0, t, 0], v[0, t, 0])
    assert rel_err(S[0, 0], Sd) < 1e-12
    S1, o1 = flowssm.linear_attention_step(s0, q[:, 0], k[:, 0], v[:, 0], g[:, 0])
    assert rel_err(o1, o_ref[:, 0]) < 1e-12


def test_linear_attention_bf16():
    q, k, v, _, g, s0 = random_inputs(4, 2, 64, H, K, V, dtype=jnp.bfloat16)
    up = [x.astype(jnp.float64) for x in (q, k, v, g)]
    o_ref, _ = flowssm.linear_attention(*up, initial_state=s0.astype(jnp.float64), backend="reference")
    o, _ = flowssm.linear_attention(q, k, v, g, initial_state=s0, chunk_size=16)
    assert o.dtype == jnp.bfloat16 and rel_err(o, o_ref) < 2e-2


def test_delta_rule_is_a_householder_cascade():
    """Explicit definition check, independent of the library's token loop: R = 2, one head."""
    q, k, v, beta, g, s0 = random_inputs(11, 1, 9, 1, 4, 3, R=2)
    S = s0[0, 0]
    for t in range(9):
        S = jnp.exp(g[0, t, 0]) * S
        for j in range(2):
            kj = k[0, t, 0, j]
            S = (jnp.eye(4) - beta[0, t, 0, j] * jnp.outer(kj, kj)) @ S + beta[0, t, 0, j] * jnp.outer(kj, v[0, t, 0, j])
    o, S_lib = flowssm.delta_rule(q, k, v, beta, g, initial_state=s0, chunk_size=4)
    assert rel_err(S_lib[0, 0], S) < 1e-12
    assert abs(float(o[0, -1, 0] @ jnp.ones(3)) - float(0.5 * q[0, -1, 0] @ S @ jnp.ones(3))) < 1e-12

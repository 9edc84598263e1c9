"""Bad input raises ValueError/TypeError naming the argument, the expected and the given value."""

import jax.numpy as jnp
import numpy as np
import pytest

import flowssm

B, T, H, K, V, R = 2, 5, 3, 4, 6, 2
f32 = jnp.float32
q = jnp.ones((B, T, H, K), f32)
k = jnp.ones((B, T, H, K), f32)
v = jnp.ones((B, T, H, V), f32)
beta = jnp.ones((B, T, H), f32)
g = jnp.zeros((B, T, H), f32)
kR, vR, betaR = jnp.ones((B, T, H, R, K), f32), jnp.ones((B, T, H, R, V), f32), jnp.ones((B, T, H, R), f32)
S = jnp.zeros((B, H, K, V), f32)


def dr(**kw):
    args = dict(q=q, k=k, v=v, beta=beta, g=None)
    args.update({a: kw.pop(a) for a in list(kw) if a in args})
    return flowssm.delta_rule(args["q"], args["k"], args["v"], args["beta"], args["g"], **kw)


CASES = {
    "q wrong rank": (lambda: dr(q=jnp.ones((B, T, K), f32)), ValueError, ["q", "[B, T, H, K]", "(2, 5, 4)"]),
    "q wrong K": (lambda: dr(q=jnp.ones((B, T, H, K + 1), f32)), ValueError, ["q", "(2, 5, 3, 4)", "(2, 5, 3, 5)"]),
    "q wrong B": (lambda: dr(q=jnp.ones((B + 1, T, H, K), f32)), ValueError, ["q", "(3, 5, 3, 4)"]),
    "q wrong T": (lambda: dr(q=jnp.ones((B, T + 1, H, K), f32)), ValueError, ["q", "(2, 6, 3, 4)"]),
    "k wrong rank": (lambda: dr(k=jnp.ones((B, T, K), f32)), ValueError, ["k", "[B, T, H, K]", "(2, 5, 4)"]),
    "v wrong H": (lambda: dr(v=jnp.ones((B, T, H + 1, V), f32)), ValueError, ["v", "(2, 5, 3)", "(2, 5, 4, 6)"]),
    "v wrong T": (lambda: dr(v=jnp.ones((B, T + 2, H, V), f32)), ValueError, ["v", "(2, 7, 3, 6)"]),
    "v rank-R with rank-1 k": (lambda: dr(v=vR), ValueError, ["v", "[B, T, H, V]", "(2, 5, 3, 2, 6)"]),
    "v rank-1 with rank-R k": (lambda: dr(k=kR, beta=betaR), ValueError, ["v", "[B, T, H, R, V]"]),
    "R mismatch k/v": (lambda: dr(k=kR, v=jnp.ones((B, T, H, R + 1, V), f32), beta=betaR), ValueError, ["v", "(2, 5, 3, 2)", "(2, 5, 3, 3, 6)"]),
    "beta shape vs rank-1 k": (lambda: dr(beta=betaR), ValueError, ["beta", "[B, T, H]", "(2, 5, 3, 2)"]),
    "beta shape vs rank-R k": (lambda: dr(k=kR, v=vR), ValueError, ["beta", "[B, T, H, R]", "(2, 5, 3)"]),
    "R mismatch beta": (lambda: dr(k=kR, v=vR, beta=jnp.ones((B, T, H, R + 1), f32)), ValueError, ["beta", "(2, 5, 3, 2)", "(2, 5, 3, 3)"]),
    "g wrong shape": (lambda: dr(g=jnp.zeros((B, T), f32)), ValueError, ["g", "[B, T, H]", "(2, 5)"]),
    "unknown solver": (lambda: dr(solver="rk4"), ValueError, ["solver", "exact", "'rk4'"]),
    "solver wrong type": (lambda: dr(solver=3), TypeError, ["solver", "int"]),
    "unknown scan": (lambda: dr(scan="parallel"), ValueError, ["scan", "sequential", "'parallel'"]),
    "unknown backend": (lambda: dr(backend="cuda"), ValueError, ["backend", "xla", "'cuda'"]),
    "unknown semantics": (lambda: dr(semantics="ito"), ValueError, ["semantics", "discrete", "'ito'"]),
    "chunk_size zero": (lambda: dr(chunk_size=0), ValueError, ["chunk_size", "positive int", "0"]),
    "chunk_size negative": (lambda: dr(chunk_size=-4), ValueError, ["chunk_size", "-4"]),
    "chunk_size float": (lambda: dr(chunk_size=16.0), ValueError, ["chunk_size", "16.0"]),
    "integer q": (lambda: dr(q=jnp.ones((B, T, H, K), jnp.int32)), TypeError, ["q", "floating", "int32"]),
    "integer k": (lambda: dr(k=jnp.ones((B, T, H, K), jnp.int32)), TypeError, ["k", "floating", "int32"]),
    "bool beta": (lambda: dr(beta=jnp.ones((B, T, H), bool)), TypeError, ["beta", "floating", "bool"]),
    "beta None": (lambda: dr(beta=None), TypeError, ["beta", "None"]),
    "list input": (lambda: dr(v=[[1.0]]), TypeError, ["v", "list"]),
    "initial_state wrong shape": (lambda: dr(initial_state=jnp.zeros((B, H, V, K), f32)), ValueError, ["initial_state", "[B, H, K, V]", "(2, 3, 6, 4)"]),
    "initial_state integer": (lambda: dr(initial_state=jnp.zeros((B, H, K, V), jnp.int32)), TypeError, ["initial_state", "int32"]),
    "scale not finite": (lambda: dr(scale=float("nan")), ValueError, ["scale", "nan"]),
    "signature depth": (lambda: dr(solver={"name": "signature", "depth": -1}), ValueError, ["depth", "-1"]),
    "exact method": (lambda: dr(solver=flowssm.Exact), TypeError, ["solver"]),
    "tuning as a string": (lambda: dr(tuning="tf32"), TypeError, ["tuning", "Tuning", "'tf32'"]),
    "step state shape": (lambda: flowssm.delta_rule_step(jnp.zeros((B, H, K, K), f32), q[:, 0], k[:, 0], v[:, 0], beta[:, 0]), ValueError, ["state", "[B, H, K, V]", "(2, 3, 4, 4)"]),
    "step q_t shape": (lambda: flowssm.delta_rule_step(S, q, k[:, 0], v[:, 0], beta[:, 0]), ValueError, ["q_t", "[B, H, K]", "(2, 5, 3, 4)"]),
    "linear attention g": (lambda: flowssm.linear_attention(q, k, v, jnp.zeros((B, H), f32)), ValueError, ["g", "[B, T, H]"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_a_clear_error(name):
    fn, exc, fragments = CASES[name]
    with pytest.raises(exc) as info:
        fn()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_nan_policy_propagates_not_checked():
    """Documented policy: values are not scanned (no host sync); a NaN in token t reaches every output of
    t's chunk and of later chunks of that sequence and head, nothing else."""
    bad = np.ones((B, T, H, V), np.float32)
    bad[0, 2, 0, 0] = np.nan
    o, _ = flowssm.delta_rule(q, k / 2, jnp.asarray(bad), beta * 0.5, chunk_size=2)
    assert not jnp.isnan(o[0, :2]).any() and jnp.isnan(o[0, 2:, 0]).any() and not jnp.isnan(o[1]).any()

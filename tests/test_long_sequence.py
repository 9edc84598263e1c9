"""T = 65536, float32, beta in (0, 2]: chunked xla stays within 1e-4 of the token loop (no blow-up)."""

import jax.numpy as jnp
import pytest

import flowssm
from flowssm.testing import random_inputs, rel_err


@pytest.mark.slow
def test_long_sequence_float32_no_blow_up():
    q, k, v, beta, g, s0 = random_inputs(31, 1, 65536, 2, 64, 64, beta_max=2.0, gated=False, dtype=jnp.float32)
    o_ref, S_ref = flowssm.delta_rule(q, k, v, beta, backend="reference")
    assert jnp.isfinite(o_ref).all()
    for scan in ("sequential", "associative"):
        o, S = flowssm.delta_rule(q, k, v, beta, chunk_size=64, scan=scan)
        assert rel_err(o, o_ref) <= 1e-4, scan
        assert rel_err(S, S_ref) <= 1e-4, scan

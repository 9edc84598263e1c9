"""Sequence-parallel delta_rule over 2, 4 and 8 host devices equals the single-device op (float64)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

import flowssm
from flowssm.distributed import sequence_parallel_delta_rule, sequence_parallel_linear_attention
from flowssm.testing import random_inputs

TOL = 1e-10
# (T, R, gated): T = 37 is ragged for every device count; T = 32 splits into whole chunks of 4 on 2, 4, 8 devices.
CASES = {"rank1_gated_ragged": (37, 1, True), "rankR_even": (32, 2, False)}


def seq_mesh(D: int, axis_type=AxisType.Auto) -> Mesh:
    return Mesh(np.array(jax.devices()[:D]), ("seq",), axis_types=(axis_type,))


def loss_and_grads(op, inputs):
    """Value, (o, S) and gradients w.r.t. q, k, v, beta, g (if any) and initial_state, under jit."""

    def loss(inputs):
        q, k, v, beta, g, s0 = inputs
        o, S = op(q, k, v, beta, g, initial_state=s0)
        return jnp.sum(jnp.sin(o)) + jnp.sum(S**2), (o, S)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(inputs)


def assert_close(actual, expected):
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=TOL)


@functools.cache
def single_device(case: str):
    T, R, gated = CASES[case]
    inputs = random_inputs(0, 2, T, 2, 4, 5, R, gated=gated)
    return inputs, loss_and_grads(functools.partial(flowssm.delta_rule, chunk_size=4), inputs)


def check_against_single_device(mesh, case):
    inputs, expected = single_device(case)
    assert_close(loss_and_grads(functools.partial(sequence_parallel_delta_rule, mesh=mesh, chunk_size=4), inputs), expected)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("D", [2, 4, 8])
def test_outputs_final_state_and_gradients_match_delta_rule(D, case):
    check_against_single_device(seq_mesh(D), case)


def test_explicit_mesh_under_set_mesh_matches_delta_rule():
    mesh = seq_mesh(4, AxisType.Explicit)
    with jax.set_mesh(mesh):
        check_against_single_device(mesh, "rank1_gated_ragged")


@pytest.mark.parametrize("T, chunk_size", [(37, 8), (10, 16)])
def test_approximate_solver_keeps_the_delta_rule_chunk_grid(T, chunk_size):
    """Euler's result depends on chunk boundaries; (10, 16) leaves three of four devices all padding."""
    q, k, v, beta, g, s0 = random_inputs(1, 1, T, 2, 4, 4, gated=True)
    kw = dict(initial_state=s0, chunk_size=chunk_size, solver="euler")
    o, S = sequence_parallel_delta_rule(q, k, v, beta, g, mesh=seq_mesh(4), **kw)
    o_ref, S_ref = flowssm.delta_rule(q, k, v, beta, g, **kw)
    assert_close((o, S), (o_ref, S_ref))
    o_exact, _ = flowssm.delta_rule(q, k, v, beta, g, **{**kw, "solver": "exact"})
    assert float(jnp.max(jnp.abs(o_exact - o))) > 1e-4  # the solver is really approximate


def test_associative_scan_matches_delta_rule_with_gradients():
    """Two chunks per device: the associative scan's backward pass has zero-sized residuals."""
    inputs = random_inputs(2, 1, 29, 2, 4, 3, 2)
    kw = dict(chunk_size=4, scan="associative")
    got = loss_and_grads(functools.partial(sequence_parallel_delta_rule, mesh=seq_mesh(4), **kw), inputs)
    assert_close(got, loss_and_grads(functools.partial(flowssm.delta_rule, **kw), inputs))


def test_continuous_semantics_matches_delta_rule():
    q, k, v, beta, g, s0 = random_inputs(5, 1, 19, 2, 4, 3, 3, beta_max=1.0)
    kw = dict(initial_state=s0, chunk_size=4, semantics="continuous")
    got = sequence_parallel_delta_rule(q, k, v, beta, g, mesh=seq_mesh(2), **kw)
    assert_close(got, flowssm.delta_rule(q, k, v, beta, g, **kw))


def test_linear_attention_matches_single_device():
    q, k, v, _, g, s0 = random_inputs(3, 2, 21, 2, 4, 6, gated=True)
    kw = dict(initial_state=s0, chunk_size=4)
    got = sequence_parallel_linear_attention(q, k, v, g, mesh=seq_mesh(2), **kw)
    assert_close(got, flowssm.linear_attention(q, k, v, g, **kw))


def test_bfloat16_inputs_give_bfloat16_outputs_and_float32_state():
    q, k, v, beta, g, _ = random_inputs(4, 1, 24, 2, 8, 8, gated=True, dtype=jnp.bfloat16)
    o, S = sequence_parallel_delta_rule(q, k, v, beta, g, mesh=seq_mesh(2), chunk_size=4)
    o_ref, S_ref = flowssm.delta_rule(q, k, v, beta, g, chunk_size=4)
    assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(o_ref, np.float32), atol=2e-2)
    np.testing.assert_allclose(S, S_ref, atol=1e-4)


def test_invalid_arguments_name_the_argument():
    q, k, v, beta, g, s0 = random_inputs(0, 1, 8, 1, 4, 4)
    mesh = seq_mesh(2)
    with pytest.raises(ValueError, match="axis_name.*'seq'.*'time'"):
        sequence_parallel_delta_rule(q, k, v, beta, mesh=mesh, axis_name="time")
    with pytest.raises(TypeError, match="mesh: expected a jax.sharding.Mesh"):
        sequence_parallel_delta_rule(q, k, v, beta, mesh=jax.devices()[:2])
    with pytest.raises(ValueError, match="q: expected shape"):
        sequence_parallel_delta_rule(q[:, :4], k, v, beta, mesh=mesh)
    with pytest.raises(ValueError, match="initial_state: expected shape"):
        sequence_parallel_delta_rule(q, k, v, beta, mesh=mesh, initial_state=s0[..., :2])
    with pytest.raises(TypeError, match="beta"):
        sequence_parallel_delta_rule(q, k, v, None, mesh=mesh)

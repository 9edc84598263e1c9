"""Packed sequences (``cu_seqlens``): every backend and scan against running each sequence alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flowssm
from flowssm import ops, varlen
from flowssm.kernels.state_pass import (state_pass_bwd_kernel, state_pass_bwd_reference, state_pass_kernel,
                                        state_pass_reference)
from flowssm.solvers import Euler, LogODE, Signature
from flowssm.testing import random_inputs, rel_err

H, K, V, T = 2, 8, 6, 37
CU = jnp.array([0, 5, 5, 21, 37], jnp.int32)  # an empty sequence; boundaries off the chunk grid (C = 16)
RUNS = [dict(backend="reference"), dict(backend="xla", scan="sequential", chunk_size=16),
        dict(backend="xla", scan="associative", chunk_size=16), dict(backend="pallas", scan="sequential", chunk_size=16),
        dict(backend="pallas", scan="associative", chunk_size=16)]


def packed_inputs(R=1, seed=0):
    q, k, v, beta, g, _ = random_inputs(seed, 1, T, H, K, V, R)
    h0 = jax.random.normal(jax.random.PRNGKey(seed + 1), (CU.shape[0] - 1, H, K, V), jnp.float64)
    return q, k, v, beta, g, h0


def one_by_one(op, xs, h0, cu=CU, **options):
    """Each sequence alone (empty ones return their initial state), concatenated like the packed call."""
    outs, finals = [], []
    for i in range(cu.shape[0] - 1):
        a, b = int(cu[i]), int(cu[i + 1])
        if a == b:
            finals.append(h0[i])
            continue
        o, S = op(*(x[:, a:b] for x in xs), initial_state=h0[i : i + 1], **options)
        outs.append(o)
        finals.append(S[0])
    return jnp.concatenate(outs, axis=1), jnp.stack(finals)


def test_packed_matches_each_sequence_alone():
    """Outputs, final states and the gradients w.r.t. every input and the initial states (one vjp a run)."""
    q, k, v, beta, g, h0 = packed_inputs()
    alone = lambda *a: one_by_one(flowssm.delta_rule, a[:5], a[5], backend="reference")
    (o_ref, S_ref), vjp_ref = jax.vjp(alone, q, k, v, beta, g, h0)
    cotangents = tuple(jax.random.normal(jax.random.PRNGKey(s), x.shape, jnp.float64) for s, x in ((7, o_ref), (8, S_ref)))
    grads_ref = vjp_ref(cotangents)
    o, S = flowssm.delta_rule(q, k, v, beta, g, initial_state=h0, cu_seqlens=CU, backend="reference")
    assert rel_err(o, o_ref) < 1e-10 and rel_err(S, S_ref) < 1e-10
    for options in RUNS[1::2]:  # xla sequential, pallas sequential
        packed = lambda *a: flowssm.delta_rule(*a[:5], initial_state=a[5], cu_seqlens=CU, **options)
        (o, S), vjp = jax.vjp(packed, q, k, v, beta, g, h0)
        assert o.shape == (1, T, H, V) and S.shape == (4, H, K, V)
        assert rel_err(o, o_ref) < 1e-10 and rel_err(S, S_ref) < 1e-10, options
        for name, a, b in zip(("q", "k", "v", "beta", "g", "initial_state"), vjp(cotangents), grads_ref):
            assert rel_err(a, b) < 1e-10, (options, name)


def test_pallas_packed_gradients_of_the_outputs_alone():
    """A loss of the outputs alone: the final states' cotangent is a symbolic zero, which the pallas reverse
    passes never read; both scans (the segmented one cuts the cotangent at each sequence start)."""
    q, k, v, beta, g, h0 = packed_inputs()
    alone = lambda *a: one_by_one(flowssm.delta_rule, a[:5], a[5], backend="reference")
    (o_ref, S_ref), vjp_ref = jax.vjp(alone, q, k, v, beta, g, h0)
    do = jax.random.normal(jax.random.PRNGKey(7), o_ref.shape, jnp.float64)
    grads_ref = vjp_ref((do, jnp.zeros_like(S_ref)))
    for options in RUNS[3:]:
        loss = lambda *a: jnp.sum(do * flowssm.delta_rule(*a[:5], initial_state=a[5], cu_seqlens=CU, **options)[0])
        for name, a, b in zip(("q", "k", "v", "beta", "g", "initial_state"),
                              jax.grad(loss, argnums=range(6))(q, k, v, beta, g, h0), grads_ref):
            assert rel_err(a, b) < 1e-10, (options, name)
    # no initial states: zeros, which the kernels never read (their backward: the spans kernel test)
    o, S = flowssm.delta_rule(q, k, v, beta, g, cu_seqlens=CU, **RUNS[3])
    o_ref, S_ref = alone(q, k, v, beta, g, jnp.zeros_like(h0))
    assert rel_err(o, o_ref) < 1e-10 and rel_err(S, S_ref) < 1e-10


def test_rank_r_associative_matches_packed_token_loop():
    """Rank 3 through the associative scans of xla and pallas (the segmented scan: 6 chunks, one a segment,
    sequences across segment boundaries), values and gradients, against the packed token loop, itself
    checked against running each sequence alone above."""
    q, k, v, beta, g, h0 = packed_inputs(R=3)
    runs = [jax.vjp(lambda *a: flowssm.delta_rule(*a[:5], initial_state=a[5], cu_seqlens=CU, **options),
                    q, k, v, beta, g, h0) for options in (RUNS[0], RUNS[2], RUNS[4])]
    (reference, vjp_ref), *others = runs
    for out, vjp in others:
        for a, b in zip((*out, *vjp(reference)), (*reference, *vjp_ref(reference))):
            assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("solver, semantics", [(Euler(), "discrete"), (Signature(depth=2), "continuous"),
                                               (LogODE(), "discrete")], ids=str)
def test_every_solver_and_semantics_packed_equals_alone(solver, semantics):
    """Sequences start on the chunk grid, so even approximate solvers see the chunks they see alone: two
    sequences of 11 tokens (and an empty one) each fill one chunk of 16 with 5 identity tokens, while alone
    they are one chunk of 11 (``C = min(chunk_size, T)``)."""
    q, k, v, beta, g, _ = random_inputs(5, 1, 22, H, K, V)
    h0 = jax.random.normal(jax.random.PRNGKey(6), (3, H, K, V), jnp.float64)
    beta = beta * 0.4  # LogODE's discrete semantics needs beta |k|^2 < 1
    options = dict(solver=solver, semantics=semantics, chunk_size=16)
    two = lambda x: jnp.concatenate([x[:, :11], x[:, 11:]])  # the two sequences as a batch of 2
    o_ref, S_ref = flowssm.delta_rule(*map(two, (q, k, v, beta, g)), initial_state=h0[::2], **options)
    cu = jnp.array([0, 11, 11, 22], jnp.int32)
    o, S = flowssm.delta_rule(q, k, v, beta, g, initial_state=h0, cu_seqlens=cu, **options)
    assert rel_err(o, o_ref.reshape(1, 22, H, V)) < 1e-10
    assert rel_err(S[::2], S_ref) < 1e-10 and bool(jnp.all(S[1] == h0[1]))


def test_linear_attention_packed():
    q, k, v, _, g, h0 = packed_inputs()
    o_ref, S_ref = one_by_one(flowssm.linear_attention, (q, k, v, g), h0, backend="reference")
    o, S = flowssm.linear_attention(q, k, v, g, initial_state=h0, cu_seqlens=CU, chunk_size=16)
    assert rel_err(o, o_ref) < 1e-10 and rel_err(S, S_ref) < 1e-10


def test_one_compilation_serves_every_packing():
    q, k, v, beta, g, h0 = packed_inputs()
    run = lambda cu: flowssm.delta_rule(q, k, v, beta, g, initial_state=h0, cu_seqlens=cu, chunk_size=16)
    packings = [jnp.array(cu, jnp.int32) for cu in ([0, 1, 2, 36, 37], [0, 16, 32, 32, 37], [0, 0, 0, 0, 37])]
    refs = [flowssm.delta_rule(q, k, v, beta, g, initial_state=h0, cu_seqlens=cu, backend="reference") for cu in packings]
    run(CU)
    before = ops._packed._cache_size()
    for cu, (o_ref, S_ref) in zip(packings, refs):
        o, S = run(cu)
        assert rel_err(o, o_ref) < 1e-10 and rel_err(S, S_ref) < 1e-10, cu
    assert ops._packed._cache_size() == before
    jitted = jax.jit(run)  # boundaries traced by the caller's jit: no value checks, one trace
    for cu in ([0, 1, 2, 36, 37], [0, 16, 32, 32, 37]):
        jitted(jnp.array(cu, jnp.int32))
    assert jitted._cache_size() == 1


@pytest.mark.parametrize("cu, error, match", [
    ([1, 5, 37], ValueError, "cu_seqlens: expected first 0 and last T = 37, got first 1"),
    ([0, 5, 36], ValueError, "cu_seqlens: expected first 0 and last T = 37, got first 0 and last 36"),
    ([0, 21, 5, 37], ValueError, "cu_seqlens: expected non-decreasing values, got 21 then 5 at index 1"),
    (np.array([0.0, 37.0]), TypeError, "cu_seqlens: expected an integer dtype"),
    ([[0, 37]], ValueError, r"cu_seqlens: expected shape \[N \+ 1\] with N >= 1, got shape \(1, 2\)"),
])
def test_invalid_cu_seqlens_is_refused(cu, error, match):
    q, k, v, beta, g, _ = packed_inputs()
    with pytest.raises(error, match=match):
        flowssm.delta_rule(q, k, v, beta, g, cu_seqlens=jnp.asarray(cu))


def test_packed_call_checks_batch_and_initial_states():
    q, k, v, beta, g, h0 = random_inputs(0, 2, T, H, K, V)
    with pytest.raises(ValueError, match="cu_seqlens: expected packed inputs with B = 1 .*, got B = 2"):
        flowssm.delta_rule(q, k, v, beta, g, cu_seqlens=CU)
    q, k, v, beta, g, _ = packed_inputs()
    with pytest.raises(ValueError, match=r"initial_state: expected shape \[N, H, K, V\] = \(4, 2, 8, 6\)"):
        flowssm.delta_rule(q, k, v, beta, g, initial_state=h0[:1], cu_seqlens=CU)


PASS_SHAPE = dict(BH=2, N=6, C=16, K=16, V=32)  # the state-pass kernel tests' operands


def pass_operands(seed: int, BH, N, C, K, V):
    """Float32 operands of the state passes: keys, G (cumulative decays), w, u, q, do."""
    F32 = jnp.float32
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    keys = jax.random.normal(ks[0], (BH, N, C, K), F32) * K**-0.5
    w = jax.random.normal(ks[1], (BH, N, C, K), F32) * 0.1
    u = jax.random.normal(ks[2], (BH, N, C, V), F32)
    G = jnp.cumsum(-jax.random.uniform(ks[3], (BH, N, C), F32, 0.0, 0.1), axis=-1)
    q = jax.random.normal(ks[4], (BH, N, C, K), F32)
    do = jax.random.normal(ks[5], (BH, N, C, V), F32)
    return keys, G, w, u, q, do


@pytest.mark.parametrize("segments", [1, 3])
def test_state_pass_kernels_with_resets_match_references(segments):
    """Interpret mode: the forward state pass (and, segmented, the segment flows) and the backward pass with
    sequence resets against their jnp references; sequences 1 and 2 span segment boundaries (3 segments of 2
    chunks). The op-level gradient tests check the references against autodiff."""
    F32 = jnp.float32
    BH, K_, V_, Ns = PASS_SHAPE["BH"], PASS_SHAPE["K"], PASS_SHAPE["V"], 3
    keys, G, w, u, q, do = pass_operands(0, **PASS_SHAPE)
    ks = jax.random.split(jax.random.PRNGKey(10), 4)
    h0, dfinals = (jax.random.normal(k_, (BH, Ns, K_, V_), F32) for k_ in ks[:2])
    S0, dS_final = (jax.random.normal(k_, (BH * segments, K_, V_), F32) for k_ in ks[2:])
    resets = varlen.Resets(*(jnp.array(x, jnp.int32) for x in ([0, 1, 1, 1, 2, 2], [1, 1, 0, 0, 1, 0],
                                                                [1, 0, 0, 1, 0, 1])))
    packed = dict(segments=segments, resets=resets)
    runs = [(dict(h0=h0), (keys, G, w, u, S0), {})] + [(dict(h0=h0), (keys, G, w, u, None), dict(flow=True,
                                                                                               write_states=False))]
    for extra, args, mode in runs[: 1 + (segments > 1)]:
        kernel = state_pass_kernel(*args, block_v=16, **packed, **extra, **mode)
        reference = state_pass_reference(*args, **packed, **extra, **mode)
        for a, b in zip(jax.tree.leaves(kernel), jax.tree.leaves(reference), strict=True):
            assert rel_err(a, b) < 1e-5
    static = dict(rank=1, scale=0.3, dfinals=dfinals, **packed)
    for a, b in zip(state_pass_bwd_kernel(q, keys, G, w, do, dS_final, block_v=16, **static),
                    state_pass_bwd_reference(q, keys, G, w, do, dS_final, **static), strict=True):
        # dS0 of a segment that begins with a sequence start is exactly 0 (the start reads h0)
        assert rel_err(a, b) < 1e-5 if jnp.any(b != 0) else not jnp.any(a != 0)


@pytest.mark.parametrize("zero", [True, False], ids=["zero-states", "states"])
def test_state_pass_kernels_over_spans_match_references(zero):
    """Interpret mode: one program per (head, sequence) over its span, forward and backward, against the
    references (through the resets the spans imply); sequence 2 is empty, sequence 3 owns the trailing
    identity chunks. The programs run longest sequence first (a permutation of the sequences here), so the
    initial states and final-state cotangents are random (``zero``: zeros, which the kernels then never
    read: ``zero_h0``, ``zero_dfinals``)."""
    F32 = jnp.float32
    BH, K_, V_, Ns = PASS_SHAPE["BH"], PASS_SHAPE["K"], PASS_SHAPE["V"], 4
    keys, G, w, u, q, do = pass_operands(1, **PASS_SHAPE)
    s0, dsf = (jnp.zeros((BH * Ns, K_, V_), F32),) * 2 if zero else jax.random.normal(
        jax.random.PRNGKey(7), (2, BH * Ns, K_, V_), F32)
    spans = varlen.Spans(jnp.array([0, 1, 4, 4], jnp.int32), jnp.array([1, 4, 4, 6], jnp.int32))
    kernel = state_pass_kernel(keys, G, w, u, s0, block_v=16, spans=spans, zero_h0=zero)
    reference = state_pass_reference(keys, G, w, u, s0, spans=spans)
    static = dict(rank=1, scale=0.3, spans=spans)
    kernel_bwd = state_pass_bwd_kernel(q, keys, G, w, do, dsf, block_v=16, zero_dfinals=zero, **static)
    reference_bwd = state_pass_bwd_reference(q, keys, G, w, do, dsf, **static)
    for a, b in zip((*kernel, *kernel_bwd), (*reference, *reference_bwd), strict=True):
        assert rel_err(a, b) < 1e-5
    finals, dh0 = kernel[1].reshape(BH, Ns, K_, V_), kernel_bwd[2].reshape(BH, Ns, K_, V_)
    # the empty sequence keeps its initial state (the cotangent of its final state); a non-empty one does not
    assert jnp.array_equal(finals[:, 2], s0.reshape(BH, Ns, K_, V_)[:, 2])
    assert jnp.array_equal(dh0[:, 2], dsf.reshape(BH, Ns, K_, V_)[:, 2])
    assert jnp.all(jnp.any(finals[:, 1] != s0.reshape(BH, Ns, K_, V_)[:, 1], axis=(1, 2)))


def test_sequence_parallel_packed_matches_single_device():
    """4 devices: the layout's 10 used chunks of 4 (13 in the static layout, 16 on the mesh, 4 a device), so
    sequences span devices; values and gradients (jit)."""
    from jax.sharding import AxisType, Mesh

    from flowssm.distributed import sequence_parallel_delta_rule

    q, k, v, beta, g, _ = random_inputs(0, 1, T, H, 4, 5)
    h0 = jax.random.normal(jax.random.PRNGKey(1), (4, H, 4, 5), jnp.float64)
    mesh = Mesh(np.array(jax.devices()[:4]), ("seq",), axis_types=(AxisType.Auto,))

    def value_and_grads(op):
        def loss(inputs):
            o, S = op(*inputs[:5], initial_state=inputs[5], cu_seqlens=CU, chunk_size=4)
            return jnp.sum(jnp.sin(o)) + jnp.sum(S**2), (o, S)

        return jax.jit(jax.value_and_grad(loss, has_aux=True))((q, k, v, beta, g, h0))

    actual = value_and_grads(lambda *a, **kw: sequence_parallel_delta_rule(*a, mesh=mesh, **kw))
    expected = value_and_grads(flowssm.delta_rule)
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert rel_err(a, b) < 1e-10


def test_generalised_transitions_packed_equal_each_sequence_alone():
    """KDA (per-channel g) and DPLR with ``cu_seqlens``: xla, both scans, and the reference, to 1e-10."""
    q, k, v, beta, _, h0 = packed_inputs()
    ks = jax.random.split(jax.random.PRNGKey(3), 3)
    gk = -jax.random.uniform(ks[0], (1, T, H, K), jnp.float64, 0.0, 0.5)
    a = -k
    b = k * jax.random.uniform(ks[1], (1, T, H, 1), jnp.float64, 0.0, 1.0)
    cases = [(flowssm.delta_rule, (q, k, v, beta, gk)), (flowssm.dplr_delta_rule, (q, k, v, a, b, gk))]
    for op, xs in cases:
        o_ref, S_ref = one_by_one(op, xs, h0, backend="reference")
        for options in (dict(backend="reference"), *RUNS[1:3]):
            o, S = op(*xs, initial_state=h0, cu_seqlens=CU, **options)
            assert rel_err(o, o_ref) < 1e-10 and rel_err(S, S_ref) < 1e-10, (op.__name__, options)


@pytest.mark.parametrize("case", ["kda", "gla", "linear", "signature", "reference_backward"])
def test_pallas_packed_rows_read_in_place_match_xla(case):
    """The pallas kernels read and write the packed rows in place (``kernels/packed.py``): per-channel decays
    (KDA, GLA), the additive path (linear attention), a solver whose transfer backward is the reference's vjp
    (the signature's truncated series), and ``Tuning(backward="reference")``; values and every gradient
    against the xla backend on the same packing, itself checked against each sequence alone above."""
    from flowssm.kernels import Tuning
    from flowssm.solvers import Signature

    q, k, v, beta, g, h0 = packed_inputs(seed=4)
    gk = -jax.random.uniform(jax.random.PRNGKey(9), (1, T, H, K), jnp.float64, 0.0, 0.5)
    if case in ("kda", "signature", "reference_backward"):
        op, xs = flowssm.delta_rule, (q, k, v, beta, gk if case == "kda" else g)
    else:
        op, xs = flowssm.linear_attention, (q, k, v, gk if case == "gla" else g)
    options = dict(cu_seqlens=CU, chunk_size=16, scan="sequential")
    if case == "signature":
        options["solver"] = Signature(depth=2)
    tuning = dict(tuning=Tuning(backward="reference")) if case == "reference_backward" else {}
    run = lambda backend, **extra: jax.vjp(lambda *a: op(*a[:-1], initial_state=a[-1], backend=backend, **options,
                                                          **extra), *xs, h0)
    (o, S), vjp = run("pallas", **tuning)
    (o_x, S_x), vjp_x = run("xla")
    assert rel_err(o, o_x) < 1e-10 and rel_err(S, S_x) < 1e-10
    cotangents = tuple(jax.random.normal(jax.random.PRNGKey(s), x.shape, jnp.float64) for s, x in ((7, o), (8, S)))
    for a, b in zip(vjp(cotangents), vjp_x(cotangents)):
        assert rel_err(a, b) < 1e-10

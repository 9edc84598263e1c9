"""Pallas kernels (interpret mode on CPU) against their jnp references, the xla backend and the token loop."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flowssm
from flowssm import backends
from flowssm.kernels import chunked as kc
from flowssm.kernels.chunk_output import chunk_output_bwd_kernel, chunk_output_bwd_reference
from flowssm.kernels.chunk_transfer import chunk_transfer_bwd_kernel, chunk_transfer_bwd_reference
from flowssm.kernels.cumulative_decay import micro_log_decay
from flowssm.kernels.state_pass import (state_pass_bwd_kernel, state_pass_bwd_reference, state_pass_kernel,
                                        state_pass_reference)
from flowssm.paths import make_path
from flowssm.solvers import Euler, Exact, LogODE, Signature
from flowssm.solvers.exact import METHODS
from flowssm.solvers.program import INVERSE

EXACT = [Exact(method=m) for m in METHODS]

F32 = jnp.float32


def make_inputs(seed, B, T, H, K, V, R=None, dtype=F32, gated=True):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    lead = (B, T, H) if R is None else (B, T, H, R)
    q = jax.random.normal(ks[0], (B, T, H, K), F32)
    k = jax.random.normal(ks[1], lead + (K,), F32)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], lead + (V,), F32)
    beta = jax.random.uniform(ks[3], lead, F32, 0.0, 2.0)
    g = -jax.random.uniform(ks[4], (B, T, H), F32, 0.0, 0.3) if gated else None
    S0 = jax.random.normal(ks[5], (B, H, K, V), F32)
    cast = lambda x: None if x is None else x.astype(dtype)
    return tuple(map(cast, (q, k, v, beta, g, S0)))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def chunk_blocks(seed=0, BH=2, N=3, C=16, R=2, K=16, V=32):
    """Head-major kernel operands, ``n = C R`` micro-steps a chunk."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    keys = jax.random.normal(ks[0], (BH, N, C * R, K), F32) * K**-0.5
    values = jax.random.normal(ks[1], (BH, N, C * R, V), F32)
    beta = jax.random.uniform(ks[2], (BH, N, C * R), F32, 0.0, 2.0)
    alpha = jax.random.uniform(ks[3], (BH, N, C * R), F32)
    log_decay = -jax.random.uniform(ks[4], (BH, N, C), F32, 0.0, 0.3)
    return keys, values, beta, alpha, log_decay


@pytest.mark.parametrize("solver", EXACT + [Euler(), Signature(depth=3), Signature(depth=2)], ids=repr)
def test_chunk_transfer_kernel_matches_reference(solver):
    """The kernel runs the solver's own program; every exact method also equals the default's reference."""
    args = chunk_blocks()
    kernel = kc.chunk_transfer_kernel(*args, solver=solver)
    for a, b in zip(kernel, kc.chunk_transfer_reference(*args, solver=solver)):
        assert rel(a, b) < 1e-5
    if solver in EXACT:
        for a, b in zip(kernel, kc.chunk_transfer_reference(*args, solver=Exact())):
            assert rel(a, b) < 1e-5
    # a path without decays: the kernel that never reads them equals the decayed one at log_decay = 0
    undecayed = (*args[:4], jnp.zeros_like(args[4]))
    for a, b in zip(kc.chunk_transfer_kernel(*undecayed, solver=solver, has_decay=False),
                    kc.chunk_transfer_kernel(*undecayed, solver=solver)):
        assert rel(a, b) < 1e-6


def test_transfer_in_float16_mode_rounds_like_tf32_and_redoes_overflowing_chunks():
    """"f16": float16 products (10-bit mantissa, like TF32); a chunk whose ``T`` overflows float16 (here one
    whose neighbouring keys overlap by 100, ``T_im = (-100)^(i - m)``, finite in float32) is formed again at
    TF32 by the second call, the other chunks keep the float16 result."""
    keys, values, beta, alpha, log_decay = args = chunk_blocks(C=16, R=1, K=32)
    per_channel = (*args[:4], jnp.repeat(log_decay[..., None], 32, axis=-1))  # a decay per key channel too
    for operands in (args, per_channel):
        full = kc.chunk_transfer_kernel(*operands, solver=Exact(), mode="f32", save_transfer=True)
        half = kc.chunk_transfer_kernel(*operands, solver=Exact(), mode="f16", save_transfer=True)
        for a, b in zip(half, full):
            assert 0 < rel(a, b) < 3e-3  # rounded (not the float32 result), about float16's 2^-11 a product
    steps = jnp.arange(16)
    chain = 10.0 * (jax.nn.one_hot(steps, 32, dtype=F32) + jax.nn.one_hot(steps + 1, 32, dtype=F32))  # k_i . k_(i-1) = 100
    args = (keys.at[0, 1].set(chain), values, beta.at[0, 1].set(1.0), alpha, log_decay.at[0, 1].set(0.0))
    full = kc.chunk_transfer_kernel(*args, solver=Exact(), mode="f32", save_transfer=True)
    half = kc.chunk_transfer_kernel(*args, solver=Exact(), mode="f16", save_transfer=True)
    assert float(jnp.max(jnp.abs(full[2][0, 1]))) > 1e20  # far past float16's 65504, finite in float32
    for a, b in zip(half, full):
        assert bool(jnp.all(jnp.isfinite(a))) and rel(a[0, 1], b[0, 1]) < 1e-6  # the redone chunk: float32 here
        assert 0 < rel(a[1], b[1]) < 3e-3  # untouched chunks keep their float16 rounding


def test_state_pass_and_output_kernels_match_references():
    keys, values, beta, alpha, log_decay = chunk_blocks()
    BH, N, n, K = keys.shape
    C = log_decay.shape[-1]
    R = n // C
    w, u = kc.chunk_transfer_reference(keys, values, beta, alpha, log_decay, solver=Exact())
    G = micro_log_decay(log_decay, R)
    S0 = jax.random.normal(jax.random.PRNGKey(1), (BH, K, values.shape[-1]), F32)
    states = state_pass_kernel(keys, G, w, u, S0, block_v=16)
    for a, b in zip(states, state_pass_reference(keys, G, w, u, S0)):
        assert rel(a, b) < 1e-5
    q = jax.random.normal(jax.random.PRNGKey(2), (BH, N, C, K), F32)
    o = kc.chunk_output_kernel(q, keys, G, w, u, states[0], rank=R, scale=0.3)
    assert rel(o, kc.chunk_output_reference(q, keys, G, w, u, states[0], rank=R, scale=0.3)) < 1e-5


@pytest.mark.parametrize("solver", EXACT + [Euler()], ids=repr)
def test_chunk_transfer_backward_kernel_matches_reference_vjp(solver):
    args = chunk_blocks(seed=5)
    w, u, *T = kc.chunk_transfer_kernel(*args, solver=solver, save_transfer=solver.program().structure == INVERSE)
    T = T[0] if T else None
    ks = jax.random.split(jax.random.PRNGKey(7), 2)
    dw, du = jax.random.normal(ks[0], w.shape, F32), jax.random.normal(ks[1], u.shape, F32)
    kernel = chunk_transfer_bwd_kernel(*args, T, w, u, dw, du, solver=solver)
    reference = chunk_transfer_bwd_reference(*args, T, w, u, dw, du, solver=solver)
    for a, b in zip(kernel, reference):
        assert a.shape == b.shape and rel(a, b) < 1e-5
    # dw formed in the kernel from the states entering the chunks: dw = -du S_in^T (w's one use is u - w S_in)
    S_in = jax.random.normal(ks[1], (*w.shape[:2], w.shape[-1], u.shape[-1]), F32)
    from_states = chunk_transfer_bwd_kernel(*args, T, w, u, None, du, solver=solver, S_in=S_in)
    formed = chunk_transfer_bwd_reference(*args, T, w, u, -jnp.einsum("bcnv,bckv->bcnk", du, S_in), du, solver=solver)
    for a, b in zip(from_states, formed):
        assert rel(a, b) < 1e-5
    with pytest.raises(ValueError, match="dw, S_in"):
        chunk_transfer_bwd_kernel(*args, T, w, u, dw, du, solver=solver, S_in=S_in)
    # without decay cotangents (a path without decays): the same other cotangents, a zero dlog_decay
    *others, dlog_decay = chunk_transfer_bwd_kernel(*args, T, w, u, dw, du, solver=solver, decay_grads=False)
    for a, b in zip(others, kernel):
        assert rel(a, b) == 0
    assert dlog_decay.shape == kernel[4].shape and not np.any(np.asarray(dlog_decay))


def test_transfer_backward_adds_the_output_backwards_shares_and_writes_input_dtype_gradients():
    """The output backward's shares of dkeys and dG are added inside the transfer backward (as the reference adds
    them); with bf16 inputs the output backward writes dkeys and dw, and the transfer backward dkeys and
    dvalues, in bf16 (their operand / final dtype), close to the float32 kernels."""
    args = chunk_blocks(seed=5)
    keys, log_decay = args[0], args[4]
    R = keys.shape[2] // log_decay.shape[2]
    w, u, T = kc.chunk_transfer_kernel(*args, solver=Exact(), save_transfer=True)
    ks = jax.random.split(jax.random.PRNGKey(11), 4)
    dw, du, dk = (jax.random.normal(k, x.shape, F32) for k, x in zip(ks, (w, u, keys)))
    dG = jax.random.normal(ks[3], micro_log_decay(log_decay, R).shape, F32)
    alone = chunk_transfer_bwd_kernel(*args, T, w, u, dw, du, solver=Exact())
    shared = chunk_transfer_bwd_kernel(*args, T, w, u, dw, du, solver=Exact(), dkeys=dk, dG=dG)
    dlog_decay = jax.vjp(lambda x: micro_log_decay(x, R), log_decay)[1](dG)[0]
    assert rel(shared[0], alone[0] + dk) < 1e-6 and rel(shared[4], alone[4] + dlog_decay) < 1e-6
    for a, b in zip(shared[1:4], alone[1:4]):
        assert rel(a, b) == 0
    for a, b in zip(shared, chunk_transfer_bwd_reference(*args, T, w, u, dw, du, solver=Exact(), dkeys=dk, dG=dG)):
        assert rel(a, b) < 1e-5
    bf = lambda *xs: tuple(x.astype(jnp.bfloat16) for x in xs)
    half = chunk_transfer_bwd_kernel(*bf(*args[:2]), *args[2:], T, *bf(w, u, dw), du, solver=Exact(), dkeys=bf(dk)[0],
                                     dG=dG)
    assert [x.dtype for x in half[:2]] == [jnp.bfloat16] * 2 and half[2].dtype == F32
    for a, b in zip(half, shared):
        assert rel(a, b) < 2e-2
    BH, N, n, K = keys.shape
    q, do = (jax.random.normal(k, (BH, N, n // R, d), F32) for k, d in zip(ks[:2], (K, u.shape[-1])))
    S = jax.random.normal(ks[2], (BH, N, K, u.shape[-1]), F32)
    G = micro_log_decay(log_decay, R)
    out = chunk_output_bwd_kernel(*bf(q, keys), G, *bf(u, S, S, do), rank=R, scale=0.3, block_k=8)
    assert [x.dtype for x in out] == [jnp.bfloat16] * 2 + [F32]


def test_state_pass_and_output_backward_kernels_match_references():
    keys, values, beta, alpha, log_decay = chunk_blocks(seed=6)
    BH, N, n, K = keys.shape
    V = values.shape[-1]
    C = log_decay.shape[-1]
    R = n // C
    w, u = kc.chunk_transfer_reference(keys, values, beta, alpha, log_decay, solver=Exact())
    G = micro_log_decay(log_decay, R)
    ks = jax.random.split(jax.random.PRNGKey(8), 4)
    q = jax.random.normal(ks[0], (BH, N, C, K), F32)
    do, dS_final = jax.random.normal(ks[1], (BH, N, C, V), F32), jax.random.normal(ks[2], (BH, K, V), F32)
    static = dict(rank=R, scale=0.3)
    passes = [f(q, keys, G, w, do, dS_final, **static) for f in (state_pass_bwd_kernel, state_pass_bwd_reference)]
    for a, b in zip(*passes):
        assert rel(a, b) < 1e-5
    dS_out, dv, _ = passes[1]
    S_in, _ = state_pass_reference(keys, G, w, u, jax.random.normal(ks[3], (BH, K, V), F32))
    _, corrected = kc.chunk_output_kernel(q, keys, G, w, u, S_in, save_corrected=True, **static)
    outs = [f(q, keys, G, corrected, S_in, dS_out, do, **static, **kw)
            for f, kw in ((chunk_output_bwd_kernel, dict(block_k=8)), (chunk_output_bwd_reference, {}))]
    for a, b in zip(*outs):
        assert rel(a, b) < 1e-5
    # without decay cotangents: dq and dkeys as before (rounding aside), no dG
    *others, dG = chunk_output_bwd_kernel(q, keys, G, corrected, S_in, dS_out, do, **static, block_k=8,
                                          decay_grads=False)
    assert dG is None and all(rel(a, b) < 1e-6 for a, b in zip(others, outs[0]))


def test_segmented_state_passes_match_references_and_the_sequential_pass():
    """Two segments of two chunks: forward states, segment flows ``[P | Q]`` and the reverse pass equal
    their references, and the segments' flows carry the sequential pass's state across the split."""
    keys, values, beta, alpha, log_decay = chunk_blocks(seed=9, N=4)
    BH, N, n, K = keys.shape
    V, R = values.shape[-1], n // log_decay.shape[-1]
    w, u = kc.chunk_transfer_reference(keys, values, beta, alpha, log_decay, solver=Exact())
    G = micro_log_decay(log_decay, R)
    ks = jax.random.split(jax.random.PRNGKey(10), 4)
    S0 = jax.random.normal(ks[0], (BH * 2, K, V), F32)
    seg = dict(segments=2, block_v=16)
    for a, b in zip(state_pass_kernel(keys, G, w, u, S0, **seg), state_pass_reference(keys, G, w, u, S0, **seg)):
        assert rel(a, b) < 1e-5
    flow = state_pass_kernel(keys, G, w, u, None, flow=True, write_states=False, **seg)
    assert flow.shape == (BH * 2, K, K + V)
    assert rel(flow, state_pass_reference(keys, G, w, u, None, flow=True, write_states=False, **seg)) < 1e-5
    S_in, _ = state_pass_reference(keys, G, w, u, S0[::2])  # sequential from the first segment's start
    first = flow[::2]
    assert rel(first[..., :K] @ S0[::2] + first[..., K:], S_in[:, 2]) < 1e-5
    q = jax.random.normal(ks[1], (BH, N, log_decay.shape[-1], K), F32)
    do, dS_end = jax.random.normal(ks[2], (BH, N, q.shape[2], V), F32), jax.random.normal(ks[3], (BH * 2, K, V), F32)
    static = dict(rank=R, scale=0.3, **seg)
    for write in (True, False):
        passes = [f(q, keys, G, w, do, dS_end, write_states=write, **static)
                  for f in (state_pass_bwd_kernel, state_pass_bwd_reference)]
        for a, b in zip(*(p if write else (p,) for p in passes)):
            assert rel(a, b) < 1e-5


@pytest.mark.parametrize("tuning", [kc.Tuning(assoc="xla"), kc.Tuning()], ids=repr)  # Tuning(): 5 segments
def test_pallas_associative_variants_match_token_loop(tuning):
    q, k, v, beta, g, S0 = make_inputs(6, 1, 70, 2, 16, 16)
    run = lambda qq, p, s: kc.chunked_pallas(qq, p, s, scale=0.25, chunk_size=16, solver=Exact(), scan="associative",
                                            semantics="discrete", tuning=tuning)
    o, S = jax.jit(run)(q, make_path(k, v, beta, g), S0)
    o_ref, S_ref = flowssm.delta_rule(q, k, v, beta, g, initial_state=S0, scale=0.25, backend="reference")
    assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5


def test_auto_scan_segments_long_rows_on_few_programs_and_longer_ones_without_a_backward(monkeypatch):
    """``scan="auto"``: the segmented scan where the sequential pass has few programs and many chunks; a forward
    without a kernel backward keeps the sequential pass up to ``AUTO_MIN_CHUNKS_FORWARD`` chunks."""
    from flowssm.kernels import launch

    monkeypatch.setattr(launch, "sm_count", lambda: 132)
    t = kc.Tuning()  # segment_programs=None: one wave of the 132 multiprocessors
    assert kc.auto_segments("auto", 1024, 32, t) == 4  # 1 x 65536 x 16 heads: 32 programs x 4 segments
    assert kc.auto_segments("auto", 1024, 32, t, backward=False) == 1
    assert kc.auto_segments("auto", launch.AUTO_MIN_CHUNKS_FORWARD, 32, t, backward=False) == 4
    assert kc.auto_segments("auto", 1024, 128, t) == kc.auto_segments("auto", 128, 32, t) == 1
    assert kc.auto_segments("sequential", 4096, 32, t) == 1 and kc.auto_segments("associative", 64, 64, t) == 2
    assert kc.auto_segments("auto", 1024, 32, kc.Tuning(segment_programs=256)) == 8
    with pytest.raises(ValueError, match="Tuning.segment_programs"):
        kc.Tuning(segment_programs=0)
    with pytest.raises(ValueError, match="Tuning.flow_block_v"):
        kc.Tuning(flow_block_v=96)
    t, bf16 = kc.Tuning(block_v=64), jnp.bfloat16  # the flow pass: 128 columns on Mosaic where they divide and fit
    assert kc.flow_block(t, bf16, 64, 128, 128, mosaic=True) == 128
    assert kc.flow_block(t, bf16, 64, 128, 128, mosaic=False) == 64
    assert kc.flow_block(t, bf16, 64, 64, 128, mosaic=True) == kc.flow_block(t, bf16, 64, 128, 192, mosaic=True) == 64
    assert kc.flow_block(t, bf16, 128, 256, 256, mosaic=True) == 64  # rank 2, K = 256: 128 columns do not fit
    assert kc.flow_block(kc.Tuning(block_v=64, flow_block_v=64), bf16, 64, 128, 128, mosaic=True) == 64


def test_auto_output_is_fused_into_the_pass_where_it_fills_more_than_half_the_gpu(monkeypatch):
    """``Tuning.output="auto"``: the Mosaic forward pass computes o on 128 programs (4 x 4096 x 16 heads, or the
    segmented scan's 32 x 4), not on the 32 of a sequential 1 x 65536 x 16-head forward; "kernel" / "fused" force."""
    from flowssm.kernels import launch

    monkeypatch.setattr(launch, "sm_count", lambda: 132)
    assert launch.fuse_output(kc.Tuning(), 128) and not launch.fuse_output(kc.Tuning(), 32)
    assert not launch.fuse_output(kc.Tuning(output="kernel"), 256) and launch.fuse_output(kc.Tuning(output="fused"), 1)
    with pytest.raises(ValueError, match="Tuning.output"):
        kc.Tuning(output="inline")


def test_pallas_splits_a_sequence_too_long_for_int32_indexing_into_exact_pieces(monkeypatch):
    """With the int32 limit lowered to two chunks' worth, T = 70 runs as pieces of 32, 32 and 6 tokens,
    each from the state the previous left: outputs, final state and gradients as in one call."""
    monkeypatch.setattr(kc, "MAX_ELEMENTS", 2 * 2 * 16 * 16)
    calls = []
    flow = kc._pallas_flow
    monkeypatch.setattr(kc, "_pallas_flow", lambda *a: calls.append(a[1].shape) or flow(*a))
    q, k, v, beta, g, S0 = make_inputs(6, 1, 70, 2, 16, 16)

    def loss(pallas, *args):
        if pallas:
            o, S = kc.chunked_pallas(args[0], make_path(*args[1:5]), args[5], scale=0.25, chunk_size=16,
                                     solver=Exact(), scan="sequential", semantics="discrete")
        else:
            o, S = flowssm.delta_rule(*args[:5], initial_state=args[5], scale=0.25, chunk_size=16, backend="xla")
        return jnp.sum(jnp.sin(o)) + jnp.sum(S**2), (o, S)

    grad = lambda pallas: jax.value_and_grad(loss, argnums=(1, 2, 3, 4, 5, 6), has_aux=True)(pallas, q, k, v, beta,
                                                                                           g, S0)
    (_, (o, S)), grads = grad(True)
    assert [shape[1] for shape in calls] == [2, 2, 1]  # chunks a piece
    (_, (o_x, S_x)), grads_x = grad(False)
    assert rel(o, o_x) < 1e-5 and rel(S, S_x) < 1e-5
    for a, b in zip(grads, grads_x):
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize(
    "R, gated, scan, dtype, T, tol",
    [
        (None, True, "sequential", F32, 70, 1e-5),  # ragged last chunk
        (3, False, "associative", jnp.float64, 37, 1e-10),  # rank 3 padded to 4 micro-steps a token
        (2, True, "sequential", jnp.bfloat16, 48, 3e-2),
    ],
)
def test_pallas_matches_token_loop(R, gated, scan, dtype, T, tol):
    q, k, v, beta, g, S0 = make_inputs(0, 2, T, 2, 16, 32, R, dtype, gated)
    o, S = flowssm.delta_rule(q, k, v, beta, g, initial_state=S0, chunk_size=16, scan=scan, backend="pallas")
    up = lambda x: None if x is None else x.astype(jnp.float64)
    o_ref, S_ref = flowssm.delta_rule(*map(up, (q, k, v, beta, g)), initial_state=up(S0), backend="reference")
    assert o.dtype == dtype
    assert rel(o, o_ref) < tol and rel(S, S_ref) < tol


GRADIENT_CASES = [
    ("kernels", Exact(), "sequential", True),  # the other exact methods: same saved-T backward (transfer tests above)
    ("kernels", Exact(), "associative", False),
    ("kernels", Euler(), "sequential", True),
    ("kernels", Signature(depth=2), "sequential", True),  # transfer backward by the reference's vjp
    ("kernels", Signature(depth=3), "sequential", True),  # (doubling form of the series)
    ("reference", Exact(), "sequential", True),
]


@pytest.mark.parametrize("backward, solver, scan, gated", GRADIENT_CASES, ids=lambda x: repr(x))
def test_pallas_forward_and_gradients_match_xla(backward, solver, scan, gated):
    """Every kind of transfer program the kernels run: outputs, final state and gradients equal the xla backend's
    in float32 (the transfer backward is the kernel for programs with ``T = (I + L)^{-1}`` or ``T = I``, the
    reference's vjp otherwise). Every exact method computes ``(I + L)^{-1}`` and shares the default's backward
    (the saved ``T``); their forward programs run in the transfer kernel tests above."""
    q, k, v, beta, g, S0 = make_inputs(2, 2, 40, 2, 16, 16, 2, gated=gated)
    tuning = kc.Tuning(backward=backward)

    def loss(backend, *args):  # ungated: the kernels' path without decays (no G, no decay cotangents)
        if backend == "pallas":
            qq, kk, vv, bb, gg, s = args
            o, S = kc.chunked_pallas(qq, make_path(kk, vv, bb, gg), s, scale=0.25, chunk_size=16, solver=solver,
                                     scan=scan, semantics="discrete", tuning=tuning, has_decay=gg is not None)
        else:
            o, S = flowssm.delta_rule(*args[:5], initial_state=args[5], scale=0.25, chunk_size=16, solver=solver,
                                      backend="xla")
        return jnp.sum(jnp.sin(o)) + jnp.sum(S**2), (o, S)

    argnums = (1, 2, 3, 4, 5, 6) if gated else (1, 2, 3, 4, 6)
    (_, (o, S)), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)("pallas", q, k, v, beta, g, S0)
    (_, (o_x, S_x)), grads_x = jax.value_and_grad(loss, argnums=argnums, has_aux=True)("xla", q, k, v, beta, g, S0)
    assert rel(o, o_x) < 1e-5 and rel(S, S_x) < 1e-5
    for a, b in zip(grads, grads_x):
        assert rel(a, b) < 1e-5


def test_pallas_gradient_reaches_initial_state():
    q, k, v, beta, g, S0 = make_inputs(3, 1, 20, 1, 16, 16)
    loss = lambda backend, s: jnp.sum(flowssm.delta_rule(q, k, v, beta, g, initial_state=s, chunk_size=16, backend=backend)[0])
    assert rel(jax.grad(loss, 1)("pallas", S0), jax.grad(loss, 1)("xla", S0)) < 1e-5


def test_ungated_ops_take_the_kernels_path_without_decays(monkeypatch):
    """``g=None`` reaches the kernels as ``has_decay=False`` (no decays kernel, no decay cotangents), with the
    outputs and gradients of an explicit ``g = 0`` (which runs the decayed path)."""
    q, k, v, beta, g, S0 = make_inputs(3, 1, 20, 1, 16, 16)
    seen = []
    kernel = kc.chunk_output_bwd_kernel
    monkeypatch.setattr(kc, "chunk_output_bwd_kernel",
                        lambda *a, **kw: seen.append(kw["decay_grads"]) or kernel(*a, **kw))

    def loss(g, *args):
        o, S = flowssm.delta_rule(*args, g, initial_state=S0, chunk_size=16, backend="pallas")
        return jnp.sum(jnp.sin(o)) + jnp.sum(S**2)

    undecayed = jax.grad(loss, argnums=(1, 2, 3, 4))(None, q, k, v, beta)
    assert seen == [False]
    decayed = jax.grad(loss, argnums=(1, 2, 3, 4))(jnp.zeros_like(g), q, k, v, beta)
    for a, b in zip(undecayed, decayed):
        assert rel(a, b) < 1e-6


@pytest.mark.parametrize("options, option", [
    (dict(semantics="continuous"), "semantics"),
    (dict(chunk_size=24), "chunk_size"),
    (dict(chunk_size=8), "chunk_size"),  # C R >= 16
    (dict(solver="logode"), "solver"),
])
def test_pallas_rejects_what_it_does_not_implement_naming_the_option(options, option):
    q, k, v, beta, g, _ = make_inputs(4, 1, 16, 1, 16, 16)
    beta = 0.4 * beta  # beta |k|^2 < 1, as logode needs
    with pytest.raises(ValueError, match=f"^{option}: not supported by backend='pallas'"):
        flowssm.delta_rule(q, k, v, beta, backend="pallas", **({"chunk_size": 16} | options))
    o, _ = flowssm.delta_rule(q, k, v, beta, **({"chunk_size": 16} | options))  # "auto": xla on the CPU
    assert bool(jnp.all(jnp.isfinite(o)))


def test_auto_backend_is_xla_on_cpu_and_tuning_is_validated(monkeypatch):
    request = backends.Request(flowssm.Exact(), "discrete", 64, 1, 128, 128, jnp.bfloat16)
    assert backends.resolve("auto", request) == "xla" and backends.check("pallas", request) == "pallas"
    monkeypatch.setattr(backends, "on_gpu", lambda: True)  # on a GPU: the kernels where they run the request
    per_channel, dplr = (dataclasses.replace(request, transition=t) for t in ("per_channel", "dplr"))
    assert backends.resolve("auto", request) == "pallas" and backends.resolve("auto", per_channel) == "pallas"
    assert backends.resolve("auto", dplr) == "xla" and backends.check("pallas", per_channel) == "pallas"
    with pytest.raises(ValueError, match="Tuning.block_k"):
        kc.Tuning(block_k=48)
    with pytest.raises(ValueError, match="Tuning.backward"):
        kc.Tuning(backward="xla")
    with pytest.raises(ValueError, match="Tuning.state_warps"):
        kc.Tuning(state_warps=3)
    resolve = lambda dtype, K, C=64, **kw: kc.Tuning(**kw).resolve(dtype, K, K, C, C)
    assert resolve(jnp.bfloat16, 128).state_stages == 3 and resolve(jnp.bfloat16, 128, state_stages=2).state_stages == 2
    assert resolve(jnp.bfloat16, 128).state_bwd_stages == 3 and resolve(jnp.bfloat16, 128, state_stages=2).state_bwd_stages == 2
    # per-channel decays: the reverse pass's float32 decay tiles and saved scores leave room for one stage (H200:
    # shared memory ran out with more); the forward keeps three
    channel = kc.Tuning().resolve(jnp.bfloat16, 128, 128, 64, 64, per_channel=True)
    assert (channel.state_stages, channel.state_bwd_stages) == (3, 1)
    # per-channel scores over 64-channel blocks past K = 64 (H200, run 15); scalar decays have no such scores
    assert channel.channel_block == 64 and resolve(jnp.bfloat16, 128).channel_block is None
    assert kc.Tuning().resolve(jnp.bfloat16, 64, 64, 64, 64, per_channel=True).channel_block is None
    with pytest.raises(ValueError, match="Tuning.channel_block"):
        kc.Tuning(channel_block=48)
    with pytest.raises(ValueError, match="Tuning.state_bwd_stages"):
        kc.Tuning(state_bwd_stages=5)
    assert resolve(jnp.float32, 128).state_warps == 8 and resolve(jnp.bfloat16, 256).output_block_v == 128
    with pytest.raises(ValueError, match="chunk_size: .*float32"):  # float32 operands: n <= 64
        flowssm.delta_rule(*make_inputs(4, 1, 16, 1, 16, 16)[:4], backend="pallas", chunk_size=128)

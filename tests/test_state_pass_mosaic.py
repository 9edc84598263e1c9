"""The Mosaic GPU state pass against the reference and the Triton-lowered kernel.

On CPU the kernel runs in Mosaic GPU's interpret mode (simulated shared memory, TMA, barriers, wgmma); the
lowering test builds the Mosaic GPU module for a CUDA target without a GPU (layouts, swizzles, shared memory).
"""

import functools
import re

import jax
import jax.numpy as jnp
import pytest

from flowssm.kernels.state_pass import (state_pass_bwd_kernel, state_pass_bwd_reference, state_pass_kernel,
                                       state_pass_reference)
from flowssm.kernels.chunk_output import chunk_output_kernel
from flowssm.kernels.state_pass_mosaic import state_pass_bwd_mosaic, state_pass_mosaic

BH, N, n = 2, 4, 64


def rel(a, b):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def operands(K, V, seed=0):
    """bf16 keys, w, u and float32 gated cumulative log-decays G and state S0, head-major, all non-zero."""
    kk, kw, ku, kg, ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    keys = (jax.random.normal(kk, (BH, N, n, K)) / K**0.5).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (BH, N, n, K)) / K**0.5).astype(jnp.bfloat16)
    u = jax.random.normal(ku, (BH, N, n, V)).astype(jnp.bfloat16)
    G = jnp.cumsum(jax.nn.log_sigmoid(jax.random.normal(kg, (BH, N, n)) + 3.0), axis=-1).astype(jnp.float32)
    return keys, G, w, u, jax.random.normal(ks, (BH, K, V), jnp.float32)


def test_mosaic_state_pass_matches_reference_and_triton_kernel():
    args = operands(64, 64)
    S_in, S_final = state_pass_mosaic(*args)
    ref_in, ref_final = state_pass_reference(*args)
    tri_in, tri_final = state_pass_kernel(*args)
    assert S_in.dtype == jnp.bfloat16 and S_final.dtype == jnp.float32
    assert rel(S_in, ref_in) < 1e-2 and rel(S_final, ref_final) < 1e-2  # bf16 operands vs float32
    assert rel(S_in, tri_in) < 1e-4 and rel(S_final, tri_final) < 1e-4  # the same roundings


def test_mosaic_state_pass_token_major_keys_and_column_blocks():
    """Keys token-major (``heads``), two ``V`` column blocks, only the final state."""
    keys, G, w, u, S0 = operands(64, 128, seed=1)
    token_keys = jnp.moveaxis(keys.reshape(1, BH, N, n, 64), 1, 3)  # [B, N, n, H, K]
    S_final = state_pass_mosaic(token_keys, G, w, u, S0, heads=BH, write_states=False, block_v=64)
    assert S_final.shape == (BH, 64, 128)
    assert rel(S_final, state_pass_reference(keys, G, w, u, S0, write_states=False)) < 1e-2


def test_mosaic_state_pass_segments_run_from_their_own_states():
    """Two segments of two chunks, each from its own S0 row, against the Triton kernel's segments."""
    keys, G, w, u, S0 = operands(64, 64, seed=3)
    S0 = jnp.concatenate([S0, -S0])  # [BH * 2, K, V]: different rows per (head, segment)
    S_in, S_final = state_pass_mosaic(keys, G, w, u, S0, segments=2)
    tri_in, tri_final = state_pass_kernel(keys, G, w, u, S0, segments=2)
    ref_in, ref_final = state_pass_reference(keys, G, w, u, S0, segments=2)
    assert S_final.shape == (2 * BH, 64, 64)
    assert rel(S_in, tri_in) < 1e-4 and rel(S_final, tri_final) < 1e-4
    assert rel(S_in, ref_in) < 1e-2 and rel(S_final, ref_final) < 1e-2


def test_mosaic_segment_flows_match_reference_and_triton_kernel():
    """Flow mode: each of two segments' ``[P | Q]`` from ``[I | 0]``, two ``P`` and two ``Q`` column blocks
    (K = V = 128, block_v = 64: the identity's second block, ``u``'s second block)."""
    keys, G, w, u, _ = operands(128, 128, seed=5)
    kw = dict(S0=None, flow=True, write_states=False, segments=2, block_v=64)
    flows = state_pass_mosaic(keys, G, w, u, **kw)
    assert flows.shape == (2 * BH, 128, 256) and flows.dtype == jnp.float32
    assert rel(flows, state_pass_reference(keys, G, w, u, **kw)) < 1e-2
    triton = state_pass_kernel(keys, G, w, u, **kw)
    assert rel(flows[..., :128], triton[..., :128]) < 1e-4 and rel(flows[..., 128:], triton[..., 128:]) < 1e-4
    wide = state_pass_mosaic(keys, G, w, u, **(kw | dict(block_v=128)))  # Tuning.flow_block_v: one P, one Q block
    assert rel(wide[..., :128], flows[..., :128]) < 1e-4 and rel(wide[..., 128:], flows[..., 128:]) < 1e-4


@pytest.mark.parametrize("flow", [False, True])
def test_mosaic_state_pass_lowers_for_the_gpu_without_one(flow):
    S = jax.ShapeDtypeStruct
    K = V = 128
    args = (S((BH, 64, n, K), jnp.bfloat16), S((BH, 64, n), jnp.float32), S((BH, 64, n, K), jnp.bfloat16),
            S((BH, 64, n, V), jnp.bfloat16), None if flow else S((BH * 2, K, V), jnp.float32))
    run = jax.jit(functools.partial(state_pass_mosaic, interpret=False, num_stages=3, segments=2, flow=flow,
                                    write_states=not flow))
    assert "mosaic_gpu" in run.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("segments, write_states", [(1, True), (2, False)])
def test_mosaic_state_pass_with_q_computes_the_output_kernels_outputs(segments, write_states):
    """``q``: o (and the corrected values) as ``chunk_output_kernel`` computes them from the Triton pass's S_in, the
    same roundings; q, keys and o token-major (``heads``), two ``V`` column blocks; without ``write_states`` no S_in."""
    keys, G, w, u, S0 = operands(64, 128, seed=7)
    q = (jax.random.normal(jax.random.PRNGKey(9), keys.shape) / 4).astype(jnp.bfloat16)
    S0 = jnp.concatenate([S0, -S0]) if segments == 2 else S0
    token = lambda x: jnp.moveaxis(x.reshape(1, *x.shape), 1, 3)  # [BH, N, n, d] -> [1, N, n, BH, d]
    outs = state_pass_mosaic(token(keys), G, w, u, S0, heads=BH, q=token(q), scale=0.125, save_corrected=True,
                             segments=segments, write_states=write_states, block_v=64)
    tri_in, tri_final = state_pass_kernel(keys, G, w, u, S0, segments=segments)
    o, corrected = chunk_output_kernel(q, keys, G, w, u, tri_in, rank=1, scale=0.125, out_dtype=jnp.bfloat16,
                                       save_corrected=True)
    S_final, o_m, corrected_m = outs[write_states:]
    assert len(outs) == 3 + write_states and o_m.shape == (1, N, n, BH, 128) and o_m.dtype == jnp.bfloat16
    assert rel(S_final, tri_final) < 1e-4 and rel(o_m, token(o)) < 1e-4 and rel(corrected_m, corrected) < 1e-4
    if write_states:
        assert rel(outs[0], tri_in) < 1e-4


@pytest.mark.parametrize("write_states", [True, False])
def test_mosaic_state_pass_with_q_lowers_for_the_gpu_without_one(write_states):
    S = jax.ShapeDtypeStruct
    K = V = 128
    token = S((1, 64, n, BH, K), jnp.bfloat16)
    args = (token, S((BH, 64, n), jnp.float32), S((BH, 64, n, K), jnp.bfloat16), S((BH, 64, n, V), jnp.bfloat16),
            S((BH * 2, K, V), jnp.float32))
    run = jax.jit(functools.partial(state_pass_mosaic, interpret=False, num_stages=4, segments=2, heads=BH,
                                    write_states=write_states, save_corrected=write_states, scale=0.1))
    assert "mosaic_gpu" in run.trace(*args, q=token).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("change, error, match", [
    (dict(save_corrected=True), ValueError, "needs q"),
    (dict(q="keys", flow=True, S0=None, write_states=False), ValueError, "no flow mode"),
    (dict(flow=True), ValueError, "S0=None"),
    (dict(resets=object()), ValueError, "unpacked"),
    (dict(flow=True, S0=None, write_states=False, dtype=jnp.float32), TypeError, "bfloat16"),
    (dict(segments=3), ValueError, "segments"),
    (dict(num_stages=0), ValueError, "num_stages"),
    (dict(num_warps=8), ValueError, "num_warps"),
    (dict(dtype=jnp.float32), TypeError, "bfloat16"),
])
def test_mosaic_state_pass_rejects_what_it_does_not_run(change, error, match):
    keys, G, w, u, S0 = operands(128, 128)
    dtype = change.pop("dtype", None)
    if dtype is not None:
        keys, w, u = (x.astype(dtype) for x in (keys, w, u))
    change = {key: keys if val == "keys" else val for key, val in change.items()}  # q: the keys' shape
    with pytest.raises(error, match=match):
        state_pass_mosaic(keys, G, w, u, **{"S0": S0, **change})


def test_mosaic_segment_flows_need_column_blocks_dividing_K():
    S = jax.ShapeDtypeStruct
    keys = S((BH, N, n, 192), jnp.bfloat16)
    with pytest.raises(ValueError, match="K multiples of block_v"):
        state_pass_mosaic(keys, S((BH, N, n), jnp.float32), keys, S((BH, N, n, 128), jnp.bfloat16), None, flow=True,
                          write_states=False, block_v=128)


def test_mosaic_state_pass_shared_memory_bounds_the_pipeline_depth():
    """Stages beyond what fits are dropped (the Triton kernel's stage counts need not fit); a column block
    too wide for even one stage is refused."""
    S = jax.ShapeDtypeStruct
    lower = lambda K, block_v, stages: jax.jit(functools.partial(
        state_pass_mosaic, interpret=False, block_v=block_v, num_stages=stages)).trace(
        S((1, 8, n, K), jnp.bfloat16), S((1, 8, n), jnp.float32), S((1, 8, n, K), jnp.bfloat16),
        S((1, 8, n, K), jnp.bfloat16), S((1, K, K), jnp.float32)).lower(lowering_platforms=("cuda",))
    lower(128, 128, 4)  # 3 stages of 48 KiB fit beside the 81 KiB of state tiles, 4 would not
    with pytest.raises(ValueError, match="shared memory"):
        lower(256, 256, 1)


def bwd_operands(seed=2):
    """bf16 q, keys, w, do and float32 G, dS_final (K = V = 64) for the backward pass, head-major."""
    keys, G, w, do, dS_final = operands(64, 64, seed)
    q = (jax.random.normal(jax.random.PRNGKey(seed + 1), keys.shape) / 8).astype(jnp.bfloat16)
    return q, keys, G, w, do, dS_final


def test_mosaic_state_pass_bwd_matches_reference_and_triton_kernel():
    args, kw = bwd_operands(), dict(rank=1, scale=0.125)
    out = state_pass_bwd_mosaic(*args, **kw)
    ref, tri = state_pass_bwd_reference(*args, **kw), state_pass_bwd_kernel(*args, **kw)
    assert [x.dtype for x in out] == [jnp.bfloat16, jnp.bfloat16, jnp.float32]
    for got, want, triton in zip(out, ref, tri):
        assert rel(got, want) < 1e-2 and rel(got, triton) < 1e-4  # bf16 operands vs float32; the same roundings
    assert rel(state_pass_bwd_mosaic(*args, **kw, write_states=False), out[2]) < 1e-6  # only dS0


def test_mosaic_state_pass_bwd_segments_run_from_their_own_cotangents():
    """Two segments of two chunks, each in reverse from its own dS_final row, against the Triton kernel's
    segments and the reference; ``write_states=False`` (the segmented scan's first pass): the same dS0."""
    q, keys, G, w, do, dS_final = bwd_operands(seed=4)
    args, kw = (q, keys, G, w, do, jnp.concatenate([dS_final, -dS_final])), dict(rank=1, scale=0.125, segments=2)
    out = state_pass_bwd_mosaic(*args, **kw)
    ref, tri = state_pass_bwd_reference(*args, **kw), state_pass_bwd_kernel(*args, **kw)
    assert out[2].shape == (2 * BH, 64, 64)
    for got, want, triton in zip(out, ref, tri):
        assert rel(got, want) < 1e-2 and rel(got, triton) < 1e-4
    assert rel(state_pass_bwd_mosaic(*args, **kw, write_states=False), out[2]) < 1e-6  # only dS0


@pytest.mark.parametrize("segments, write_states", [(1, True), (2, False)])
def test_mosaic_state_pass_bwd_lowers_for_the_gpu_without_one(segments, write_states):
    S = jax.ShapeDtypeStruct
    tokens = lambda d: S((1, 64, n, BH, d), jnp.bfloat16)  # q, keys, do token-major
    args = (tokens(128), tokens(128), S((BH, 64, n), jnp.float32), S((BH, 64, n, 128), jnp.bfloat16), tokens(128),
            S((BH * segments, 128, 128), jnp.float32))
    run = jax.jit(functools.partial(state_pass_bwd_mosaic, rank=1, scale=0.125, heads=BH, interpret=False,
                                    segments=segments, write_states=write_states))
    assert "mosaic_gpu" in run.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("change, match", [(dict(rank=2), "rank"), (dict(segments=3), "segments"),
                                           (dict(resets=object()), "unpacked"), (dict(num_warps=8), "num_warps")])
def test_mosaic_state_pass_bwd_rejects_what_it_does_not_run(change, match):
    with pytest.raises(ValueError, match=match):
        state_pass_bwd_mosaic(*bwd_operands(), **{"rank": 1, "scale": 0.125, **change})


def op_inputs():
    """bf16 q, k, v [1, 256, 2, 64] and float32 steps beta [1, 256, 2] for the whole op (4 chunks of 64)."""
    kq, kk, kv, kb = jax.random.split(jax.random.PRNGKey(3), 4)
    B, T, H, K = 1, 256, 2, 64
    q = jax.random.normal(kq, (B, T, H, K)).astype(jnp.bfloat16)
    k = (jax.random.normal(kk, (B, T, H, K)) / K**0.5).astype(jnp.bfloat16)
    v = jax.random.normal(kv, (B, T, H, K)).astype(jnp.bfloat16)
    return q, k, v, jax.nn.sigmoid(jax.random.normal(kb, (B, T, H), jnp.float32))


@pytest.mark.parametrize("scan, additive", [("sequential", False), ("associative", False), ("sequential", True)],
                         ids=["sequential", "associative", "additive"])
def test_op_with_mosaic_state_passes_matches_the_triton_lowering(scan, additive):
    """``Tuning(state_lowering="mosaic")`` through the whole pallas op (bf16): the same outputs, final state and
    gradients as the Triton lowering. Sequential scan: the Mosaic forward and backward passes; associative
    (2 segments of 2 chunks): the segment flows, the last forward pass and both reverse passes of the
    segmented backward on Mosaic. ``additive``: linear attention's path (the Additive solver, ``w = 0``), which
    the Mosaic passes read as a formed ``w`` of zeros and a head-major ``u``."""
    from flowssm.kernels import Tuning, chunked_pallas
    from flowssm.paths import linear_attention_path, make_path
    from flowssm.solvers import Additive, get_solver

    q, k, v, beta = op_inputs()
    B, T, H, K = q.shape

    def run(lowering, q, k, v):  # segment_programs=4: 2 heads x 2 segments
        path = (linear_attention_path(k.astype(jnp.float32), v.astype(jnp.float32)) if additive
                else make_path(k, v, beta, dtype=jnp.float32))
        o, S = chunked_pallas(q, path, jnp.zeros((B, H, K, K), jnp.float32), scale=K**-0.5, chunk_size=64,
                              solver=Additive() if additive else get_solver("exact"), scan=scan,
                              semantics="discrete", tuning=Tuning(state_lowering=lowering, segment_programs=4))
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(S), (o, S)

    grads = lambda lowering: jax.jit(jax.value_and_grad(functools.partial(run, lowering), argnums=(0, 1, 2),
                                                        has_aux=True))  # jitted: one compile, no eager dispatch
    mosaic = grads("mosaic")
    jaxpr = str(jax.make_jaxpr(mosaic)(q, k, v))
    passes = set(re.findall(r"flowssm_(?:state_pass|segment_flows)\w*", jaxpr))  # Triton's: no _mosaic
    flows = {"flowssm_segment_flows_mosaic"} if scan == "associative" else set()
    assert passes == {"flowssm_state_pass_mosaic", "flowssm_state_pass_bwd_mosaic"} | flows
    (_, (o_m, S_m)), g_m = mosaic(q, k, v)
    (_, (o_t, S_t)), g_t = grads("triton")(q, k, v)
    # additive: without erasure or decay the state grows over the 256 tokens, and the states entering the chunks are
    # rounded to bf16 after float32 sums taken in another order (the Triton pass skips the product with w = 0):
    # o moves by 7.7e-5, a few bf16 roundings
    assert rel(o_m, o_t) < (2**-9 if additive else 1e-5) and rel(S_m, S_t) < 1e-5
    # associative: the two lowerings' segment flows differ in the last float32 bit (the interpreted matmuls sum in
    # another order) and P enters the segmented backward unrounded, flipping bf16 roundings of its cotangents:
    # dk moves by 7.5e-4 (as with Triton's own flows times 1 + 1e-7 noise), below bf16's unit roundoff
    tol = 2**-9 if scan == "associative" or additive else 1e-4
    assert all(rel(a, b) < tol for a, b in zip(g_m, g_t))


@pytest.mark.parametrize("scan, additive", [("sequential", False), ("associative", False), ("sequential", True)],
                         ids=["sequential", "associative", "additive"])
def test_op_with_the_output_fused_into_the_mosaic_pass_matches_the_output_kernel(scan, additive):
    """``Tuning(output="fused")`` through the whole op (Mosaic passes, bf16; associative: 2 segments of 2 chunks;
    additive: linear attention, ``w = 0`` formed, the corrected values not saved): no output kernel runs, and the
    outputs, final state and gradients are those of ``output="kernel"``."""
    from flowssm.kernels import Tuning, chunked_pallas
    from flowssm.paths import linear_attention_path, make_path
    from flowssm.solvers import Additive, get_solver

    q, k, v, beta = op_inputs()
    B, T, H, K = q.shape

    def run(output, q, k, v):
        path = (linear_attention_path(k.astype(jnp.float32), v.astype(jnp.float32)) if additive
                else make_path(k, v, beta, dtype=jnp.float32))
        o, S = chunked_pallas(q, path, jnp.zeros((B, H, K, K), jnp.float32), scale=K**-0.5, chunk_size=64,
                              solver=Additive() if additive else get_solver("exact"), scan=scan, semantics="discrete",
                              tuning=Tuning(state_lowering="mosaic", segment_programs=4, output=output))
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(S), (o, S)

    grads = lambda output: jax.jit(jax.value_and_grad(functools.partial(run, output), argnums=(0, 1, 2), has_aux=True))
    forward = lambda output: jax.jit(lambda *a: run(output, *a)[1])
    kernels = lambda f: set(re.findall(r"flowssm_\w+", str(jax.make_jaxpr(f)(q, k, v))))
    assert "flowssm_chunk_output" not in kernels(forward("fused"))
    assert "flowssm_chunk_output" in kernels(forward("kernel"))
    (_, (o_f, S_f)), g_f = grads("fused")(q, k, v)
    (_, (o_k, S_k)), g_k = grads("kernel")(q, k, v)
    o_alone, S_alone = forward("fused")(q, k, v)  # without a backward: no S_in written
    # the same roundings; o's float32 products sum in another order (wgmma in the interpreter vs Triton's dot)
    assert rel(o_f, o_k) < 1e-5 and rel(o_alone, o_k) < 1e-5 and rel(S_f, S_k) < 1e-6 and rel(S_alone, S_k) < 1e-6
    assert all(rel(a, b) < 1e-5 for a, b in zip(g_f, g_k))


@pytest.mark.parametrize("output", ["auto", "kernel"])
def test_auto_scan_forward_with_the_output_fused_splits_like_one_with_a_backward(monkeypatch, output):
    """A forward without a backward (``scan="auto"``) on the Mosaic pass: with the output fused, segmented from
    ``AUTO_MIN_CHUNKS`` like the backward (here 2 segments of 2 chunks on a GPU of 4 multiprocessors) and no
    output kernel; with the output kernel, sequential below ``AUTO_MIN_CHUNKS_FORWARD``."""
    from flowssm.kernels import Tuning, chunked_pallas, launch
    from flowssm.paths import make_path
    from flowssm.solvers import get_solver

    monkeypatch.setattr(launch, "sm_count", lambda: 4)
    monkeypatch.setattr(launch, "AUTO_MIN_CHUNKS", 4)
    q, k, v, beta = op_inputs()
    B, T, H, K = q.shape
    forward = lambda q, k, v: chunked_pallas(
        q, make_path(k, v, beta, dtype=jnp.float32), jnp.zeros((B, H, K, K), jnp.float32), scale=K**-0.5,
        chunk_size=64, solver=get_solver("exact"), scan="auto", semantics="discrete",
        tuning=Tuning(state_lowering="mosaic", output=output))
    kernels = set(re.findall(r"flowssm_\w+", str(jax.make_jaxpr(forward)(q, k, v))))
    fused = output == "auto"
    assert ("flowssm_segment_flows_mosaic" in kernels) == fused and ("flowssm_chunk_output" in kernels) != fused

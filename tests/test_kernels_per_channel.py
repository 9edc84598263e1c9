"""Pallas kernels with per-channel decays (GLA, KDA; interpret mode on CPU): every stage against its jnp
reference, the ops and their gradients against backend "xla", strong decays against the float64 token loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flowssm
from flowssm import chunks
from flowssm.kernels import chunked as kc
from flowssm.kernels import decay
from flowssm.kernels.chunk_output import (chunk_output_bwd_kernel, chunk_output_bwd_reference, chunk_output_kernel,
                                          chunk_output_reference)
from flowssm.kernels.chunk_transfer import (chunk_transfer_bwd_kernel, chunk_transfer_bwd_reference,
                                            chunk_transfer_kernel, chunk_transfer_reference)
from flowssm.kernels.cumulative_decay import (cumulative_decay_kernel, cumulative_decay_vjp_kernel, end_keys,
                                             micro_log_decay)
from flowssm.kernels.common import head_major, reference_dot
from flowssm.kernels.state_pass import (state_pass_bwd_kernel, state_pass_bwd_reference, state_pass_kernel,
                                        state_pass_reference)
from flowssm.solvers import Euler, Exact

F64 = jnp.float64
B, T, H, K, V = 1, 64, 2, 16, 16


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def inputs(seed, strength=1.0, dtype=F64):
    """q, k, v, beta, per-channel g (per-token log-decays in [-strength, 0]), S0 in fla's layout."""
    r = np.random.default_rng(seed)
    k = r.normal(size=(B, T, H, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    arrays = (r.normal(size=(B, T, H, K)), k, r.normal(size=(B, T, H, V)), r.uniform(0, 1, (B, T, H)),
              -r.uniform(0, strength, (B, T, H, K)), r.normal(size=(B, H, K, V)))
    return tuple(jnp.asarray(x, dtype) for x in arrays)


@pytest.mark.parametrize("strength,form", [(0.5, "whole"), (3.0, "factored"), (10.0, "looped")],
                         ids=["whole", "factored", "looped"])
def test_decayed_scores_and_vjp_match_the_jnp_scores(strength, form, C=64, R=2):
    """``decay.scores`` (transfer and output masks, four time blocks, two micro-steps a token) and its vjp
    equal ``chunks.decayed_scores`` and autodiff, on each of its forms: the whole chunk through one decay (weak
    decays), blocks factored through one decay each (a chunk's decay past ``decay.CHUNK_RANGE``) and the loops
    (a block's decay past ``decay.BLOCK_RANGE``)."""
    r = np.random.default_rng(C)
    n = C * R
    G_tok = jnp.cumsum(-r.uniform(0, strength, (C, K)), axis=0)
    G = jnp.repeat(G_tok, R, axis=0)
    k, q = jnp.asarray(r.normal(size=(n, K))), jnp.asarray(r.normal(size=(C, K)))
    blocks = chunks.score_blocks(C)
    items = decay.array_rows(k, G)
    taken = "whole" if decay.whole(items, n) else "factored" if decay.factored(items, n, blocks) else "looped"
    assert taken == form
    for left, G_left, rank, shift in ((k, G, 1, 0), (q, G_tok, R, R)):
        visible = jnp.arange(n)[None] < rank * jnp.arange(left.shape[0])[:, None] + shift
        ref = lambda *a: chunks.decayed_scores(*a, visible, blocks)
        kw = dict(blocks=blocks, rank=rank, shift=shift, matmul=reference_dot, operand_dtype=F64)
        A, vjp = jax.vjp(ref, left, G_left, k, G)
        assert rel(decay.scores(left, G_left, k, G, **kw), A) < 1e-13
        assert rel(decay.scores(left, G_left, k, G, channels=K // 2, **kw), A) < 1e-13  # two channel blocks
        dA = jnp.asarray(r.normal(size=A.shape))
        d_left, dG_left, d_right, dG_right = vjp(dA)
        got_left, got_right = decay.scores_vjp(left, G_left, k, G, dA, **kw)
        for a, b in ((got_left, d_left), (got_right, d_right), (left * got_left, dG_left), (-k * got_right, dG_right)):
            assert rel(a, b) < 1e-13


@pytest.mark.parametrize("R", [1, 2])
def test_cumulative_decay_kernels_match_the_cumsums_and_autodiff(R, BH=2, N=2, C=16):
    """The prefix-mask kernels equal ``micro_log_decay`` (cumsums) and its autodiff, hard resets included
    (gradient 0 there); scalar decays go through the jnp functions."""
    r = np.random.default_rng(R)
    for shape in ((BH, N, C, K), (BH, N, C)):
        g = -r.uniform(0, 2, shape)
        g[0, 1, 5], g[1, 0, 0] = -np.inf, -np.inf
        g = jnp.asarray(g, F64)
        G, vjp = jax.vjp(lambda x: micro_log_decay(x, R), g)
        assert rel(cumulative_decay_kernel(g, R), G) < 1e-14
        dG = jnp.asarray(r.normal(size=G.shape))
        got = cumulative_decay_vjp_kernel(g, dG, R)
        assert got.shape == g.shape and rel(got, vjp(dG)[0]) < 1e-14
        assert float(jnp.abs(got[0, 1, 5]).max()) == 0.0
        if g.ndim == 4:  # with the keys (token-major, two heads): also the keys decayed to their chunk's end
            keys = jnp.asarray(r.normal(size=(1, N, C * R, BH, K)))
            got_G, k_end = cumulative_decay_kernel(g, R, keys=keys, heads=BH)
            assert rel(got_G, G) < 1e-14 and rel(k_end, end_keys(head_major(keys, BH), G)) < 1e-14
            assert rel(k_end[:, :, -1], head_major(keys, BH)[:, :, -1]) < 1e-15  # the last micro-step: not decayed


def stage_inputs(seed=0, BH=2, N=2, C=32, R=1, key_dim=K):
    r = np.random.default_rng(seed)
    n = C * R
    keys, values = r.normal(size=(BH, N, n, key_dim)) / 4, r.normal(size=(BH, N, n, V))
    beta, alpha = r.uniform(0, 1, (BH, N, n)), r.uniform(0, 1, (BH, N, n))
    log_decay = -r.uniform(0, 3, (BH, N, C, key_dim))
    return tuple(jnp.asarray(x, F64) for x in (keys, values, beta, alpha, log_decay))


@pytest.mark.parametrize("solver", [Exact(), Euler()], ids=repr)
def test_transfer_kernels_match_references(solver):
    args = stage_inputs()
    exact = isinstance(solver, Exact)
    w, u, *T = chunk_transfer_kernel(*args, solver=solver, save_transfer=exact)
    for a, b in zip((w, u), chunk_transfer_reference(*args, solver=solver)):
        assert rel(a, b) < 1e-12
    r = np.random.default_rng(1)
    dw, du = jnp.asarray(r.normal(size=w.shape)), jnp.asarray(r.normal(size=u.shape))
    kernel = chunk_transfer_bwd_kernel(*args, T[0] if exact else None, w, u, dw, du, solver=solver)
    for a, b in zip(kernel, chunk_transfer_bwd_reference(*args, None, w, u, dw, du, solver=solver)):
        assert a.shape == b.shape and rel(a, b) < 1e-12
    S_in = jnp.asarray(r.normal(size=(*w.shape[:2], w.shape[-1], u.shape[-1])))  # dw = -du S_in^T formed inside
    kernel = chunk_transfer_bwd_kernel(*args, T[0] if exact else None, w, u, None, du, solver=solver, S_in=S_in)
    for a, b in zip(kernel, chunk_transfer_bwd_reference(*args, None, w, u, None, du, solver=solver, S_in=S_in)):
        assert rel(a, b) < 1e-12


def test_state_pass_and_output_kernels_match_references_and_autodiff():
    """Forward kernels equal their references; the backward kernels equal autodiff of the forward references."""
    keys, values, beta, alpha, log_decay = stage_inputs(seed=2)
    BH, N, n, _ = keys.shape
    C = log_decay.shape[2]
    R = n // C
    w, u = chunk_transfer_reference(keys, values, beta, alpha, log_decay, solver=Exact())
    G = micro_log_decay(log_decay, R)
    r = np.random.default_rng(3)
    q, do = jnp.asarray(r.normal(size=(BH, N, C, K))), jnp.asarray(r.normal(size=(BH, N, C, V)))
    S0, dS_final = jnp.asarray(r.normal(size=(BH, K, V))), jnp.asarray(r.normal(size=(BH, K, V)))
    static = dict(rank=R, scale=0.3)
    S_in, S_final = state_pass_kernel(keys, G, w, u, S0, block_v=8)
    for a, b in zip((S_in, S_final), state_pass_reference(keys, G, w, u, S0)):
        assert rel(a, b) < 1e-13
    k_end = jnp.exp(G[:, :, -1:] - G) * keys  # the transfer's end keys: the pass reads only G's last rows
    for a, b in zip(state_pass_kernel(k_end, G, w, u, S0, block_v=8, decayed_keys=True), (S_in, S_final)):
        assert rel(a, b) < 1e-13
    o, corrected, scores = chunk_output_kernel(q, keys, G, w, u, S_in, save_corrected=True, save_scores=True,
                                               **static)
    assert rel(o, chunk_output_reference(q, keys, G, w, u, S_in, **static)) < 1e-13

    def forward(q, keys, G, w, u, S0):
        S_in, S_final = state_pass_reference(keys, G, w, u, S0)
        return chunk_output_reference(q, keys, G, w, u, S_in, **static), S_final

    dq, dk, dG, dw, du, dS0 = jax.vjp(forward, q, keys, G, w, u, S0)[1]((do, dS_final))
    passes = [f(q, keys, G, w, do, dS_final, **static) for f in (state_pass_bwd_kernel, state_pass_bwd_reference)]
    # the reverse pass reading the forward's attention blocks instead of recomputing them
    passes.append(state_pass_bwd_kernel(q, keys, G, w, do, dS_final, scores=scores, **static))
    for a, b, c in zip(*passes):
        assert rel(a, b) < 1e-13 and rel(c, b) < 1e-13
    dS_out, dv, got_dS0 = passes[0]
    assert rel(dv, du) < 1e-12 and rel(got_dS0, dS0) < 1e-12
    outs = [f(q, keys, G, corrected, S_in, dS_out, do, **static, **kw)
            for f, kw in ((chunk_output_bwd_kernel, dict(block_k=8)), (chunk_output_bwd_reference, {}))]
    for a, b, want in zip(*outs, (dq, dk, dG)):
        assert rel(a, b) < 1e-13 and rel(a, want) < 1e-12
    assert rel(-jnp.einsum("bcnv,bckv->bcnk", dv, S_in), dw) < 1e-12  # the dw the transfer backward forms


def _ops(family, q, k, v, beta, g, S0, **kw):
    if family == "gla":
        return flowssm.linear_attention(q, k, v, g, initial_state=S0, **kw)
    return flowssm.delta_rule(q, k, v, beta, g, initial_state=S0, **kw)


@pytest.mark.parametrize("family, scan", [("gla", "sequential"), ("kda", "associative")])
def test_ops_and_gradients_match_xla(family, scan):
    """Outputs, final states and the gradients of every input (g included) equal backend "xla" in float64;
    ``associative`` runs the segmented scan (segment flows with per-row decay) forward and backward (the
    sequential passes: the stage test above)."""
    args = inputs(4, strength=1.0)
    r = np.random.default_rng(5)
    do, dS = jnp.asarray(r.normal(size=(B, T, H, V))), jnp.asarray(r.normal(size=(B, H, K, V)))

    def loss(backend, *a):
        o, S = _ops(family, *a, chunk_size=16, scan=scan, backend=backend)
        return jnp.sum(o * do) + jnp.sum(S * dS), (o, S)

    grads = {b: jax.grad(lambda *a: loss(b, *a), argnums=tuple(range(6)), has_aux=True)(*args)
             for b in ("pallas", "xla")}
    (g_pallas, out_pallas), (g_xla, out_xla) = grads["pallas"], grads["xla"]
    for a, b in zip(out_pallas, out_xla):
        assert rel(a, b) < 1e-10
    for i, (a, b) in enumerate(zip(g_pallas, g_xla)):
        if family == "gla" and i == 3:  # beta is not an input of linear attention
            continue
        assert rel(a, b) < 1e-9, i


def test_packed_sequences_match_xla():
    """Packed sequences (``cu_seqlens``) restart the per-channel passes at each sequence start, sequential
    and segmented."""
    q, k, v, beta, g, _ = inputs(6)
    cu = jnp.asarray([0, 20, 64], jnp.int32)
    h0 = jnp.asarray(np.random.default_rng(7).normal(size=(2, H, K, V)))
    run = lambda backend, scan: flowssm.delta_rule(q, k, v, beta, g, initial_state=h0, cu_seqlens=cu, chunk_size=16,
                                                   scan=scan, backend=backend)
    want = run("xla", "sequential")
    for scan in ("sequential", "associative"):
        for a, b in zip(run("pallas", scan), want):
            assert rel(a, b) < 1e-10


def test_strong_decays_in_float32_match_the_float64_token_loop():
    """Per-token log-decays down to -5 over chunks of 64 (cumulative decays near -320) in float32."""
    args = inputs(8, strength=5.0)
    want = flowssm.delta_rule(*args[:5], initial_state=args[5], backend="reference")
    got = flowssm.delta_rule(*(x.astype(jnp.float32) for x in args[:5]), initial_state=args[5].astype(jnp.float32),
                             chunk_size=64, backend="pallas")
    for a, b in zip(got, want):
        assert np.all(np.isfinite(np.asarray(a))) and rel(a, b) < 1e-5


def test_dplr_is_still_refused_on_pallas():
    q, k, v, _, g, _ = inputs(9)
    with pytest.raises(ValueError, match="dplr"):
        flowssm.dplr_delta_rule(q, k, v, -k, k, g, backend="pallas")



def test_score_mode_sets_the_precision_of_the_decayed_scores():
    """``Tuning.score_mode`` reaches the kernels: on bf16 operands (interpret mode) "operand" rounds the scores'
    products to bf16, "tf32" (float32 on the CPU) keeps the output backward's float32 cotangents (dG; dk leaves in
    the operand dtype) at float32 accuracy; an unknown mode is refused, named."""
    r = np.random.default_rng(3)
    BH, N, C = 2, 1, 32
    bf16 = lambda *shape: jnp.asarray(r.normal(size=shape), jnp.bfloat16)
    q, keys = bf16(BH, N, C, K), bf16(BH, N, C, K)
    corrected, S, dS, do = (x.astype(jnp.float32) for x in (bf16(BH, N, C, V), bf16(BH, N, K, V), bf16(BH, N, K, V),
                                                              bf16(BH, N, C, V)))
    G = micro_log_decay(jnp.asarray(-r.uniform(0, 0.5, (BH, N, C, K)), jnp.float32), 1)
    args = (q, keys, G, corrected, S, dS, do)
    *_, dG_want = chunk_output_bwd_reference(*(x.astype(F64) for x in args), rank=1, scale=0.25)
    errors = {mode: rel(chunk_output_bwd_kernel(*args, rank=1, scale=0.25, score_mode=mode)[2], dG_want)
              for mode in ("operand", "tf32")}
    assert errors["tf32"] < 1e-5 < 1e-4 < errors["operand"], errors
    with pytest.raises(ValueError, match="Tuning.score_mode"):
        kc.Tuning(score_mode="bf16")


def test_a_configs_kernel_choices_reach_the_kernels(monkeypatch):
    """``model.mixer.kernels`` travels from the config through the layer and the op to ``chunked_pallas``."""
    from flax import nnx

    import flowssm.kernels
    from flowssm.kernels import Tuning
    from flowssm.layers import DeltaMixer
    from flowssm.train import config as C

    seen, real = [], flowssm.kernels.chunked_pallas
    monkeypatch.setattr(flowssm.kernels, "chunked_pallas",
                        lambda *a, tuning=None, **kw: seen.append(tuning) or real(*a, tuning=tuning, **kw))
    cfg = C.load(None, ["model.d_model=32", "model.mixer.family=kda", "model.mixer.num_heads=2",
                        "model.mixer.backend=pallas", "model.mixer.chunk_size=16",
                        "model.mixer.kernels.score_mode=tf32"])
    mixer = DeltaMixer(32, cfg.model.mixer, rngs=nnx.Rngs(0))
    mixer(jnp.ones((1, 16, 32)))
    assert seen == [Tuning(score_mode="tf32")]


def test_kernels_form_the_scores_over_channel_blocks():
    """``channel_block``: the output kernel and the transfer (key channels in two blocks, rank 2, token-major
    operands) equal them forming the scores over all channels at once."""
    keys, values, beta, alpha, log_decay = stage_inputs(seed=4, R=2, key_dim=64)
    BH, N, n, Kb = keys.shape
    C, R, H = log_decay.shape[2], 2, 2
    G = micro_log_decay(log_decay, R)
    r = np.random.default_rng(5)
    q = jnp.asarray(r.normal(size=(BH // H, N, C, H, Kb)))
    tok = lambda x: jnp.moveaxis(x.reshape(BH // H, H, *x.shape[1:]), 1, 3)  # head-major -> token-major
    w, u = chunk_transfer_reference(keys, values, beta, alpha, log_decay, solver=Exact())
    S_in = jnp.asarray(r.normal(size=(BH, N, Kb, V)))
    output = lambda **kw: chunk_output_kernel(q, tok(keys), G, w, u, S_in, rank=R, scale=0.3, heads=H,
                                              save_corrected=True, save_scores=True, **kw)
    transfer = lambda **kw: chunk_transfer_kernel(tok(keys), tok(values), beta, alpha, log_decay, solver=Exact(),
                                                  heads=H, save_transfer=True, **kw)
    for stage in (output, transfer):
        for a, b in zip(stage(channel_block=32), stage()):
            assert rel(a, b) < 1e-13

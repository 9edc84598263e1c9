"""Generalised transitions against fla: GLA, KDA and DPLR, correctness and timings (issue 17).

    python3 benchmarks/bench_kernels.py transitions [--reps 30] [--kinds gla,kda,dplr] [--backend auto] [--no-fla] [--tiny]
        [--tuning score_mode=tf32]
    python3 benchmarks/bench_transitions.py ...   (the same)

For each kind, on 4x4096x16x128x128 (B x T x H x K x V; ``--tiny``: 1x64x2x16x16 on CPU, no fla), bf16
q, k, v, a, b and log-decays (as fla's tests): flowssm's op (``--backend auto``: the Pallas kernels for GLA
and KDA, per-channel decays; xla for DPLR, which the kernels do not run; ``--backend xla``: xla for all)
forward and forward+backward, timed (median ms a call), and fla 0.6.0's
``chunk_gla`` / ``chunk_kda`` / ``chunk_dplr_delta_rule`` on the same inputs (triton's do_bench), with
the relative error of flowssm's outputs and final state against fla's; a pallas row also reports its
outputs', final state's and largest input gradient's errors against the xla backend (``err_*_vs_xla``).
Without fla (or ``--no-fla``) the outputs are checked against flowssm's float32 token loop instead (tiny
shapes only: it is slow).
Conventions (both sides): ``S_t = diag(e^{g_t}) S_{t-1} + k v^T`` (GLA, fla's ``g``);
``S_t = (I - beta k k^T) diag(e^{g_t}) S_{t-1} + beta k v^T`` (KDA, fla's ``g``, ``beta``);
``S_t = (diag(e^{gk_t}) + b a^T) S_{t-1} + k v^T`` (DPLR, fla's ``a, b, gk``); scale ``K^-0.5``.
``--tuning``: the kernels' choices for GLA and KDA (``flowssm.kernels.Tuning`` fields, ``field=value,...``), passed
as the ops' ``tuning=``; each row records them. Writes ``bench_transitions.json`` to ``--out`` (default $OUT)
when given.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import flowssm
from timing import rel, timed

SHAPE, TINY = (4, 4096, 16, 128, 128), (1, 64, 2, 16, 16)
KINDS = ("gla", "kda", "dplr")
INPUTS = {"gla": ("q", "k", "v", "g"), "kda": ("q", "k", "v", "beta", "g"), "dplr": ("q", "k", "v", "a", "b", "g")}


def inputs(seed, B, T, H, K, V):
    """bf16 q, unit keys k, v, beta (sigmoid), dplr ``a = -k``, ``b = k sigmoid(.)``, do and the per-channel
    log-decay ``g = log sigmoid(N(0, 1) + 2)`` (about -0.13 a token)."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    bf = lambda x: x.astype(jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, H, K))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    rate = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H, K)))
    return dict(q=bf(jax.random.normal(ks[0], (B, T, H, K))), k=bf(k), v=bf(jax.random.normal(ks[2], (B, T, H, V))),
                beta=bf(jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))), a=bf(-k), b=bf(k * rate),
                g=bf(jax.nn.log_sigmoid(jax.random.normal(ks[5], (B, T, H, K)) + 2.0)),
                do=bf(jax.random.normal(ks[6], (B, T, H, V))))


def flowssm_call(kind, x, **options):
    """``(o, S)`` of flowssm's op for ``kind`` on the inputs ``x``."""
    if kind == "gla":
        return flowssm.linear_attention(x["q"], x["k"], x["v"], x["g"], **options)
    if kind == "kda":
        return flowssm.delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], **options)
    return flowssm.dplr_delta_rule(x["q"], x["k"], x["v"], x["a"], x["b"], x["g"], **options)


def kind_backend(kind, backend):
    """The backend a row runs: ``"auto"`` is pallas where the kernels run the transition (not dplr), on any
    device (interpret mode on CPU); otherwise ``backend`` itself."""
    if backend == "auto":
        return "xla" if kind == "dplr" else "pallas"
    return backend


def flowssm_fns(kind, chunk_size, backend="xla", tuning=None):
    """Jitted forward and forward+backward (grads of ``sum(o * do)`` w.r.t. every input but ``do``); ``tuning``:
    the kernels' choices (GLA and KDA; dplr has none: ``main`` refuses any for it)."""
    kernels = {} if tuning is None or kind == "dplr" else {"tuning": tuning}
    options = dict(chunk_size=chunk_size, backend=backend, **kernels)
    fwd = jax.jit(lambda x: flowssm_call(kind, x, **options))

    def loss(x, do):
        o = flowssm_call(kind, x, **options)[0]
        return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))

    return fwd, jax.jit(jax.grad(loss))


def fla_run(kind, x, reps_ms):
    """fla's outputs ``(o, S)`` (numpy) and its median forward / forward+backward ms."""
    import torch
    from fla.ops.generalized_delta_rule.dplr import chunk_dplr_delta_rule
    from fla.ops.gla import chunk_gla
    from fla.ops.kda import chunk_kda
    from triton.testing import do_bench

    def t(a, grad=True):
        dtype = torch.bfloat16 if a.dtype == jnp.bfloat16 else torch.float32
        return torch.from_numpy(np.asarray(a.astype(jnp.float32))).cuda().to(dtype).requires_grad_(grad)

    tx = {name: t(a, name != "do") for name, a in x.items()}
    common = dict(q=tx["q"], k=tx["k"], v=tx["v"], output_final_state=True)
    fwd = {
        "gla": lambda: chunk_gla(g=tx["g"], **common),
        "kda": lambda: chunk_kda(g=tx["g"], beta=tx["beta"], **common),
        "dplr": lambda: chunk_dplr_delta_rule(a=tx["a"], b=tx["b"], gk=tx["g"], **common),
    }[kind]
    o, S = fwd()
    out = {"o": o.detach().float().cpu().numpy(), "S": S.detach().float().cpu().numpy()}
    bench = lambda f: do_bench(f, warmup=50, rep=reps_ms, return_mode="median")
    out["fwd"] = bench(lambda: fwd()[0])
    out["fwdbwd"] = bench(lambda: fwd()[0].backward(tx["do"]))
    del tx
    torch.cuda.empty_cache()
    return out


def row(kind, shape, reps, fla_ok, say, chunk_size, backend="auto", tuning=None):
    """One kind's row: flowssm timings and its errors against fla (or the token loop); ``tuning``: as in
    :func:`flowssm_fns`."""
    x = inputs(0, *shape)
    backend = kind_backend(kind, backend)
    fwd, fwdbwd = flowssm_fns(kind, chunk_size, backend, tuning)
    o, S = fwd(x)
    r = {"kind": kind, "backend": backend, "shape": "x".join(map(str, shape)),
         "tuning": tuning.changes() if tuning is not None else {},
         "flowssm_fwd": timed(fwd, x, reps=reps), "flowssm_fwdbwd": timed(fwdbwd, x, x["do"], reps=reps)}
    if backend != "xla":  # the kernels against the xla path: outputs, final state, every input's gradient
        xla_fwd, xla_fwdbwd = flowssm_fns(kind, chunk_size, "xla")
        o_xla, S_xla = xla_fwd(x)
        grads, grads_xla = fwdbwd(x, x["do"]), xla_fwdbwd(x, x["do"])
        r.update(err_o_vs_xla=rel(o, o_xla), err_S_vs_xla=rel(S, S_xla),
                 err_grad_vs_xla=max(rel(grads[n], grads_xla[n]) for n in INPUTS[kind]))
    say(kind, "flowssm", {key: (round(val, 4) if isinstance(val, float) else val) for key, val in r.items()})
    if fla_ok:
        fl = fla_run(kind, x, reps_ms=200)
        r.update(fla_fwd=fl["fwd"], fla_fwdbwd=fl["fwdbwd"], err_o_vs_fla=rel(o, fl["o"]), err_S_vs_fla=rel(S, fl["S"]))
    else:
        o_ref, S_ref = flowssm_call(kind, {n: a.astype(jnp.float32) for n, a in x.items()}, backend="reference")
        r.update(err_o_vs_token_loop=rel(o, o_ref), err_S_vs_token_loop=rel(S, S_ref))
    say(kind, {key: (round(val, 4) if isinstance(val, float) else val) for key, val in r.items()})
    return r


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--tiny", action="store_true", help=f"shape {TINY}, chunk 16, no fla (CPU smoke test)")
    parser.add_argument("--backend", default="auto", choices=("auto", "pallas", "xla"),
                        help="flowssm's backend (auto: pallas for gla and kda, xla for dplr)")
    parser.add_argument("--no-fla", action="store_true")
    parser.add_argument("--tuning", default="default", help="GLA's and KDA's kernel choices, e.g. 'score_mode=tf32'")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args(argv)
    kinds = args.kinds.split(",")
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"--kinds: expected a comma-separated subset of {KINDS}, got {kind!r}")
    from bench_kernels import tunings

    (tuning,) = tunings(args.tuning)
    if tuning.changes() and "dplr" in kinds:
        raise ValueError(f"--tuning: dplr runs no kernels; drop it from --kinds or the choices {tuning.changes()}")
    t0 = time.time()
    say = lambda *a: print(f"[{time.time() - t0:6.1f}s]", *a, flush=True)
    fla_ok = False
    if not (args.tiny or args.no_fla):
        try:
            import fla  # noqa: F401
            import torch

            fla_ok = torch.cuda.is_available()
        except ImportError as e:
            say("fla unavailable:", e)
    shape, chunk = (TINY, 16) if args.tiny else (SHAPE, 64)
    say("jax", jax.__version__, jax.devices(), "fla" if fla_ok else "no fla")
    rows = []
    for kind in kinds:  # the JSON is rewritten after every row
        rows.append(row(kind, shape, args.reps, fla_ok, say, chunk, args.backend, tuning))
        if args.out:
            with open(os.path.join(args.out, "bench_transitions.json"), "w") as f:
                json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()

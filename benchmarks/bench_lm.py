"""Training-step benchmark of the DeltaNet LM (and its GLA, KDA and packed variants): flowssm (pallas and xla
backends) against fla's models.

    python benchmarks/bench_lm.py --out /tmp/lm                        # GPU: every row of the table
    python benchmarks/bench_lm.py --rows flowssm-pallas-4,fla-4 --steps 10
    python benchmarks/bench_lm.py --tiny                               # CPU smoke test (tiny model)
    python benchmarks/bench_lm.py --rows flowssm-pallas-4 --kernels '{"output": "kernel"}'   # a launch variant
    python benchmarks/bench_lm.py --rows flowssm-pallas-4,fla-4 --profile 3   # + each row's GPU time by op

The same model on both sides: d_model 1024, 8 heads (K = V = 128), SwiGLU hidden 2816, vocab 32000,
short convolution 4, output gate, untied embeddings, the default exact solver (the merge); batch 8 x 2048
tokens; AdamW; float32 master
weights, bf16 compute (flowssm ``model.dtype=bfloat16``; fla under ``torch.autocast``). Each row runs
in its own process (fresh compile, clean peak-memory counter) and appends one JSON line to
``OUT/rows.jsonl``; the table is printed last. Per row: parameters, first step (compile + run), median
ms/step over back-to-back steps, tokens/s, model FLOPs utilisation ``6 P tokens / time / 790 TFLOP/s``,
peak device memory, and the loss at the first and last step (both sides train on the same 4 cycled
batches, so the loss must fall). ``decode`` rows time :meth:`LanguageModel.generate` (prefill 128
tokens through the chunked op, then 128 decode steps in one jitted scan) at batch 1 and 64.

Variants (same sizes): ``-gla-`` / ``-kda-`` rows swap the mixer for a per-channel-decay one (flowssm
families "gla" / "kda"; fla's ``GLAForCausalLM`` with ``expand_k=1`` / ``KDAForCausalLM``: their gate
parametrisations differ from flowssm's, the ops are the same). fla's GLA has no short convolution by
default, flowssm's ``gla`` family does: ``fla-gla-conv-4`` adds it (``use_short_conv=True``, width 4), the
closer match; flowssm's also L2-normalises q and k. ``flowssm-pallas-packed-4`` trains on rows of
packed documents (random lengths, :func:`document_positions`; the same batches otherwise), to set against
``flowssm-pallas-4``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PEAK_FLOPS = 790e12  # bf16 dense matmul rate measured on the H200 (device README)
ROWS = ["fla-4", "flowssm-pallas-4", "flowssm-xla-4", "flowssm-pallas-remat-4", "fla-12", "flowssm-pallas-12",
        "flowssm-xla-12", "flowssm-pallas-gated-4", "flowssm-pallas-packed-4", "flowssm-pallas-gla-4", "fla-gla-4",
        "fla-gla-conv-4", "flowssm-pallas-kda-4", "fla-kda-4", "decode-1", "decode-64"]
FAMILIES = {"gated": "gated_deltanet", "gla": "gla", "kda": "kda"}  # row-name part -> flowssm mixer family


def shape(tiny: bool) -> dict:
    if tiny:
        return dict(d_model=64, heads=2, hidden=128, vocab=256, batch=2, seq=64, chunk=16)
    return dict(d_model=1024, heads=8, hidden=2816, vocab=32000, batch=8, seq=2048, chunk=64)


def batches(s: dict, n: int = 4):
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.integers(0, s["vocab"], (s["batch"], s["seq"] + 1), dtype=np.int32) for _ in range(n)]


def document_positions(batch: int, seq: int, documents: int = 4, seed: int = 0):
    """Positions of ``documents`` packed documents a row (random boundaries; 0 where one starts): [batch, seq]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    positions = np.empty((batch, seq), np.int32)
    for row in positions:
        starts = np.sort(np.concatenate([[0], rng.choice(np.arange(1, seq), documents - 1, replace=False)]))
        row[:] = np.arange(seq) - np.repeat(starts, np.diff(np.append(starts, seq)))
    return positions


def family_of(name: str) -> str:
    return next((f for part, f in FAMILIES.items() if f"-{part}-" in name), "deltanet")


def flowssm_row(name: str, layers: int, steps: int, tiny: bool, kernels: dict | None = None,
                profile: int = 0) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from flowssm.models import LanguageModel, MixerConfig, ModelConfig

    s = shape(tiny)
    backend = "xla" if "xla" in name else "pallas"
    family = family_of(name)
    mixer = MixerConfig(family=family, num_heads=s["heads"], chunk_size=s["chunk"], backend=backend,  # Exact()
                        **({"kernels": kernels} if kernels else {}))
    config = ModelConfig(vocab_size=s["vocab"], d_model=s["d_model"], n_layers=layers, mlp_hidden=s["hidden"],
                         tie_embeddings=False, max_len=s["seq"], dtype="bfloat16", remat="remat" in name, mixer=mixer)
    model = LanguageModel(config, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(3e-4, weight_decay=0.1)
    state = (params, tx.init(params))

    positions = jnp.asarray(document_positions(s["batch"], s["seq"])) if "packed" in name else None

    @jax.jit
    def step(state, tokens):
        params, opt = state

        def loss_fn(params):
            nll, _ = nnx.merge(graphdef, params, rest).losses(tokens[:, :-1], tokens[:, 1:], positions=positions)
            return nll.mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return (optax.apply_updates(params, updates), opt), loss

    data = [jnp.asarray(b) for b in batches(s)]
    t0 = time.perf_counter()
    state, loss = step(state, data[0])
    first_loss = float(loss)
    first_step = time.perf_counter() - t0
    state, loss = step(state, data[1])
    jax.block_until_ready(loss)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        state, loss = step(state, data[i % 4])
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    stats = jax.local_devices()[0].memory_stats() or {}
    row = dict(params=model.num_params(), first_step_s=first_step, ms=1e3 * statistics.median(times),
               first_loss=first_loss, last_loss=float(loss), peak_gb=stats.get("peak_bytes_in_use", 0) / 1e9,
               backend=backend, device=jax.devices()[0].device_kind)
    if profile:
        row["profile"] = jax_profile(lambda i: jax.block_until_ready(step(state, data[i % 4])), profile)
    return row


def top(times: dict[str, float], steps: int, n: int = 25) -> dict:
    """``{name: ns}`` summed over ``steps`` -> ``{"busy_ms": ms a step, "ops": [[name, ms a step], ...]}`` (the
    ``n`` largest)."""
    ranked = sorted(times.items(), key=lambda kv: -kv[1])
    return dict(busy_ms=sum(times.values()) / steps / 1e6,
                ops=[[name[:100], round(ns / steps / 1e6, 4)] for name, ns in ranked[:n]])


def jax_profile(run, steps: int) -> dict:
    """GPU time a step by XLA op (the device plane's "XLA Ops" line, else its streams' kernels) over ``steps`` calls
    of ``run(i)``, from a ``jax.profiler`` trace read back with ``jax.profiler.ProfileData``."""
    import glob
    import tempfile

    import jax
    from jax.profiler import ProfileData

    folder = tempfile.mkdtemp()
    with jax.profiler.trace(folder):
        for i in range(steps):
            run(i)
    data = ProfileData.from_file(glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)[0])
    lines: dict[str, dict[str, float]] = {}  # line -> event name -> ns
    for plane in data.planes:
        if plane.name.startswith("/device:GPU"):
            for line in plane.lines:
                times = lines.setdefault(line.name, {})
                for event in line.events:
                    times[event.name] = times.get(event.name, 0.0) + event.duration_ns
    kernels = {k: v for name, times in lines.items() if name.startswith("Stream") for k, v in times.items()}
    return dict(top(lines.get("XLA Ops") or kernels, steps), lines=sorted(lines))


def fla_model(family: str, layers: int, s: dict, short_conv: bool = False):
    """fla's model of ``family`` at the benchmark sizes (K = V = d_model / heads); ``short_conv`` (GLA, whose
    default has none): the short convolution of width 4 on q, k, v that flowssm's ``gla`` family has."""
    from fla import models

    common = dict(hidden_size=s["d_model"], num_heads=s["heads"], num_hidden_layers=layers, vocab_size=s["vocab"],
                  intermediate_size=s["hidden"], tie_word_embeddings=False)
    if family == "gla":
        return models.GLAForCausalLM(models.GLAConfig(expand_k=1, expand_v=1, use_short_conv=short_conv, conv_size=4,
                                                      **common))
    if family == "kda":
        return models.KDAForCausalLM(models.KDAConfig(head_dim=s["d_model"] // s["heads"], **common))
    return models.DeltaNetForCausalLM(models.DeltaNetConfig(use_gate=True, **common))


def fla_row(name: str, layers: int, steps: int, tiny: bool, profile: int = 0) -> dict:
    import torch

    s = shape(tiny)
    model = fla_model(family_of(name), layers, s, short_conv="-conv-" in name).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
    data = [torch.from_numpy(b).long().cuda() for b in batches(s)]

    def step(tokens):
        inputs = tokens[:, :-1].contiguous()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=inputs, labels=inputs).loss  # fla shifts the labels itself (fused loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    first_loss = float(step(data[0]))
    first_step = time.perf_counter() - t0
    step(data[1])
    torch.cuda.synchronize()
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        loss = step(data[i % 4])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    row = dict(params=sum(p.numel() for p in model.parameters()), first_step_s=first_step,
               ms=1e3 * statistics.median(times), first_loss=first_loss, last_loss=float(loss),
               peak_gb=torch.cuda.max_memory_allocated() / 1e9, device=torch.cuda.get_device_name())
    if profile:  # GPU time a step by kernel
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for i in range(profile):
                step(data[i % 4])
            torch.cuda.synchronize()
        row["profile"] = top({e.key: 1e3 * e.self_device_time_total for e in prof.key_averages()}, profile)
    return row


def decode_row(batch: int, tiny: bool) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from flowssm.models import LanguageModel, MixerConfig, ModelConfig

    s = shape(tiny)
    mixer = MixerConfig(family="deltanet", num_heads=s["heads"], chunk_size=s["chunk"])  # Exact()
    config = ModelConfig(vocab_size=s["vocab"], d_model=s["d_model"], n_layers=4, mlp_hidden=s["hidden"],
                         tie_embeddings=False, max_len=s["seq"], dtype="bfloat16", mixer=mixer)
    model = LanguageModel(config, rngs=nnx.Rngs(0))
    prompt = jax.random.randint(jax.random.key(0), (batch, 128), 0, s["vocab"], jnp.int32)
    n = 128
    out = model.generate(prompt, n, temperature=0.0)  # compile
    jax.block_until_ready(out)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(model.generate(prompt, n, temperature=0.0))
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return dict(batch=prompt.shape[0], prompt=128, new=n, ms=1e3 * t, decode_tok_s=prompt.shape[0] * n / t,
                device=jax.devices()[0].device_kind)


def run_row(name: str, steps: int, tiny: bool, kernels: dict | None = None, profile: int = 0) -> dict:
    if name.startswith("decode-"):
        return decode_row(int(name.split("-")[1]), tiny)
    layers = int(name.rsplit("-", 1)[1])
    row = (fla_row(name, layers, steps, tiny, profile) if name.startswith("fla")
           else {**flowssm_row(name, layers, steps, tiny, kernels, profile), "kernels": kernels or {}})
    s = shape(tiny)
    tokens = s["batch"] * s["seq"]
    row.update(tok_s=tokens / (row["ms"] / 1e3), mfu=6 * row["params"] * tokens / (row["ms"] / 1e3) / PEAK_FLOPS)
    return row


def table(rows: list[dict]) -> str:
    out = ["| row | params | first step s | ms/step | tokens/s | MFU | peak GB | loss first -> last |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['row']} | failed: {r['error'][:120]} |||||||")
        elif r["row"].startswith("decode"):
            out.append(f"| {r['row']} | batch {r['batch']}, prompt {r['prompt']} + {r['new']} new | | {r['ms']:.1f} "
                       f"(whole generate) | {r['decode_tok_s']:,.0f} decoded/s | | | |")
        else:
            out.append(f"| {r['row']} | {r['params']:,} | {r['first_step_s']:.1f} | {r['ms']:.1f} | {r['tok_s']:,.0f} "
                       f"| {100 * r['mfu']:.1f}% | {r['peak_gb']:.2f} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {ROWS}")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke test)")
    p.add_argument("--out", default="/tmp/bench_lm")
    p.add_argument("--kernels", type=json.loads, default={},
                   help='flowssm rows: Tuning fields as JSON, e.g. \'{"output": "kernel"}\' (model.mixer.kernels)')
    p.add_argument("--profile", type=int, default=0,
                   help="after timing, trace this many steps and record GPU time a step by op (row['profile'])")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one row in this process
    a = p.parse_args()
    if a.one:
        print(json.dumps(run_row(a.one, a.steps, a.tiny, a.kernels, a.profile)))
        return
    os.makedirs(a.out, exist_ok=True)
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
    rows = []
    for name in a.rows.split(","):
        cmd = ([sys.executable, __file__, "--one", name, "--steps", str(a.steps), "--kernels", json.dumps(a.kernels),
                "--profile", str(a.profile)] + (["--tiny"] if a.tiny else []))
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            row = {"row": name, "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
            print(done.stderr[-3000:], file=sys.stderr)
        else:
            row = {"row": name, **json.loads(lines[-1])}
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(os.path.join(a.out, "rows.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
    print(table(rows))
    for r in rows:
        if "profile" in r:
            print(f"\n{r['row']}: GPU busy {r['profile']['busy_ms']:.1f} ms a step; largest ops (ms a step):")
            print("\n".join(f"  {ms:8.3f}  {name}" for name, ms in r["profile"]["ops"][:15]))


if __name__ == "__main__":
    main()

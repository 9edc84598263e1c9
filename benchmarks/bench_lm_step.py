"""Time one training step (AdamW, jit, value_and_grad) of a small byte-level LM on the default device.

    python benchmarks/bench_lm_step.py                          # gated DeltaNet, ~3.5 M params, 8 x 256 tokens
    python benchmarks/bench_lm_step.py --family attention --d-model 192 --n-layers 3

Prints the parameter count, compile time, the median wall time of a step over ``--steps`` steps after
warm-up, and the median CPU time of a step (all threads): on a shared machine the wall time includes
waiting for the CPU, the CPU time does not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

# The exact solver's triangular solves call LAPACK (scipy's OpenBLAS) once per small system; OpenBLAS's
# own threads then fight XLA's for the cores, which made steps several times slower (and erratic) here.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from flowssm.models import LanguageModel, MixerConfig, ModelConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="gated_deltanet")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--solver", default="exact", help='a name or JSON: \'{"name": "exact", "method": "doubling"}\'')
    p.add_argument("--scan", default="sequential")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()

    solver = json.loads(a.solver) if a.solver.startswith("{") else a.solver
    mixer = MixerConfig(
        family=a.family, num_heads=a.heads, rank=a.rank, chunk_size=a.chunk_size, solver=solver, scan=a.scan
    )
    config = ModelConfig(vocab_size=256, d_model=a.d_model, n_layers=a.n_layers, max_len=a.seq_len, mixer=mixer)
    model = LanguageModel(config, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(3e-4, weight_decay=0.1), wrt=nnx.Param)
    tokens = jax.random.randint(jax.random.key(1), (a.batch, a.seq_len + 1), 0, 256, jnp.int32)

    @nnx.jit
    def train_step(model, opt, tokens):
        def loss_fn(model):
            logits = model(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    t0 = time.perf_counter()
    jax.block_until_ready(train_step(model, opt, tokens))
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(train_step(model, opt, tokens))
    times, cpu = [], []
    for _ in range(a.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = jax.block_until_ready(train_step(model, opt, tokens))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    print(f"device {jax.devices()[0].device_kind} (OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}); "
          f"{a.family}, d_model {a.d_model}, {a.n_layers} layers, {a.heads} heads, rank {a.rank}, "
          f"chunk {a.chunk_size}, solver {a.solver}, scan {a.scan}")
    print(f"params {model.num_params():,}; batch {a.batch} x {a.seq_len} tokens; compile + first step {compile_s:.1f} s")
    print(f"median step {statistics.median(times) * 1e3:.0f} ms over {a.steps} steps "
          f"(min {min(times) * 1e3:.0f}, max {max(times) * 1e3:.0f} ms); loss {float(loss):.3f}")
    print(f"median CPU time per step {statistics.median(cpu) * 1e3:.0f} ms (all threads; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()

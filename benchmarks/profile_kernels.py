"""Where one call's GPU time goes, kernel by kernel: Nsight Compute's duration of every kernel of a call.

    python3 benchmarks/profile_kernels.py --cases packed,unpacked,batched,fla_packed,fla_batched --out DIR

runs itself under ``ncu`` (one metric, ``gpu__time_duration.sum``; clocks and caches left alone), then writes
``DIR/kernels.json``: for each case and mode (``fwd``, ``fwdbwd``) the kernels of one warm call, in launch
order merged by name (ms, launches), and their sum. Cases (bf16, chunk 64, ungated, default solver):
``packed`` (16 documents of random lengths summing to 32768 tokens, ``cu_seqlens``, H = 16, K = V = 128, as
``bench_kernels.py --packed``), ``unpacked`` (the same 1x32768 row, one sequence), ``batched``
(4x4096x16x128x128), the ``fla_`` variants (fla's ``chunk_delta_rule`` on the same inputs), and ``gla``, ``kda``
(per-channel decays at 4x4096x16x128x128, ``bench_transitions.py``'s inputs).

Kernels run one at a time under the profiler: the sum is the GPU time of the kernels without launch gaps
or overlap, so it can differ from wall-clock timings. A one-element Pallas kernel named ``marker_<case>_<mode>``
opens each measured call; the profiler records only inside ``cudaProfilerStart``/``Stop`` (through torch),
so compilation, autotuning and warm-up are not profiled.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from bench_kernels import PACKED, fns, inputs, packing

MARKER = "marker_"
CASES = ("packed", "unpacked", "batched", "fla_packed", "fla_batched", "gla", "kda")


def marker(tag: str):
    """A jitted one-element Pallas kernel whose GPU name is ``marker_<tag>``."""
    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1.0

    kernel.__name__ = MARKER + tag
    call = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((16,), jnp.float32), name=MARKER + tag)
    return jax.jit(call), jnp.zeros((16,), jnp.float32)


def case_inputs(case: str):
    """(q, k, v, beta, do, cu_seqlens or None) of a case."""
    T, H, K, V = PACKED["T"], PACKED["H"], PACKED["K"], PACKED["V"]
    if case.endswith("batched"):
        q, k, v, beta, _, do = inputs(0, 4, 4096, H, K, V)
        return q, k, v, beta, do, None
    q, k, v, beta, _, do = inputs(0, 1, T, H, K, V)
    return q, k, v, beta, do, (jnp.asarray(packing(0, T, PACKED["documents"])) if case.endswith("packed") else None)


def flowssm_calls(case: str):
    """{mode: thunk} of flowssm pallas (the op as users call it)."""
    if case in ("gla", "kda"):
        import bench_transitions as bt

        x = bt.inputs(0, 4, 4096, PACKED["H"], PACKED["K"], PACKED["V"])
        do = x.pop("do")
        x = {name: x[name] for name in bt.INPUTS[case]}
        fwd, grad = bt.flowssm_fns(case, 64, backend="pallas")
        return {"fwd": lambda: fwd(x), "fwdbwd": lambda: grad(x, do)}
    q, k, v, beta, do, cu = case_inputs(case)
    fwd, grad = fns(False, backend="pallas", **({} if cu is None else {"cu_seqlens": cu}))
    return {"fwd": lambda: fwd(q, k, v, beta, None), "fwdbwd": lambda: grad(q, k, v, beta, None, do)}


def fla_calls(case: str):
    """{mode: thunk} of fla's chunk_delta_rule (torch tensors, synchronised by the caller)."""
    import torch
    from fla.ops.delta_rule import chunk_delta_rule

    q, k, v, beta, do, cu = case_inputs(case)
    t = lambda x, grad=True: torch.from_numpy(np.asarray(x.astype(jnp.float32))).cuda().to(torch.bfloat16).requires_grad_(grad)
    tq, tk, tv, tb, tdo = t(q), t(k), t(v), t(beta), t(do, False)
    packed = {} if cu is None else {"cu_seqlens": torch.tensor(np.asarray(cu), dtype=torch.long).cuda()}
    fwd = lambda: chunk_delta_rule(tq, tk, tv, tb, output_final_state=True, **packed)
    return {"fwd": fwd, "fwdbwd": lambda: fwd()[0].backward(tdo)}


def measure(cases):
    """Warm each call, then run it once inside a profiler range, after its marker."""
    import torch

    sync = lambda out: (jax.block_until_ready(out), torch.cuda.synchronize())
    for case in cases:
        calls = fla_calls(case) if case.startswith("fla_") else flowssm_calls(case)
        for mode, call in calls.items():
            mark, zero = marker(f"{case}_{mode}")
            for _ in range(3):
                sync(call())
            sync(mark(zero))
            torch.cuda.profiler.start()
            sync(mark(zero))
            sync(call())
            torch.cuda.profiler.stop()
            print(f"measured {case} {mode}", flush=True)


def short(name: str) -> str:
    """A kernel's name without template arguments or parameter lists."""
    return name.split("(")[0].split("<")[0].removeprefix("void ").strip()


def summarise(csv_path: str) -> dict:
    """ncu's raw CSV -> {"<case>_<mode>": {"total_ms", "kernels": [[name, ms, launches], ...]}}."""
    with open(csv_path) as f:
        lines = [line for line in f if line.startswith('"')]
    rows = list(csv.DictReader(lines))
    out, current = {}, None
    for row in rows:
        name, duration = short(row.get("Kernel Name", "")), row.get("gpu__time_duration.sum", "")
        if not duration or not duration.replace(".", "").isdigit():
            continue  # the units row
        if name.startswith(MARKER):
            current = out.setdefault(name[len(MARKER):], {"total_ms": 0.0, "kernels": {}})
            continue
        if current is None:
            continue
        ms = float(duration) * 1e-6  # ns
        ms_launches = current["kernels"].setdefault(name, [0.0, 0])
        ms_launches[0] += ms
        ms_launches[1] += 1
        current["total_ms"] += ms
    for entry in out.values():
        entry["kernels"] = [[name, round(ms, 4), n] for name, (ms, n) in entry["kernels"].items()]
        entry["total_ms"] = round(entry["total_ms"], 4)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="packed,unpacked,batched", help=f"comma-separated, of {CASES}")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--inner", action="store_true", help="run the calls (under ncu); not for direct use")
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"--cases: expected names of {CASES}, got {unknown}")
    if args.inner:
        return measure(cases)
    report = os.path.join(args.out, "ncu.csv")
    command = ["ncu", "--profile-from-start", "off", "--clock-control", "none", "--cache-control", "none",
               "--metrics", "gpu__time_duration.sum", "--csv", "--page", "raw", "--print-units", "base",
               "--log-file", report, sys.executable, os.path.abspath(__file__), "--inner", "--cases", args.cases]
    subprocess.run(command, check=True)
    result = summarise(report)
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump(result, f, indent=1)
    for key, entry in result.items():
        print(f"{key}: {entry['total_ms']:.3f} ms")
        for name, ms, n in entry["kernels"]:
            print(f"    {ms:8.4f} ms  x{n:<3d} {name[:90]}")


if __name__ == "__main__":
    main()

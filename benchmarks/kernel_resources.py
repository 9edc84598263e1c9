"""Offline resource report of the Pallas kernels for an H100 (sm_90), no GPU needed.

    python -m pip install --target /tmp/triton-site triton==3.6.0      # once, outside the project venv
    .venv/bin/python benchmarks/kernel_resources.py --triton-site /tmp/triton-site [--out /tmp/kernel-resources]

Two steps in two processes (jax's and triton's MLIR bindings do not share one process):

1. ``--lower`` (this venv, jax on CPU): every kernel of ``bench_kernels.kernel_calls`` at the benchmark
   shape 4x4096x16x128x128 (bf16, chunk 64, default ``Tuning``) is lowered for the "cuda" platform with
   the GPU info patched to an H100, and the Triton IR that Pallas's Triton lowering builds is written to
   ``OUT/<kernel>.ttir`` with its warps, stages and grid (``meta.json``).
2. upstream Triton compiles each ``.ttir`` for ``GPUTarget("cuda", 90, 32)``; the bundled ptxas, run with
   ``-v``, reports registers a thread, spills and stack; Triton's metadata the shared memory.

Caveat: on the GPU, XLA compiles the same IR with its own Triton and ptxas; registers and spills there
can differ. The IR is JAX's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys


def lower(out: str) -> None:
    """Step 1: write ``out/<kernel>.ttir`` and ``out/meta.json``."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import jax.numpy as jnp
    from jax._src.pallas.triton import gpu_info, lowering  # private: the lowering entry point and GPU query

    from bench_kernels import SHAPES, kernel_calls

    gpu_info.get_gpu_info = lambda: gpu_info.GpuInfo(
        gpu_version=gpu_info.GpuVersion.H100, arch_name="9.0", compute_capability=90)
    captured = []
    lower_module = lowering.lower_jaxpr_to_triton_module

    def capture(jaxpr, grid_mapping, platform, compute_capability, mlir_ctx):
        result = lower_module(jaxpr, grid_mapping, platform, compute_capability, mlir_ctx=mlir_ctx)
        captured.append((result.module.operation.get_asm(enable_debug_info=False), list(result.grid)))
        return result

    lowering.lower_jaxpr_to_triton_module = capture
    B, T, H, K, V = SHAPES[0]
    spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
    calls = kernel_calls(spec(B, T, H, K), spec(B, T, H, K), spec(B, T, H, V), spec(B, T, H, dtype=jnp.float32),
                         spec(B, T, H, dtype=jnp.float32), spec(B, T, H, V), interpret=False)
    meta = {}
    for name, (fn, args) in calls.items():
        captured.clear()
        hlo = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        hlo = re.sub(r'ir = "(?:[^"\\]|\\.)*"', "ir = ...", hlo)  # drop the serialized module
        config = re.search(r"__gpu\$xla\.gpu\.triton.*?backend_config\s*=\s*\{([^}]*)\}", hlo, re.S).group(1)
        (ir, grid), = captured
        with open(os.path.join(out, f"{name}.ttir"), "w") as f:
            f.write(ir)
        meta[name] = {key: int(re.search(rf"\b{key}\s*=\s*(\d+)", config).group(1)) for key in ("num_warps", "num_stages")}
        meta[name]["grid"] = grid
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


def compile_all(out: str, site: str) -> dict:
    """Step 2: compile every ``.ttir`` with upstream Triton and read ptxas's resource usage."""
    sys.path.insert(0, site)
    os.environ["TRITON_CACHE_DIR"] = os.path.join(out, "triton_cache")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    target = GPUTarget("cuda", 90, 32)
    ptxas = get_ptxas(target.arch).path
    rows = {}
    for name, m in json.load(open(os.path.join(out, "meta.json"))).items():
        kernel = triton.compile(os.path.join(out, f"{name}.ttir"), target=target,
                                options=dict(num_warps=m["num_warps"], num_stages=m["num_stages"]))
        ptx = os.path.join(out, f"{name}.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        log = subprocess.run([ptxas, "-v", f"--gpu-name={sm_arch_from_capability(90)}", ptx, "-o", ptx + ".cubin"],
                             capture_output=True, text=True, check=True).stderr
        stack, stores, loads = map(int, re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
        rows[name] = dict(m, registers=int(re.search(r"Used (\d+) registers", log).group(1)), stack=stack,
                          spill_stores=stores, spill_loads=loads, shared=kernel.metadata.shared,
                          wgmma=len(re.findall(r"^\s*wgmma\.mma_async", kernel.asm["ptx"], re.M)),
                          serialized_wgmma="C7512" in log or "serialized" in log, triton=triton.__version__)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triton-site", help="a folder with upstream triton installed (pip --target)")
    parser.add_argument("--out", default="/tmp/kernel-resources")
    parser.add_argument("--lower", action="store_true", help="step 1 only (run by step 2 in a subprocess)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.lower:
        return lower(args.out)
    if not args.triton_site:
        parser.error("--triton-site is required (see the module docstring)")
    subprocess.run([sys.executable, __file__, "--lower", "--out", args.out], check=True)
    rows = compile_all(args.out, args.triton_site)
    print("| kernel | warps | stages | grid | registers | spill stores / loads (B) | stack (B) | shared (B) "
          "| wgmma | wgmma serialized |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['num_warps']} | {r['num_stages']} | {'x'.join(map(str, r['grid']))} | {r['registers']} "
              f"| {r['spill_stores']} / {r['spill_loads']} | {r['stack']} | {r['shared']} | {r['wgmma']} "
              f"| {r['serialized_wgmma']} |")
    with open(os.path.join(args.out, "resources.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

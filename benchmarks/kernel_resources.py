"""Offline resource report of the Pallas kernels for an H100 (sm_90), no GPU needed.

    .venv/bin/python -m pip install --target /tmp/triton-site triton==3.6.0   # once; same Python as the venv
    .venv/bin/python benchmarks/kernel_resources.py --triton-site /tmp/triton-site [--out /tmp/kernel-resources]

Two steps in two processes (jax's and triton's MLIR bindings do not share one process):

1. ``--lower`` (this venv, jax on CPU): every kernel of ``bench_kernels.kernel_calls`` at the benchmark
   shape 4x4096x16x128x128 (bf16, chunk 64, default ``Tuning``) is lowered for the "cuda" platform with
   the GPU info patched to an H100, and the Triton IR that Pallas's Triton lowering builds is written to
   ``OUT/<kernel>.ttir`` with its warps, stages and grid (``meta.json``).
2. upstream Triton compiles each ``.ttir`` for ``GPUTarget("cuda", 90, 32)``; the bundled ptxas, run with
   ``-v``, reports registers a thread, spills and stack; Triton's metadata the shared memory.

With ``--op`` step 1 instead lowers the whole op as the models call it, forward and backward
(``jax.grad`` of ``delta_rule(backend="pallas")`` at 1 x 256 x 2 x K x K), at ``--dtype`` / ``--head-dim`` /
``--chunk`` / ``--scan`` (``--ungated``: ``g=None``, the kernels' path without decays; ``--per-channel``: KDA's
decay per key channel, ``g: [B, T, H, K]``; with
``--linear``, ``linear_attention``'s: GLA), with the launch options ``flowssm.kernels.launch.Tuning.resolve`` picks for them: this is
how those choices were checked against the 232,448 B of shared memory a block (figures in RESULTS.md, run 6).

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


def capture_triton() -> list:
    """Patch jax (CPU) to lower Pallas kernels for an H100 and record every Triton module it builds:
    returns the list that fills with ``(Triton IR text, grid)`` as kernels are lowered."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    from jax._src.pallas.triton import gpu_info, lowering  # private: the lowering entry point and GPU query

    gpu_info.get_gpu_info = lambda: gpu_info.GpuInfo(
        gpu_version=gpu_info.GpuVersion.H100, arch_name="9.0", compute_capability=90)
    captured = []
    lower_module = lowering.lower_jaxpr_to_triton_module

    def capture(jaxpr, grid_mapping, platform, compute_capability, mlir_ctx):
        result = lower_module(jaxpr, grid_mapping, platform, compute_capability, mlir_ctx=mlir_ctx)
        captured.append((result.module.operation.get_asm(enable_debug_info=False), list(result.grid)))
        return result

    lowering.lower_jaxpr_to_triton_module = capture
    return captured


def lower(out: str, method: str = "merge") -> None:
    """Step 1: write ``out/<kernel>.ttir`` and ``out/meta.json`` (``method``: the exact method, ``name[:block]``)."""
    import jax
    import jax.numpy as jnp

    from bench_kernels import SHAPES, kernel_calls

    captured = capture_triton()
    B, T, H, K, V = SHAPES[0]
    spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
    calls = kernel_calls(spec(B, T, H, K), spec(B, T, H, K), spec(B, T, H, V), spec(B, T, H, dtype=jnp.float32),
                         spec(B, T, H, dtype=jnp.float32), spec(B, T, H, V), interpret=False, method=method)
    meta = {}
    for name, (fn, args) in calls.items():
        captured.clear()
        hlo = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        if not captured:  # an XLA stage (the cumulative decays), no Pallas kernel
            continue
        hlo = re.sub(r'ir = "(?:[^"\\]|\\.)*"', "ir = ...", hlo)  # drop the serialized module
        configs = re.findall(r"__gpu\$xla\.gpu\.triton.*?backend_config\s*=\s*\{([^}]*)\}", hlo, re.S)
        for j, ((ir, grid), config) in enumerate(zip(captured, configs)):  # a call may launch several kernels
            kernel = name if j == 0 else f"{name}_{j + 1}"
            with open(os.path.join(out, f"{kernel}.ttir"), "w") as f:
                f.write(ir)
            meta[kernel] = {key: int(re.search(rf"\b{key}\s*=\s*(\d+)", config).group(1))
                            for key in ("num_warps", "num_stages")}
            meta[kernel]["grid"] = grid
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


def lower_op(out: str, dtype: str, head_dim: int, chunk: int, scan: str = "sequential",
             per_channel: bool = False, linear: bool = False, packed: bool = False, ungated: bool = False) -> None:
    """Step 1 for ``--op``: every kernel of the pallas op's forward and backward, as ``lower`` writes them;
    ``per_channel``: a decay per key channel (``g: [B, T, H, K]``: KDA, or GLA with ``linear``);
    ``linear``: ``linear_attention`` (``T = I``) instead of ``delta_rule``; ``packed``: three packed documents
    (``cu_seqlens``, lengths 100, 90 and 66: the kernels read and write the packed rows in place); ``ungated``:
    ``g=None`` (no decays kernel, no decay cotangents)."""
    import jax
    import jax.numpy as jnp

    import flowssm
    from flowssm.kernels import chunk_output, chunk_transfer, cumulative_decay, state_pass

    # compile for the GPU, not interpret on the CPU
    for module in (chunk_output, chunk_transfer, cumulative_decay, state_pass):
        module.resolve_interpret = lambda interpret: False
    captured = capture_triton()
    B, T, H, K = 1, 256, 2, head_dim
    spec = lambda *shape, dtype=jnp.dtype(dtype): jax.ShapeDtypeStruct(shape, dtype)

    def loss(q, k, v, beta, g):
        g = None if ungated else g
        options = dict(backend="pallas", chunk_size=chunk, scan=scan)
        if packed:
            options["cu_seqlens"] = jnp.array([0, 100, 190, T], jnp.int32)
        if linear:
            o, S = flowssm.linear_attention(q, k, v, g, **options)
        else:
            o, S = flowssm.delta_rule(q, k, v, beta, g, **options)
        return o.astype(jnp.float32).sum() + S.sum()

    decay = (B, T, H, K) if per_channel else (B, T, H)
    args = spec(B, T, H, K), spec(B, T, H, K), spec(B, T, H, K), spec(B, T, H, dtype=jnp.float32), spec(
        *decay, dtype=jnp.float32)
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    meta = {}
    for ir, grid in captured:
        name = re.search(r"tt.func public @(\w+)", ir).group(1)
        stages, warps = re.search(rf'name = "{name}", num_stages = (\d+) : i32, num_warps = (\d+)', hlo).groups()
        with open(os.path.join(out, f"{name}.ttir"), "w") as f:
            f.write(ir)
        meta[name] = {"num_warps": int(warps), "num_stages": int(stages), "grid": grid}
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
    parser.add_argument("--method", default="merge", help="without --op: the exact method, name[:block]")
    parser.add_argument("--op", action="store_true", help="the whole pallas op, forward and backward")
    parser.add_argument("--dtype", default="bfloat16", help="with --op: the inputs' dtype")
    parser.add_argument("--head-dim", type=int, default=128, help="with --op: K = V")
    parser.add_argument("--chunk", type=int, default=64, help="with --op: chunk_size")
    parser.add_argument("--scan", default="sequential", help="with --op: scan (associative: the segmented kernels)")
    parser.add_argument("--per-channel", action="store_true", help="with --op: a decay per key channel (KDA)")
    parser.add_argument("--linear", action="store_true", help="with --op: linear_attention (GLA with --per-channel)")
    parser.add_argument("--packed", action="store_true", help="with --op: packed documents (cu_seqlens)")
    parser.add_argument("--ungated", action="store_true", help="with --op: g=None (the path without decays)")
    args = parser.parse_args()
    if (args.per_channel or args.linear or args.packed or args.ungated) and not args.op:
        parser.error("--per-channel, --linear, --packed and --ungated need --op (the per-kernel mode lowers the "
                     "scalar-decay benchmark calls)")
    if args.ungated and args.per_channel:
        parser.error("--ungated: no decays, so no per-channel ones (--per-channel)")
    os.makedirs(args.out, exist_ok=True)
    if args.lower:
        if args.op:
            return lower_op(args.out, args.dtype, args.head_dim, args.chunk, args.scan, args.per_channel, args.linear,
                            args.packed, args.ungated)
        return lower(args.out, args.method)
    if not args.triton_site:
        parser.error("--triton-site is required (see the module docstring)")
    op = (["--op", "--dtype", args.dtype, "--head-dim", str(args.head_dim), "--chunk", str(args.chunk), "--scan", args.scan]
          + (["--per-channel"] if args.per_channel else []) + (["--linear"] if args.linear else [])
          + (["--packed"] if args.packed else []) + (["--ungated"] if args.ungated else []) if args.op else [])
    subprocess.run([sys.executable, __file__, "--lower", "--out", args.out, "--method", args.method, *op], check=True)
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

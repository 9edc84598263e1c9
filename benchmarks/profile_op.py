"""One op's calls for a kernel profiler: run under Nsight Compute to read each kernel's occupancy, throughput
and stall reasons (the device README: ``--clock-control none``).

    ncu --clock-control none --kernel-name regex:flowssm --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats python3 benchmarks/profile_op.py --kinds kda,gdn

Kinds as in ``bench_transitions`` (``gla``, ``kda``), plus ``gdn``: the gated delta rule, ``delta_rule`` with the
scalar log-decay ``g[..., 0]`` (the scalar-decay kernels, to set against KDA's). Each kind's op runs ``--calls``
times on 4x4096x16x128x128 bf16 (``--shape`` to change), forward only unless ``--backward``; the kernels are the
pallas backend's with the default ``Tuning`` (``--tuning`` as in ``bench_kernels``).
"""

from __future__ import annotations

import argparse

import jax

import flowssm
from bench_kernels import tunings
from bench_transitions import SHAPE, flowssm_fns, inputs


def op_fns(kind: str, tuning, backward: bool):
    """The jitted call of ``kind`` (its forward, or the gradients of ``sum(o * do)`` with ``backward``)."""
    if kind != "gdn":
        return flowssm_fns(kind, 64, "pallas", tuning)[int(backward)]
    import jax.numpy as jnp

    def out(x):
        return flowssm.delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"][..., 0], chunk_size=64, backend="pallas",
                                  tuning=tuning)

    if not backward:
        return jax.jit(out)
    return jax.jit(jax.grad(lambda x, do: jnp.sum(out(x)[0].astype(jnp.float32) * do.astype(jnp.float32))))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="kda")
    parser.add_argument("--calls", type=int, default=1)
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--tuning", default="default")
    parser.add_argument("--shape", default="x".join(map(str, SHAPE)), help="B x T x H x K x V")
    args = parser.parse_args(argv)
    (tuning,) = tunings(args.tuning)
    shape = tuple(int(s) for s in args.shape.split("x"))
    x = inputs(0, *shape)
    for kind in args.kinds.split(","):
        if kind not in ("gla", "kda", "gdn"):
            raise ValueError(f"--kinds: expected a comma-separated subset of ('gla', 'kda', 'gdn'), got {kind!r}")
        fn = op_fns(kind, tuning, args.backward)
        for _ in range(args.calls):
            jax.block_until_ready(fn(x, x["do"]) if args.backward else fn(x))
        print(kind, "done", flush=True)


if __name__ == "__main__":
    main()

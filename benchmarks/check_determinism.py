"""Are the pallas op's outputs a function of its inputs alone? (GPU check.)

    python3 benchmarks/check_determinism.py [--shape 4,4096,16,128,128] [--out DIR]

On LM-like correlated keys (``bench_kernels.correlated_keys``), bf16: the default exact method and
substitution, called in the order merge, substitution, merge, then again after device memory was filled
with large values (a freed buffer), and the xla float32 reference (full-precision matmuls) twice.
Reports every output's relative error against the first reference and the largest difference between
repeated calls of one function (0 when nothing uninitialised or order-dependent is read). Writes
``check_determinism.json``.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

from bench_kernels import correlated_keys, exact_spec, fns, highest, inputs
from timing import rel


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="4,4096,16,128,128", help="B,T,H,K,V")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.split(","))
    q, _, v, beta, _, _ = inputs(1, *shape)
    k = correlated_keys(2, *shape[:4])
    xla = highest(fns(False, backend="xla")[0])
    f32 = lambda: (*(x.astype(jnp.float32) for x in (q, k, v, beta)), None)
    calls = {m: fns(False, backend="pallas", solver=exact_spec(m))[0] for m in ("merge", "substitution")}
    outs = {"ref_1": xla(*f32())[0]}
    for label, m in (("merge_1", "merge"), ("substitution_1", "substitution"), ("merge_2", "merge")):
        outs[label] = calls[m](q, k, v, beta, None)[0]
    jax.block_until_ready(jnp.full((2**30,), 1e4, jnp.float32))  # freed at once: its memory holds 1e4s
    for label, m in (("merge_3", "merge"), ("substitution_2", "substitution")):
        outs[label] = calls[m](q, k, v, beta, None)[0]
    outs["ref_2"] = xla(*f32())[0]
    diff = lambda a, b: float(jnp.max(jnp.abs(outs[a].astype(jnp.float32) - outs[b].astype(jnp.float32))))
    report = {"shape": "x".join(map(str, shape)),
              "err_vs_ref_1": {name: rel(o, outs["ref_1"]) for name, o in outs.items() if name != "ref_1"},
              "max_diff": {f"{a} - {b}": diff(a, b) for a, b in (("merge_1", "merge_2"), ("merge_1", "merge_3"),
                                                                ("substitution_1", "substitution_2"),
                                                                ("ref_1", "ref_2"), ("merge_1", "substitution_1"))}}
    print(json.dumps(report, indent=1))
    if args.out:
        with open(os.path.join(args.out, "check_determinism.json"), "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()

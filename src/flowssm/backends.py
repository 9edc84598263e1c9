"""The backends and what each one can run, decided in one place.

* ``"reference"``: the token loop (ground truth, slow);
* ``"xla"``: the chunked flow computation in pure jnp (every solver, scan, semantics and transition);
* ``"pallas"``: the GPU kernels (interpret mode on CPU), discrete semantics, a scalar or per-channel decay
  per token (no dplr), power-of-two chunks, float32 / bfloat16 operands (float64 only when
  interpreting), head sizes up to 256;
* ``"auto"`` (the default): ``"pallas"`` on a GPU when it can run the request, else ``"xla"``.

Ops, layers and the config loader all ask :func:`check` before any work, so an unsupported combination
is refused naming the options (never replaced by something else); :func:`resolve` turns ``"auto"`` into
a backend.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "reference", "xla", "pallas")

# How each option is called at op level; layers and the config loader pass their own names.
OP_NAMES = {"backend": "backend", "solver": "solver", "semantics": "semantics", "chunk_size": "chunk_size",
            "rank": "k (rank R)", "key_dim": "k (head size K)", "value_dim": "v (head size V)", "dtype": "q (dtype)",
            "transition": "g (per-channel decay)"}


@dataclasses.dataclass(frozen=True)
class Request:
    """What a call asks of a backend: the solver object, semantics, chunk size ``C``, rank ``R``, head
    sizes ``K, V``, the dtype of the inputs (the kernels' operand dtype) and the path's transition
    (:attr:`flowssm.paths.Path.transition`)."""

    solver: object
    semantics: str
    chunk_size: int
    rank: int
    key_dim: int
    value_dim: int
    dtype: jnp.dtype
    transition: str = "scalar"


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def pallas_limits(request: Request) -> list[tuple[str, str]]:
    """``(option, reason)`` for every part of ``request`` the Pallas kernels cannot run (empty: all of it)."""
    from flowssm.kernels.launch import launch_problem

    out = []
    if request.transition == "dplr":
        out.append(("transition", "run scalar and per-channel decays with the delta rule's keys only, got a 'dplr' "
                                  "transition (separate reading keys)"))
    if request.semantics != "discrete":
        out.append(("semantics", f"runs 'discrete' semantics only, got {request.semantics!r}"))
    C, R = request.chunk_size, request.rank
    n = C * (1 << (R - 1).bit_length())
    if C & (C - 1):
        out.append(("chunk_size", f"needs a power-of-two chunk size, got {C}"))
    elif n < 16:
        out.append(("chunk_size", f"needs chunk_size * R (R rounded up to a power of two) >= 16, got {C} * {R}"))
    unsupported = request.solver.program().pallas_unsupported
    if unsupported:
        out.append(("solver", f"cannot run {request.solver!r}: its program {type(request.solver.program()).__name__} "
                              f"{unsupported}"))
    dtype = jnp.dtype(request.dtype)
    if dtype == jnp.float64:
        if on_gpu():
            out.append(("dtype", "runs float32 and bfloat16 on the GPU (float64 only in interpret mode), got float64"))
    elif dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        out.append(("dtype", f"runs float32 and bfloat16, got {dtype}"))
    for option, size in (("key_dim", request.key_dim), ("value_dim", request.value_dim)):
        if size > 256:
            out.append((option, f"runs head sizes up to 256, got {size}"))
    if not out:
        problem = launch_problem(dtype, request.key_dim, request.value_dim, n)
        if problem:
            out.append(problem)
    return out


def unsupported(backend: str, request: Request) -> list[tuple[str, str]]:
    """``(option, reason)`` pairs ``backend`` (not "auto") cannot run; reference and xla run everything."""
    return pallas_limits(request) if backend == "pallas" else []


def resolve(backend: str, request: Request) -> str:
    """``"auto"`` -> ``"pallas"`` on a GPU when the kernels can run ``request``, else ``"xla"``. Per-channel
    decays included: on an H200 (bf16, 4 x 4096 x 16 x 128 x 128) their kernels took 2.14 / 10.18 ms (GLA,
    forward / forward+backward) and 3.36 / 14.43 ms (KDA) against xla's 4.30 / 12.90 and 8.03 / 32.22."""
    if backend != "auto":
        return backend
    kernels = on_gpu() and not pallas_limits(request)
    return "pallas" if kernels else "xla"


def check(backend: str, request: Request, names: Mapping[str, str] = OP_NAMES) -> str:
    """Raise ValueError naming the options when ``backend`` cannot run ``request``; return the resolved backend."""
    if backend not in BACKENDS:
        raise ValueError(f"{names['backend']}: expected one of {BACKENDS}, got {backend!r}")
    resolved = resolve(backend, request)
    problems = unsupported(resolved, request)
    if problems:
        keys = ", ".join(dict.fromkeys(names[o] for o, _ in problems))
        why = "; ".join(reason for _, reason in problems)
        raise ValueError(f"{keys}: not supported by {names['backend']}={backend!r}: the Pallas kernels {why}; "
                         f"use backend 'xla' (or 'auto') for this combination")
    return resolved

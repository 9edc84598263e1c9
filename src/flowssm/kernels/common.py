"""Shared plumbing for the Pallas kernels: the interpret switch, launch options and in-kernel matmuls.

The kernels are plain ``pallas_call``s over ``BlockSpec`` grids with Triton compiler parameters: on GPU,
JAX 0.11 lowers them through Pallas's Triton backend (its default for a ``pallas_call`` without Mosaic
GPU parameters; deprecated, with a warning); on CPU they run in interpret mode.
"""

from __future__ import annotations

import contextvars
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

# Matmul modes inside kernels (operands -> float32 accumulation):
#   "operand": operands in the kernel's operand dtype (bf16 tensor cores for bf16 inputs; IEEE
#              float32/float64 otherwise), "tf32": float32 operands at TF32 precision,
#   "f32": float32 operands at full precision (3xTF32 in compiled kernels, see ``_COMPILED``),
#   "f16": float16 operands: TF32's 10-bit mantissa at the 16-bit tensor-core rate (half TF32's
#          instructions), over float16's range (|x| <= 65504; a larger operand becomes inf).
DOT_MODES = ("operand", "tf32", "f32", "f16")


def resolve_interpret(interpret: bool | None) -> bool:
    """``interpret=None`` means: interpret exactly when the default backend is the CPU."""
    return jax.default_backend() == "cpu" if interpret is None else bool(interpret)


def compiler_params(num_warps: int, num_stages: int, interpret: bool):
    """Triton launch options on GPU; nothing in interpret mode."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu_triton

    return plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


# Whether the kernel being traced is compiled for the GPU (set by :func:`pallas_call` while it traces the
# kernel body): float32 matmuls then run as 3xTF32 on the tensor cores (about float32 accuracy); Triton's
# IEEE float32 dot is a scalar FMA loop, slow and register-hungry. Interpret mode (CPU) keeps IEEE float32.
_COMPILED = contextvars.ContextVar("flowssm_kernel_compiled", default=False)


def pallas_call(kernel, *, interpret: bool, num_warps: int, num_stages: int, **kwargs):
    """``pl.pallas_call`` with Triton launch options, and :func:`dot` told whether the kernel is compiled."""

    @functools.wraps(kernel)
    def traced(*refs):
        token = _COMPILED.set(not interpret)
        try:
            return kernel(*refs)
        finally:
            _COMPILED.reset(token)

    return pl.pallas_call(traced, interpret=interpret, compiler_params=compiler_params(num_warps, num_stages, interpret),
                          **kwargs)


def dot(a, b, *, operand_dtype, mode: str = "operand", trans_a: bool = False, trans_b: bool = False):
    """``op(a) @ op(b)`` accumulated in float32 (float64 for float64 operands).

    a: [M, Kc] (or [Kc, M] with ``trans_a``); b: [Kc, N] (or [N, Kc] with ``trans_b``) -> [M, N].
    """
    full = mode == "operand" or operand_dtype == jnp.float64
    dtype = operand_dtype if full else jnp.float16 if mode == "f16" else jnp.float32
    if mode == "tf32" and not full:
        precision = lax.Precision.DEFAULT
    elif _COMPILED.get() and jnp.dtype(dtype) == jnp.float32:
        precision = lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    else:
        precision = lax.Precision.HIGHEST
    acc = jnp.promote_types(dtype, jnp.float32)
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    precision = precision if isinstance(precision, lax.DotAlgorithmPreset) else (precision, precision)
    return lax.dot_general(a.astype(dtype), b.astype(dtype), dims, precision=precision, preferred_element_type=acc)


def reference_dot(a, b, *, operand_dtype, mode: str = "operand", trans_a: bool = False, trans_b: bool = False):
    """The references' matmul: same contract as :func:`dot`, operands upcast, full precision.

    The references do not round operands to bf16: their autodiff (``Tuning(backward="reference")``) runs
    in float32 (float64 for float64 inputs).
    """
    del mode
    acc = jnp.promote_types(operand_dtype, jnp.float32)
    a = a.astype(acc).T if trans_a else a.astype(acc)
    b = b.astype(acc).T if trans_b else b.astype(acc)
    return jnp.matmul(a, b, precision=lax.Precision.HIGHEST)


# Token-major operands. Arrays derived from the inputs (queries, keys, values, outputs and their
# cotangents) can stay in fla's layout, chunked: [B, N, r, H, d] is a free reshape of [B, T, H, d].
# Kernels take ``heads=H`` for that layout, ``heads=None`` for head-major [B H, N, r, d]; vectors and
# the kernels' own intermediates are always head-major.


def head_major(x, heads: int | None):
    """[B, N, r, H, d] -> [B H, N, r, d] (a copy); identity for ``heads=None``."""
    if heads is None:
        return x
    B, N, r, H, d = x.shape
    return jnp.moveaxis(x, 3, 1).reshape(B * H, N, r, d)


def token_major(x, heads: int | None):
    """Inverse of :func:`head_major`: [B H, N, r, d] -> [B, N, r, H, d]."""
    if heads is None:
        return x
    BH, N, r, d = x.shape
    return jnp.moveaxis(x.reshape(BH // heads, heads, N, r, d), 1, 3)


def in_layout(spec: pl.BlockSpec, x, heads: int | None) -> pl.BlockSpec:
    """``spec`` (written head-major) for ``x`` in the layout its rank tells: token-major [B, N, r, H, d]
    (5 axes) or head-major [B H, N, r, d]. For operands that arrive either way (``u`` of an additive path is
    the token-major values, else the transfer's head-major output)."""
    return token_spec(spec, heads) if x.ndim == 5 else spec


def to_head_major(x, heads: int | None):
    """:func:`head_major` of an operand in either layout (by its rank, as :func:`in_layout`)."""
    return head_major(x, heads) if x.ndim == 5 else x


def layout_dims(x, heads: int | None) -> tuple[int, int, int, int]:
    """(B H, N, r, d) of an operand in either layout (head-major when ``heads`` is None or ``x`` has 4 axes)."""
    if heads is None or x.ndim == 4:
        return tuple(x.shape)
    B, N, r, H, d = x.shape
    return B * H, N, r, d


def token_spec(spec: pl.BlockSpec, heads: int | None) -> pl.BlockSpec:
    """A ``BlockSpec`` written for a head-major [B H, N, r, d] operand, moved to the token-major layout."""
    if heads is None:
        return spec
    a, b, r, d = spec.block_shape
    index = spec.index_map

    def token_index(*grid):
        bh, c, z, j = index(*grid)
        return bh // heads, c, z, bh % heads, j

    return pl.BlockSpec((a, b, r, None, d), token_index)

"""Launch options of the Pallas kernels, chosen from the operand dtype and the head sizes.

Shared memory and registers grow with the tiles' bytes: ``[n, K]`` keys and ``w``, ``[n, V]`` values,
``n x n`` transfer matrices, times the pipeline stages of the state passes. On Hopper (227 KiB of
shared memory a block, 255 registers a thread) the bf16 defaults of the benchmarks (4 warps, a
3-stage state pass) ask for 232 KiB at float32, K = V = 128 and spill kilobytes a thread. Float32
operands therefore get 8 warps and fewer stages; head sizes above 128 get narrower column blocks.
The figures behind each rule come from ``benchmarks/kernel_resources.py --op`` (offline Triton for
sm_90, no GPU needed) and are summarised in ``benchmarks/RESULTS.md`` (run 6).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from flowssm.kernels.common import DOT_MODES

BACKWARDS = ("kernels", "reference")
ASSOCIATIVE = ("segmented", "xla")
STATE_LOWERINGS = ("auto", "triton", "mosaic")
OUTPUTS = ("auto", "kernel", "fused")
MAX_MICRO_STEPS = 128  # n = C R: the transfer kernel holds n x n matrices in registers
MAX_MICRO_STEPS_F32 = 64  # float32: the transfer backward's n x n tiles outgrow shared memory at n = 128
STAGE_BYTES = 180 * 1024  # stages x (one chunk's tiles) of the state passes: measured to fit in 227 KiB
OUTPUT_STATE_BYTES = 64 * 1024  # the output kernel's [K, block_v] state tile
# scan="auto": shorter sequences keep the sequential pass. H100, bf16, 1 x T x 16 heads of 128 x 128, 32 programs,
# 4 segments (RESULTS.md run 17): forward+backward at 256 chunks 1.841 ms segmented against 1.905 sequential, at
# 1024 chunks 6.528 against 7.16, at 4096 25.07 against 27.89 (H200, run 8, 8 segments then: at 256 chunks the
# sequential pass had been faster, 2.244 against 2.202 ms, before the Mosaic backward passes)
AUTO_MIN_CHUNKS = 256
# a forward without a backward (and with the output kernel: see ``chunked._stages`` for the fused output) pays the
# segmented scan's extra passes without its faster reverse passes: the sequential forward was faster at 1024 chunks
# (2.472 against 2.856 ms) and at 4096 (9.342 against 10.81) on the H100 of run 17; on the H200 of run 10 the
# segmented one won at 4096 by 2 % (8.937 against 9.142)
AUTO_MIN_CHUNKS_FORWARD = 8192


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Launch options. ``None`` means: chosen by :meth:`resolve` from the dtype and head sizes.

    Warps per kernel (``backward_warps``: the output and transfer backward kernels), the state passes'
    pipeline stages (``state_bwd_stages``: the reverse passes'; None: as ``state_stages`` when that is set) and
    ``V`` block, the output kernel's ``V`` block, the output backward's ``K`` block. transfer_mode: matmul mode
    of the transfer program's ``n x n`` products (``common.DOT_MODES``; None: "f16" for bf16/f16 operands, full
    precision otherwise). "f16" has TF32's mantissa at bf16's instruction count (chunks whose float16 products
    overflow are formed again at TF32): on an H100 at 4 x 4096 x 16 x 128 x 128 it took the forward from 0.371 to
    0.309 ms and forward+backward from 1.248 to 1.203 ms against "tf32" (the default before), with the same errors
    against float32 xla (outputs 4.0e-3, gradients 4.2e-3..5.3e-3 ungated; RESULTS.md, run 21). "operand" (bf16)
    moved the outputs by 5e-3 (run 20).
    score_mode: matmul mode of the per-channel decayed scores and their vjp (``decay.scores``, GLA and KDA):
    "operand" (bf16 products for bf16 inputs, the fastest) or "tf32" (KDA's gradients as accurate as the
    scalar-decay path's, 3.4e-3 against 8.8e-3 relative to float32 xla, for about 18 % more forward+backward
    time on an H200: RESULTS.md, run 12) or "f32".
    assoc: "segmented" or "xla" (see ``chunked``); segment_programs: the segmented scan uses at most this
    many (head, segment, column block) programs; None: the GPU's multiprocessor count (one wave: at
    1 x 16384..262144 x 16 heads on an H100, 4 segments of 128 programs beat 8 of 256 forward and
    forward+backward, run 17). backward: "kernels" or "reference" (see ``chunked``). state_lowering: the
    unpacked state passes through Pallas's Triton lowering or Mosaic GPU (``state_pass_mosaic``: the
    forward pass, also the segmented scan's segment flows and its last pass, and at rank 1 the backward
    pass, sequential or both reverse passes of the segmented scan; bf16/f16 operands, sizes multiples of
    64; the forward pass 1.45x faster than Triton at 1 x 65536 x 16 heads on an H200); "auto": Mosaic on a
    GPU wherever it runs the pass, else Triton; "mosaic": also in interpret mode (CPU tests). Packed
    passes stay on Triton.
    mosaic_stages: the Mosaic pass's pipeline depth (chunks in flight).
    flow_block_v: the column block of the segmented scan's segment-flow pass (``[P | Q]``, ``K + V`` columns);
    None: 128 where the pass runs on Mosaic, 128 divides ``K`` and ``V`` and its tiles fit, else ``block_v``. Wider
    blocks run that pass on fewer programs (at 1 x 65536 x 16 heads, K = V = 128 and 4 segments: 256 programs at 64
    columns, 128 at 128: forward 1.758-1.808 -> 1.629-1.665 ms on an H100, RESULTS.md, run 23).
    output: where the forward computes the outputs ``o``: "kernel" (``chunk_output``, one program per chunk, from the
    ``S_in`` the state pass wrote) or "fused": inside the Mosaic forward state pass, from the state tile it holds
    (``state_pass_mosaic(q=...)``: no ``S_in`` read back, and none written by a forward without a backward), wherever
    that pass runs on Mosaic at one micro-step a token (sequential, or the segmented scan's last pass); elsewhere
    the kernel. "auto": fused where that pass fills more than half the GPU (:func:`fuse_output`), else the kernel;
    with ``scan="auto"`` a forward without a backward then takes the segmented scan from as few chunks as one with a
    backward (:data:`AUTO_MIN_CHUNKS`) where its last pass computes o.
    channel_block (per-channel decays): the transfer and output kernels form their decayed scores as a sum over
    blocks of this many key channels (``decay.scores``), and the transfer its ``w = T (b e^G * k)`` block by
    block, which keeps ``[n, channel_block]`` float32 tiles live instead of ``[n, K]`` ones; None: chosen by
    :meth:`resolve` (64 for per-channel decays with ``K > 64``, else all ``K`` at once). At ``K = 128`` in the
    offline sm_90 report the output kernel's spills fell from 880 B a thread to none at 32 or 64, the
    transfer's from 1012 B to 444 (32) or 456 (64), and to none once ``w`` was blocked too; 16 serialises the
    tensor-core products. On an H200 (KDA, 4 x 4096 x 16 x 128 x 128) 64 took the output kernel from 0.362 to
    0.341 ms, 32 to 0.424; the transfer was unchanged (RESULTS.md, run 15: the field was ``score_channels``
    then, and the transfer's ``w`` was still formed over all channels; ``w`` by blocks is not yet timed).
    """

    transfer_mode: str | None = None
    score_mode: str = "operand"
    transfer_warps: int | None = None
    state_warps: int | None = None
    state_stages: int | None = None
    state_bwd_stages: int | None = None
    block_v: int | None = None
    output_warps: int | None = None
    output_block_v: int | None = None
    assoc: str = "segmented"
    backward: str = "kernels"
    backward_warps: int | None = None
    block_k: int | None = None
    segment_programs: int | None = None
    flow_block_v: int | None = None
    state_lowering: str = "auto"
    mosaic_stages: int = 4
    output: str = "auto"
    channel_block: int | None = None

    def __post_init__(self):
        # "f16" only where an overflowing chunk is formed again (the transfer): the scores have no such fallback
        choices = {"transfer_mode": (None,) + DOT_MODES, "score_mode": tuple(m for m in DOT_MODES if m != "f16"),
                   "assoc": ASSOCIATIVE,
                   "backward": BACKWARDS,
                   "state_lowering": STATE_LOWERINGS, "output": OUTPUTS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"Tuning.{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        for name in ("block_v", "block_k", "output_block_v", "channel_block", "flow_block_v"):
            value = getattr(self, name)
            if value is not None and (value < 16 or value & (value - 1)):
                raise ValueError(f"Tuning.{name}: expected None or a power of two >= 16, got {value!r}")
        for name in ("transfer_warps", "state_warps", "output_warps", "backward_warps"):
            value = getattr(self, name)
            if value is not None and value not in (1, 2, 4, 8, 16):
                raise ValueError(f"Tuning.{name}: expected None or one of (1, 2, 4, 8, 16), got {value!r}")
        programs = self.segment_programs
        if programs is not None and (not isinstance(programs, int) or isinstance(programs, bool) or programs < 1):
            raise ValueError(f"Tuning.segment_programs: expected None or a positive count, got {programs!r}")
        for name in ("state_stages", "state_bwd_stages"):
            value = getattr(self, name)
            if value is not None and value not in (1, 2, 3, 4):
                raise ValueError(f"Tuning.{name}: expected None or 1..4, got {value!r}")

    def changes(self) -> dict:
        """The fields set away from their defaults."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}

    def resolve(self, dtype, key_dim: int, value_dim: int, chunk: int, micro_steps: int,
                per_channel: bool = False) -> Tuning:
        """Every ``None`` replaced by the choice for this operand dtype, (padded) head sizes ``K, V``,
        chunk ``C`` and ``n = C R`` micro-steps: the largest pipeline depth whose tiles fit
        :data:`STAGE_BYTES`, narrower column blocks for float32 and for head sizes above 128. Per-channel
        decays hold ``[n, K]`` float32 decay tiles: 8 warps in the state passes and the backward kernels, as
        for float32. The transfer and output forward kernels at 4 warps and the output backward's 64-column
        ``K`` blocks, as for bf16, timed faster at ``K = 128`` (RESULTS.md, run 12); at ``K = 256`` blocks of 64
        spill in the offline report (``benchmarks/kernel_resources.py``), so 32 there."""
        size = jnp.dtype(dtype).itemsize
        f32, big = size >= 4, max(key_dim, value_dim) > 128
        wide = f32 or per_channel
        K, V, C, n = key_dim, value_dim, chunk, micro_steps
        block_v = min(self.block_v or (32 if wide and big else 64), V)
        forward_tile = (2 * n * K + n * block_v) * size  # keys, w, u of one chunk
        backward_tile = (C * K + 2 * n * K + C * block_v) * size  # q, keys, w, do of one chunk
        # per-channel reverse pass: also float32 decay tiles G [n, K], G_t [C, K] and the saved scores [C, n]
        reverse_tile = backward_tile + (4 * (n + C) * K + C * n * size if per_channel else 0)
        stages = lambda tile: next((s for s in (3, 2) if s * max(forward_tile, tile) <= STAGE_BYTES), 1)
        output_block_v = V if K * V * size <= OUTPUT_STATE_BYTES else (64 if wide else 128)
        auto = dict(
            transfer_mode="f16" if size <= 2 else "operand",
            transfer_warps=8 if f32 or big else 4,
            state_warps=8 if wide else 4,
            state_stages=stages(backward_tile),
            state_bwd_stages=self.state_stages or stages(reverse_tile),  # a set state_stages sets both
            block_v=block_v,
            output_warps=8 if f32 or big else 4,
            output_block_v=min(output_block_v, V),
            backward_warps=8 if wide or big else 4,
            block_k=32 if f32 or (per_channel and big) else 64,
            channel_block=64 if per_channel and K > 64 else None,
        )
        return dataclasses.replace(self, **{k: v for k, v in auto.items() if getattr(self, k) is None})


def sm_count() -> int:
    """Streaming multiprocessors of the first device (132 on H100/H200 when JAX does not say)."""
    import jax

    return getattr(jax.devices()[0], "core_count", None) or 132


def segment_count(N: int, programs: int, target: int) -> int:
    """Segments of the segmented scan: the largest divisor of the ``N`` chunks that keeps ``programs`` (the
    sequential pass's programs, one per head and column block) x segments at most ``target``."""
    most = max(1, min(N, target // max(1, programs)))
    return max(d for d in range(1, most + 1) if N % d == 0)


def auto_segments(scan: str, N: int, programs: int, tuning: Tuning, backward: bool = True) -> int:
    """Segments for ``scan`` over ``N`` chunks (1: the sequential pass). ``"associative"`` always splits;
    ``"auto"`` splits only when the sequential pass's ``programs`` fill at most half the GPU and the
    sequence is long (at least :data:`AUTO_MIN_CHUNKS` chunks, :data:`AUTO_MIN_CHUNKS_FORWARD` for a forward
    that no kernel backward follows, ``backward=False``): then its ``N`` dependent steps on few
    multiprocessors cost more than the segmented scan's extra passes."""
    shortest = AUTO_MIN_CHUNKS if backward else AUTO_MIN_CHUNKS_FORWARD
    if scan == "sequential" or (scan == "auto" and (2 * programs > sm_count() or N < shortest)):
        return 1
    return segment_count(N, programs, tuning.segment_programs or sm_count())


def fuse_output(tuning: Tuning, programs: int) -> bool:
    """Whether the outputs are computed in the Mosaic forward pass (``Tuning.output``) when it runs ``programs``
    (head, segment, column block) programs. "auto": where they fill more than half the GPU (as
    :func:`auto_segments` leaves a pass sequential): the output's products then add little to each step, while on
    few programs they serialise work the output kernel spreads over every chunk. On the H100 (run 19) fused was
    faster at 128 and 256 programs (forward 22 % and 15 %, forward+backward 6-9 %) and slower at 32 (the
    sequential forward at 1 x 16384 and 1 x 65536 x 16 heads, 20-24 %)."""
    return tuning.output == "fused" or (tuning.output == "auto" and 2 * programs > sm_count())


def launch_problem(dtype, key_dim: int, value_dim: int, n: int) -> tuple[str, str] | None:
    """``(option, why)`` when the kernels cannot run ``n = C R`` micro-steps a chunk at these sizes
    (options as in :class:`flowssm.backends.Request`), else None."""
    wide = jnp.dtype(dtype).itemsize >= 4
    if n > MAX_MICRO_STEPS:
        return "chunk_size", f"hold at most {MAX_MICRO_STEPS} micro-steps a chunk (chunk_size * R), got {n}"
    if wide and n > MAX_MICRO_STEPS_F32:
        return "chunk_size", (f"hold at most {MAX_MICRO_STEPS_F32} micro-steps a chunk (chunk_size * R) with "
                              f"{jnp.dtype(dtype)} operands (shared memory), got {n}; use bfloat16 inputs or a "
                              f"smaller chunk_size")
    if wide and max(key_dim, value_dim) > 128:
        option = "key_dim" if key_dim > 128 else "value_dim"
        return option, (f"run head sizes up to 128 with {jnp.dtype(dtype)} operands (shared memory), got "
                        f"K = {key_dim}, V = {value_dim}; use bfloat16 inputs")
    return None

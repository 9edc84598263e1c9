"""Sequence parallelism: the time axis split over the devices of one mesh axis.

Device ``d`` of ``D`` holds tokens ``[d T_loc, (d + 1) T_loc)`` and

1. solves its ``N`` chunks and scans their flows from the identity: every chunk's entry state as a dense
   flow of the device's entry state, and the device's flow ``(P_d, Q_d)``: ``P_d: [K, K]``, ``Q_d: [K, V]``;
2. all-gathers the ``D`` flows (one collective, ``D (K^2 + K V)`` floats per batch element and head);
3. composes its predecessors' flows onto the replicated initial state,
   ``S_d = P_{d-1} (... (P_0 S_0 + Q_0) ...) + Q_{d-1}`` (every device also gets ``S_D``, the final state);
4. applies the chunk entry flows to ``S_d`` (no second scan) and reads out its outputs.

Per device that is one scan of ``N = T / (D C)`` steps on ``K x (K + V)`` states, against ``T / C`` steps
on ``K x V`` states on one device.

Autodiff runs through ``shard_map``; the backward pass adds one all-reduce, of the ``D`` entry states'
cotangents (``D K V`` floats per batch element and head).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float

from flowssm import chunks, varlen
from flowssm import flows as F
from flowssm.ops import validate
from flowssm.paths import Path, chunk_path, dplr_path, linear_attention_path, make_path, pad_path
from flowssm.scan import chunk_states
from flowssm.solvers import Additive, FlowSolver


def lift(flow: F.WYFlow) -> F.WYFlow:
    """``u`` widened to ``[0 | u]``: the flow then maps the stacked ``[M | S]`` (``K x (K + V)``) to
    ``[P M | P S + Q]``, so scanning chunk flows from ``[I | 0]`` yields their prefix compositions as dense
    ``[P | Q]`` without densifying any chunk's ``K x K`` factor."""
    return flow._replace(u=jnp.concatenate([jnp.zeros_like(flow.w), flow.u], axis=-1))


def _check_mesh(mesh, axis_name) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name: expected one of the mesh axes {mesh.axis_names}, got {axis_name!r}")


@functools.partial(
    jax.jit, static_argnames=("mesh", "axis_name", "scale", "chunk_size", "solver", "scan", "semantics")
)
def _sharded(q, path: Path, S0, *, mesh: Mesh, axis_name, scale, chunk_size, solver: FlowSolver, scan, semantics):
    """q: [B, T, H, K] -> (o: [B, T, H, V] in the compute dtype, final state [B, H, K, V])."""
    T = path.length
    D = mesh.shape[axis_name]
    C = min(chunk_size, T)  # the chunk grid of delta_rule, so approximate solvers agree too
    N = -(-T // (D * C))  # chunks per device
    # An Explicit mesh axis types arrays by their sharding (an Auto one leaves placement to shard_map), and a
    # time axis of length T % D != 0 has no even sharding: there padding and the final slice are time-replicated.
    explicit = mesh.axis_types[mesh.axis_names.index(axis_name)] == AxisType.Explicit
    place = lambda x, spec: jax.reshard(x, NamedSharding(mesh, spec)) if explicit else x
    uneven = T % D != 0
    if uneven:
        q, path = place((q, path), PartitionSpec())
    path = pad_path(path, D * N * C)  # identity tokens: exact
    qh = jnp.pad(jnp.moveaxis(q.astype(path.keys.dtype), 2, 1), [(0, 0), (0, 0), (0, D * N * C - T), (0, 0)])

    def local(qh, path: Path, S0):
        B, H = qh.shape[:2]
        K, V = path.keys.shape[-1], path.values.shape[-1]
        systems, sols = chunks.solve_chunks(chunk_path(path, C), solver, semantics)
        origin = jnp.concatenate([jnp.eye(K, dtype=S0.dtype), jnp.zeros((K, V), S0.dtype)], axis=-1)
        origin = jax.lax.pcast(origin, axis_name, to="varying")  # the scan carry varies like the flows
        prefix = lambda f: chunk_states(lift(f), origin, scan)
        if scan == "associative":
            # Recomputed in the backward pass: jax 0.11.2's Shardy partitioner segfaults when the associative
            # scan's zero-sized residuals cross the shard_map boundary.
            prefix = jax.checkpoint(prefix)
        # entry: [B, H, N, K, K + V], each chunk's entry state as a flow of this device's entry state
        entry, device_flow = jax.vmap(jax.vmap(prefix))(sols.flow)
        PQ = jax.lax.all_gather(device_flow, axis_name, axis=2, to="invarying")  # [B, H, D, K, K + V]
        flows = F.DenseFlow(PQ[..., :K], PQ[..., K:])
        S_dev, S_final = jax.vmap(jax.vmap(lambda f, s: chunk_states(f, s, "sequential")))(flows, S0)  # over devices
        S_entry = S_dev[:, :, jax.lax.axis_index(axis_name), None]  # [B, H, 1, K, V]
        S_in = F.apply(F.DenseFlow(entry[..., :K], entry[..., K:]), S_entry)  # [B, H, N, K, V]
        qc = qh.reshape(B, H, N, C, K)
        o = chunks.read_chunks(systems, qc, sols, S_in, scale)
        return o.reshape(B, H, N * C, V), S_final

    time = PartitionSpec(None, None, axis_name)
    qh, path = place((qh, path), time)
    o, S = jax.shard_map(local, mesh=mesh, in_specs=(time, time, PartitionSpec()), out_specs=(time, PartitionSpec()))(
        qh, path, S0
    )
    if uneven:
        o = place(o, PartitionSpec())
    return jnp.moveaxis(o[:, :, :T], 1, 2), S


@functools.partial(
    jax.jit, static_argnames=("mesh", "axis_name", "scale", "chunk_size", "solver", "scan", "semantics")
)
def _sharded_packed(q, path: Path, h0, cu, *, mesh: Mesh, axis_name, scale, chunk_size, solver: FlowSolver, scan,
                    semantics):
    """Packed sequences (:mod:`flowssm.varlen`): the chunk-aligned layout, its chunks split over the devices.

    q: [1, T, H, K], h0: [N, H, K, V], cu: [N + 1] -> (o: [1, T, H, V], finals: [N, H, K, V]). As
    :func:`_sharded`, in ``[P | S]`` form: a sequence starting on a device resets the lifted state to
    ``[0 | h0]``, so the device flow of a device holding a start no longer depends on earlier devices. Each
    sequence's final state is computed on the device of its last chunk and summed over devices (one
    all-reduce of ``N K V`` floats a head).
    """
    T, N = path.length, h0.shape[0]
    D = mesh.shape[axis_name]
    C = min(chunk_size, T)
    Nd = -(-varlen.num_chunks(T, N, C) // D)  # chunks per device
    lay = varlen.layout(cu, T, C, chunks=D * Nd)
    explicit = mesh.axis_types[mesh.axis_names.index(axis_name)] == AxisType.Explicit
    place = lambda x, spec: jax.reshard(x, NamedSharding(mesh, spec)) if explicit else x
    q, path = place((q, path), PartitionSpec())  # the gathers into slots read every token
    qh = varlen.to_slots(jnp.moveaxis(q.astype(path.keys.dtype), 2, 1), lay, 2)  # [1, H, D Nd C, K]
    path = varlen.slots_path(path, lay)
    h0h = jnp.moveaxis(h0, 0, 1)  # [H, N, K, V]

    def local(qh, path: Path, resets: varlen.Resets, h0):
        H, K, V = h0.shape[0], h0.shape[-2], h0.shape[-1]
        systems, sols = chunks.solve_chunks(chunk_path(path, C), solver, semantics)
        flows = jax.tree.map(lambda x: x[0], sols.flow)  # [H, Nd, ...]
        origin = jnp.concatenate([jnp.eye(K, dtype=h0.dtype), jnp.zeros((K, V), h0.dtype)], axis=-1)
        origin = jax.lax.pcast(origin, axis_name, to="varying")
        h0_lifted = jnp.concatenate([jnp.zeros((H, N, K, K), h0.dtype), h0], axis=-1)  # resets to [0 | h0]
        prefix = lambda f, h: varlen.chunk_states(lift(f), h, resets, scan, S0=origin)[0]
        entry = jax.vmap(prefix)(flows, h0_lifted)  # [H, Nd, K, K + V]
        last = jax.tree.map(lambda x: x[:, -1], flows)
        device_flow = F.apply(lift(last), entry[:, -1])  # [H, K, K + V]
        PQ = jax.lax.all_gather(device_flow, axis_name, axis=1, to="invarying")  # [H, D, K, K + V]
        zero = jnp.zeros((H, K, V), h0.dtype)  # device 0 starts a sequence: its entry state is never read
        S_dev, _ = jax.vmap(lambda f, s: chunk_states(f, s, "sequential"))(F.DenseFlow(PQ[..., :K], PQ[..., K:]), zero)
        S_entry = S_dev[:, jax.lax.axis_index(axis_name), None]  # [H, 1, K, V]
        S_in = F.apply(F.DenseFlow(entry[..., :K], entry[..., K:]), S_entry)  # [H, Nd, K, V]
        ends_here = jnp.zeros((N,), bool).at[jnp.where(resets.end > 0, resets.seq, N)].set(True, mode="drop")
        finals = jax.vmap(lambda f, s: varlen.after_chunks(f, s, varlen.last_chunks(resets, N)))(flows, S_in)
        finals = jax.lax.psum(jnp.where(ends_here[:, None, None], finals, 0.0), axis_name)
        o = chunks.read_chunks(systems, qh.reshape(1, H, Nd, C, K), sols, S_in[None], scale)
        return o.reshape(1, H, Nd * C, V), finals

    time, chunk_axis = PartitionSpec(None, None, axis_name), PartitionSpec(axis_name)
    qh, path = place((qh, path), time)
    o, finals = jax.shard_map(local, mesh=mesh, in_specs=(time, time, chunk_axis, PartitionSpec()),
                              out_specs=(time, PartitionSpec()))(qh, path, lay.resets, h0h)
    o = varlen.from_slots(place(o, PartitionSpec()), lay, 2)
    finals = jnp.where(varlen.nonempty(lay.resets, N)[None, :, None, None], finals, h0h)
    return jnp.moveaxis(o, 1, 2), jnp.moveaxis(finals, 0, 1)


def _run(q, path: Path, initial_state, mesh, axis_name, scale, chunk_size, solver, scan, semantics, cu_seqlens=None):
    _check_mesh(mesh, axis_name)
    options = dict(mesh=mesh, axis_name=axis_name, chunk_size=chunk_size, scan=scan, semantics=semantics)
    if cu_seqlens is None:
        solver, S0, scale = validate(q, path, initial_state, scale, chunk_size, solver, scan, semantics)
        o, S = _sharded(q, path, S0, scale=scale, solver=solver, **options)
    else:
        solver, _, scale = validate(q, path, None, scale, chunk_size, solver, scan, semantics)
        cu = varlen.check_cu_seqlens(cu_seqlens, q.shape[0], path.length)
        h0 = varlen.initial_states(initial_state, path, cu.shape[0] - 1)
        o, S = _sharded_packed(q, path, h0, cu, scale=scale, solver=solver, **options)
    return o.astype(q.dtype), S


def sequence_parallel_delta_rule(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T H K"] | Float[Array, "B T H R K"],
    v: Float[Array, "B T H V"] | Float[Array, "B T H R V"],
    beta: Float[Array, "B T H"] | Float[Array, "B T H R"],
    g: Float[Array, "B T H"] | Float[Array, "B T H K"] | None = None,
    *,
    mesh: Mesh,
    axis_name: str = "seq",
    initial_state: Float[Array, "B H K V"] | None = None,
    scale: float | None = None,
    chunk_size: int = 64,
    solver="exact",
    scan: str = "sequential",
    semantics: str = "discrete",
    cu_seqlens=None,
):
    """:func:`flowssm.delta_rule` with the time axis sharded over ``mesh`` axis ``axis_name`` (``D`` devices).

    Same arguments, layout and results: ``o: [B, T, H, V]`` (dtype of ``q``, sharded over time) and the
    final state ``[B, H, K, V]`` (replicated). Chunks lie on delta_rule's grid ``C = min(chunk_size, T)``,
    so every solver gives delta_rule's result; each device holds ``ceil(T / (D C))`` chunks, the sequence
    being padded at its end with identity tokens (``k = v = 0``, ``beta = 0``, ``g = 0``), which leave the
    state unchanged: any ``T`` is exact. Inputs are replicated over the other mesh axes. With an Explicit
    mesh axis (``jax.make_mesh``'s default) differentiate under ``jax.set_mesh(mesh)``. Backend: xla.
    ``cu_seqlens``: packed sequences as in :func:`flowssm.delta_rule` (``B = 1``, states ``[N, H, K, V]``);
    the chunk-aligned layout is split over the devices, so a sequence may span several.
    """
    if beta is None:
        raise TypeError("beta: expected a floating-point array, got None")
    path = make_path(k, v, beta, g)
    return _run(q, path, initial_state, mesh, axis_name, scale, chunk_size, solver, scan, semantics, cu_seqlens)


def sequence_parallel_linear_attention(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T H K"],
    v: Float[Array, "B T H V"],
    g: Float[Array, "B T H"] | Float[Array, "B T H K"] | None = None,
    *,
    mesh: Mesh,
    axis_name: str = "seq",
    initial_state: Float[Array, "B H K V"] | None = None,
    scale: float | None = None,
    chunk_size: int = 64,
    scan: str = "sequential",
    cu_seqlens=None,
):
    """:func:`flowssm.linear_attention` (``S <- e^{g_t} S + k_t v_t^T``) sharded over time like
    :func:`sequence_parallel_delta_rule` (``cu_seqlens`` too)."""
    path = linear_attention_path(k, v, g)
    return _run(q, path, initial_state, mesh, axis_name, scale, chunk_size, Additive(), scan, "discrete", cu_seqlens)


def sequence_parallel_dplr_delta_rule(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T H K"],
    v: Float[Array, "B T H V"],
    a: Float[Array, "B T H K"],
    b: Float[Array, "B T H K"],
    gk: Float[Array, "B T H K"],
    *,
    mesh: Mesh,
    axis_name: str = "seq",
    initial_state: Float[Array, "B H K V"] | None = None,
    scale: float | None = None,
    chunk_size: int = 64,
    solver="exact",
    scan: str = "sequential",
):
    """:func:`flowssm.dplr_delta_rule` (``S <- (diag(e^{gk}) + b a^T) S + k v^T``) sharded over time like
    :func:`sequence_parallel_delta_rule`."""
    path = dplr_path(k, v, a, b, gk)
    return _run(q, path, initial_state, mesh, axis_name, scale, chunk_size, solver, scan, "discrete")

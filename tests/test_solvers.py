"""Flow solvers: exactness, measured local orders, long-sequence stability, the public op, gradients.

Float64 throughout (x64 is on in conftest). One-chunk checks use the study's helpers
(``experiments/solver_study.py``), so the study measures what these tests verify.
"""

import dataclasses
import functools
import importlib.util
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.test_util import check_grads

import flowssm
from flowssm import chunks, flows
from flowssm.models.config import MixerConfig
from flowssm.solvers import (SOLVERS, Euler, Exact, FlowSolver, LogODE, Requirements, Signature, TransferProgram,
                             get_solver)
from flowssm.solvers.exact import METHODS
from flowssm.solvers.program import Merge, Substitution
from flowssm.testing import random_inputs, rel_err

_spec = importlib.util.spec_from_file_location(
    "solver_study", pathlib.Path(__file__).resolve().parents[1] / "experiments" / "solver_study.py"
)
study = sys.modules.setdefault("solver_study", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(study)

SEMANTICS = ("discrete", "continuous")


def one_chunk_systems(semantics, eps=1.0, *, C=3, R=2, beta_max=0.9, seed=0):
    """Three random gated chunks (unit keys, K = 4, V = 3, beta in (0, beta_max)), path scaled by ``eps``.
    One shape throughout, so each (solver, semantics) compiles once."""
    base = study.random_chunks(seed, 3, C, R, 4, 3, beta_max)
    return study.build_systems(study.scale_path(base, eps), semantics)


@functools.partial(jax.jit, static_argnums=0)
def solve_dense(solver, systems):
    """(w, u) prefix generators and the dense chunk flows of a batch of systems."""
    sol = jax.vmap(solver.solve)(systems)
    return sol.w, sol.u, flows.densify(sol.flow)


def max_abs(a, b):
    return float(jnp.max(jnp.abs(a - b)))


# --- exactness --------------------------------------------------------------------------------


@pytest.mark.parametrize("semantics", SEMANTICS)
@pytest.mark.parametrize("method", METHODS)
def test_exact_methods_equal_a_triangular_solve_to_1e10(semantics, method):
    """Every exact method's ``(w, u)`` against LAPACK's unit-lower triangular solve of ``(I + L) x = rhs``."""
    systems = one_chunk_systems(semantics, beta_max=2.0)
    n = systems.L.shape[-1]
    solve = lambda L, r: scipy.linalg.solve_triangular(np.eye(n) + L, r, lower=True, unit_diagonal=True)
    for i in range(3):
        w, u, _ = solve_dense(Exact(method=method), systems)
        assert max_abs(w[i], solve(systems.L[i], systems.rhs_k[i])) < 1e-10
        assert max_abs(u[i], solve(systems.L[i], systems.rhs_v[i])) < 1e-10


@pytest.mark.parametrize("program", [Substitution, Merge])
@pytest.mark.parametrize("block", [1, 2, 4])
def test_blocked_programs_are_exact_for_any_block_size(program, block):
    """Block sizes that divide n = 6, that do not (4), and single rows (1)."""
    systems = one_chunk_systems("discrete", beta_max=2.0)
    ref = solve_dense(Exact(), systems)
    out = jax.vmap(lambda sy: flowssm.solvers.program.solve_system(program(block=block), sy))(systems)
    assert max_abs(out.w, ref[0]) < 1e-10 and max_abs(out.u, ref[1]) < 1e-10


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_signature_depth_n_minus_1_is_exact(semantics):
    systems = one_chunk_systems(semantics, beta_max=2.0)  # n = C R = 6 micro-steps
    ref = solve_dense(Exact(), systems)
    for depth in (5, 7):
        out = solve_dense(Signature(depth), systems)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
            assert max_abs(a, b) < 1e-10, depth


def test_euler_equals_signature_depth_0():
    systems = one_chunk_systems("discrete")
    euler, depth0 = solve_dense(Euler(), systems), solve_dense(Signature(0), systems)
    for a, b in zip(jax.tree.leaves(euler), jax.tree.leaves(depth0)):
        assert max_abs(a, b) == 0.0


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_signature_error_non_increasing_in_depth(semantics):
    systems = one_chunk_systems(semantics, eps=0.5)
    _, _, ref = solve_dense(Exact(), systems)
    errors = [study.flow_error(solve_dense(Signature(d), systems)[2], ref) for d in range(6)]
    assert errors[0] > 1e-3 and errors[-1] < 1e-13
    assert all(later <= earlier * (1 + 1e-9) + 1e-15 for earlier, later in zip(errors, errors[1:])), errors


# --- logode ------------------------------------------------------------------------------------


def dense_magnus_flow(chunk, semantics):
    """Independent dense reference: ``expm`` of the level-2 Magnus sum of ``logm`` of each step's
    decay-folded affine map (scipy), rescaled by ``e^{G_end}``. Steps: micro-steps (discrete) or tokens."""
    keys, values, beta, alpha, g = (np.asarray(x) for x in chunk[:5])  # right_keys: None
    C, R, K = keys.shape
    V = values.shape[-1]
    G = np.cumsum(g)
    steps = []
    for t in range(C):
        if semantics == "continuous":
            A = g[t] * np.eye(K) - np.einsum("rk,r,rj->kj", keys[t], beta[t], keys[t])
            B = np.einsum("rk,r,rv->kv", keys[t], alpha[t], values[t])
            flow = scipy.linalg.expm(np.block([[A, B], [np.zeros((V, K + V))]]))
            flow[:K, :K] *= np.exp(-g[t])  # S^_t = e^{-G_t} S_t = e^{-g_t} P_t S^_{t-1} + e^{-G_t} Q_t
            flow[:K, K:] *= np.exp(-G[t])
            steps.append(flow)
            continue
        for j in range(R):
            k = keys[t, j]
            P = np.eye(K) - beta[t, j] * np.outer(k, k)
            Q = np.exp(-G[t]) * alpha[t, j] * np.outer(k, values[t, j])
            steps.append(np.block([[P, Q], [np.zeros((V, K)), np.eye(V)]]))
    logs = [np.real(scipy.linalg.logm(s)) for s in steps]
    omega = sum(logs) + 0.5 * sum(logs[t] @ logs[s] - logs[s] @ logs[t] for t in range(len(logs)) for s in range(t))
    Y = np.exp(G[-1]) * scipy.linalg.expm(omega)
    return Y[:K, :K], Y[:K, K:]


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_logode_flow_is_exp_of_level2_magnus_generator(semantics):
    systems = one_chunk_systems(semantics, seed=1)  # full scale: far from the small-step regime
    _, _, flow = solve_dense(LogODE(), systems)
    for i in range(3):
        P, Q = dense_magnus_flow(jax.tree.map(lambda x: x[i], systems.path), semantics)
        assert max_abs(flow.P[i], P) < 1e-10 and max_abs(flow.Q[i], Q) < 1e-10


def test_logode_rejects_beta_at_least_one_under_discrete_semantics_in_jit(op_case):
    (q, k, v, beta, g, s0), _ = op_case
    run = jitted_delta_rule(chunk_size=8, solver=LogODE(), scan="sequential", semantics="discrete")
    with pytest.raises(Exception, match=r"beta \* \|k\|\^2 < 1"):
        jax.block_until_ready(run(q, k, v, beta.at[0, 3, 0, 1].set(1.5), g, initial_state=s0))


# --- orders ------------------------------------------------------------------------------------

def finite_order_solvers():
    """Every registered solver with a finite order (its defaults), plus lower depths of the families."""
    defaults = [cls() for cls in SOLVERS.values() if math.isfinite(cls().order())]
    return defaults + [Signature(1), LogODE(depth=1)]


# under continuous semantics L is block-lower over the C = 3 tokens (L^3 = 0): signature(depth >= 2) is exact there
ORDER_CASES = [(solver, semantics) for solver in finite_order_solvers() for semantics in SEMANTICS
               if not (semantics == "continuous" and isinstance(solver, Signature) and solver.depth >= 2)]


@pytest.mark.parametrize("solver, semantics", ORDER_CASES, ids=[f"{s!r}-{m}" for s, m in ORDER_CASES])
def test_measured_local_order_is_order_plus_one(solver, semantics):
    """Scale the path (g, beta, alpha = beta) by eps over a decade; slope of the P and Q errors."""
    scales = np.logspace(-1.75, -0.75, 5)
    errors = []
    for eps in scales:
        systems = one_chunk_systems(semantics, eps, seed=3)
        (_, _, a), (_, _, b) = solve_dense(solver, systems), solve_dense(Exact(), systems)
        errors.append([float(jnp.linalg.norm(a.P - b.P)), float(jnp.linalg.norm(a.Q - b.Q))])
    errors = np.array(errors)
    assert errors.min() > 1e-13  # above round-off: the slope is measured, not noise
    for part, errs in zip("PQ", errors.T):
        slope = np.polyfit(np.log(scales), np.log(errs), 1)[0]
        assert abs(slope - (solver.order() + 1)) < 0.3, (part, slope)


def test_exact_continuous_flow_matches_diffrax():
    """The continuous-semantics reference of the logode order test, checked independently."""
    chunk = jax.tree.map(lambda x: x[0], study.random_chunks(5, 1, 3, 2, 3, 3, 0.9))
    ref = study.diffrax_flow(chunk)
    flow = flows.densify(Exact().solve(chunks.build_system(chunk, "continuous")).flow)
    assert max_abs(flow.P, ref.P) < 1e-8 and max_abs(flow.Q, ref.Q) < 1e-8


# --- long sequences ----------------------------------------------------------------------------


def test_long_sequence_logode_flows_stay_bounded_euler_grows():
    """T = 16384, beta in (0, 1), unit keys, K = V = 4, C = 32: every logode chunk flow has
    ||P||_2 <= 1 (exp of a dissipative generator) and so does their product; Euler's
    ``I - sum beta k k^T`` overshoots below -1 and the product explodes."""
    T, K, C = 16384, 4, 32
    _, k, v, beta, _, _ = random_inputs(11, 1, T, 1, K, K, beta_max=0.95, gated=False)
    path = flowssm.paths.chunk_path(flowssm.paths.make_path(k, v, beta), C)
    systems = jax.vmap(lambda c: chunks.build_system(c, "discrete"))(jax.tree.map(lambda x: x[0, 0], path))

    def norms(solver):
        """Spectral norms of the chunk flows' P and log-norms of the running products P_i ... P_1."""
        P = jax.jit(lambda s: flows.densify(jax.vmap(solver.solve)(s).flow).P)(systems)

        def step(acc, P_i):
            acc = P_i @ acc
            norm = jnp.linalg.norm(acc, 2)
            return acc / norm, jnp.log(norm)

        log_norms = jnp.cumsum(jax.lax.scan(step, jnp.eye(K, dtype=P.dtype), P)[1])
        return float(jnp.linalg.norm(P, 2, axis=(-2, -1)).max()), np.asarray(log_norms)

    chunk_norm, log_norms = norms(LogODE())
    assert chunk_norm <= 1 + 1e-6 and log_norms.max() <= np.log1p(1e-6)
    chunk_norm, log_norms = norms(Euler())
    assert chunk_norm > 2 and log_norms[-1] > 100  # ||P_N ... P_1||_2 > e^100


# --- public op ---------------------------------------------------------------------------------

OP_SOLVERS = {name: cls() for name, cls in SOLVERS.items()} | {
    f"exact-{method}": Exact(method=method) for method in METHODS if Exact(method=method) != Exact()
}


@pytest.fixture(scope="module")
def op_case():
    """Rank 2, gated, B = 1, H = 1, T = 20 (ragged for C = 8), beta in (0, 0.9); token-loop references."""
    q, k, v, beta, g, s0 = random_inputs(2, 1, 20, 1, 4, 4, R=2, beta_max=0.9)
    refs = {
        sem: flowssm.delta_rule(q, k, v, beta, g, initial_state=s0, backend="reference", semantics=sem)
        for sem in SEMANTICS
    }
    return (q, k, v, beta, g, s0), refs


@functools.cache
def jitted_delta_rule(**options):
    """``jax.jit`` of the public op, one per option set (so tests sharing options share the compile)."""
    return jax.jit(functools.partial(flowssm.delta_rule, **options))


@pytest.mark.parametrize("semantics", SEMANTICS)
@pytest.mark.parametrize("name", list(OP_SOLVERS))
def test_every_solver_through_delta_rule_both_scans_under_jit(op_case, name, semantics):
    """Both scans agree; the exact methods reproduce the token loop through the public op."""
    (q, k, v, beta, g, s0), refs = op_case
    o_ref, S_ref = refs[semantics]
    (o, S), (o2, S2) = [
        jitted_delta_rule(chunk_size=8, solver=OP_SOLVERS[name], scan=scan, semantics=semantics)(
            q, k, v, beta, g, initial_state=s0
        )
        for scan in ("sequential", "associative")
    ]
    assert o.shape == o_ref.shape and S.shape == S_ref.shape
    assert bool(jnp.all(jnp.isfinite(o))) and bool(jnp.all(jnp.isfinite(S)))
    assert rel_err(o2, o) < 1e-10 and rel_err(S2, S) < 1e-10
    if math.isinf(OP_SOLVERS[name].order()):
        assert rel_err(o, o_ref) < 1e-10 and rel_err(S, S_ref) < 1e-10


@pytest.mark.parametrize("name", list(OP_SOLVERS))
def test_every_solver_exact_on_single_token_chunks_continuous(op_case, name):
    """With C = 1 under continuous semantics L = 0 and one token's Magnus generator is exact, so every
    solver reproduces the token loop end to end (rank 2, gates, prefix readout and scan included)."""
    (q, k, v, beta, g, s0), refs = op_case
    o_ref, S_ref = refs["continuous"]
    run = jitted_delta_rule(chunk_size=1, solver=OP_SOLVERS[name], scan="sequential", semantics="continuous")
    o, S = run(q, k, v, beta, g, initial_state=s0)
    assert rel_err(o, o_ref) < 1e-10 and rel_err(S, S_ref) < 1e-10


GRAD_CASES = [(name, "discrete") for name in OP_SOLVERS] + [("logode", "continuous")]


@pytest.mark.parametrize("name, semantics", GRAD_CASES, ids=[f"{n}-{s}" for n, s in GRAD_CASES])
def test_every_solver_is_differentiable(op_case, name, semantics):
    """Reverse-mode gradients to every input (initial state included) match finite differences."""
    (q, k, v, beta, g, s0), _ = op_case
    run = jitted_delta_rule(chunk_size=8, solver=OP_SOLVERS[name], scan="sequential", semantics=semantics)
    check_grads(lambda *a: run(*a[:5], initial_state=a[5]), (q, k, v, beta, g, s0), order=1, modes=["rev"])


# --- selection ---------------------------------------------------------------------------------


def test_solvers_selectable_by_name_mapping_and_object(op_case):
    (q, k, v, beta, g, s0), _ = op_case
    outs = [
        flowssm.delta_rule(q, k, v, beta, g, initial_state=s0, chunk_size=8, solver=spec)
        for spec in ("logode", {"name": "logode", "depth": 2}, LogODE())
    ]
    assert all(max_abs(o[0], outs[0][0]) == 0.0 for o in outs)
    for name, cls in SOLVERS.items():
        solver = get_solver(name)
        assert solver == cls() and solver.name == name and getattr(flowssm, cls.__name__) is cls
        assert get_solver(solver.spec()) == solver and get_solver(solver) is solver
        assert solver.order() > 0 and isinstance(solver.program(), TransferProgram)
    assert get_solver({"name": "exact", "method": "wavefront"}) == Exact(method="wavefront")
    with pytest.raises(ValueError, match="solver: expected one of"):
        get_solver("magnus")
    with pytest.raises(ValueError, match=r"mixer\.solver: LogODE\(depth=...\): expected 1 or 2, got 3"):
        get_solver({"name": "logode", "depth": 3}, key="mixer.solver")
    with pytest.raises(ValueError, match=r"Exact\(method=...\)"):
        Exact(method="anti-diagonal")
    assert get_solver({"name": "exact", "method": "merge", "block": 16}).program() == Merge(block=16)
    with pytest.raises(ValueError, match=r"mixer\.solver: Exact\(block=...\): only the blocked methods"):
        get_solver({"name": "exact", "method": "doubling", "block": 8}, key="mixer.solver")
    with pytest.raises(ValueError, match=r"mixer\.solver: Merge\(block=...\): expected an int >= 1, got 0"):
        get_solver({"name": "exact", "block": 0}, key="mixer.solver")


# --- a solver written outside flowssm ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sweeps(TransferProgram):
    """User code: ``count`` Jacobi sweeps ``x <- rhs - L x`` from ``x = rhs`` (``n - 1`` sweeps: exact)."""

    count: int | None = None

    def apply(self, L, rhs, matmul):
        x = rhs
        for _ in range(L.shape[-1] - 1 if self.count is None else self.count):
            x = rhs - matmul(L, x)
        return x


@dataclasses.dataclass(frozen=True)
class JacobiSolver(FlowSolver):
    """User code: a new solver is a frozen dataclass with an order and a program, nothing more."""

    sweeps: int | None = None
    name = "jacobi"

    def order(self) -> float:
        return math.inf if self.sweeps is None else self.sweeps + 1.0

    def program(self) -> TransferProgram:
        return Sweeps(self.sweeps)


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_a_solver_defined_outside_flowssm_runs_on_every_backend(backend):
    """Defined in this test module, unknown to flowssm: exact with ``n - 1`` sweeps (float32, the token
    loop's result to 1e-5, the Pallas kernel in interpret mode), and a layer config accepts it as it is."""
    q, k, v, beta, g, S0 = random_inputs(1, 1, 40, 2, 16, 16, dtype=jnp.float32)
    o_ref, S_ref = flowssm.delta_rule(q, k, v, beta, g, initial_state=S0, backend="reference")
    o, S = flowssm.delta_rule(q, k, v, beta, g, initial_state=S0, chunk_size=16, solver=JacobiSolver(), backend=backend)
    assert o.dtype == jnp.float32 and rel_err(o, o_ref) < 1e-5 and rel_err(S, S_ref) < 1e-5
    assert MixerConfig(solver=JacobiSolver(3)).solver == JacobiSolver(3)


@dataclasses.dataclass(frozen=True)
class DiscreteOnly(JacobiSolver):
    def requirements(self) -> Requirements:
        return Requirements(semantics=("discrete",))


def test_a_solver_is_refused_semantics_it_does_not_declare(op_case):
    (q, k, v, beta, g, s0), _ = op_case
    with pytest.raises(ValueError, match=r"semantics: DiscreteOnly\(sweeps=None\) implements \('discrete',\), got 'continuous'"):
        flowssm.delta_rule(q, k, v, beta, g, solver=DiscreteOnly(), semantics="continuous")


# --- study -------------------------------------------------------------------------------------


def test_study_runs_and_plots_on_a_tiny_grid(tmp_path):
    """The notebook-facing study functions: rows, slopes, table, CSV and both figures."""
    config = study.StudyConfig(scales=(0.05, 0.1, 0.2), chunk_sizes=(4,), depths=(1,), semantics=("discrete",),
                               key_dim=4, value_dim=4, num_chunks=2, repeats=1)
    rows = study.run_study(config, log=lambda *_: None)
    assert len(rows) == 3 * len(study.study_solvers(config.depths))
    slopes = {line["solver"]: line["slope_discrete"] for line in study.summary(rows)}
    solvers = study.study_solvers(config.depths)
    for label in ("euler", "signature(1)"):
        assert abs(slopes[label] - (solvers[label].order() + 1)) < 0.3, label
    assert "| logode | 4 |" in study.markdown_table(study.summary(rows), config.semantics)
    study.write_csv(rows, tmp_path / "rows.csv")
    study.plot_orders(rows, tmp_path / "orders.png")
    study.plot_frontier(rows, tmp_path / "frontier.png")
    assert all((tmp_path / name).stat().st_size > 0 for name in ("rows.csv", "orders.png", "frontier.png"))


@pytest.mark.parametrize("method", ["substitution", "merge", "wavefront"])
def test_exact_methods_stay_accurate_in_float32_on_correlated_keys(method):
    """LM keys (L2-normalised SiLU features) are positively correlated, so ``L`` of a 64-token chunk has
    large positive entries: the doubling product's powers ``L^(2^i)`` grow like binomial coefficients
    and cancel (float32 error 2e4 at mean cosine 0.5, the NaN of ``lm_small_gpu``); blocked
    substitution, the merge and the wavefront do not form those powers."""
    B, T, H, K = 1, 128, 1, 32
    kq, kk, kv, kb = jax.random.split(jax.random.PRNGKey(0), 4)
    features = lambda key: jax.nn.silu(jax.random.normal(key, (B, T, H, K)) + 2.0)
    l2 = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q, k = l2(features(kq)), l2(features(kk))
    v = jax.random.normal(kv, (B, T, H, K))
    beta = jax.nn.sigmoid(jax.random.normal(kb, (B, T, H)) + 2.0)
    assert float(jnp.mean(jnp.einsum("bthk,bshk->bhts", k, k))) > 0.7
    o_ref, _ = flowssm.delta_rule(q, k, v, beta, backend="reference")
    f32 = [x.astype(jnp.float32) for x in (q, k, v, beta)]
    o, _ = flowssm.delta_rule(*f32, solver=Exact(method=method), backend="xla", chunk_size=64)
    doubling, _ = flowssm.delta_rule(*f32, solver=Exact(method="doubling"), backend="xla", chunk_size=64)
    assert rel_err(o, o_ref) < 1e-4
    assert rel_err(doubling, o_ref) > 1e-2  # the documented instability (see Exact's docstring)

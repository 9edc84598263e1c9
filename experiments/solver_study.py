"""Flow solvers: local error vs path scale (measured order) and error vs cost.

For random chunks of ``C`` tokens the path ``X = (omega, xi)`` is scaled by ``eps`` (``g`` and ``beta``,
hence ``alpha = beta``, times ``eps``; unit keys, ``v ~ N(0, 1)``). Each solver's one-chunk flow
``[P | Q]`` is compared with ``exact`` (same semantics); under continuous semantics a small case is also
compared with diffrax (``ControlTerm`` over the ``LinearInterpolation`` of the token path). Cost is
XLA's FLOP count of the jitted, chunk-batched solve (``cost_analysis``; it counts a loop body once and
skips the triangular-solve op, so ``exact(substitution)``, ``exact(wavefront)`` and ``logode``'s
``expm`` are undercounted) and its best-of-``repeats`` wall time. Importing enables float64.

    python experiments/solver_study.py --out DIR      # DIR/solver_study.csv, summary.md, orders.png, frontier.png

Notebook use: ``rows = run_study(StudyConfig(...))``, ``plot_orders(rows, path)``, ``plot_frontier(rows, path)``,
``markdown_table(summary(rows))``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import pathlib
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from flowssm import chunks, flows  # noqa: E402
from flowssm.paths import Path  # noqa: E402
from flowssm.reference import diffrax_prefix_flows  # noqa: E402
from flowssm.solvers import Euler, Exact, FlowSolver, LogODE, Signature  # noqa: E402

PALETTE = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9", "k")  # no grey: grey marks chunk sizes
FIELDS = ("semantics", "solver", "reference", "chunk_size", "rank", "scale", "error", "flops", "us_per_chunk")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Grid of the study. ``scales``: path scale ``eps``; ``fit_points``: smallest scales used for slopes."""

    scales: tuple[float, ...] = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)
    chunk_sizes: tuple[int, ...] = (8, 16, 32)
    depths: tuple[int, ...] = (1, 2, 3)
    semantics: tuple[str, ...] = ("discrete", "continuous")
    rank: int = 1
    key_dim: int = 16
    value_dim: int = 16
    num_chunks: int = 64
    beta_max: float = 0.95
    repeats: int = 20
    diffrax_chunk_size: int = 4
    diffrax_dim: int = 4
    fit_points: int = 3
    seed: int = 0


def study_solvers(depths) -> dict[str, FlowSolver]:
    """The compared solvers by label: euler, signature(N) for N in ``depths``, logode, exact methods."""
    out: dict[str, FlowSolver] = {"euler": Euler()}
    out.update({f"signature({d})": Signature(d) for d in depths})
    out["logode"] = LogODE()
    out.update({f"exact({m})": Exact(method=m) for m in ("substitution", "doubling", "wavefront")})
    return out


def random_chunks(seed: int, num: int, C: int, R: int, K: int, V: int, beta_max: float) -> Path:
    """``num`` chunks (fields ``[num, C, R, .]``, decay ``[num, C]``): unit keys, ``v ~ N(0, 1)``,
    beta in (0, beta_max], g in [-1, 0]."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    k = jax.random.normal(ks[0], (num, C, R, K), jnp.float64)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[1], (num, C, R, V), jnp.float64)
    beta = beta_max * jax.random.uniform(ks[2], (num, C, R), jnp.float64, 0.05, 1.0)
    g = -jax.random.uniform(ks[3], (num, C), jnp.float64, 0.0, 1.0)
    return Path(k, v, beta, beta, g)


def scale_path(chunk: Path, eps: float) -> Path:
    """Scale the driving path by ``eps``: ``g, beta, alpha -> eps g, eps beta, eps alpha``."""
    return chunk._replace(beta=eps * chunk.beta, alpha=eps * chunk.alpha, log_decay=eps * chunk.log_decay)


def build_systems(chunk: Path, semantics: str) -> chunks.ChunkSystem:
    return jax.vmap(lambda c: chunks.build_system(c, semantics))(chunk)


def compile_solve(solver: FlowSolver, systems: chunks.ChunkSystem):
    """The jitted, chunk-batched ``solver.solve``, compiled for the shapes of ``systems``."""
    return jax.jit(jax.vmap(solver.solve)).lower(systems).compile()


def dense_flows(compiled, systems: chunks.ChunkSystem) -> flows.DenseFlow:
    return flows.densify(compiled(systems).flow)


def flow_error(flow: flows.DenseFlow, ref: flows.DenseFlow) -> float:
    """Mean over chunks of the relative Frobenius error of the affine flow ``[P | Q]``."""
    a = jnp.concatenate([flow.P, flow.Q], axis=-1)
    b = jnp.concatenate([ref.P, ref.Q], axis=-1)
    return float(jnp.mean(jnp.linalg.norm(a - b, axis=(-2, -1)) / jnp.linalg.norm(b, axis=(-2, -1))))


def measure_cost(compiled, systems: chunks.ChunkSystem, repeats: int) -> tuple[float, float]:
    """(FLOPs per chunk from XLA's cost analysis, best-of-``repeats`` wall microseconds per chunk)."""
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    jax.block_until_ready(compiled(systems))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(systems))
        times.append(time.perf_counter() - start)
    num = systems.L.shape[0]
    return float(analysis.get("flops", math.nan)) / num, 1e6 * min(times) / num


def diffrax_flow(chunk: Path) -> flows.DenseFlow:
    """Continuous-semantics flow of one chunk (fields ``[C, R, .]``) from diffrax."""
    return jax.tree.map(lambda x: x[-1], diffrax_prefix_flows(chunk))


def _row(semantics, solver, reference, C, R, eps, error, flops=math.nan, us=math.nan) -> dict:
    return dict(zip(FIELDS, (semantics, solver, reference, C, R, eps, error, flops, us)))


def run_study(config: StudyConfig = StudyConfig(), log=print) -> list[dict]:
    """Every solver x semantics x chunk size x scale: error vs exact, FLOPs and time; plus diffrax rows."""
    solvers = study_solvers(config.depths)
    rows = []
    for semantics in config.semantics:
        for C in config.chunk_sizes:
            base = random_chunks(config.seed + C, config.num_chunks, C, config.rank, config.key_dim,
                                 config.value_dim, config.beta_max)
            systems = {eps: build_systems(scale_path(base, eps), semantics) for eps in config.scales}
            reference = compile_solve(Exact(), systems[config.scales[-1]])
            refs = {eps: dense_flows(reference, s) for eps, s in systems.items()}
            for label, solver in solvers.items():
                compiled = compile_solve(solver, systems[config.scales[-1]])
                flops, us = measure_cost(compiled, systems[config.scales[-1]], config.repeats)
                for eps in config.scales:
                    err = flow_error(dense_flows(compiled, systems[eps]), refs[eps])
                    rows.append(_row(semantics, label, "exact", C, config.rank, eps, err, flops, us))
                log(f"{semantics:10s} C={C:3d} {label:20s} flops/chunk={flops:10.0f} us/chunk={us:8.2f}")
    if "continuous" in config.semantics:
        rows += diffrax_rows(config, solvers)
    return rows


def diffrax_rows(config: StudyConfig, solvers: dict[str, FlowSolver]) -> list[dict]:
    """Continuous semantics on a small case (one chunk, ``R = 2``): every solver against diffrax."""
    C, R, D = config.diffrax_chunk_size, 2, config.diffrax_dim
    base = random_chunks(config.seed, 1, C, R, D, D, config.beta_max)
    scaled = [scale_path(base, eps) for eps in config.scales]
    systems = [build_systems(chunk, "continuous") for chunk in scaled]
    refs = [jax.tree.map(lambda x: x[None], diffrax_flow(jax.tree.map(lambda x: x[0], chunk))) for chunk in scaled]
    rows = []
    for label, solver in solvers.items():
        compiled = compile_solve(solver, systems[0])
        for eps, system, ref in zip(config.scales, systems, refs):
            rows.append(_row("continuous", label, "diffrax", C, R, eps, flow_error(dense_flows(compiled, system), ref)))
    return rows


def fit_slope(scales, errors, points: int = 3, floor: float = 1e-13) -> float:
    """Least-squares slope of ``log error`` vs ``log scale`` over the ``points`` smallest scales above ``floor``."""
    pairs = sorted((s, e) for s, e in zip(scales, errors) if e > floor)[:points]
    if len(pairs) < 2:
        return math.nan
    x, y = np.log([p[0] for p in pairs]), np.log([p[1] for p in pairs])
    return float(np.polyfit(x, y, 1)[0])


def _select(rows, **match):
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def _series(rows, semantics, solver, C=None, reference="exact"):
    match = dict(semantics=semantics, solver=solver, reference=reference) | ({} if C is None else dict(chunk_size=C))
    sel = sorted(_select(rows, **match), key=lambda r: r["scale"])
    return [r["scale"] for r in sel], [r["error"] for r in sel]


def _labels(rows, approximate_only=False):
    labels = list(dict.fromkeys(r["solver"] for r in rows))
    return [s for s in labels if not s.startswith("exact")] if approximate_only else labels


def summary(rows, fit_points: int = 3) -> list[dict]:
    """One line per (solver, chunk size): fitted slope and error at the largest scale per semantics,
    FLOPs and time of the first semantics."""
    out = {}
    for r in rows:
        if r["reference"] != "exact":
            continue
        line = out.setdefault((r["solver"], r["chunk_size"]), dict(solver=r["solver"], chunk_size=r["chunk_size"],
                                                                   flops=r["flops"], us_per_chunk=r["us_per_chunk"]))
        if f"slope_{r['semantics']}" not in line:
            scales, errors = _series(rows, r["semantics"], r["solver"], r["chunk_size"])
            line[f"slope_{r['semantics']}"] = fit_slope(scales, errors, fit_points)
            line[f"error_{r['semantics']}"] = errors[-1]
    return sorted(out.values(), key=lambda line: (line["chunk_size"], line["flops"]))


def _fmt(x: float, spec: str) -> str:
    return "-" if math.isnan(x) else format(x, spec)


def markdown_table(lines: list[dict], semantics=("discrete", "continuous")) -> str:
    """The summary as a markdown table (slopes: measured local order, "-" when every error is at
    round-off; errors at the largest scale)."""
    cols = [f"slope {s}" for s in semantics] + [f"error {s}, eps=1" for s in semantics]
    head = "| solver | C | " + " | ".join(cols) + " | FLOPs / chunk (XLA) | us / chunk (CPU) |"
    body = []
    for line in lines:
        slopes = [_fmt(line.get(f"slope_{s}", math.nan), ".2f") for s in semantics]
        errors = [f"{line.get(f'error_{s}', math.nan):.1e}" for s in semantics]
        costs = [f"{line['flops']:.3g}", f"{line['us_per_chunk']:.1f}"]
        cells = [line["solver"], str(line["chunk_size"]), *slopes, *errors, *costs]
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, "|" + "---|" * (len(cols) + 4), *body])


def diffrax_summary(rows) -> str:
    """Max error of every solver against diffrax over the scales (continuous semantics, small case)."""
    sel = _select(rows, reference="diffrax")
    worst = {label: max(r["error"] for r in sel if r["solver"] == label) for label in _labels(sel)}
    return ", ".join(f"{label} {err:.1e}" for label, err in worst.items())


def plot_orders(rows, path, chunk_size: int | None = None, fit_points: int = 3) -> None:
    """Error vs path scale (log-log), one panel per semantics, fitted slopes in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    C = chunk_size or min(r["chunk_size"] for r in rows if r["reference"] == "exact")
    semantics = list(dict.fromkeys(r["semantics"] for r in rows))
    fig, axes = plt.subplots(1, len(semantics), figsize=(5.5 * len(semantics), 4.2), squeeze=False)
    for ax, sem in zip(axes[0], semantics):
        for label in _labels(rows, approximate_only=True):
            scales, errors = _series(rows, sem, label, C)
            if scales:
                slope = fit_slope(scales, errors, fit_points)
                ax.loglog(scales, errors, "o-", ms=3, label=f"{label}: slope {slope:.2f}")
        scales, errors = _series(rows, sem, "exact(substitution)", reference="diffrax")
        if scales:
            ax.loglog(scales, errors, "k:", label="exact vs diffrax (small case, R=2)")
        ax.set(xlabel="path scale eps (g, beta x eps)", ylabel="relative flow error vs exact", title=f"{sem}, C={C}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_frontier(rows, path, scale: float | None = None, semantics: str = "discrete", floor: float = 1e-17) -> None:
    """Error (at path scale ``scale``, default the largest) vs cost per chunk: XLA FLOPs and wall time.
    Colour = solver, marker = chunk size; errors below ``floor`` are drawn at ``floor``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = _select(rows, semantics=semantics, reference="exact")
    scale = scale or max(r["scale"] for r in sel)
    sel = [r for r in sel if r["scale"] == scale]
    markers = dict(zip(sorted({r["chunk_size"] for r in sel}), "os^Dv<>"))
    colours = dict(zip(_labels(sel), PALETTE))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), sharey=True)
    costs = {"flops": "FLOPs per chunk (XLA cost analysis)", "us_per_chunk": "us per chunk (CPU wall)"}
    for ax, (cost, xlabel) in zip(axes, costs.items()):
        for r in sel:
            ax.loglog(r[cost], max(r["error"], floor), markers[r["chunk_size"]], color=colours[r["solver"]])
        ax.set(xlabel=xlabel, title=f"error vs cost, {semantics}, eps={scale:g}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(f"relative flow error vs exact (floored at {floor:g})")
    for label, colour in colours.items():
        axes[1].plot([], [], "o", color=colour, label=label)
    for C, m in markers.items():
        axes[1].plot([], [], m, color="gray", label=f"C={C}")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_csv(rows, path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, required=True, help="output folder")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    config = StudyConfig()
    start = time.perf_counter()
    rows = run_study(config)
    write_csv(rows, args.out / "solver_study.csv")
    table = markdown_table(summary(rows, config.fit_points), config.semantics)
    if "continuous" in config.semantics:
        table += f"\n\nmax error vs diffrax (continuous, C={config.diffrax_chunk_size}, R=2): {diffrax_summary(rows)}"
    (args.out / "summary.md").write_text(table + "\n")
    plot_orders(rows, args.out / "orders.png", fit_points=config.fit_points)
    plot_frontier(rows, args.out / "frontier.png")
    print(table)
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

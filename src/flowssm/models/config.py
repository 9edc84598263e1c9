"""Typed model configuration: plain frozen dataclasses that YAML fills in (see flowssm.train.config)."""

from __future__ import annotations

import dataclasses

from flowssm.kernels.launch import Tuning
from flowssm.solvers import Exact, FlowSolver, get_solver

FAMILIES = (
    "deltanet",
    "gated_deltanet",
    "deltaproduct",
    "gated_deltaproduct",
    "linear_attention",
    "gated_linear_attention",
    "gla",
    "kda",
    "rwkv7",
    "attention",
)


@dataclasses.dataclass(frozen=True)
class MixerConfig:
    """Token mixer: which recurrence, and every knob of how it is computed.

    family: one of FAMILIES ("gla": linear attention, "kda": delta rule, both with a per-channel decay;
    "rwkv7": RWKV-7-style diagonal-plus-low-rank, :func:`flowssm.dplr_delta_rule`); num_heads: heads H; head_dim: K = V per head (None: d_model // num_heads);
    rank: R keys per token (DeltaProduct); solver: a FlowSolver, or its name or mapping
    (``{"name": "signature", "depth": 3}``), built (and validated) once, here;
    scan: "auto" | "sequential" | "associative"; backend: "auto" | "reference" | "xla" | "pallas" (see
    :mod:`flowssm.backends`; "auto": the kernels on a GPU when they can run this mixer); chunk_size: C;
    semantics: "discrete" | "continuous"; allow_neg_eigval: beta (rwkv7: its rate) in (0, 2) instead of (0, 1);
    conv_size: short causal depthwise conv width (0 disables); output_gate: SiLU-gated output norm.
    kernels: the Pallas kernels' launch and precision choices (:class:`flowssm.kernels.Tuning`, or a mapping of
    its fields, e.g. ``{"score_mode": "tf32"}``), read where the mixer runs on the kernels; only families with
    kernels (not rwkv7, not attention) and backends that can pick them ("auto", "pallas") accept non-defaults.
    """

    family: str = "deltanet"
    num_heads: int = 4
    head_dim: int | None = None
    rank: int = 1
    solver: FlowSolver = Exact()
    scan: str = "auto"
    backend: str = "auto"
    chunk_size: int = 64
    semantics: str = "discrete"
    allow_neg_eigval: bool = False
    conv_size: int = 4
    output_gate: bool = True
    kernels: Tuning = Tuning()

    def __post_init__(self):
        object.__setattr__(self, "solver", get_solver(self.solver, key="mixer.solver"))
        if isinstance(self.kernels, dict):
            object.__setattr__(self, "kernels", tuning_from(self.kernels, "mixer.kernels"))


def tuning_from(fields: dict, key: str) -> Tuning:
    """A :class:`Tuning` from a mapping of its fields; a wrong field or value raises ValueError naming
    ``key.field``."""
    names = [f.name for f in dataclasses.fields(Tuning)]
    for name in fields:
        if name not in names:
            raise ValueError(f"{key}.{name}: unknown key; allowed keys: {names}")
    try:
        return Tuning(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(str(e).replace("Tuning.", f"{key}.", 1)) from None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only LM: embedding -> n_layers x (norm, mixer, norm, SwiGLU MLP) -> norm -> head.

    vocab_size: V_tok; d_model: width; n_layers; mlp_hidden: SwiGLU width (None: 8/3 d_model rounded
    to 64); tie_embeddings: share the embedding with the output head; max_len: longest sequence
    (positions are implicit for SSM mixers; used by the attention baseline only for checks).
    dtype: compute dtype ("float32" | "bfloat16"): activations, matmul operands and the ops' inputs;
    param_dtype: the master weights' dtype (float32); norm statistics, logits and the loss stay float32,
    the residual stream in ``param_dtype``. remat: recompute each layer in the backward pass instead of
    saving its activations (less memory, about one more forward of compute).
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    mlp_hidden: int | None = None
    tie_embeddings: bool = True
    max_len: int = 2048
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    mixer: MixerConfig = dataclasses.field(default_factory=MixerConfig)


DELTA_FAMILIES = ("deltanet", "gated_deltanet", "deltaproduct", "gated_deltaproduct", "kda")
LINEAR_FAMILIES = ("linear_attention", "gated_linear_attention", "gla")
DPLR_FAMILIES = ("rwkv7",)
PER_CHANNEL_FAMILIES = ("gla", "kda", "rwkv7")  # one log-decay per key channel: discrete semantics only
GATED_FAMILIES = ("gated_deltanet", "gated_deltaproduct", "gated_linear_attention", *PER_CHANNEL_FAMILIES)
PRODUCT_FAMILIES = ("deltaproduct", "gated_deltaproduct")
DTYPES = ("float32", "bfloat16")


def _int_at_least(field: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{field}: expected an int >= {low}, got {value!r}")


def head_dim(mixer: MixerConfig, d_model: int) -> int:
    """K = V per head: ``mixer.head_dim`` or ``d_model // num_heads``."""
    return mixer.head_dim if mixer.head_dim is not None else d_model // mixer.num_heads


def validate_mixer(mixer: MixerConfig, d_model: int, dtype: str = "float32", prefix: str = "mixer.") -> MixerConfig:
    """Raise ValueError naming the field (``prefix`` + name), what was expected and what was given;
    return ``mixer``. ``dtype``: the compute dtype the ops receive (for the backend's capabilities)."""
    from flowssm import backends
    from flowssm.chunks import SEMANTICS
    from flowssm.scan import SCANS

    key = lambda field: prefix + field
    if mixer.family not in FAMILIES:
        raise ValueError(f"{key('family')}: expected one of {FAMILIES}, got {mixer.family!r}")
    _int_at_least(key("num_heads"), mixer.num_heads, 1)
    if mixer.head_dim is None:
        if d_model % mixer.num_heads:
            raise ValueError(
                f"{key('num_heads')}: expected a divisor of d_model = {d_model} (or set {key('head_dim')}), "
                f"got {mixer.num_heads}"
            )
    else:
        _int_at_least(key("head_dim"), mixer.head_dim, 1)
    _int_at_least(key("rank"), mixer.rank, 1)
    if mixer.rank > 1 and mixer.family not in PRODUCT_FAMILIES:
        raise ValueError(
            f"{key('rank')}: expected 1 for family {mixer.family!r} (rank > 1 needs one of {PRODUCT_FAMILIES}), "
            f"got {mixer.rank}"
        )
    if mixer.allow_neg_eigval and mixer.family not in (*DELTA_FAMILIES, *DPLR_FAMILIES):
        raise ValueError(
            f"{key('allow_neg_eigval')}: expected False for family {mixer.family!r} (it has no beta), got True"
        )
    _int_at_least(key("chunk_size"), mixer.chunk_size, 1)
    _int_at_least(key("conv_size"), mixer.conv_size, 0)
    for field, allowed in (("scan", SCANS), ("backend", backends.BACKENDS), ("semantics", SEMANTICS)):
        if getattr(mixer, field) not in allowed:
            raise ValueError(f"{key(field)}: expected one of {allowed}, got {getattr(mixer, field)!r}")
    if not isinstance(mixer.output_gate, bool) or not isinstance(mixer.allow_neg_eigval, bool):
        raise ValueError(
            f"{key('output_gate')}, {key('allow_neg_eigval')}: expected bools, got "
            f"{mixer.output_gate!r}, {mixer.allow_neg_eigval!r}"
        )
    if not isinstance(mixer.kernels, Tuning):
        raise ValueError(f"{key('kernels')}: expected a flowssm.kernels.Tuning or a mapping of its fields, "
                         f"got {mixer.kernels!r}")
    if mixer.kernels != Tuning() and (mixer.family in ("attention", *DPLR_FAMILIES)
                                      or mixer.backend not in ("auto", "pallas")):
        raise ValueError(f"{key('kernels')}: the Pallas kernels' choices apply to families with kernels (not "
                         f"'attention' or {DPLR_FAMILIES}) on backend 'auto' or 'pallas'; got family "
                         f"{mixer.family!r}, backend {mixer.backend!r} with {mixer.kernels.changes()}")
    solver = mixer.solver
    if mixer.family == "attention":
        return mixer
    if mixer.family in PER_CHANNEL_FAMILIES and mixer.semantics != "discrete":
        raise ValueError(f"{key('semantics')}: family {mixer.family!r} (per-channel decay) runs 'discrete' semantics "
                         f"only, got {mixer.semantics!r}")
    if mixer.family not in LINEAR_FAMILIES and transition(mixer) not in solver.requirements().transitions:
        raise ValueError(f"{key('solver')}: {solver!r} runs transitions {solver.requirements().transitions}, "
                         f"but family {mixer.family!r} needs {transition(mixer)!r}; use another solver")
    if mixer.family in DELTA_FAMILIES and mixer.semantics not in solver.requirements().semantics:
        raise ValueError(f"{key('solver')}, {key('semantics')}: {solver!r} implements semantics "
                         f"{solver.requirements().semantics}, got {mixer.semantics!r}")
    bound = solver.requirements().max_discrete_step if mixer.family in DELTA_FAMILIES else None
    if bound is not None and mixer.semantics == "discrete" and mixer.allow_neg_eigval:
        raise ValueError(
            f"{key('solver')}, {key('allow_neg_eigval')}: solver {solver!r} needs beta |k|^2 < {bound} under "
            f"discrete semantics, but allow_neg_eigval=true gives beta |k|^2 up to 2; set allow_neg_eigval: false, "
            f"semantics: continuous, or another solver"
        )
    names = {"backend": key("backend"), "solver": key("solver"), "semantics": key("semantics"),
             "chunk_size": key("chunk_size"), "rank": key("rank"), "key_dim": key("head_dim"),
             "value_dim": key("head_dim"), "dtype": "model.dtype" if prefix.startswith("model.") else "dtype",
             "transition": key("family")}
    backends.check(mixer.backend, backend_request(mixer, d_model, dtype), names)
    return mixer


def transition(mixer: MixerConfig) -> str:
    """The path structure of a family (:attr:`flowssm.paths.Path.transition`)."""
    if mixer.family in DPLR_FAMILIES:
        return "dplr"
    return "per_channel" if mixer.family in PER_CHANNEL_FAMILIES else "scalar"


def backend_request(mixer: MixerConfig, d_model: int, dtype: str):
    """What a DeltaNet-family mixer asks of its backend (:class:`flowssm.backends.Request`)."""
    from flowssm import backends
    from flowssm.solvers import get_solver

    K = head_dim(mixer, d_model)
    solver = get_solver("euler" if mixer.family in LINEAR_FAMILIES else mixer.solver)  # linear attention: L = 0
    return backends.Request(solver, mixer.semantics, mixer.chunk_size, mixer.rank, K, K, dtype, transition(mixer))


def resolved_backend(config: ModelConfig) -> str:
    """The backend the model's mixers run on this machine ("auto" resolved; "-" for attention)."""
    from flowssm import backends

    if config.mixer.family == "attention":
        return "-"
    return backends.resolve(config.mixer.backend, backend_request(config.mixer, config.d_model, config.dtype))


def validate(config: ModelConfig) -> ModelConfig:
    """Check every field of a model config (ValueError naming field, expected, given); return it."""
    _int_at_least("model.vocab_size", config.vocab_size, 1)
    _int_at_least("model.d_model", config.d_model, 1)
    _int_at_least("model.n_layers", config.n_layers, 1)
    _int_at_least("model.max_len", config.max_len, 1)
    if config.mlp_hidden is not None:
        _int_at_least("model.mlp_hidden", config.mlp_hidden, 1)
    if not isinstance(config.tie_embeddings, bool):
        raise ValueError(f"model.tie_embeddings: expected a bool, got {config.tie_embeddings!r}")
    for field in ("dtype", "param_dtype"):
        if getattr(config, field) not in DTYPES:
            raise ValueError(f"model.{field}: expected one of {DTYPES}, got {getattr(config, field)!r}")
    if not isinstance(config.remat, bool):
        raise ValueError(f"model.remat: expected a bool, got {config.remat!r}")
    if not isinstance(config.mixer, MixerConfig):
        raise ValueError(f"model.mixer: expected a MixerConfig, got {type(config.mixer).__name__}")
    validate_mixer(config.mixer, config.d_model, config.dtype, prefix="model.mixer.")
    return config

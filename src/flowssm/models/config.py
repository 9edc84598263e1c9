"""Typed model configuration: plain frozen dataclasses that YAML fills in (see flowssm.train.config)."""

from __future__ import annotations

import dataclasses

from flowssm.solvers import Exact, FlowSolver, get_solver

FAMILIES = (
    "deltanet",
    "gated_deltanet",
    "deltaproduct",
    "gated_deltaproduct",
    "linear_attention",
    "gated_linear_attention",
    "attention",
)


@dataclasses.dataclass(frozen=True)
class MixerConfig:
    """Token mixer: which recurrence, and every knob of how it is computed.

    family: one of FAMILIES; num_heads: heads H; head_dim: K = V per head (None: d_model // num_heads);
    rank: R keys per token (DeltaProduct); solver: a FlowSolver, or its name or mapping
    (``{"name": "signature", "depth": 3}``), built (and validated) once, here;
    scan: "sequential" | "associative"; backend: "reference" | "xla" | "pallas"; chunk_size: C;
    semantics: "discrete" | "continuous"; allow_neg_eigval: beta in (0, 2) instead of (0, 1);
    conv_size: short causal depthwise conv width (0 disables); output_gate: SiLU-gated output norm.
    """

    family: str = "deltanet"
    num_heads: int = 4
    head_dim: int | None = None
    rank: int = 1
    solver: FlowSolver = Exact()
    scan: str = "sequential"
    backend: str = "xla"
    chunk_size: int = 64
    semantics: str = "discrete"
    allow_neg_eigval: bool = False
    conv_size: int = 4
    output_gate: bool = True

    def __post_init__(self):
        object.__setattr__(self, "solver", get_solver(self.solver, key="mixer.solver"))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only LM: embedding -> n_layers x (norm, mixer, norm, SwiGLU MLP) -> norm -> head.

    vocab_size: V_tok; d_model: width; n_layers; mlp_hidden: SwiGLU width (None: 8/3 d_model rounded
    to 64); tie_embeddings: share the embedding with the output head; max_len: longest sequence
    (positions are implicit for SSM mixers; used by the attention baseline only for checks).
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    mlp_hidden: int | None = None
    tie_embeddings: bool = True
    max_len: int = 2048
    mixer: MixerConfig = dataclasses.field(default_factory=MixerConfig)


DELTA_FAMILIES = ("deltanet", "gated_deltanet", "deltaproduct", "gated_deltaproduct")
LINEAR_FAMILIES = ("linear_attention", "gated_linear_attention")
GATED_FAMILIES = ("gated_deltanet", "gated_deltaproduct", "gated_linear_attention")
PRODUCT_FAMILIES = ("deltaproduct", "gated_deltaproduct")


def _int_at_least(field: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{field}: expected an int >= {low}, got {value!r}")


def head_dim(mixer: MixerConfig, d_model: int) -> int:
    """K = V per head: ``mixer.head_dim`` or ``d_model // num_heads``."""
    return mixer.head_dim if mixer.head_dim is not None else d_model // mixer.num_heads


def validate_mixer(mixer: MixerConfig, d_model: int) -> MixerConfig:
    """Raise ValueError naming the field, what was expected and what was given; return ``mixer``."""
    from flowssm.chunks import SEMANTICS
    from flowssm.ops import BACKENDS
    from flowssm.scan import SCANS

    if mixer.family not in FAMILIES:
        raise ValueError(f"mixer.family: expected one of {FAMILIES}, got {mixer.family!r}")
    _int_at_least("mixer.num_heads", mixer.num_heads, 1)
    if mixer.head_dim is None:
        if d_model % mixer.num_heads:
            raise ValueError(
                f"mixer.num_heads: expected a divisor of d_model = {d_model} (or set mixer.head_dim), "
                f"got {mixer.num_heads}"
            )
    else:
        _int_at_least("mixer.head_dim", mixer.head_dim, 1)
    _int_at_least("mixer.rank", mixer.rank, 1)
    if mixer.rank > 1 and mixer.family not in PRODUCT_FAMILIES:
        raise ValueError(
            f"mixer.rank: expected 1 for family {mixer.family!r} (rank > 1 needs one of {PRODUCT_FAMILIES}), "
            f"got {mixer.rank}"
        )
    if mixer.allow_neg_eigval and mixer.family not in DELTA_FAMILIES:
        raise ValueError(
            f"mixer.allow_neg_eigval: expected False for family {mixer.family!r} (it has no beta), got True"
        )
    _int_at_least("mixer.chunk_size", mixer.chunk_size, 1)
    _int_at_least("mixer.conv_size", mixer.conv_size, 0)
    for field, allowed in (("scan", SCANS), ("backend", BACKENDS), ("semantics", SEMANTICS)):
        if getattr(mixer, field) not in allowed:
            raise ValueError(f"mixer.{field}: expected one of {allowed}, got {getattr(mixer, field)!r}")
    if not isinstance(mixer.output_gate, bool) or not isinstance(mixer.allow_neg_eigval, bool):
        raise ValueError(
            f"mixer.output_gate, mixer.allow_neg_eigval: expected bools, got "
            f"{mixer.output_gate!r}, {mixer.allow_neg_eigval!r}"
        )
    return mixer


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
    if not isinstance(config.mixer, MixerConfig):
        raise ValueError(f"model.mixer: expected a MixerConfig, got {type(config.mixer).__name__}")
    validate_mixer(config.mixer, config.d_model)
    return config

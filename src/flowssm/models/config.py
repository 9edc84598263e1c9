"""Typed model configuration: plain frozen dataclasses that YAML fills in (see flowssm.train.config)."""

from __future__ import annotations

import dataclasses
from typing import Any

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
    rank: R keys per token (DeltaProduct); solver: name or mapping (``{"name": "signature", "depth": 3}``);
    scan: "sequential" | "associative"; backend: "reference" | "xla" | "pallas"; chunk_size: C;
    semantics: "discrete" | "continuous"; allow_neg_eigval: beta in (0, 2) instead of (0, 1);
    conv_size: short causal depthwise conv width (0 disables); output_gate: SiLU-gated output norm.
    """

    family: str = "deltanet"
    num_heads: int = 4
    head_dim: int | None = None
    rank: int = 1
    solver: Any = "exact"
    scan: str = "sequential"
    backend: str = "xla"
    chunk_size: int = 64
    semantics: str = "discrete"
    allow_neg_eigval: bool = False
    conv_size: int = 4
    output_gate: bool = True


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

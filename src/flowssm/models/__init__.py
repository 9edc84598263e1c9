"""Small language models built from flowssm token mixers, and their typed configuration."""

from flowssm.models.config import FAMILIES, MixerConfig, ModelConfig, validate
from flowssm.models.lm import LanguageModel, make_mixer

__all__ = ["FAMILIES", "LanguageModel", "MixerConfig", "ModelConfig", "make_mixer", "validate"]

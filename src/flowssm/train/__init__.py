"""Experiment runner: typed YAML configs, the training loop, orbax checkpoints, metrics and plots."""

from flowssm.train.config import ConfigError, RunConfig, load
from flowssm.train.loop import load_model, train

__all__ = ["ConfigError", "RunConfig", "load", "load_model", "train"]

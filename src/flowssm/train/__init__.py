"""Experiment runner: typed YAML configs, the training loop, orbax checkpoints, metrics and plots."""

from flowssm.train.config import ConfigError, RunConfig, load

__all__ = ["ConfigError", "RunConfig", "load"]

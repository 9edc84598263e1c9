"""Datasets: synthetic tasks (MQAR, parity, S3/S5 word problems) and byte-level LM on an embedded corpus.

Every batch is a pure function of ``(seed, split, index)``, so a resumed run sees exactly the batches
an uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from flowssm.data import corpus, synthetic
from flowssm.train.config import DataConfig, task_vocab_size

SPLITS = {"train": 0, "val": 1}
GROUP_ORDER = {"parity": 2, "s3": 3, "s5": 5}


class Batch(NamedTuple):
    """``inputs, targets: int32 [B, T]``; ``mask: float32 [B, T]`` (1 where the target is scored);
    ``positions: int32 [B, T]``, each input's position in its document (``data.packing``), else None."""

    inputs: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    positions: np.ndarray | None = None


class Task:
    """Batches of the task described by a :class:`DataConfig`."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.vocab_size = task_vocab_size(cfg)
        self._text = corpus.split(cfg.corpus, cfg.val_fraction) if cfg.task == "lm" else None

    def batch(self, seed: int, split: str, index: int, batch_size: int) -> Batch:
        """Batch number ``index`` of ``split`` ("train" | "val") for run seed ``seed``; token ids checked to
        lie in ``[0, vocab_size)`` (the model cannot check them under ``jit``)."""
        batch = self._make(seed, split, index, batch_size)
        for name in ("inputs", "targets"):
            ids = getattr(batch, name)
            if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
                raise ValueError(
                    f"{name}: expected token ids in [0, {self.vocab_size}) for task {self.cfg.task!r}, "
                    f"got ids in [{ids.min()}, {ids.max()}] ({split} batch {index})"
                )
        return batch

    def _make(self, seed: int, split: str, index: int, batch_size: int) -> Batch:
        rng = np.random.default_rng((seed, SPLITS[split], index))
        c = self.cfg
        if c.task == "lm":
            data = self._text[split]
            starts = rng.integers(0, len(data) - c.seq_len - 1, batch_size)
            windows = data[starts[:, None] + np.arange(c.seq_len + 1)].astype(np.int32)
            positions = None
            if c.packing:
                offset = 0 if split == "train" else len(self._text["train"])  # the val split is the corpus tail
                positions = corpus.positions(c.corpus, starts + offset, c.seq_len)
            return Batch(windows[:, :-1], windows[:, 1:], np.ones((batch_size, c.seq_len), np.float32), positions)
        if c.task == "mqar":
            return Batch(*synthetic.mqar(rng, batch_size, c.seq_len, c.num_kv_pairs, c.num_keys, c.num_values, c.num_queries))
        return Batch(*synthetic.word_problem(rng, batch_size, c.seq_len, GROUP_ORDER[c.task]))

    def baselines(self) -> dict[str, float]:
        """Reference figures logged once per run: the unigram bits per byte for LM, chance accuracy otherwise."""
        if self._text is not None:
            return {"unigram_bpb": corpus.unigram_bpb(self._text["train"], self._text["val"])}
        if self.cfg.task == "mqar":
            return {"chance_accuracy": 1.0 / self.cfg.num_values}
        return {"chance_accuracy": 1.0 / len(synthetic.permutation_table(GROUP_ORDER[self.cfg.task]))}


__all__ = ["GROUP_ORDER", "SPLITS", "Batch", "Task", "corpus", "synthetic"]

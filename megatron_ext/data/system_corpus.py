"""A second held-out corpus that no run trains on, read at run time from the system.

Debian (and its derivatives) install the texts of the common free-software licences under
``/usr/share/common-licenses`` (package ``base-files``): English prose, unlike the Python
sources and arithmetic traces the runs train on. Nothing is downloaded; a machine without
the folder is refused with a message saying so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_ext.errors import ConfigError

COMMON_LICENSES = Path("/usr/share/common-licenses")


@dataclass
class SystemCorpus:
    """The documents of a system text folder: file names and their texts (each file once)."""

    root: Path
    names: list[str]
    texts: list[str]

    @property
    def chars(self) -> int:
        """Characters over every document."""
        return sum(len(t) for t in self.texts)


def read_system_corpus(root: str | Path = COMMON_LICENSES) -> SystemCorpus:
    """Every regular file of ``root``, sorted by name; a symlink to a file already read is
    skipped (``GPL`` -> ``GPL-3``), so no text counts twice.

    Raises :class:`ConfigError` when ``root`` is absent or holds no readable text.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(
            f"held-out corpus: {root} does not exist; it ships with Debian's base-files "
            "package (the licence texts). Run on a Debian-based machine, or name another "
            "folder of plain-text files"
        )
    seen: set[Path] = set()
    names, texts = [], []
    for path in sorted(root.iterdir()):
        real = path.resolve()
        if not real.is_file() or real in seen:
            continue
        seen.add(real)
        text = real.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            names.append(path.name)
            texts.append(text)
    if not texts:
        raise ConfigError(f"held-out corpus: {root} holds no non-empty text file")
    return SystemCorpus(root, names, texts)


def corpus_batches(
    token_docs: list[list[int]], eod: int, seq_length: int, batch_size: int, max_batches: int
) -> list[dict[str, torch.Tensor]]:
    """Held-out batches from tokenized documents, in the training batches' layout.

    The documents are joined with ``eod`` between them and cut into consecutive,
    non-overlapping windows of ``seq_length + 1`` tokens (tokens, and labels shifted by
    one); every label counts in the loss. At most ``max_batches`` batches of
    ``batch_size`` windows; the remainder is dropped. Raises :class:`ConfigError` when
    the text does not fill one batch.
    """
    stream: list[int] = []
    for doc in token_docs:
        stream.extend(doc)
        stream.append(eod)
    window = seq_length + 1
    n_windows = min(len(stream) // window, batch_size * max_batches)
    n_batches = n_windows // batch_size
    if n_batches < 1:
        raise ConfigError(
            f"held-out corpus: {len(stream)} tokens do not fill one batch of {batch_size} x "
            f"{window}; lower the batch size or the sequence length"
        )
    data = torch.tensor(stream[: n_batches * batch_size * window], dtype=torch.long)
    data = data.view(n_batches, batch_size, window)
    positions = torch.arange(seq_length, dtype=torch.long).expand(batch_size, seq_length)
    return [
        {
            "tokens": rows[:, :-1].contiguous(),
            "labels": rows[:, 1:].contiguous(),
            "loss_mask": torch.ones(batch_size, seq_length),
            "position_ids": positions.clone(),
        }
        for rows in data
    ]

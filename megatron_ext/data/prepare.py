"""Turn a directory of text files into megatron-core indexed datasets (.bin/.idx).

Each readable file is one document: its tokens followed by the tokenizer's EOD id.
Files go to train or valid by a seeded hash of their relative path, so the split of a
file never depends on which other files exist or on traversal order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from tqdm import tqdm

from megatron_ext.data.tokenizer import Tokenizer
from megatron_ext.models.config import ConfigError

logger = logging.getLogger(__name__)


class DataError(RuntimeError):
    """The corpus gives no usable dataset (a split is empty or too short); names the split."""


def check_split_lengths(meta: dict, seq_length: int, field: str) -> None:
    """Raise :class:`DataError` if a split of ``meta`` holds fewer tokens than one sequence.

    A sequence of ``seq_length`` needs ``seq_length + 1`` tokens (the labels are shifted by
    one); ``field`` is the setting named in the message.
    """
    for split in ("train", "valid"):
        tokens = meta[f"{split}_tokens"]
        if tokens < seq_length + 1:
            raise DataError(
                f"the {split} split of {meta['train_prefix'].rsplit('_train_', 1)[0]} has "
                f"{tokens} tokens, fewer than one sequence ({field}={seq_length} + 1); use "
                "more data or a shorter sequence"
            )


SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "__pycache__"})
"""Directory names whose contents are never read."""


def default_corpus_dir() -> Path:
    """The running interpreter's standard-library source directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_corpus_files(src_dir: str | Path, glob: str = "**/*.py") -> list[Path]:
    """Files under ``src_dir`` matching ``glob``, sorted, minus :data:`SKIP_DIRS` contents."""
    root = Path(src_dir)
    files = []
    for path in root.glob(glob):
        rel_dirs = path.relative_to(root).parts[:-1]
        if path.is_file() and not SKIP_DIRS.intersection(rel_dirs):
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def read_text_file(path: Path) -> str | None:
    """Text of a UTF-8 file, or None if it is unreadable, binary (NUL bytes) or empty."""
    return read_text_or_reason(path)[0]


def read_text_or_reason(path: Path) -> tuple[str | None, str]:
    """``(text, "")`` for a UTF-8 text file, else ``(None, why it is skipped)``."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return None, f"unreadable: {e.strerror or e}"
    if not data:
        return None, "empty"
    if b"\x00" in data:
        return None, "binary (contains NUL bytes)"
    try:
        return data.decode("utf-8"), ""
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 (byte {e.start}: {data[e.start : e.start + 1]!r})"


def is_valid_file(rel_path: str, valid_fraction: float, seed: int) -> bool:
    """Whether ``rel_path`` belongs to the valid split (seeded hash, uniform in [0, 1))."""
    digest = hashlib.sha256(f"{seed}:{rel_path}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < valid_fraction


def prepare_indexed_dataset(
    src_dir: str | Path,
    out_prefix: str | Path,
    tokenizer: Tokenizer,
    *,
    glob: str = "**/*.py",
    valid_fraction: float = 0.05,
    max_files: int | None = None,
    max_bytes: int | None = None,
    seed: int = 1234,
    progress: bool = True,
    parse_special: bool = False,
) -> dict[str, Any]:
    """Tokenize text files under ``src_dir`` into train/valid indexed datasets.

    Writes ``{out_prefix}_{train,valid}_text_document.{bin,idx}`` and ``{out_prefix}_meta.json``.
    ``max_files``/``max_bytes`` stop after that many documents / UTF-8 source bytes (in sorted
    path order). ``parse_special=False`` keeps literal ``"<eod>"`` etc. in the text as plain
    text, so a source file can never inject EOD or pad ids. Returns the document and token
    counts and the two dataset prefixes.
    """
    if not 0.0 <= valid_fraction <= 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1], got {valid_fraction}")
    root = Path(src_dir)
    if not root.is_dir():
        raise ConfigError(f"data.source_dir: corpus directory {root} does not exist")
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    prefixes = {s: f"{out_prefix}_{s}_text_document" for s in ("train", "valid")}
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    builders = {s: IndexedDatasetBuilder(p + ".bin", dtype=dtype) for s, p in prefixes.items()}
    docs = dict.fromkeys(prefixes, 0)
    tokens = dict.fromkeys(prefixes, 0)
    t_start = time.perf_counter()
    files = list_corpus_files(root, glob)
    skipped: list[dict[str, str]] = []
    source_bytes = 0
    bar = tqdm(files, desc="tokenize", unit="file", disable=not progress, dynamic_ncols=True)
    for path in bar:
        if max_files is not None and docs["train"] + docs["valid"] >= max_files:
            break
        if max_bytes is not None and source_bytes >= max_bytes:
            break
        text, why = read_text_or_reason(path)
        if text is None:
            skipped.append({"file": path.relative_to(root).as_posix(), "reason": why})
            logger.warning("skipped %s: %s", path, why)
            continue
        source_bytes += len(text.encode("utf-8"))
        rel = path.relative_to(root).as_posix()
        split = "valid" if is_valid_file(rel, valid_fraction, seed) else "train"
        ids = tokenizer.encode(text, parse_special=parse_special)
        ids.append(tokenizer.eod)
        builders[split].add_document(numpy.asarray(ids, dtype=dtype), [len(ids)])
        docs[split] += 1
        tokens[split] += len(ids)
        bar.set_postfix(tokens=tokens["train"] + tokens["valid"], refresh=False)
    bar.close()
    for split, builder in builders.items():
        builder.finalize(prefixes[split] + ".idx")
    empty = [split for split in prefixes if docs[split] == 0]
    if empty:  # no meta file: the cache never takes this for a prepared dataset
        raise DataError(
            f"data.source_dir: the {' and '.join(empty)} split of {root} (glob {glob!r}) has no "
            f"documents ({docs['train']} train, {docs['valid']} valid, {len(skipped)} files "
            "skipped); add text files or change data.valid_fraction / data.glob"
        )

    result: dict[str, Any] = {
        "train_documents": docs["train"],
        "valid_documents": docs["valid"],
        "train_tokens": tokens["train"],
        "valid_tokens": tokens["valid"],
        "train_prefix": prefixes["train"],
        "valid_prefix": prefixes["valid"],
    }
    meta = {
        **result,
        "tokenizer_kind": getattr(tokenizer, "kind", type(tokenizer).__name__),
        "vocab_size": int(tokenizer.vocab_size),
        "padded_vocab_size": int(tokenizer.padded_vocab_size(128)),
        "dtype": dtype.__name__,
        "source_dir": str(root),
        "glob": glob,
        "valid_fraction": valid_fraction,
        "seed": seed,
        "source_bytes": source_bytes,
        "skipped_files": len(skipped),
        "skipped": skipped,
        "seconds": round(time.perf_counter() - t_start, 3),
    }
    Path(f"{out_prefix}_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return result

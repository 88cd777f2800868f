"""The tokenizer that ships with an exported slice, in the files each format expects.

Two tokenizers exist in this project (:mod:`megatron_ext.data.tokenizer`):

* a Hugging Face ``tokenizer.json`` (``data.tokenizer=hf``): every format copies the file;
* the byte tokenizer (ids 0..255 are UTF-8 bytes, then ``<eod> <pad> <think> </think>``):
  - megatron: a small ``tokenizer_config.json`` describing it (``"tokenizer_kind": "byte"``);
  - Hugging Face: a generated ``tokenizer.json`` that encodes exactly like it (a byte-level BPE
    with no merges whose vocabulary maps byte ``b`` to id ``b``, and the four special tokens
    added at 256..259), so ``AutoTokenizer.from_pretrained(export_dir)`` works.

:func:`load_tokenizer` reads either description back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from megatron_ext.config.schema import DataConfig
from megatron_ext.data.tokenizer import (
    SPECIAL_TOKENS,
    ByteTokenizer,
    HFJsonTokenizer,
    Tokenizer,
)
from megatron_ext.run_format import TOKENIZER, config_path, read_config

TOKENIZER_CONFIG = "tokenizer_config.json"
BYTE_KIND = "byte"


def _byte_description(tok: ByteTokenizer) -> dict[str, Any]:
    return {
        "tokenizer_kind": BYTE_KIND,
        "vocab_size": tok.vocab_size,
        "bytes": 256,
        "special_tokens": {t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)},
        "eod_id": tok.eod,
        "pad_id": tok.pad,
    }


def write_megatron_tokenizer(tok: Tokenizer, directory: str | Path) -> list[Path]:
    """``tokenizer.json`` (a copy) for an hf tokenizer, ``tokenizer_config.json`` for bytes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(tok, HFJsonTokenizer):
        return [Path(shutil.copyfile(tok.path, directory / TOKENIZER))]
    path = directory / TOKENIZER_CONFIG
    path.write_text(json.dumps(_byte_description(tok), indent=1) + "\n")
    return [path]


def _byte_to_char() -> dict[int, str]:
    """The reversible byte -> printable character map of byte-level BPE tokenizers.

    Printable latin-1 bytes map to themselves; the other 68 bytes map, in byte order, to the
    characters from U+0100 upwards. ``tokenizers``' ``ByteLevel`` pre-tokenizer and decoder
    use this map, so a vocabulary keyed by these characters round-trips every byte.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer_json() -> str:
    """A ``tokenizer.json`` that encodes and decodes exactly like :class:`ByteTokenizer`."""
    try:
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError as err:
        raise ImportError(
            "writing the byte tokenizer as tokenizer.json needs the 'tokenizers' package "
            "(pip install -e '.[hf]')"
        ) from err
    vocab = {char: b for b, char in _byte_to_char().items()}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    added = tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    if added != len(SPECIAL_TOKENS) or tok.get_vocab_size() != 256 + len(SPECIAL_TOKENS):
        raise RuntimeError("byte tokenizer.json: special tokens did not land at ids 256..259")
    return tok.to_str(pretty=True)


def write_hf_tokenizer(
    tok: Tokenizer, directory: str | Path, model_max_length: int | None = None
) -> list[Path]:
    """``tokenizer.json`` plus a Hugging Face ``tokenizer_config.json`` (fast tokenizer)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / TOKENIZER
    if isinstance(tok, HFJsonTokenizer):
        shutil.copyfile(tok.path, target)
    else:
        target.write_text(byte_tokenizer_json())
    inv = tok.inv_vocab
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "eos_token": inv[tok.eod],
    }
    with contextlib.suppress(AttributeError):  # a tokenizer without a pad token
        config["pad_token"] = inv[tok.pad]
    if model_max_length:
        config["model_max_length"] = model_max_length
    cfg_path = directory / TOKENIZER_CONFIG
    cfg_path.write_text(json.dumps(config, indent=1) + "\n")
    return [target, cfg_path]


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer an export directory describes (``tokenizer.json`` or the byte config)."""
    directory = Path(directory)
    cfg_path = directory / TOKENIZER_CONFIG
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("tokenizer_kind") == BYTE_KIND:
            return ByteTokenizer()
    if (directory / TOKENIZER).is_file():
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        return HFJsonTokenizer(
            directory / TOKENIZER,
            eod_token=cfg.get("eos_token"),
            pad_token=cfg.get("pad_token"),
        )
    raise FileNotFoundError(f"{directory}: no {TOKENIZER} and no byte {TOKENIZER_CONFIG}")


def source_data_config(source_dir: str | Path, fallback: DataConfig) -> tuple[DataConfig, str]:
    """The data config a run was made with (its ``config.yaml``), else ``fallback``.

    Returns the config and where it came from, so the exported tokenizer is the one the
    weights were trained with, not whatever the export command line defaults to.
    """
    from omegaconf import DictConfig, OmegaConf

    path = config_path(source_dir)
    if path.is_file():
        saved = read_config(source_dir)
        if isinstance(saved, DictConfig) and isinstance(saved.get("data"), DictConfig):
            known = {f.name for f in dataclasses.fields(DataConfig)}
            values = OmegaConf.to_container(saved.data, resolve=True)
            assert isinstance(values, dict)
            return DataConfig(**{k: v for k, v in values.items() if k in known}), str(path)
    return fallback, "data (this command's config)"

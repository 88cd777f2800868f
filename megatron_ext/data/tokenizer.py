"""Tokenizers usable both by our own code and by megatron-core's ``GPTDataset``.

megatron-core 0.16.1 types ``BlendedMegatronDatasetConfig.tokenizer`` as
``megatron.core.tokenizers.MegatronTokenizerBase`` (the legacy
``MegatronLegacyTokenizer`` is deprecated and logs a warning on construction), so both
tokenizers here subclass ``MegatronTokenizerBase``.  What the dataset code actually reads:

* ``vocab_size`` -- picks the token dtype code (uint16 when it fits);
* ``eod`` -- end-of-document id, used for the left-to-right masks;
* ``pad`` -- id masked out of the loss; it must differ from ``eod`` (megatron warns and
  falls back to -1 otherwise); a missing pad may raise, megatron then uses -1;
* ``unique_identifiers`` -- a JSON-able dict hashed into the index-cache file names.
  ``MegatronTokenizerBase`` does not define it, so it is provided here.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from collections import OrderedDict
from pathlib import Path
from typing import Any

from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_ext.run_format import TOKENIZER

SPECIAL_TOKENS: tuple[str, ...] = ("<eod>", "<pad>", "<think>", "</think>")
"""Special tokens of :class:`ByteTokenizer`, with ids 256, 257, 258, 259 in this order."""

_EOD_CANDIDATES = ("<eod>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


class _TokenizerBase(MegatronTokenizerBase):
    """Shared interface: ``encode``/``decode`` plus what megatron-core datasets read."""

    kind: str = ""

    def __init__(self, path: str, options: dict[str, Any]) -> None:
        super().__init__(path, {})
        self._options = dict(options)

    @abstractmethod
    def encode(self, text: str, *, parse_special: bool = True) -> list[int]:
        """Convert text to token ids."""

    @abstractmethod
    def decode(self, ids: Any) -> str:
        """Convert token ids back to text."""

    def tokenize(self, text: str) -> list[int]:  # type: ignore[override]
        """Megatron's name for :meth:`encode`."""
        return self.encode(text)

    def detokenize(self, ids: Any) -> str:  # type: ignore[override]
        """Megatron's name for :meth:`decode`."""
        return self.decode(ids)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Not supported: these tokenizers have no chat template."""
        raise TypeError(f"{type(self).__name__} has no chat template")

    @property
    def inv_vocab(self) -> dict[int, str]:
        """Map from token id to token string."""
        return {i: s for s, i in self.vocab.items()}

    def padded_vocab_size(self, multiple: int = 128) -> int:
        """Return ``vocab_size`` rounded up to a multiple of ``multiple`` (embedding rows)."""
        if multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {multiple}")
        return -(-self.vocab_size // multiple) * multiple

    @property
    def unique_identifiers(self) -> OrderedDict:
        """JSON-able identity of this tokenizer; megatron hashes it into cache names."""
        ident: OrderedDict = OrderedDict()
        ident["class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        ident["tokenizer_path"] = self.path
        for key in sorted(self._options):
            ident[key] = str(self._options[key])
        return ident


class ByteTokenizer(_TokenizerBase):
    """UTF-8 byte tokenizer: ids 0..255 are bytes, 256.. are :data:`SPECIAL_TOKENS`."""

    kind = "byte"

    def __init__(self) -> None:
        super().__init__("", {"num_special": len(SPECIAL_TOKENS)})
        self._special_ids = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._special_strs = {i: tok for tok, i in self._special_ids.items()}
        self._special_re = re.compile("(" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")")

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        """Number of valid ids (256 bytes + specials); see :meth:`padded_vocab_size`."""
        return 256 + len(SPECIAL_TOKENS)

    @property
    def vocab(self) -> dict[str, int]:  # type: ignore[override]
        """Map from token string (a latin-1 char for bytes) to id."""
        table = {bytes([b]).decode("latin-1"): b for b in range(256)}
        table.update(self._special_ids)
        return table

    @property
    def eod(self) -> int:
        """End-of-document id."""
        return self._special_ids["<eod>"]

    @property
    def pad(self) -> int:
        """Padding id."""
        return self._special_ids["<pad>"]

    @property
    def think(self) -> int:
        """Id of ``<think>``."""
        return self._special_ids["<think>"]

    @property
    def end_think(self) -> int:
        """Id of ``</think>``."""
        return self._special_ids["</think>"]

    def encode(self, text: str, *, parse_special: bool = True) -> list[int]:
        """UTF-8 bytes of ``text``; literal special tokens become their ids if ``parse_special``."""
        if not parse_special or "<" not in text:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        for i, piece in enumerate(self._special_re.split(text)):
            if i % 2:  # odd pieces are the captured special tokens
                ids.append(self._special_ids[piece])
            elif piece:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids: Any) -> str:
        """Inverse of :meth:`encode`; bad bytes and unknown ids become U+FFFD."""
        out: list[str] = []
        run = bytearray()
        for raw in ids:
            tok = int(raw)
            if 0 <= tok < 256:
                run.append(tok)
                continue
            if run:
                out.append(run.decode("utf-8", errors="replace"))
                run.clear()
            out.append(self._special_strs.get(tok, "\ufffd"))
        if run:
            out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


class HFJsonTokenizer(_TokenizerBase):
    """A Hugging Face ``tokenizer.json`` loaded with the ``tokenizers`` package."""

    kind = "hf"

    def __init__(
        self, path: str | Path, *, eod_token: str | None = None, pad_token: str | None = None
    ) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as err:
            raise ImportError(
                "HFJsonTokenizer needs the 'tokenizers' package, which is not installed "
                "(pip install tokenizers, or the project's [hf] extra)"
            ) from err
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER
        if not path.is_file():
            raise FileNotFoundError(f"no {TOKENIZER} at {path}")
        super().__init__(str(path), {"eod_token": eod_token, "pad_token": pad_token})
        self._tok = Tokenizer.from_file(str(path))
        self._vocab: dict[str, int] = self._tok.get_vocab(with_added_tokens=True)
        self._eod = self._find(eod_token, _EOD_CANDIDATES)
        if self._eod is None:
            raise ValueError(
                f"{path}: no end-of-document token among {_EOD_CANDIDATES}; pass eod_token="
            )
        self._pad = self._find(pad_token, _PAD_CANDIDATES)

    def _find(self, explicit: str | None, candidates: tuple[str, ...]) -> int | None:
        """Id of ``explicit`` (must exist) or of the first candidate present."""
        if explicit is not None:
            if explicit not in self._vocab:
                raise ValueError(f"token {explicit!r} is not in {self.path}")
            return self._vocab[explicit]
        return next((self._vocab[c] for c in candidates if c in self._vocab), None)

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        """One past the largest id (added tokens included)."""
        return max(self._vocab.values()) + 1

    @property
    def vocab(self) -> dict[str, int]:  # type: ignore[override]
        """Map from token string to id."""
        return dict(self._vocab)

    @property
    def eod(self) -> int:
        """End-of-document id."""
        assert self._eod is not None  # resolved (or refused) in __init__
        return self._eod

    @property
    def pad(self) -> int:
        """Padding id; raises ``AttributeError`` when the tokenizer has none."""
        if self._pad is None:
            raise AttributeError(f"{self.path} defines no pad token; pass pad_token=")
        return self._pad

    def encode(self, text: str, *, parse_special: bool = True) -> list[int]:
        """Token ids of ``text`` without added BOS/EOS; specials parsed if ``parse_special``."""
        previous = self._tok.encode_special_tokens
        self._tok.encode_special_tokens = not parse_special
        try:
            return list(self._tok.encode(text, add_special_tokens=False).ids)
        finally:
            self._tok.encode_special_tokens = previous

    def decode(self, ids: Any) -> str:
        """Text of ``ids``, special tokens kept as their literal strings."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


Tokenizer = ByteTokenizer | HFJsonTokenizer
"""Either tokenizer of this module."""


def build_tokenizer(kind: str, path: str | Path | None = None) -> Tokenizer:
    """Build a tokenizer: ``"byte"`` (``path`` unused) or ``"hf"`` (``path`` to tokenizer.json)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        if path is None:
            raise ValueError("tokenizer kind 'hf' needs a path to a tokenizer.json")
        return HFJsonTokenizer(path)
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'byte' or 'hf'")

"""The data settings of a recipe: the corpus and its tokenized, indexed form."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as default_factory_field

from megatron_ext.data.arithmetic import ArithmeticConfig
from megatron_ext.models.config import require

DATA_SOURCES = ("files", "arithmetic")


@dataclass
class DataConfig:
    """The corpus and its tokenized, indexed form.

    ``source`` is ``files`` (the text files under ``source_dir`` matching ``glob``;
    ``source_dir`` empty means the running interpreter's standard-library sources) or
    ``arithmetic`` (the generated task of :mod:`megatron_ext.data.arithmetic`, configured by
    ``arithmetic``, with a held-out test split; ``source_dir``, ``glob``, ``valid_fraction``,
    ``max_files`` and ``max_bytes`` are unused).
    """

    source: str = "files"
    source_dir: str = ""
    glob: str = "**/*.py"
    cache_dir: str = "runs/data"
    name: str = "stdlib"
    tokenizer: str = "byte"
    tokenizer_path: str = ""
    valid_fraction: float = 0.05
    max_files: int = 0
    max_bytes: int = 0
    # prepare-data refuses a split with fewer tokens than one sequence of this length (plus
    # the shifted label); 0 checks only that no split is empty. Training checks its own
    # seq_length. Not part of the dataset's cache key: it does not change the dataset.
    min_seq_length: int = 0
    arithmetic: ArithmeticConfig = default_factory_field(default_factory=ArithmeticConfig)

    def __post_init__(self) -> None:
        require(
            self.source in DATA_SOURCES,
            "data.source",
            f"{self.source!r} is not one of {DATA_SOURCES}",
        )
        require(self.tokenizer in ("byte", "hf"), "data.tokenizer", "must be 'byte' or 'hf'")
        require(
            self.tokenizer != "hf" or bool(self.tokenizer_path),
            "data.tokenizer_path",
            "is required with data.tokenizer=hf (path to a tokenizer.json)",
        )
        require(0.0 < self.valid_fraction < 1.0, "data.valid_fraction", "must be in (0, 1)")
        require(self.max_files >= 0, "data.max_files", "must be >= 0 (0 = no limit)")
        require(self.max_bytes >= 0, "data.max_bytes", "must be >= 0 (0 = no limit)")
        require(self.min_seq_length >= 0, "data.min_seq_length", "must be >= 0 (0 = no check)")

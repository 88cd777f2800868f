"""A generated multi-step arithmetic task whose answer is easier after a written trace.

Every example is one document: a question, a digit-by-digit trace inside ``<think>`` …
``</think>``, then the answer line::

    Q: 347+589=?
    <think>7+9=16 c1;4+8+1=13 c1;3+5+1=9</think>
    A: 936

* ``+``: two operands of ``min_digits``..``max_digits`` digits each. One step per digit,
  least significant first, over the longer operand (the shorter one reads 0 there):
  ``x+y[+c]=s``, then `` c1`` when ``s >= 10`` (the carry into the next step). A final carry
  is the answer's leading digit.
* ``*``: an operand of ``min_digits``..``max_digits`` digits times one digit 2..9. Steps
  ``x*d[+c]=p``, then `` cK`` when ``p >= 10`` (``K = p // 10``, the carry).

``<think>`` and ``</think>`` are the byte tokenizer's special tokens: the corpus is tokenized
with ``parse_special=True``, so training sees the same ids that budget control
(:mod:`megatron_ext.generate.budget`) writes after a prompt.

Splits. A problem belongs to test, valid or train by a seeded hash of its text (its *region*),
never by draw order, so the test split is disjoint from the others by construction and does
not move when the train size changes. Problems are drawn from ``random.Random(seed)`` and each
goes to its region's split until that split is full; the test split holds distinct problems
(it is scored), train and valid may repeat one. The first ``n`` test problems of a config are
the same for every ``test_examples >= n``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from megatron_ext.models.config import ConfigError, require

OPS = ("+", "*")
SPLITS = ("train", "valid", "test")
REGION_SHARES = {"test": 0.1, "valid": 0.05}
"""Share of the problem space held out for each evaluation split (the rest is train)."""

FORMAT_VERSION = 2
"""Bumped whenever the files :func:`prepare_arithmetic` writes change (part of the cache key)."""

MAX_DRAWS_PER_EXAMPLE = 50
"""Give up (a config error) after this many draws per requested example."""


@dataclass
class ArithmeticConfig:
    """The generated arithmetic corpus (``data.arithmetic`` when ``data.source=arithmetic``)."""

    ops: list[str] = field(default_factory=lambda: ["+"])
    min_digits: int = 3
    max_digits: int = 3
    train_examples: int = 20000
    valid_examples: int = 400
    test_examples: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        require(bool(self.ops), "data.arithmetic.ops", f"give at least one of {OPS}")
        for op in self.ops:
            require(op in OPS, "data.arithmetic.ops", f"{op!r} is not one of {OPS}")
        require(self.min_digits >= 1, "data.arithmetic.min_digits", "must be >= 1")
        require(
            self.max_digits >= self.min_digits,
            "data.arithmetic.max_digits",
            f"must be >= data.arithmetic.min_digits={self.min_digits}",
        )
        require(self.max_digits <= 18, "data.arithmetic.max_digits", "must be <= 18")
        for name in ("train_examples", "valid_examples", "test_examples"):
            require(getattr(self, name) >= 1, f"data.arithmetic.{name}", "must be >= 1")
        require(self.seed >= 0, "data.arithmetic.seed", "must be >= 0")
        space = problem_space(self)
        require(
            self.test_examples <= space * REGION_SHARES["test"] / 2,
            "data.arithmetic.test_examples",
            f"{self.test_examples} distinct test problems need a larger problem space than "
            f"{space:,} (raise data.arithmetic.max_digits)",
        )


def problem_space(cfg: ArithmeticConfig) -> int:
    """How many distinct problems ``cfg`` can draw."""
    numbers = 10**cfg.max_digits - (10 ** (cfg.min_digits - 1) if cfg.min_digits > 1 else 0)
    per_op = {"+": numbers * numbers, "*": numbers * 8}
    return sum(per_op[op] for op in cfg.ops)


@dataclass(frozen=True)
class Problem:
    """``a op b`` with its prompt, trace, answer and full text."""

    a: int
    op: str
    b: int

    @property
    def prompt(self) -> str:
        """The question line, newline included: what generation starts from."""
        return f"Q: {self.a}{self.op}{self.b}=?\n"

    @property
    def value(self) -> int:
        """The exact result."""
        return self.a + self.b if self.op == "+" else self.a * self.b

    @property
    def answer(self) -> str:
        """The answer as written after ``A:``: the result's decimal digits."""
        return str(self.value)

    @property
    def steps(self) -> list[str]:
        """The trace's steps, least significant digit first."""
        return _add_steps(self.a, self.b) if self.op == "+" else _mul_steps(self.a, self.b)

    @property
    def trace(self) -> str:
        """The steps joined by ``;`` (the text inside ``<think>`` … ``</think>``)."""
        return ";".join(self.steps)

    @property
    def text(self) -> str:
        """The whole document: prompt, ``<think>`` trace ``</think>``, answer line."""
        return f"{self.prompt}<think>{self.trace}</think>\nA: {self.answer}\n"


def _digits(n: int, width: int) -> list[int]:
    """Decimal digits of ``n``, least significant first, padded with zeros to ``width``."""
    return [int(c) for c in reversed(str(n).zfill(width))]


def _add_steps(a: int, b: int) -> list[str]:
    width = max(len(str(a)), len(str(b)))
    carry, steps = 0, []
    for x, y in zip(_digits(a, width), _digits(b, width)):
        total = x + y + carry
        step = f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={total}"
        carry = total // 10
        steps.append(step + (f" c{carry}" if carry else ""))
    return steps


def _mul_steps(a: int, d: int) -> list[str]:
    carry, steps = 0, []
    for x in _digits(a, len(str(a))):
        product = x * d + carry
        step = f"{x}*{d}" + (f"+{carry}" if carry else "") + f"={product}"
        carry = product // 10
        steps.append(step + (f" c{carry}" if carry else ""))
    return steps


def region(problem: Problem, seed: int) -> str:
    """The split ``problem`` belongs to: a seeded hash of its prompt, uniform in [0, 1)."""
    digest = hashlib.sha256(f"{seed}:{problem.prompt}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < REGION_SHARES["test"]:
        return "test"
    if u < REGION_SHARES["test"] + REGION_SHARES["valid"]:
        return "valid"
    return "train"


def _draw(rng: random.Random, cfg: ArithmeticConfig) -> Problem:
    op = rng.choice(cfg.ops)
    low = 10 ** (cfg.min_digits - 1) if cfg.min_digits > 1 else 0

    def number() -> int:
        return rng.randrange(low, 10**cfg.max_digits)

    if op == "+":
        return Problem(number(), op, number())
    return Problem(number(), op, rng.randrange(2, 10))


def generate_splits(cfg: ArithmeticConfig) -> dict[str, list[Problem]]:
    """The train, valid and test problems of ``cfg``, deterministic in ``cfg.seed``."""
    want = {
        "train": cfg.train_examples,
        "valid": cfg.valid_examples,
        "test": cfg.test_examples,
    }
    out: dict[str, list[Problem]] = {s: [] for s in SPLITS}
    seen_test: set[Problem] = set()
    rng = random.Random(cfg.seed)
    budget = MAX_DRAWS_PER_EXAMPLE * sum(want.values())
    for _ in range(budget):
        if all(len(out[s]) >= want[s] for s in SPLITS):
            return out
        problem = _draw(rng, cfg)
        split = region(problem, cfg.seed)
        if len(out[split]) >= want[split] or (split == "test" and problem in seen_test):
            continue
        if split == "test":
            seen_test.add(problem)
        out[split].append(problem)
    short = [s for s in SPLITS if len(out[s]) < want[s]]
    raise ConfigError(
        f"data.arithmetic: could not fill {short} after {budget:,} draws; the problem space "
        f"({problem_space(cfg):,}) is too small for the requested sizes"
    )


def iter_documents(problems: list[Problem]) -> Iterator[str]:
    """Each problem's document text."""
    return (p.text for p in problems)


def heldout_file(out_prefix: str | Path) -> Path:
    """Where :func:`prepare_arithmetic` writes the test split (JSON lines)."""
    return Path(f"{out_prefix}_test.jsonl")


def prepare_arithmetic(cfg: ArithmeticConfig, out_prefix: str | Path, tokenizer) -> dict[str, Any]:
    """Write the train/valid indexed datasets and the test split of ``cfg``.

    Writes ``{out_prefix}_{train,valid}_text_document.{bin,idx}`` (one document per problem,
    its text then EOD, special tokens parsed), ``{out_prefix}_test.jsonl`` (one
    ``{"prompt", "answer", "trace", "text"}`` per line) and ``{out_prefix}_meta.json``;
    returns the meta.
    """
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    splits = generate_splits(cfg)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    meta: dict[str, Any] = {}
    for split in ("train", "valid"):
        prefix = f"{out_prefix}_{split}_text_document"
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
        tokens = 0
        for text in iter_documents(splits[split]):
            ids = tokenizer.encode(text, parse_special=True) + [tokenizer.eod]
            builder.add_document(numpy.asarray(ids, dtype=dtype), [len(ids)])
            tokens += len(ids)
        builder.finalize(prefix + ".idx")
        meta |= {
            f"{split}_prefix": prefix,
            f"{split}_documents": len(splits[split]),
            f"{split}_tokens": tokens,
        }
    lines = [
        json.dumps({"prompt": p.prompt, "answer": p.answer, "trace": p.trace, "text": p.text})
        for p in splits["test"]
    ]
    test_path = heldout_file(out_prefix)
    test_path.write_text("\n".join(lines) + "\n")
    meta |= {
        "test_file": str(test_path),
        "test_documents": len(splits["test"]),
        "tokenizer_kind": getattr(tokenizer, "kind", type(tokenizer).__name__),
        "vocab_size": int(tokenizer.vocab_size),
        "padded_vocab_size": int(tokenizer.padded_vocab_size(128)),
        "dtype": dtype.__name__,
        "source": "arithmetic",
        "arithmetic": {
            "ops": list(cfg.ops),
            "min_digits": cfg.min_digits,
            "max_digits": cfg.max_digits,
            "seed": cfg.seed,
        },
    }
    Path(f"{out_prefix}_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta

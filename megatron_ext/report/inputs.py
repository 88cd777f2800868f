"""Read what the pipeline's runs left: ``summary.json`` files and checkpoint sizes.

Every reader returns ``None`` (never raises) when its input is absent or unreadable, with the
reason kept in :class:`Missing`, so a report section can say what to run instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_ext.run_format import SUMMARY, checkpoints_dir, read_json

MANIFEST = "manifest.json"
LATEST = "latest.txt"
OPTIMIZER_DIR = "rank_state/"  # per-rank optimizer, RNG and data state inside a checkpoint


@dataclass
class Missing:
    """Why an input could not be read."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"`{self.path}` {self.reason}"


def read_summary(run_dir: str | Path) -> dict[str, Any] | Missing:
    """The ``summary.json`` of ``run_dir``, or why there is none."""
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        return Missing(path, "does not exist")
    try:
        data = read_json(path)
    except (OSError, ValueError) as err:
        return Missing(path, f"is unreadable ({err})")
    if not isinstance(data, dict):
        return Missing(path, "is not a JSON object")
    return data


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint ``latest.txt`` names under ``root``, else the newest ``iter_*`` there."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / MANIFEST).is_file():
            return candidate
    found = sorted(p for p in root.glob("iter_*") if (p / MANIFEST).is_file())
    return found[-1] if found else None


@dataclass
class CheckpointSize:
    """Bytes of one checkpoint: its weights, and everything (optimizer state included)."""

    path: Path
    weights: int
    total: int


def checkpoint_size(checkpoint: str | Path) -> CheckpointSize | None:
    """Sizes of ``checkpoint`` from its manifest (the files it lists); ``None`` without one."""
    path = Path(checkpoint)
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    total = sum(int(size) for size in files.values())
    weights = sum(int(size) for name, size in files.items() if not name.startswith(OPTIMIZER_DIR))
    return CheckpointSize(path, weights, total)


def run_checkpoint_size(run_dir: str | Path) -> CheckpointSize | None:
    """Sizes of the newest checkpoint of a run (``<run_dir>/checkpoints``)."""
    latest = latest_checkpoint(checkpoints_dir(run_dir))
    return checkpoint_size(latest) if latest is not None else None


def budget_throughput(generate_summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per budget: prefill and decode tokens/s over every phase that ran at that budget.

    A ``star-elastic generate`` summary times each pair's think phase at its think budget and
    its answer phase at its answer budget; the phases of one budget are pooled (tokens and
    seconds summed) across pairs.
    """
    pooled: dict[str, dict[str, float]] = {}
    for pair in generate_summary.get("pairs", {}).values():
        for phase, budget_key in (("think", "think_budget"), ("answer", "answer_budget")):
            fig = pair.get(phase) or {}
            acc = pooled.setdefault(str(pair.get(budget_key)), dict.fromkeys(_POOLED, 0.0))
            for key in _POOLED:
                acc[key] += float(fig.get(key, 0.0) or 0.0)
    return {
        budget: {
            "decode_tokens_per_s": _rate(acc["decode_tokens"], acc["decode_s"]),
            "prefill_tokens_per_s": _rate(acc["prefill_tokens"], acc["prefill_s"]),
            "decode_tokens": acc["decode_tokens"],
        }
        for budget, acc in pooled.items()
    }


_POOLED = ("decode_tokens", "decode_s", "prefill_tokens", "prefill_s")


def timing_noise(masked_summary: dict[str, Any]) -> float | None:
    """The relative spread of decode speed across pairs of a masked elastic generate run.

    Masked compute runs every budget at full width, so every pair of such a run decodes the
    same model: ``(max - min) / mean`` of the pairs' decode tokens/s is this machine's timing
    noise, the floor below which a difference between two pairs means nothing. ``None``
    with fewer than two timed pairs.
    """
    rates = []
    for pair in masked_summary.get("pairs", {}).values():
        tokens = sum(float((pair.get(p) or {}).get("decode_tokens", 0) or 0) for p in _PHASES)
        seconds = sum(float((pair.get(p) or {}).get("decode_s", 0) or 0) for p in _PHASES)
        if seconds > 0:
            rates.append(tokens / seconds)
    if len(rates) < 2:
        return None
    return (max(rates) - min(rates)) / (sum(rates) / len(rates))


_PHASES = ("think", "answer")


def _rate(tokens: float, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0

"""Held-out loss of every budget's zero-shot slice, importance order vs random orders.

Usage: python bench/slice_quality.py [PARENT_RUN_DIR] (default runs/demo/parent, from
`make demo`). Writes bench/slice_quality.json and bench/slice_quality.png and prints a table.
Measured before any elastic training: what importance ranking alone buys.
"""

from __future__ import annotations

from megatron_ext.compat import ensure_compat

ensure_compat()  # the entry point's shims, before megatron-core's model modules are imported

import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


from megatron_ext.config.compose import compose_recipe, section  # noqa: E402
from megatron_ext.config.schema import DataConfig, RunConfig, TrainConfig  # noqa: E402
from megatron_ext.elastic.config import ElasticConfig  # noqa: E402
from megatron_ext.elastic.ranking_baseline import compare_orders  # noqa: E402
from megatron_ext.elastic.slicing import sliced_config  # noqa: E402
from megatron_ext.models.config import load_model_config  # noqa: E402
from megatron_ext.parallel import ParallelConfig, init_distributed  # noqa: E402
from megatron_ext.report import format_table  # noqa: E402
from megatron_ext.run_format import MODEL_CONFIG  # noqa: E402
from megatron_ext.training.data import build_batches  # noqa: E402

HERE = Path(__file__).resolve().parent
SEEDS = (0, 1, 2)


def main() -> None:
    parent = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo/parent")
    if not (parent / MODEL_CONFIG).exists():
        sys.exit(f"{parent} is not a train-parent run; run `make demo` first")
    parent_cfg = compose_recipe("train_parent", [])  # the demo's data and seed
    saved = compose_recipe("train_parent", [f"data.cache_dir={parent.parent.parent / 'data'}"])
    data = section(
        saved if (parent.parent.parent / "data").exists() else parent_cfg, "data", DataConfig
    )
    seed = section(parent_cfg, "run", RunConfig).seed
    pgs = init_distributed(ParallelConfig())
    calib = TrainConfig(
        steps=16, micro_batch_size=8, seq_length=128, eval_batches=16, warmup_steps=0
    )
    batches, valid, _ = build_batches(data, calib, pgs, seed=seed + 1)
    elastic = section(compose_recipe("slice", []), "elastic", ElasticConfig)
    losses = compare_orders(
        parent, elastic, batches, valid, pgs, calib_steps=16, random_seeds=SEEDS
    )
    model_cfg = load_model_config(parent)
    budgets = [b.name for b in elastic.budgets]
    rows, out = [], {"parent": str(parent), "full_val_loss": losses["full"]["full"], "budgets": {}}
    for name in budgets:
        small = sliced_config(model_cfg, elastic.widths_for(name, model_cfg))
        randoms = [losses[f"random{s}"][name] for s in SEEDS]
        entry = {
            "widths": elastic.widths_for(name, model_cfg),
            "hidden_size": small.hidden_size,
            "importance_val_loss": losses["importance"][name],
            "random_val_loss": randoms,
            "random_val_loss_mean": sum(randoms) / len(randoms),
        }
        out["budgets"][name] = entry
        rows.append(
            [
                name,
                small.hidden_size,
                entry["importance_val_loss"],
                entry["random_val_loss_mean"],
                min(randoms),
                entry["random_val_loss_mean"] - entry["importance_val_loss"],
            ]
        )
    (HERE / "slice_quality.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"zero-shot slices of {parent} (full held-out loss {losses['full']['full']:.4f})")
    print(
        format_table(
            ["budget", "hidden", "importance", "random (mean of 3)", "random (best)", "gain"], rows
        )
    )
    _plot(budgets, out)


def _plot(budgets: list[str], out: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    xs = range(len(budgets))
    ax.plot(
        xs,
        [out["budgets"][b]["importance_val_loss"] for b in budgets],
        "o-",
        label="importance order",
    )
    ax.plot(
        xs,
        [out["budgets"][b]["random_val_loss_mean"] for b in budgets],
        "s--",
        label="random order (mean)",
    )
    ax.axhline(out["full_val_loss"], color="gray", linewidth=1, label="parent")
    ax.set_xticks(list(xs), budgets)
    ax.set_xlabel("budget (zero-shot slice, no elastic training)")
    ax.set_ylabel("held-out loss (nats/byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "slice_quality.png")


if __name__ == "__main__":
    main()

"""``star-elastic prepare-data``: tokenize a folder of text files into indexed datasets."""

from __future__ import annotations

from omegaconf import DictConfig

from megatron_ext.config.compose import section
from megatron_ext.config.schema import DataConfig
from megatron_ext.data.cache import dataset_prefix, ensure_prepared, source_dir
from megatron_ext.data.prepare import check_split_lengths
from megatron_ext.report import key_value_table, write_summary
from megatron_ext.runtime import prepare_run_dir


def run(cfg: DictConfig) -> dict:
    """Prepare (or reuse) the train/valid datasets; write ``summary.json``; print counts."""
    data = section(cfg, "data", DataConfig)
    run_dir = prepare_run_dir(cfg, cfg.run.dir)
    meta = ensure_prepared(data, seed=int(cfg.run.seed))
    check_split_lengths(meta, data.min_seq_length, "data.min_seq_length")
    summary = {"source": str(source_dir(data)), "prefix": str(dataset_prefix(data)), **meta}
    write_summary(run_dir, summary)
    table = {k: v for k, v in summary.items() if k != "skipped"}
    print(key_value_table(f"dataset {data.name}", table))
    for skipped in summary.get("skipped", []):
        print(f"  skipped {skipped['file']}: {skipped['reason']}")
    return summary

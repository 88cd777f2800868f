"""What a recipe takes from the run it reads (``source.dir``, else ``parent.dir``).

The tokenizer belongs to the weights: a run records it in its ``config.yaml`` (``data.tokenizer``,
``data.tokenizer_path``; ``import-hf`` writes the checkpoint's ``tokenizer.json`` there). A
recipe that reads a run (importance, train-elastic, slice, export, generate, qad) takes the
tokenizer from that run unless its own command line names one, so an imported or train-parent
run is used with no tokenizer overrides, and each run it produces records the same tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from megatron_ext.run_format import has_config, read_config

RUN_KEYS = ("source", "parent")
"""The config groups whose ``dir`` names the run a recipe reads, in order of precedence."""

TOKENIZER_KEYS = ("tokenizer", "tokenizer_path")


def _override_key(override: str) -> str:
    """``data.tokenizer`` of ``data.tokenizer=hf`` (also ``+``/``++``/``~`` forms)."""
    return override.split("=", 1)[0].lstrip("+~")


def names_tokenizer(overrides: list[str]) -> bool:
    """Whether the command line sets ``data.tokenizer`` or ``data.tokenizer_path``."""
    return any(_override_key(o) in {f"data.{k}" for k in TOKENIZER_KEYS} for o in overrides)


def read_run(cfg: DictConfig) -> Path | None:
    """The run directory ``cfg`` reads whose ``config.yaml`` exists (``source`` first)."""
    for key in RUN_KEYS:
        node = cfg.get(key)
        if not isinstance(node, DictConfig) or "dir" not in node:
            continue
        if OmegaConf.is_missing(node, "dir"):
            continue
        value = node.get("dir")
        if value and has_config(str(value)):
            return Path(str(value))
    return None


def saved_tokenizer(run_dir: Path) -> dict[str, str] | None:
    """``{"tokenizer", "tokenizer_path"}`` from ``run_dir/config.yaml``, if it records them."""
    saved = read_config(run_dir)
    data = saved.get("data") if isinstance(saved, DictConfig) else None
    if not isinstance(data, DictConfig) or "tokenizer" not in data:
        return None
    return {k: str(data.get(k) or "") for k in TOKENIZER_KEYS}


def take_tokenizer_from_run(cfg: DictConfig, overrides: list[str]) -> Path | None:
    """Set ``cfg.data``'s tokenizer to that of the run ``cfg`` reads; returns that run.

    Nothing changes (``None``) when the recipe has no ``data`` group, reads no run with a
    ``config.yaml``, or ``overrides`` name ``data.tokenizer`` / ``data.tokenizer_path``.
    """
    if "data" not in cfg or names_tokenizer(overrides):
        return None
    run_dir = read_run(cfg)
    found = saved_tokenizer(run_dir) if run_dir is not None else None
    if found is None:
        return None
    for key, value in found.items():
        cfg.data[key] = value
    return run_dir

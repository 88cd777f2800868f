"""Corrupt, partial and unwritable checkpoints: set aside (never deleted), refused, reported.

A world of one on a tiny real model; every checkpoint is a real torch_dist save on disk.
"""

from __future__ import annotations

import errno
import logging
import re
from pathlib import Path

import pytest
import torch

from megatron_ext import checkpoint as ckpt_module
from megatron_ext.checkpoint import CheckpointError, CheckpointManager
from megatron_ext.models.builder import build_model
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.parallel import ParallelConfig, init_distributed, set_seed


@pytest.fixture(scope="module")
def pgs():
    return init_distributed(ParallelConfig())


@pytest.fixture(scope="module")
def model_and_opt(pgs):
    set_seed(1)
    model = build_model(HybridModelConfig(), ParallelConfig(), pgs)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _saved(root: Path, pgs, model_and_opt, steps) -> CheckpointManager:
    manager = CheckpointManager(root, pgs)
    for step in steps:
        manager.save(step, *model_and_opt, {"step": step})
    return manager


def _aside(root: Path, name: str, kind: str) -> list[Path]:
    return sorted(root.glob(f"{name}.{kind}-*"))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def test_corrupt_newest_is_kept_aside_and_named_and_the_run_resumes_from_the_older(
    tmp_path, pgs, model_and_opt, caplog
):
    manager = _saved(tmp_path, pgs, model_and_opt, [1, 2])
    _truncate(tmp_path / "iter_0000002" / ".metadata")
    with caplog.at_level(logging.WARNING, logger="megatron_ext.checkpoint"):
        assert manager.resume_point() == tmp_path / "iter_0000001"
    kept = _aside(tmp_path, "iter_0000002", "corrupt")
    assert len(kept) == 1 and (kept[0] / ".metadata").is_file()
    assert any(
        kept[0].name in r.getMessage() and ".metadata" in r.getMessage() for r in caplog.records
    )


@pytest.mark.parametrize("damage", ["truncated .metadata", "deleted .metadata"])
def test_only_corrupt_checkpoints_refuse_to_start_naming_each_and_why(
    tmp_path, pgs, model_and_opt, damage
):
    manager = _saved(tmp_path, pgs, model_and_opt, [1, 2])
    for step in (1, 2):
        meta = tmp_path / f"iter_000000{step}" / ".metadata"
        _truncate(meta) if damage.startswith("truncated") else meta.unlink()
    why = r"has \d+ bytes but the manifest says" if damage.startswith("truncated") else "is missing"
    for check in (manager.check_resumable, manager.resume_point):  # launcher, then the ranks
        with pytest.raises(CheckpointError, match="restart_from_scratch") as err:
            check()
        message = str(err.value)
        assert "\n" not in message
        for step in (1, 2):
            assert f"iter_000000{step}: .metadata" in message
        assert len(re.findall(why, message)) == 2
    # refusing changes nothing on disk
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000001", "iter_0000002"]


def test_restart_from_scratch_starts_over_and_keeps_the_corrupt_ones(tmp_path, pgs, model_and_opt):
    manager = _saved(tmp_path, pgs, model_and_opt, [1])
    (tmp_path / "iter_0000001" / ".metadata").unlink()
    assert manager.resume_point(restart_from_scratch=True) is None
    assert len(_aside(tmp_path, "iter_0000001", "corrupt")) == 1
    manager.save(1, *model_and_opt, {"step": 1})  # the new run saves the same step again
    assert manager.resume_point() == tmp_path / "iter_0000001"
    assert len(_aside(tmp_path, "iter_0000001", "corrupt")) == 1


def test_saving_a_step_over_its_corrupt_checkpoint_keeps_the_old_one(tmp_path, pgs, model_and_opt):
    manager = _saved(tmp_path, pgs, model_and_opt, [1])
    _truncate(next((tmp_path / "iter_0000001").glob("*.distcp")))
    manager.save(1, *model_and_opt, {"step": 1})
    assert len(_aside(tmp_path, "iter_0000001", "corrupt")) == 1
    assert manager.problem(tmp_path / "iter_0000001") is None


def test_pruning_sets_a_corrupt_old_checkpoint_aside_instead_of_deleting_it(
    tmp_path, pgs, model_and_opt
):
    manager = _saved(tmp_path, pgs, model_and_opt, [1, 2, 3])
    (tmp_path / "iter_0000001" / "manifest.json").unlink()
    manager.save(4, *model_and_opt, {"step": 4})  # keep=3: iter_1 falls out
    assert len(_aside(tmp_path, "iter_0000001", "corrupt")) == 1
    assert sorted(p.name for p in tmp_path.glob("iter_???????")) == [
        "iter_0000002",
        "iter_0000003",
        "iter_0000004",
    ]


def test_disk_full_during_a_save_raises_checkpoint_error_and_keeps_the_last_good_one(
    tmp_path, pgs, model_and_opt, monkeypatch
):
    manager = _saved(tmp_path, pgs, model_and_opt, [1])
    good = {p.name: p.read_bytes() for p in (tmp_path / "iter_0000001").rglob("*") if p.is_file()}

    def no_space(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ckpt_module, "_write_durable", no_space)
    with pytest.raises(CheckpointError, match="iter_0000002.*No space left on device"):
        manager.save(2, *model_and_opt, {"step": 2})
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in (tmp_path / "iter_0000001").rglob("*") if p.is_file()}
    assert after == good
    assert manager.resume_point() == tmp_path / "iter_0000001"
    assert manager.load(tmp_path / "iter_0000001", *model_and_opt) == {"step": 1}
    # the unfinished save is kept aside for inspection, not deleted
    assert len(_aside(tmp_path, "iter_0000002", "partial")) == 1

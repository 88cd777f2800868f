"""Preemption in one process: a signal mid-run checkpoints and exits 75, and a restart
resumes bit-identically; a truncated newest checkpoint is skipped for the previous one."""

from __future__ import annotations

import logging
import os
import re
import signal
from pathlib import Path

import pytest

from megatron_ext.config.compose import compose_recipe
from megatron_ext.tracking import Tracker
from megatron_ext.training.preemption import REQUEUE_EXIT_CODE, Preempted, PreemptionHandler
from recipes import train_parent

COMMON = [
    "train.micro_batch_size=4",
    "train.seq_length=64",
    "train.warmup_steps=2",
    "train.eval_batches=2",
    "train.steps=6",
    "train.eval_interval=3",
    "train.save_interval=2",
    "train.log_interval=1",
    "logger=none",
]


def _run(run_dir: Path, data_overrides: list[str], *extra: str) -> dict:
    cfg = compose_recipe("train_parent", [f"run.dir={run_dir}", *data_overrides, *COMMON, *extra])
    return train_parent.run(cfg)


@pytest.fixture(scope="module")
def whole(tmp_path_factory, data_overrides) -> dict:
    """The uninterrupted 6-step run every interrupted one must reproduce exactly."""
    return _run(tmp_path_factory.mktemp("whole"), data_overrides)


def _same_run(got: dict, want: dict) -> None:
    assert got["steps"] == want["steps"] == 6
    assert got["final_train_loss"] == want["final_train_loss"]
    assert got["val_loss"] == want["val_loss"]
    assert got["val_curve"] == want["val_curve"]


def test_handler_records_the_signal_and_restores_the_previous_handler():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler() as handler:
        assert not handler.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.requested()
        assert handler.signal_name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before
    assert str(Preempted(7, signal.SIGTERM)) == "preempted by SIGTERM after step 7"


def test_signal_mid_run_checkpoints_exits_75_and_the_restart_matches(
    whole, tmp_path, data_overrides, monkeypatch, capsys
):
    def signal_at_step_3(self, step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)

    with monkeypatch.context() as patch:
        patch.setattr(Tracker, "log", signal_at_step_3)
        with pytest.raises(SystemExit) as stop:
            _run(tmp_path, data_overrides)
    assert stop.value.code == REQUEUE_EXIT_CODE
    out = capsys.readouterr().out
    assert "preempted by SIGUSR1 after step 3" in out
    # Step 3 is not a save_interval step: the checkpoint there is the preemption's own.
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").glob("iter_*"))
    assert checkpoints == ["iter_0000002", "iter_0000003"]
    resumed = _run(tmp_path, data_overrides)
    assert re.search(r"resumed from \S*iter_0000003", capsys.readouterr().out)
    _same_run(resumed, whole)


def test_truncated_newest_checkpoint_is_skipped_and_the_run_resumes_from_the_previous(
    whole, tmp_path, data_overrides, caplog, capsys
):
    first = _run(tmp_path, data_overrides, "train.stop_at=4")
    assert first["steps"] == 4
    newest = tmp_path / "checkpoints" / "iter_0000004"
    distcp = sorted(newest.glob("*.distcp"))
    assert distcp, f"no .distcp file in {newest}"
    size = distcp[0].stat().st_size
    with open(distcp[0], "r+b") as f:
        f.truncate(size // 2)
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="megatron_ext.checkpoint"):
        resumed = _run(tmp_path, data_overrides)
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert f"kept corrupt checkpoint {newest} as {newest}.corrupt-" in warning
    assert len(list(newest.parent.glob(f"{newest.name}.corrupt-*"))) == 1  # kept, not deleted
    assert f"{distcp[0].name} has {size // 2} bytes but the manifest says {size}" in warning
    assert re.search(r"resumed from \S*iter_0000002", capsys.readouterr().out)
    _same_run(resumed, whole)

"""Interval-averaged logging: means over the interval, per-budget keys whenever sampled,
``lr``, tokens/s and validation in the elastic run, quiet progress bars in log files."""

from __future__ import annotations

import io
import json

import pytest
import torch

from megatron_ext.checkpoint import CheckpointManager
from megatron_ext.config.compose import compose_recipe
from megatron_ext.training import metrics as metrics_module
from megatron_ext.training.metrics import IntervalMetrics, progress_bar
from recipes import train_elastic, train_parent


def test_interval_means_count_only_the_steps_that_had_the_key():
    interval = IntervalMetrics()
    interval.add({"kd": 1.0, "kd/S": 1.0, "budget": "S"}, tokens=100, seconds=1.0)
    interval.add({"kd": 3.0, "kd/L": 3.0}, tokens=300, seconds=1.0)
    assert interval.flush() == {"kd": 2.0, "kd/S": 1.0, "kd/L": 3.0, "tokens_per_s": 200.0}
    assert interval.flush() == {}  # the next interval starts empty


def test_progress_bar_refreshes_rarely_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr(metrics_module.sys, "stderr", io.StringIO())
    bar = progress_bar(total=100, initial=0, desc="x", disable=False)
    assert bar.mininterval == metrics_module.NON_TERMINAL_REFRESH_S
    for _ in range(100):
        bar.update(1)
        bar.set_postfix(loss="1.0", refresh=False)
    bar.close()
    # one line at the start and one at close, not one per step
    assert metrics_module.sys.stderr.getvalue().count("\r") <= 3


class Recorder:
    """Stands in for the Tracker: keeps every logged (step, metrics)."""

    records: list[tuple[int, dict]] = []

    def __init__(self, *args, **kwargs) -> None:
        Recorder.records = []

    def log(self, step: int, metrics: dict) -> None:
        Recorder.records.append((step, dict(metrics)))

    def finish(self) -> None:
        pass


def test_parent_logs_the_mean_loss_of_each_interval(tmp_path, data_overrides, monkeypatch):
    monkeypatch.setattr(train_parent, "Tracker", Recorder)
    overrides = [
        f"run.dir={tmp_path}",
        *data_overrides,
        "train.steps=6",
        "train.log_interval=3",
        "train.eval_interval=6",
        "train.micro_batch_size=2",
        "train.seq_length=32",
        "train.eval_batches=1",
        "train.warmup_steps=1",
    ]
    train_parent.run(compose_recipe("train_parent", overrides))
    assert [s for s, _ in Recorder.records] == [3, 6]
    assert all({"loss", "lr", "grad_norm", "tokens_per_s"} <= m.keys() for _, m in Recorder.records)
    assert "val_loss" in Recorder.records[-1][1]
    latest = CheckpointManager(tmp_path / "checkpoints", None).latest_valid()
    assert latest is not None
    state = torch.load(latest / "rank_state" / "rank_00000.pt", weights_only=False)
    losses = dict(state["extra"]["history"].train)
    for step, logged in Recorder.records:  # the mean of the interval's losses, not its last
        assert logged["loss"] == pytest.approx(
            sum(losses[s] for s in range(step - 2, step + 1)) / 3
        )


def test_elastic_run_logs_lr_tokens_per_s_validation_and_every_sampled_budget(
    tmp_path, importance_run, data_overrides, monkeypatch
):
    monkeypatch.setattr(train_elastic, "Tracker", Recorder)
    overrides = [
        f"source.dir={importance_run}",
        f"run.dir={tmp_path}",
        *data_overrides,
        "curriculum=smoke",
        "elastic_train.micro_batch_size=2",
        "elastic_train.eval_batches=1",
        "elastic_train.eval_seq_length=32",
        "elastic_train.eval_interval=4",
        "elastic_train.log_interval=4",
        "elastic_train.warmup_steps=0",
        "logger=none",
    ]
    train_elastic.run(compose_recipe("train_elastic", overrides))
    records = [(s, m) for s, m in Recorder.records if not any(k.startswith("final/") for k in m)]
    assert [s for s, _ in records] == [4, 8]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 8
    for _, logged in records:
        assert {"lr", "tokens_per_s", "kd"} <= logged.keys()
        assert any(k.startswith("val/") for k in logged), "validation at eval_interval"
        assert logged["lr"] == pytest.approx(1.0e-3)  # both smoke stages, no warm-up
    # every budget sampled in an interval has its mean in that interval's record
    latest = CheckpointManager(tmp_path / "checkpoints", None).latest_valid()
    assert latest is not None
    state = torch.load(latest / "rank_state" / "rank_00000.pt", weights_only=False)
    steps = state["extra"]["history"].train
    for step, logged in records:
        sampled = {m["budget"] for m in steps if step - 4 < m["step"] <= step}
        kds = [m["kd"] for m in steps if step - 4 < m["step"] <= step]
        assert {k.removeprefix("kd/") for k in logged if k.startswith("kd/")} == sampled
        assert logged["kd"] == pytest.approx(sum(kds) / len(kds))  # the interval's mean

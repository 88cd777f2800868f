"""Validation on the launcher: bad configs and bad sources are refused before torchrun starts
and before anything is written into ``run.dir``; bad checkpoints are one-line errors."""

from __future__ import annotations

import json

import pytest

import launch.local
from megatron_ext.checkpoint import CheckpointError, CheckpointManager
from megatron_ext.models.builder import build_model
from megatron_ext.models.config import HybridModelConfig, save_model_config
from megatron_ext.parallel import ParallelConfig, init_distributed, set_seed
from megatron_ext.quant.state import read_quant_state
from megatron_ext.run_format import BUDGET_CHOICES, QUANT_STATE
from recipes.cli import main


@pytest.fixture(autouse=True)
def no_torchrun(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torchrun was started before the config was validated")

    monkeypatch.setattr(launch.local, "launch_torchrun", refuse)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A run directory with a model config and one real checkpoint of that model."""
    root = tmp_path_factory.mktemp("source")
    pgs = init_distributed(ParallelConfig())
    set_seed(1)
    cfg = HybridModelConfig()
    model = build_model(cfg, ParallelConfig(), pgs)
    CheckpointManager(root / "checkpoints", pgs).save(1, model, None, {})
    save_model_config(cfg, root)
    return root


def _refused(capsys, argv: list[str], code: int, starts: str) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith(starts), err[-1]
    return err[-1]


def test_a_width_not_divisible_by_tp_is_refused_before_torchrun(tmp_path, source, capsys):
    run_dir = tmp_path / "run"
    argv = ["train-elastic", f"source.dir={source}", f"run.dir={run_dir}", "parallel=tp2"]
    line = _refused(capsys, [*argv, "elastic.axes.ffn=[256,192,129,128]"], 2, "config error:")
    assert "elastic.axes.ffn" in line and "129" in line
    assert not run_dir.exists()


def test_qad_layout_is_checked_before_torchrun_and_names_the_field(tmp_path, source, capsys):
    """qad builds the elastic model at its own layout: a width that splits at TP=1 but not
    over 2 TP ranks (144 -> 72 channels per rank, not whole 16-element blocks), and an
    export or the task accuracy (both from one process) asked of several ranks, are refused
    on the launcher; nothing is written."""
    run_dir = tmp_path / "run"
    argv = ["qad", f"source.dir={source}", f"run.dir={run_dir}", "parallel=tp2"]
    line = _refused(capsys, [*argv, "elastic.axes.ffn=[256,192,144,128]"], 2, "config error:")
    assert "elastic.axes.ffn" in line and "144" in line
    line = _refused(capsys, [*argv, "export=true"], 2, "config error: export:")
    assert "parallel.nproc=2" in line
    line = _refused(
        capsys, [*argv, "qad_train.task_prompts=4"], 2, "config error: qad_train.task_prompts:"
    )
    assert "parallel.nproc=2" in line
    line = _refused(
        capsys,
        ["qad", f"source.dir={source}", f"run.dir={run_dir}", "parallel.nproc=3", "parallel.pp=3"],
        2,
        "config error:",
    )
    assert "parallel.pp: the 8 layers" in line
    assert not run_dir.exists()


@pytest.mark.parametrize("recipe", ["train-elastic", "slice", "export", "qad"])
def test_a_missing_source_dir_names_the_field_and_writes_nothing(tmp_path, capsys, recipe):
    run_dir = tmp_path / "run"
    argv = [recipe, f"source.dir={tmp_path / 'nowhere'}", f"run.dir={run_dir}"]
    assert "source.dir" in _refused(capsys, argv, 2, "config error: source.dir:")
    assert not run_dir.exists()


def test_a_curriculum_that_cannot_resolve_is_refused_before_torchrun(tmp_path, source, capsys):
    run_dir = tmp_path / "run"
    argv = ["train-elastic", f"source.dir={source}", f"run.dir={run_dir}", "parallel=tp2"]
    _refused(capsys, [*argv, "curriculum.stages.1.budget_probs=[0.5,0.5]"], 2, "config error:")
    assert not run_dir.exists()


@pytest.mark.parametrize("recipe", ["slice", "train-elastic"])
def test_a_bad_checkpoint_in_source_dir_is_a_one_line_error(tmp_path, capsys, recipe):
    broken = tmp_path / "broken"
    (broken / "checkpoints" / "iter_0000001").mkdir(parents=True)
    (broken / "checkpoints" / "iter_0000001" / "manifest.json").write_text("{not json")
    save_model_config(HybridModelConfig(), broken)
    run_dir = tmp_path / "run"
    argv = [recipe, f"source.dir={broken}", f"run.dir={run_dir}", "parallel=tp2"][:4]
    if recipe == "slice":
        argv = argv[:3]
    line = _refused(capsys, argv, 1, "checkpoint error: source.dir: no valid checkpoint")
    assert "iter_0000001: manifest.json is unreadable" in line
    assert not run_dir.exists()


def test_a_corrupt_budget_choices_file_is_a_one_line_error(tmp_path, source, capsys):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for item in source.iterdir():
        (damaged / item.name).symlink_to(item)
    (damaged / BUDGET_CHOICES).write_text('{"L": {"ffn": "wide"')  # cut short mid-write
    run_dir = tmp_path / "run"
    argv = ["slice", f"source.dir={damaged}", f"run.dir={run_dir}"]
    assert BUDGET_CHOICES in _refused(capsys, argv, 1, "checkpoint error:")
    (damaged / BUDGET_CHOICES).write_text(json.dumps({"L": {"ffn": "wide"}}))
    assert "corrupt" in _refused(capsys, argv, 1, "checkpoint error:")
    assert not run_dir.exists()


@pytest.mark.parametrize("text", ['{"config": {"format": "nvfp4"', '{"modules": {}}', "[]"])
def test_a_corrupt_quant_state_is_a_checkpoint_error_naming_the_file(tmp_path, text):
    (tmp_path / QUANT_STATE).write_text(text)
    with pytest.raises(CheckpointError, match=QUANT_STATE) as err:
        read_quant_state(tmp_path)
    assert "\n" not in str(err.value)


def test_a_run_dir_with_only_corrupt_checkpoints_is_refused_on_the_launcher(
    tmp_path, source, capsys
):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    for item in (source / "checkpoints").iterdir():  # a copy whose .metadata is cut short
        dest = run_dir / "checkpoints" / item.name
        dest.mkdir()
        for f in item.rglob("*"):
            if f.is_file():
                (dest / f.relative_to(item)).parent.mkdir(parents=True, exist_ok=True)
                (dest / f.relative_to(item)).write_bytes(f.read_bytes())
        (dest / ".metadata").write_bytes(b"")
    before = sorted(p.name for p in run_dir.rglob("*"))
    argv = ["train-parent", f"run.dir={run_dir}", "logger=none", "parallel=tp2"]
    line = _refused(capsys, argv, 1, "checkpoint error:")
    assert "iter_0000001: .metadata has 0 bytes" in line and "run.restart_from_scratch" in line
    assert sorted(p.name for p in run_dir.rglob("*")) == before

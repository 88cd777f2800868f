"""The qad recipe end to end: an elastic run (real corpus slice), NVFP4 PTQ + QAD, FP8 PTQ.

What is compared and why it is robust:
* ``recovery`` is recomputed from the reported losses (same float arithmetic: exact).
* The held-out KD loss from the unquantized model (the QAD objective, ``ptq_kd`` /
  ``qad_kd``) is the sensitive measure on this small parent (60 steps): its NVFP4 PTQ loss
  gap is ~1e-3 nats, the size of what any weight update moves, so the loss recovery is
  reported but not asserted here (on the demo-scale run QAD closes 35-55% of it). The KD
  loss is ~1e-3 after PTQ and QAD lowers it by ~25% on average over the budgets in 12
  steps at lr 3e-5 (measured); the test asserts the mean goes down.
* Task accuracy (``qad_train.task_prompts``): the references are the answers ``star-elastic
  generate`` wrote for the same prompts at L (greedy, masked compute), so QAD's unquantized
  pass must score exactly 1.0 at L: any difference between its decode and generate's fails.
* FP8 (3 mantissa bits, per-tensor scales) perturbs the model far less than NVFP4 (1
  mantissa bit, 16-element blocks): its held-out KD loss after PTQ is smaller at every
  budget (measured 4-7x).
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_ext.checkpoint import CheckpointManager
from megatron_ext.config.compose import compose_recipe
from megatron_ext.generate.evaluate import extract_answer
from megatron_ext.models.builder import build_model
from megatron_ext.models.config import load_model_config
from megatron_ext.parallel import ParallelConfig, init_distributed
from megatron_ext.quant.qad import recovery
from megatron_ext.quant.state import read_quant_state
from megatron_ext.quant.task import accuracy_recovery
from recipes import generate, qad, train_elastic

SMOKE = [
    "curriculum=smoke",
    "elastic_train.micro_batch_size=2",
    "elastic_train.eval_batches=2",
    "elastic_train.eval_seq_length=64",
    "elastic_train.eval_interval=8",
    "elastic_train.warmup_steps=2",
    "logger=none",
]
QAD = [
    "qad_train.steps=12",
    "qad_train.warmup_steps=2",
    "qad_train.lr=3e-5",
    "qad_train.micro_batch_size=4",
    "qad_train.seq_length=64",
    "qad_train.eval_batches=4",
    "qad_train.eval_seq_length=64",
    "quant.calib_batches=2",
]


@pytest.fixture(scope="module")
def elastic_run(tmp_path_factory, importance_run, data_overrides):
    run_dir = tmp_path_factory.mktemp("elastic_for_qad")
    overrides = [f"source.dir={importance_run}", f"run.dir={run_dir}", *data_overrides, *SMOKE]
    train_elastic.run(compose_recipe("train_elastic", overrides))
    return run_dir


def _qad(run_dir, source, data_overrides, *extra: str) -> dict:
    overrides = [f"source.dir={source}", f"run.dir={run_dir}", *data_overrides, *QAD, *extra]
    return qad.run(compose_recipe("qad", overrides))


TASK = ["generation.max_think_tokens=6", "generation.max_answer_tokens=6"]


@pytest.fixture(scope="module")
def scored_prompts(tmp_path_factory, elastic_run, data_overrides):
    """A prompts file whose references are generate's own answers at L, on the elastic run."""
    out = tmp_path_factory.mktemp("generate_for_qad")
    overrides = [
        f"source.dir={elastic_run}",
        f"run.dir={out / 'run'}",
        *data_overrides,
        *TASK,
        "generation.think_budget=L",
        "generation.answer_budget=L",
    ]
    summary = generate.run(compose_recipe("generate", overrides))
    pair = summary["pairs"]["L->L"]
    lines = [
        json.dumps({"prompt": prompt, "answer": extract_answer(item["answer"])})
        for prompt, item in zip(
            compose_recipe("generate", []).generation.prompts, pair["generations"]
        )
    ]
    path = out / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, len(lines)


@pytest.fixture(scope="module")
def nvfp4(tmp_path_factory, elastic_run, data_overrides, scored_prompts):
    run_dir = tmp_path_factory.mktemp("qad_nvfp4")
    path, count = scored_prompts
    task = [f"generation.prompts_file={path}", f"qad_train.task_prompts={count}", *TASK]
    return run_dir, _qad(run_dir, elastic_run, data_overrides, "quant=nvfp4", *task)


def test_qad_task_accuracy_is_scored_unquantized_after_ptq_and_after_qad(nvfp4, scored_prompts):
    _, summary = nvfp4
    _, count = scored_prompts
    for f in summary["budgets"].values():
        task = f["task"]
        for stage in ("ref", "ptq", "qad"):
            assert task[stage]["total"] == count
            assert task[stage]["accuracy"] == task[stage]["correct"] / count
        expected = accuracy_recovery(
            task["ref"]["accuracy"], task["ptq"]["accuracy"], task["qad"]["accuracy"]
        )
        assert task["recovery"] == expected
    assert summary["budgets"]["L"]["task"]["ref"]["accuracy"] == 1.0


def test_qad_task_accuracy_without_reference_answers_is_refused_before_any_work(
    tmp_path, elastic_run, data_overrides
):
    from megatron_ext.models.config import ConfigError

    run_dir = tmp_path / "qad"
    with pytest.raises(ConfigError, match="qad_train.task_prompts"):
        _qad(run_dir, elastic_run, data_overrides, "qad_train.task_prompts=2")
    assert not run_dir.exists()


def test_qad_reports_every_budget_with_reference_ptq_qad_and_recovery(nvfp4, elastic_run):
    run_dir, summary = nvfp4
    choices = json.loads((elastic_run / "budget_choices.json").read_text())
    assert set(summary["budgets"]) == set(choices) == {"L", "M", "S"}
    for name, f in summary["budgets"].items():
        assert f["widths"] == choices[name]  # the router's nested widths, unchanged
        assert f["recovery"] == recovery(f["ref_loss"], f["ptq_loss"], f["qad_loss"])
        # NVFP4 does change the model: its logits move (the loss itself may move by less
        # than 1e-4 either way on this 60-step parent, so the KD from the reference is used)
        assert f["ptq_kd"] > 1e-5 and f["ptq_loss"] != f["ref_loss"]
        # paired over the same held-out batches: positive, and far below the loss itself
        assert 0.0 < f["ptq_gap_se"] < 0.01 and 0.0 < f["qad_change_se"] < 0.01
    assert summary["backend"]["name"] == "fake" and summary["backend"]["why"]
    assert summary["format"] == "nvfp4" and summary["qad"]["steps"] == 12
    assert (run_dir / "quant_budgets.png").stat().st_size > 1000
    assert json.loads((run_dir / "budget_choices.json").read_text()) == choices


def test_nvfp4_qad_lowers_the_held_out_kd_loss_from_the_unquantized_model(nvfp4):
    _, summary = nvfp4
    budgets = summary["budgets"].values()
    assert all(f["ptq_kd"] > 1e-5 for f in budgets)  # quantization moved the logits
    mean_ptq = sum(f["ptq_kd"] for f in budgets) / len(budgets)
    mean_qad = sum(f["qad_kd"] for f in budgets) / len(budgets)
    assert mean_qad < mean_ptq


def test_qad_checkpoint_has_upstream_keys_and_a_quant_state_beside_it(nvfp4, elastic_run):
    run_dir, summary = nvfp4
    state = read_quant_state(run_dir)
    assert state["format"] == "nvfp4"
    assert sorted(state["modules"]) == summary["quantized_modules"]
    assert all(m["input_scale"] > 0 for m in state["modules"].values())
    pgs = init_distributed(ParallelConfig())
    cfg = load_model_config(run_dir)
    plain = build_model(cfg, ParallelConfig(), pgs, initialize=False)
    ckpts = CheckpointManager(run_dir / "checkpoints", pgs)
    ckpts.load(ckpts.latest_valid(), plain, weights_only=True)  # upstream keys: loads strictly
    source = build_model(cfg, ParallelConfig(), pgs, initialize=False)
    src = CheckpointManager(elastic_run / "checkpoints", pgs)
    src.load(src.latest_valid(), source, weights_only=True)
    key = "decoder.layers.4.mlp.linear_fc1.weight"
    assert not torch.equal(plain.state_dict()[key], source.state_dict()[key])  # QAD trained


def test_fp8_ptq_moves_the_model_less_than_nvfp4_ptq(tmp_path, nvfp4, elastic_run, data_overrides):
    _, nv = nvfp4
    fp8 = _qad(tmp_path, elastic_run, data_overrides, "quant=fp8", "qad_train.steps=0")
    assert fp8["qad"] is None and fp8["format"] == "fp8"
    for name, f in fp8["budgets"].items():
        assert f["qad_loss"] is None and f["recovery"] is None and "qad_kd" not in f
        assert f["ref_loss"] == nv["budgets"][name]["ref_loss"]  # same model, same batches
        assert 0 < f["ptq_kd"] < nv["budgets"][name]["ptq_kd"]

"""Pipeline parallelism: PP=2 (1F1B over gloo) against PP=1, resume, resharding, the engine.

``cases_pipeline.py`` runs every case in one 2-rank torchrun launch; each test below checks
one case. The tiny hybrid ``M*ME-M*E`` splits into ``M*ME`` (stage 0, with the embedding)
and ``-M*E`` (stage 1, with the final norm and the output layer); 4 micro-batches of 2.

Tolerances. Each stage computes exactly the operations of the unpipelined model on the same
values (p2p sends the activations and their gradients unchanged), so losses and the model's
gradients are compared for exact equality. Two sums change order and are compared with a
rounding tolerance instead:

- tied embeddings: at PP=1 the embedding and the output layer accumulate into one gradient
  tensor, at PP=2 each stage holds one part and megatron's embedding group adds them: one
  rounding of a float32 sum, a few ulps of the gradient (measured 3e-8 to 6e-8; bound 1e-6);
- the router: replicated, each stage's gates send it a part of its gradient and
  megatron's ``finalize_model_grads`` sums the parts over the stages, where PP=1 sums all
  gates in one backward (measured 6e-8 to 2.5e-7 relative to the largest router gradient,
  masked and narrow; bound 1e-5 relative). A missing stage sum loses a whole stage's
  share, an error of order one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.launch import case, run_cases

SCRIPT = Path(__file__).with_name("cases_pipeline.py")
TIED_GRAD_ATOL = 1e-6
ROUTER_GRAD_RTOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out_dir = tmp_path_factory.mktemp("pipeline")
    data = run_cases(SCRIPT, out_dir)
    data["out_dir"] = out_dir
    return data


def test_each_stage_holds_half_the_layers(results):
    assert case(results, "parent_pp2_vs_pp1")["stage_layers"] == [4, 4]


def test_pp2_parent_loss_and_every_gradient_equal_pp1_exactly(results):
    result = case(results, "parent_pp2_vs_pp1")
    assert result["loss_pp"] == result["loss_ref"]
    assert len(result["loss_pp"]) == 4  # one loss per micro-batch
    keys = result["grad_keys"]
    for piece in ("embedding.word_embeddings", "output_layer", "decoder.layers.7.", "final_norm"):
        assert any(piece in key for key in keys), piece  # both stages' ends, global numbers
    assert result["grad_tensors"] == len(keys) > 40
    assert result["grad_max_abs_diff"] == 0.0


def test_pp2_tied_embeddings_sum_both_stages_gradients(results):
    result = case(results, "parent_tied_pp2_vs_pp1")
    assert result["tied"] and result["loss_pp"] == result["loss_ref"]
    assert not any("output_layer" in key for key in result["grad_keys"])  # one tied tensor
    assert result["grad_max_abs_diff"] <= TIED_GRAD_ATOL


@pytest.mark.parametrize("mode", ["masked", "narrow"])
def test_pp2_elastic_step_equals_pp1_at_every_axis_reduced(results, mode):
    result = case(results, f"elastic_{mode}_pp2_vs_pp1")
    assert result["reduced_axes"] == sorted(
        [
            "embedding",
            "attn_heads",
            "mamba_heads",
            "mamba_head_dim",
            "ffn",
            "moe_experts",
            "moe_ffn",
        ]
    )
    assert result["kd_pp"] == result["kd_ref"]
    assert result["grad_max_abs_diff"] == 0.0 and result["grad_tensors"] > 40
    assert result["router_grad_scale"] > 1e-3  # the router learns from this step
    assert result["router_grad_rel_diff"] <= ROUTER_GRAD_RTOL, result


@pytest.mark.parametrize("mode", ["masked", "narrow"])
def test_pp2_elastic_step_with_skipped_layers_on_both_stages_equals_pp1(results, mode):
    """The depth axis at 5 of 8 layers (global layer numbers: stage 0 skips layer 2, stage 1
    skips 5 and 7) with every width reduced: PP=2 gives PP=1's losses and gradients."""
    result = case(results, f"elastic_depth_{mode}_pp2_vs_pp1")
    assert "depth" in result["reduced_axes"] and len(result["reduced_axes"]) == 8
    assert result["choices_ref"][0]["depth"] == 5
    assert result["kd_pp"] == result["kd_ref"]
    assert result["grad_max_abs_diff"] == 0.0 and result["grad_tensors"] > 40
    assert result["router_grad_scale"] > 1e-3
    assert result["router_grad_rel_diff"] <= ROUTER_GRAD_RTOL, result
    stage0, stage1 = result["choices_by_stage"]
    assert stage0 == stage1 == result["choices_ref"]


@pytest.mark.parametrize("mode", ["masked", "narrow"])
def test_every_stage_and_micro_batch_applies_the_same_router_choice(results, mode):
    result = case(results, f"elastic_{mode}_pp2_vs_pp1")
    stage0, stage1 = result["choices_by_stage"]
    assert len(stage0) == len(stage1) == result["micro_batches"]
    assert stage0 == stage1 == result["choices_ref"]


def test_pp2_resume_is_bit_identical_for_three_steps_after_the_load(results):
    result = case(results, "resume_pp2")
    assert result["step"] == 2 and result["optimizer_entries"] > 0
    assert len(result["losses_ref"]) == 3
    assert result["losses_resumed"] == result["losses_ref"]
    assert result["weights_max_diff_after"] == 0.0


def test_pp2_checkpoint_loads_at_pp1_with_the_same_weights_and_loss(results):
    result = case(results, "reshard_pp2_to_pp1")
    assert result["load_info"] == {"resharded": True}
    assert all(n > 0 for n in result["stage_keys"])  # both stages wrote their part
    assert result["weights_tensors"] > 40 and result["weights_max_abs_diff"] == 0.0
    assert result["loss_pp1"] == result["loss_pp2"]


def test_export_reads_a_pp2_checkpoint(results, tmp_path):
    """``export`` (and ``slice``, ``importance``: the same loader) reads the PP=2 checkpoint."""
    from megatron_ext.config.compose import compose_recipe
    from recipes import export

    source = Path(case(results, "reshard_pp2_to_pp1")["source"])
    manifest = json.loads(next((source / "checkpoints").glob("iter_*/manifest.json")).read_text())
    assert manifest["layout"]["pp"] == 2
    cfg = compose_recipe(
        "export",
        [f"source.dir={source}", f"run.dir={tmp_path / 'run'}", "budget=S", "format=megatron"],
    )
    summary = export.run(cfg)
    assert [e["budget"] for e in summary["exports"]] == ["S"]
    assert summary["exports"][0]["bytes"] > 0


# The engine clips by the global gradient norm, summed over the stages at PP=2 in another
# order than in one backward at PP=1: the norm differs in the last bits (measured 3e-8
# relative), and so, through the clip factor, do the updates and the later losses (2.4e-8
# relative after 2 updates). Bound: 1e-6 relative; a stage's gradients left out of the norm
# or the update would change it by order one.
ENGINE_RTOL = 1e-6


def test_engine_at_pp2_trains_like_pp1_and_every_stage_reports_the_loss(results):
    result = case(results, "engine_parent_pp2_vs_pp1")
    (loss0, norm0), *_ = result["pp2"]
    assert loss0 == result["pp1"][0][0]  # the first loss: same weights, same schedule sums
    for (loss_ref, norm_ref), (loss, norm) in zip(result["pp1"], result["pp2"]):
        assert abs(loss - loss_ref) <= ENGINE_RTOL * abs(loss_ref)
        assert abs(norm - norm_ref) <= ENGINE_RTOL * abs(norm_ref)
    stage0, stage1 = result["ranks_agree"]
    assert stage0 == stage1 == result["pp2"]  # metrics are broadcast from the last stage


def test_train_parent_recipe_runs_two_pipeline_stages(tmp_path, data_overrides):
    """``star-elastic train-parent parallel.pp=2`` trains, evaluates and checkpoints."""
    import subprocess
    import sys

    run_dir = tmp_path / "pp2"
    args = [
        *data_overrides,
        "train.micro_batch_size=4",
        "train.seq_length=64",
        "train.warmup_steps=2",
        "train.eval_batches=2",
        "train.steps=4",
        "train.eval_interval=4",
        "train.save_interval=4",
        "logger=none",
        "parallel.nproc=2",
        "parallel.pp=2",
        f"run.dir={run_dir}",
    ]
    cmd = [sys.executable, "-m", "recipes.cli", "train-parent", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and 0 < summary["val_loss"] < 6.0  # ln(384) = 5.95 at init
    manifest = json.loads((run_dir / "checkpoints" / "iter_0000004" / "manifest.json").read_text())
    assert manifest["layout"]["pp"] == 2 and manifest["complete"]


def test_engine_elastic_step_at_pp2_equals_pp1_with_a_staged_teacher(results):
    """The engine's elastic step (router per micro-batch, the teacher staged and run first,
    chunked KD on the last stage): same budget, router choice, KD and cost error as PP=1 at
    every step; the grad norm (a sum over the stages) within ``ENGINE_RTOL``."""
    result = case(results, "engine_elastic_pp2_vs_pp1")
    assert len(result["pp1"]) == len(result["pp2"]) == 3
    for ref, got in zip(result["pp1"], result["pp2"]):
        kd_ref, cost_ref, norm_ref, budget_ref, widths_ref = ref
        kd, cost, norm, budget, widths = got
        assert (budget, widths) == (budget_ref, widths_ref)
        # measured: KD and cost error equal to the last bit, grad norm 9e-8 relative
        assert abs(kd - kd_ref) <= ENGINE_RTOL * abs(kd_ref)
        assert abs(cost - cost_ref) <= ENGINE_RTOL * abs(cost_ref)
        assert abs(norm - norm_ref) <= ENGINE_RTOL * abs(norm_ref)
    assert len({str(w) for *_, w in result["pp1"]}) > 1  # the router's choice changes
    stage0, stage1 = result["ranks_agree"]
    assert stage0 == stage1  # every stage reports the last stage's KD and the same choice


def test_engine_elastic_resume_at_pp2_is_bit_identical_for_two_steps(results):
    result = case(results, "engine_elastic_pp2_vs_pp1")
    assert len(result["pp2_continued"]) == 2
    assert result["pp2_resumed"] == result["pp2_continued"]


ELASTIC_SMOKE = [
    "curriculum=smoke",  # 8 steps over two stages of different sequence lengths
    "elastic_train.micro_batch_size=2",
    "elastic_train.eval_batches=2",
    "elastic_train.eval_seq_length=64",
    "elastic_train.eval_interval=4",
    "elastic_train.warmup_steps=2",
    "logger=none",
]


def test_train_elastic_recipe_at_pp2_trains_like_pp1(tmp_path, importance_run, data_overrides):
    """``star-elastic train-elastic parallel.pp=2`` (staged teacher and student) against the
    same run at PP=1 from the same checkpoint: the same router choice per budget at every
    evaluation and the same held-out losses within ``ENGINE_RTOL`` (the clip factor's
    rounding, see above; measured 5e-8 relative after 8 steps)."""
    import subprocess
    import sys

    from megatron_ext.config.compose import compose_recipe
    from recipes import train_elastic

    common = [f"source.dir={importance_run}", *data_overrides, *ELASTIC_SMOKE]
    ref = train_elastic.run(
        compose_recipe("train_elastic", [*common, f"run.dir={tmp_path / 'pp1'}"])
    )
    run_dir = tmp_path / "pp2"
    args = [*common, "parallel.nproc=2", "parallel.pp=2", f"run.dir={run_dir}"]
    cmd = [sys.executable, "-m", "recipes.cli", "train-elastic", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads((run_dir / "summary.json").read_text())
    assert got["steps"] == ref["steps"] == 8
    assert len(got["val_curve"]) == len(ref["val_curve"]) == 2
    for val, val_ref in zip(got["val_curve"], ref["val_curve"]):
        assert {k: v for k, v in val.items() if k.startswith("router/")} == {
            k: v for k, v in val_ref.items() if k.startswith("router/")
        }
        for key in (k for k in val_ref if k.startswith("val/")):
            assert abs(val[key] - val_ref[key]) <= ENGINE_RTOL * abs(val_ref[key]), key
    for name, budget in ref["budgets"].items():
        assert got["budgets"][name]["router_choice"] == budget["router_choice"]
        assert abs(got["budgets"][name]["val_loss"] - budget["val_loss"]) <= ENGINE_RTOL * abs(
            budget["val_loss"]
        )
    assert abs(got["parent_val_loss"] - ref["parent_val_loss"]) <= ENGINE_RTOL * abs(
        ref["parent_val_loss"]
    )
    manifest = json.loads((run_dir / "checkpoints" / "iter_0000008" / "manifest.json").read_text())
    assert manifest["layout"]["pp"] == 2 and manifest["complete"]

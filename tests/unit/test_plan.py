"""The memory planner: its arithmetic per component, its refusal, and its prediction vs a
measured step.

Hand counts are written out from the layer shapes (megatron-core's local layers, no biases).
The prediction-vs-measurement tolerance is the issue's: within 15% of the peak of live tensor
bytes of a real train-elastic step (student, frozen teacher, chunked KD, Adam; see
megatron_ext.plan.measure). bench/longseq.py covers sequence 256..4096, hidden 128..512, with
and without full recompute, at PP=1 (measured 1.000..1.098) and PP=2 (0.923..1.041).
"""

from __future__ import annotations

import pytest
import torch

from megatron_ext.config.compose import compose_recipe
from megatron_ext.models.builder import build_model
from megatron_ext.models.config import ConfigError, HybridModelConfig
from megatron_ext.parallel import ParallelConfig, init_distributed
from megatron_ext.plan.budget import PlanInputs, StageLength, check_fits, plan_memory
from megatron_ext.plan.counts import layer_activations, layer_params
from megatron_ext.plan.measure import measure_elastic_step
from megatron_ext.plan.meter import LiveTensorMeter
from recipes.cli import main as cli_main
from recipes.plan import plan_inputs

TINY = HybridModelConfig()  # h 128, Mamba 8 heads x 16, state 16, 2 groups; vocab 384


@pytest.fixture(scope="module")
def pgs():
    return init_distributed(ParallelConfig())


def test_layer_parameter_counts_equal_hand_counts_and_the_built_model(pgs):
    h = 128
    mamba = h * (2 * 128 + 2 * 2 * 16 + 8) + 192 * (4 + 1) + 3 * 8 + 128 + 128 * h + h
    attention = h * (4 * 32 + 2 * 2 * 32) + 4 * 32 * h + h
    mlp = h * 256 + 256 * h + h
    moe = h + 8 * h + 128 * h * 2 + 8 * (h * 64 + 64 * h)
    hand = {"M": mamba, "*": attention, "-": mlp, "E": moe}
    model = build_model(TINY, ParallelConfig(), pgs, meta=True)
    for i, kind in enumerate(TINY.pattern):
        built = sum(p.numel() for p in model.decoder.layers[i].parameters())
        assert layer_params(TINY, kind).total == hand[kind] == built, kind


def _inputs(**kw) -> PlanInputs:
    base = dict(model=TINY, stages=[StageLength("s", 256, steps=3)], micro_batch_size=2)
    return PlanInputs(**{**base, **kw})


def test_weights_grads_and_optimizer_are_parameters_times_their_bytes():
    params = sum(layer_params(TINY, k).total for k in TINY.pattern) + 2 * 384 * 128 + 128
    fp32 = plan_memory(_inputs())[0].per_pp_stage[0]
    assert (fp32["weights"], fp32["grads"], fp32["optimizer"]) == (
        4 * params,
        4 * params,
        8 * params,
    )
    # bf16: bf16 weights, fp32 grads, two fp32 moments + fp32 main params; ZeRO-1 over DP=4
    bf16 = plan_memory(_inputs(precision="bf16", nproc=4, distributed_optimizer=True))[0]
    part = bf16.per_pp_stage[0]
    assert (part["weights"], part["grads"]) == (2 * params, 4 * params)
    assert part["optimizer"] == pytest.approx(12 * params / 4)
    assert part["teacher"] == 2 * params + 2 * 256 * 128 * 2  # its weights + final hidden
    assert bf16.tokens_per_step == 4 * 2 * 256 and bf16.steps == 3


def test_activations_of_an_mlp_stack_are_its_saved_elements_times_the_tokens():
    cfg = HybridModelConfig(pattern="--", hidden_size=64, ffn_hidden_size=96)
    part = plan_memory(_inputs(model=cfg))[0].per_pp_stage[0]
    per_layer = 3 * 64 + 1 + 2 * 96  # pre-norm (input, normed, residual, rstd) + fc1 in/out
    assert layer_activations(cfg, "-", 256) == per_layer
    edges = 64 + 3 * 64 + 1  # embedding output, final norm
    assert part["activations"] == (2 * per_layer + edges) * 2 * 256 * 4
    full = plan_memory(_inputs(model=cfg, recompute="full"))[0].per_pp_stage[0]
    assert full["activations"] == (2 * 64 + per_layer + edges) * 2 * 256 * 4


def test_pipeline_stages_split_parameters_and_hold_their_micro_batches_in_flight():
    # 4 MLP layers over 2 stages, 4 micro-batches of 2 x 256 tokens per step (1F1B)
    cfg = HybridModelConfig(pattern="----", hidden_size=64, ffn_hidden_size=96)
    inp = _inputs(model=cfg, nproc=2, pp=2, global_batch_size=8, kd_chunk_size=64)
    plan = plan_memory(inp)[0]
    first, last = plan.per_pp_stage
    layer = 64 * 96 + 96 * 64 + 64  # fc1, fc2, pre-norm weight
    params = [2 * layer + 384 * 64, 2 * layer + 64 + 384 * 64]  # + embedding | final norm, output
    for part, n in zip(plan.per_pp_stage, params):
        assert (part["weights"], part["grads"], part["optimizer"]) == (4 * n, 4 * n, 8 * n)
    tokens = 2 * 256
    # the teacher's stage weights; on the last stage its hidden states of all 4 micro-batches
    assert first["teacher"] == 4 * params[0]
    assert last["teacher"] == 4 * params[1] + 4 * tokens * 64 * 4
    per_layer = 3 * 64 + 1 + 2 * 96
    # 1F1B: the first stage holds pp - 0 = 2 micro-batches in flight, the last one
    assert first["activations"] == (2 * per_layer * 2 + 64) * tokens * 4  # + embedding output
    assert last["activations"] == (2 * per_layer * 1 + 3 * 64 + 1) * tokens * 4  # + final norm
    assert first["backward"] == last["backward"] == 2 * 96 * tokens * 4
    kd = 10 * 4 * 64 * 2 * 384 + 384 * 64 * 4 + tokens * 64 * 4
    assert (first["kd_chunk"], last["kd_chunk"]) == (0, kd)  # the loss lives on the last stage
    kept = [
        sum(v for k, v in part.items() if k not in ("backward", "kd_chunk"))
        for part in (first, last)
    ]
    assert plan.total(0) == kept[0] + first["backward"]
    assert plan.total(1) == kept[1] + max(last["backward"], kd)


def test_under_full_recompute_the_recomputed_layer_and_the_kd_chunk_do_not_add_up():
    cfg = HybridModelConfig(pattern="--", hidden_size=64, ffn_hidden_size=96)
    plan = plan_memory(_inputs(model=cfg, recompute="full", kd_chunk_size=256))[0]
    part = plan.per_pp_stage[0]
    tokens, per_layer = 2 * 256, 3 * 64 + 1 + 2 * 96
    once = per_layer * tokens * 4  # one layer's activations while the backward recomputes it
    working = 2 * 96 * tokens * 4  # its backward's gradients, on top of them
    assert plan.recomputed == [once] and part["backward"] == working
    kept = sum(v for k, v in part.items() if k not in ("backward", "kd_chunk"))
    # the loss runs before any layer is recomputed: the peak is the larger of the two
    assert plan.total(0) == kept - once + max(once + working, part["kd_chunk"])


def test_the_kd_chunk_grows_with_the_chunk_not_the_sequence():
    one = plan_memory(_inputs(kd_chunk_size=64, stages=[StageLength("s", 1024, steps=1)]))[0]
    two = plan_memory(_inputs(kd_chunk_size=64, stages=[StageLength("s", 8192, steps=1)]))[0]
    whole = plan_memory(_inputs(kd_chunk_size=0, stages=[StageLength("s", 8192, steps=1)]))[0]
    logits = 10 * 4 * 64 * 2 * 384  # 10 fp32 copies of a [64, 2, 384] chunk
    grads = 384 * 128 * 4  # the output layer's gradient accumulator
    assert one.per_pp_stage[0]["kd_chunk"] == logits + grads + 2 * 1024 * 128 * 4
    assert two.per_pp_stage[0]["kd_chunk"] - one.per_pp_stage[0]["kd_chunk"] == 2 * 7168 * 128 * 4
    assert whole.per_pp_stage[0]["kd_chunk"] > 50 * one.per_pp_stage[0]["kd_chunk"]


def test_a_run_over_the_gpu_memory_is_refused_naming_the_component_and_the_fix():
    inp = _inputs(gpu_memory_gb=0.05, stages=[StageLength("long", 4096, steps=1)])
    with pytest.raises(ConfigError, match=r"cluster.gpu_memory_gb.*'long'.*activations.*recompute"):
        check_fits(inp, plan_memory(inp))
    check_fits(_inputs(gpu_memory_gb=1.0), plan_memory(_inputs(gpu_memory_gb=1.0)))


@pytest.mark.parametrize(
    ("section", "fix"),
    [("elastic_train", "lower the micro-batch size"), ("train", "train.recompute=full")],
)
def test_the_activation_advice_names_only_fixes_the_recipe_accepts(section, fix):
    inp = _inputs(gpu_memory_gb=0.05, stages=[StageLength("long", 4096, steps=1)], section=section)
    with pytest.raises(ConfigError, match="activations") as err:
        check_fits(inp, plan_memory(inp))
    advice = str(err.value).split("): ", 1)[1]
    assert advice.startswith(fix) or f"set {fix}" in advice, advice
    if section == "elastic_train":  # the engine refuses elastic_train.recompute=full
        assert "set elastic_train.recompute=full" not in advice


def test_the_meter_counts_live_storages_views_once_and_their_release():
    meter = LiveTensorMeter()
    with meter:
        a = torch.zeros(1024, 256)  # 1 MiB
        view = a[:10]
        b = a + 1
        del a, b
        assert meter.current == 1024 * 256 * 4  # the view keeps a's storage alive
        del view
    assert meter.current == 0 and meter.peak == 2 * 1024 * 256 * 4


@pytest.mark.parametrize("hidden,seq", [(128, 256), (256, 512)])
def test_predicted_peak_is_within_15_percent_of_a_measured_train_elastic_step(pgs, hidden, seq):
    cfg = HybridModelConfig(hidden_size=hidden, ffn_hidden_size=2 * hidden)
    measured = measure_elastic_step(cfg, seq, 1, 128, pgs)
    plan = plan_memory(
        PlanInputs(model=cfg, stages=[StageLength("s", seq, steps=1)], kd_chunk_size=128)
    )[0]
    assert 0.85 <= plan.total(0) / measured <= 1.15, (plan.per_pp_stage[0], measured)


def test_plan_reads_the_training_recipe_config_and_the_cli_prints_it(capsys):
    engine = ["elastic_train.precision=bf16", "elastic_train.recompute=selective"]
    cfg = compose_recipe("train_elastic", ["model=nano_v3", "curriculum=star_elastic", *engine])
    inp = plan_inputs(cfg, "train-elastic")
    assert [s.seq_length for s in inp.stages] == [8192, 49152]
    assert inp.precision == "bf16" and inp.recompute == "selective" and inp.teacher
    assert inp.distributed_optimizer and inp.kd_chunk_size == 1024  # the recipe's defaults
    assert cli_main(["plan", "curriculum=star_elastic"]) == 0
    out = capsys.readouterr().out
    assert "stage stage2_49k: seq 49152" in out and "kd_chunk" in out and "peak" in out


def test_slurm_submission_runs_the_planner_first_and_submits_nothing_that_cannot_fit(
    tmp_path, capsys
):
    code = cli_main(
        [
            "train-parent",
            "cluster=slurm",
            "cluster.dry_run=true",
            "cluster.gpus_per_node=1",
            "cluster.gpu_memory_gb=0.01",
            f"run.dir={tmp_path / 'run'}",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "cluster.gpu_memory_gb" in err and "needs" in err
    assert not (tmp_path / "run").exists()  # nothing rendered, nothing written

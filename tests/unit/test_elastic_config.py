"""Elastic config validation: every bad value fails naming the field and what to change."""

from __future__ import annotations

import re

import pytest

from megatron_ext.elastic.config import AXES, BUDGET_KINDS, Budget, ElasticConfig
from megatron_ext.models.config import ConfigError, HybridModelConfig
from megatron_ext.parallel import ParallelConfig

# The default HybridModelConfig: "M*ME-M*E", hidden 128, 4 heads in 2 groups x kv 32,
# ffn 256, Mamba 8 heads x 16 dims in 2 groups, 8 experts top-2, expert ffn 64.
AXES_TP1 = {
    "embedding": [128, 96, 64],
    "attn_heads": [4, 2],
    "mamba_heads": [8, 4],
    "mamba_head_dim": [16],
    "ffn": [256, 192, 128],
    "moe_experts": [8, 6, 4],
    "moe_ffn": [64, 48, 32],
}
# At TP=2 every per-rank GEMM input must still be a multiple of 16: expert ffn 48/2 = 24 fails.
AXES_TP2 = {**AXES_TP1, "moe_ffn": [64, 32]}
# At EP=2 every expert count must split over two ranks.
AXES_EP2 = {**AXES_TP1, "moe_experts": [8, 6, 4, 2]}

BUDGETS = [Budget("full", 1.0), Budget("large", 0.75), Budget("small", 0.5)]


def _cfg(axes=None, budgets=None, **kwargs) -> ElasticConfig:
    return ElasticConfig(
        axes=AXES_TP1 if axes is None else axes,
        budgets=BUDGETS if budgets is None else budgets,
        **kwargs,
    )


def _raises(field: str, *also: str):
    return pytest.raises(ConfigError, match=re.escape(field) + "".join(f".*{a}" for a in also))


def test_axis_and_budget_kind_names():
    assert len(AXES) == 7 and len(set(AXES)) == 7
    assert BUDGET_KINDS == ("params", "active_params", "memory", "latency")


@pytest.mark.parametrize(
    ("axes", "parallel"),
    [(AXES_TP1, ParallelConfig()), (AXES_TP2, ParallelConfig(nproc=2, tp=2))]
    + [(AXES_EP2, ParallelConfig(nproc=2, ep=2))],
    ids=["tp1", "tp2", "ep2"],
)
def test_valid_tiny_config_passes(axes, parallel):
    model = HybridModelConfig()
    parallel.check_model(model)
    _cfg(axes).validate_for(model, parallel)


# --- rules checked by __post_init__ -------------------------------------------------------


def test_unknown_axis_is_rejected():
    with _raises("elastic.axes", "unknown axis 'layers'"):
        _cfg({"layers": [8, 4]})


def test_depth_choices_start_at_every_layer_and_keep_every_layer_kind():
    model = HybridModelConfig()  # "M*ME-M*E": 8 layers of 4 kinds
    _cfg({**AXES_TP1, "depth": [8, 6, 4]}).validate_for(model, ParallelConfig())
    with _raises("elastic.axes.depth", "first choice 7", "start the list with 8"):
        _cfg({"depth": [7, 5]}).validate_for(model, ParallelConfig())
    with _raises("elastic.axes.depth", "choice 3 would drop a whole layer kind", "at least 4"):
        _cfg({"depth": [8, 3]}).validate_for(model, ParallelConfig())
    assert _cfg({"depth": [8, 6]}).full_widths(model)["depth"] == 8


def test_choices_must_be_positive_integers():
    with _raises("elastic.axes.ffn", "positive integer"):
        _cfg({"ffn": [256, 0]})
    with _raises("elastic.axes.ffn", "positive integer"):
        _cfg({"ffn": [256, 128.0]})
    with _raises("elastic.axes.ffn", "at least one"):
        _cfg({"ffn": []})


def test_choices_must_be_unique():
    with _raises("elastic.axes.ffn", "unique", r"\[128\]"):
        _cfg({"ffn": [256, 128, 128]})


def test_choices_must_be_strictly_descending_and_error_shows_the_sorted_fix():
    with _raises("elastic.axes.ffn", "descending", re.escape("write [256, 192, 128]")):
        _cfg({"ffn": [128, 256, 192]})


def test_budget_names_must_be_unique():
    with _raises("elastic.budgets", "unique", "'a'"):
        _cfg(budgets=[Budget("a", 1.0), Budget("a", 0.5)])
    with _raises("elastic.budgets", "at least one"):
        _cfg(budgets=[])


@pytest.mark.parametrize("target", [0.0, -0.5, 1.5])
def test_budget_target_must_be_a_fraction_in_zero_one(target):
    with _raises("elastic.budgets[b].target", re.escape("(0, 1]")):
        Budget("b", target)


def test_budget_kind_and_name_are_checked():
    with _raises("elastic.budgets[b].kind", "flops"):
        Budget("b", 0.5, kind="flops")
    with _raises("elastic.budgets[].name"):
        Budget("", 0.5)
    with _raises("elastic.budgets[b].widths", "unknown axis"):
        Budget("b", 0.5, widths={"layers": 4})


def test_explicit_widths_must_be_among_the_axis_choices():
    with _raises("elastic.budgets[b].widths.ffn", "160 is not one of"):
        _cfg(budgets=[Budget("b", 0.5, widths={"ffn": 160})])
    with _raises("elastic.budgets[b].widths.ffn", "not elastic"):
        _cfg({"embedding": [128, 64]}, budgets=[Budget("b", 0.5, widths={"ffn": 128})])


def test_compute_quant_block_and_router_hidden_are_checked():
    with _raises("elastic.compute", "masked"):
        _cfg(compute="sparse")
    with _raises("elastic.quant_block"):
        _cfg(quant_block=0)
    with _raises("elastic.router_hidden"):
        _cfg(router_hidden=0)


def test_budgets_given_as_plain_dicts_become_budgets():
    cfg = _cfg(budgets=[{"name": "s", "target": 0.5, "widths": {"ffn": 128}}])
    assert isinstance(cfg.budgets[0], Budget) and cfg.budgets[0].kind == "params"


# --- rules checked by validate_for ---------------------------------------------------------

TP1, TP2, EP2 = ParallelConfig(), ParallelConfig(nproc=2, tp=2), ParallelConfig(nproc=2, ep=2)


def _validate(axes, parallel=TP1, model=None, **kwargs):
    _cfg(axes, **kwargs).validate_for(model or HybridModelConfig(), parallel)


def test_first_choice_must_be_the_full_width():
    with _raises("elastic.axes.embedding", "model.hidden_size=128", "start the list with 128"):
        _validate({"embedding": [96, 64]})


def test_axis_whose_layer_kind_is_absent_is_rejected():
    with _raises("elastic.axes.ffn", "no '-' layers"):
        _validate({"ffn": [256, 128]}, model=HybridModelConfig(pattern="M*ME"))


def test_embedding_widths_must_be_multiples_of_the_quant_block():
    with _raises("elastic.axes.embedding", "choice 120", "quant_block=16", "multiples of 16"):
        _validate({"embedding": [128, 120]})


def test_embedding_needs_no_tp_split():
    _validate({"embedding": [128, 112, 16]}, TP2)


def test_ffn_widths_must_divide_by_tp():
    with _raises("elastic.axes.ffn", "choice 129", "parallel.tp=2"):
        _validate({"ffn": [256, 129]}, TP2, quant_block=1)


def test_ffn_per_rank_width_must_be_a_multiple_of_the_quant_block():
    _validate({"ffn": [256, 208]}, TP1)
    with _raises("elastic.axes.ffn", "choice 208", "per-rank width", "multiples of 32"):
        _validate({"ffn": [256, 208]}, TP2)


def test_attention_heads_must_stay_whole_per_query_group():
    model = HybridModelConfig(num_attention_heads=8, num_query_groups=4, kv_channels=16)
    with _raises("elastic.axes.attn_heads", "choice 6", "num_query_groups=4"):
        _validate({"attn_heads": [8, 6]}, model=model)


def test_attention_per_rank_inner_width_must_be_a_multiple_of_the_quant_block():
    model = HybridModelConfig(num_attention_heads=8, num_query_groups=2, kv_channels=4)
    _validate({"attn_heads": [8, 4]}, TP1, model=model)
    with _raises("elastic.axes.attn_heads", "choice 2", "linear_proj"):
        _validate({"attn_heads": [8, 4, 2]}, TP1, model=model)
    with _raises("elastic.axes.attn_heads", "choice 4", re.escape("choice*4/2")):
        _validate({"attn_heads": [8, 4]}, TP2, model=model)


def test_mamba_heads_must_stay_whole_per_mamba_group():
    with _raises("elastic.axes.mamba_heads", "choice 6", "mamba_num_groups=4"):
        model = HybridModelConfig(mamba_num_groups=4)
        _validate({"mamba_heads": [8, 6]}, model=model, quant_block=1)


def test_mamba_inner_width_must_be_a_multiple_of_the_quant_block_for_every_combination():
    # 2 heads x 8 dims = 16 fits one rank, but over TP=2 each rank's out_proj input is 8
    both = {"mamba_heads": [8, 2], "mamba_head_dim": [16, 8]}
    _validate(both, TP1)
    with _raises("elastic.axes.mamba_heads", "choice 2", "mamba_head_dim 8", "out_proj"):
        _validate(both, TP2)
    with _raises("elastic.axes.mamba_head_dim", "choice 2", "mamba_heads 8", "out_proj"):
        _validate({"mamba_head_dim": [16, 2]}, TP2)


def test_expert_counts_must_divide_by_ep():
    with _raises("elastic.axes.moe_experts", "choice 3", "parallel.ep=2"):
        _validate({"moe_experts": [8, 6, 3]}, EP2)


def test_expert_counts_must_cover_the_router_top_k():
    with _raises("elastic.axes.moe_experts", "choice 1", "moe_router_topk=2"):
        _validate({"moe_experts": [8, 4, 1]})


def test_expert_ffn_per_rank_width_must_be_a_multiple_of_the_quant_block():
    with _raises("elastic.axes.moe_ffn", "choice 40", "expert fc2"):
        _validate({"moe_ffn": [64, 40]})
    with _raises("elastic.axes.moe_ffn", "choice 48", "per-rank"):
        _validate({"moe_ffn": [64, 48]}, TP2)


def test_full_width_that_cannot_fit_the_layout_says_so():
    model = HybridModelConfig(ffn_hidden_size=200)
    with _raises("elastic.axes.ffn", "choice 200", "even the full width 200"):
        _validate({"ffn": [200, 160]}, model=model)


# --- widths ---------------------------------------------------------------------------------


def test_full_widths_cover_the_axes_present_in_the_model():
    model = HybridModelConfig(pattern="M*M")
    assert _cfg().full_widths(model) == {
        "embedding": 128,
        "attn_heads": 4,
        "mamba_heads": 8,
        "mamba_head_dim": 16,
    }


def test_widths_for_a_budget_are_its_explicit_widths_else_full():
    cfg = _cfg(
        {"ffn": [256, 128], "moe_experts": [8, 4]},
        budgets=[Budget("full", 1.0), Budget("s", 0.5, widths={"ffn": 128})],
    )
    assert cfg.widths_for("s") == {"ffn": 128, "moe_experts": 8}
    with_model = cfg.widths_for("s", HybridModelConfig())
    assert with_model["ffn"] == 128 and with_model["embedding"] == 128
    assert with_model["moe_ffn"] == 64
    with _raises("elastic.budgets", "no budget named 'x'"):
        cfg.widths_for("x")

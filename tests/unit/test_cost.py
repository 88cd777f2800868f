"""The cost model of a choice of widths (megatron_ext.elastic.cost).

The parameter count is checked against real models, not against a copy of its formula: for
width combinations drawn from ``conf/elastic/tiny.yaml``'s choices, the plain megatron-core
model is sliced (``slice_model`` + ``build_slice``, strict load) and counted with
``count_parameters``; total and active must be equal, exactly (float64 holds these integers
exactly). A second model shape (swiglu, tied embeddings, other pattern, kv width, Mamba groups
and state, top-k, vocab) catches hard-coded constants.

Each cost is multilinear in the widths (degree one in each width alone), so the gradient
w.r.t. a tensor width equals the central difference over integer widths ±1 exactly, up to
float64 rounding of numbers below 1e12 (relative 1e-12).
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from megatron_ext.elastic.config import ElasticConfig
from megatron_ext.elastic.controller import ElasticController, StripeLayout
from megatron_ext.elastic.cost import CostModel, CostSpec
from megatron_ext.elastic.slicing import build_slice, slice_model
from megatron_ext.models.builder import build_model
from megatron_ext.models.config import ConfigError, HybridModelConfig
from megatron_ext.models.params import count_parameters
from megatron_ext.parallel import ParallelConfig, init_distributed, set_seed

KINDS = ("params", "active_params", "memory", "latency")
TINY = HybridModelConfig()
OTHER = HybridModelConfig(
    name="other",
    pattern="*EM-E*M",
    vocab_size=320,
    activation="swiglu",
    tie_embeddings=True,
    kv_channels=16,
    mamba_state_dim=8,
    mamba_num_groups=4,
    moe_router_topk=3,
    moe_shared_expert_ffn_hidden_size=64,
)
COMBOS = 24
CONF = Path(__file__).resolve().parents[2] / "conf"


def tiny_choices() -> dict[str, list[int]]:
    raw = yaml.safe_load((CONF / "elastic" / "tiny.yaml").read_text())
    return {axis: list(choices) for axis, choices in raw["axes"].items()}


def draws(choices: dict[str, list[int]], n: int, seed: int) -> list[dict[str, int]]:
    """Full, smallest, then ``n`` distinct random combinations of the choices."""
    rng = random.Random(seed)
    everything = [dict(zip(choices, c)) for c in itertools.product(*choices.values())]
    full = {a: c[0] for a, c in choices.items()}
    small = {a: c[-1] for a, c in choices.items()}
    return [full, small, *rng.sample(everything[1:-1], n)]


@pytest.fixture(scope="module", params=[TINY, OTHER], ids=["tiny", "swiglu_tied"])
def shape(request):
    cfg = request.param
    choices = tiny_choices()
    ElasticConfig(axes=choices, budgets=[{"name": "L", "target": 1.0}]).validate_for(
        cfg, ParallelConfig()
    )
    parallel = ParallelConfig()
    pgs = init_distributed(parallel)
    set_seed(5)
    model = build_model(cfg, parallel, pgs)  # random weights
    return cfg, choices, model, pgs


def sliced_counts(cfg, model, pgs, widths):
    ctrl = ElasticController(cfg, StripeLayout())
    small_cfg, state = slice_model(model, widths, ctrl)
    return count_parameters(build_slice(small_cfg, state, pg_collection=pgs), small_cfg)


def test_params_and_active_params_equal_the_sliced_models_count(shape):
    cfg, choices, model, pgs = shape
    total, active = CostModel(cfg, CostSpec("params")), CostModel(cfg, CostSpec("active_params"))
    full = count_parameters(model, cfg)
    assert total.full() == full.total and active.full() == full.active
    for widths in draws(choices, COMBOS, seed=len(cfg.pattern) + cfg.vocab_size):
        counts = sliced_counts(cfg, model, pgs, widths)
        assert total(widths).item() == counts.total, widths
        assert active(widths).item() == counts.active, widths
        assert total.params(widths).item() == counts.total
        assert active.active_params(widths).item() == counts.active


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_is_finite_positive_and_equals_the_exact_difference(kind):
    choices = tiny_choices()
    cost = CostModel(TINY, CostSpec(kind, batch=2, seq_length=256))
    at = {a: c[-1] for a, c in choices.items()}
    widths = {a: torch.tensor(float(w), requires_grad=True) for a, w in at.items()}
    value = cost(widths)
    assert value.dtype == torch.float64 and value.item() == cost(at).item()
    value.backward()
    for axis, w in widths.items():
        grad = w.grad.item()
        up, down = cost({**at, axis: at[axis] + 1}), cost({**at, axis: at[axis] - 1})
        diff = (up - down).item() / 2
        assert torch.isfinite(w.grad) and grad > 0, (axis, grad)
        assert grad == pytest.approx(diff, rel=1e-12), axis


@pytest.mark.parametrize("kind", ("memory", "latency"))
def test_memory_and_latency_grow_with_every_width(kind):
    choices = tiny_choices()
    cost = CostModel(TINY, CostSpec(kind))
    for widths in draws(choices, 10, seed=3):
        for axis, options in choices.items():
            values = [cost({**widths, axis: c}).item() for c in options]  # descending widths
            assert all(a > b for a, b in itertools.pairwise(values)), (axis, values)


# A hand-computed case: pattern "M*", H=16, V=32 (untied), attention 2 heads x kv 8 in 1
# group, Mamba 2 heads x dim 4 (d=8), 1 group, state 2 (2GN=4), conv kernel 4 (c=d+4=12).
HAND = HybridModelConfig(
    name="hand",
    pattern="M*",
    hidden_size=16,
    vocab_size=32,
    num_attention_heads=2,
    num_query_groups=1,
    kv_channels=8,
    mamba_num_heads=2,
    mamba_head_dim=4,
    mamba_state_dim=2,
    mamba_num_groups=1,
)
HAND_PARAMS = (
    (32 * 16 + 32 * 16 + 16)  # embedding, output layer, final norm = 1040
    + (16 + 16 * (2 * 8 + 4 + 2) + 12 * 4 + 12 + 3 * 2 + 8 + 8 * 16)  # Mamba = 570
    + (16 + 16 * (2 + 2 * 1) * 8 + 2 * 8 * 16)  # attention = 784
)  # = 2394
SPEC = dict(batch=2, seq_length=8, bytes_per_param=2.0, kv_bytes=2.0, state_bytes=4.0)


def test_memory_and_latency_at_full_width_equal_the_hand_computed_formula():
    assert HAND_PARAMS == 2394
    parallel = ParallelConfig()
    built = build_model(HAND, parallel, init_distributed(parallel), meta=True)
    assert count_parameters(built, HAND).total == HAND_PARAMS
    assert CostModel(HAND, CostSpec("params", **SPEC)).full() == 2394
    kv = 2 * 2 * 8 * 1 * 8 * 2.0  # K and V x batch x seq x groups x kv_channels x bytes = 512
    state = 2 * (8 * 2 + 12 * (4 - 1)) * 4.0  # batch x (d x N + c x (K - 1)) x bytes = 416
    assert CostModel(HAND, CostSpec("memory", **SPEC)).full() == 2394 * 2.0 + kv + state == 5716
    attn = 2 * 2 * 8 * 8**2  # 2 x heads x kv_channels x seq^2 = 2048
    latency = 2 * (2394 * 8 + attn)  # batch x (active params x seq + attention) = 42400
    assert CostModel(HAND, CostSpec("latency", **SPEC)).full() == latency == 42400


def test_latency_table_interpolates_linearly_per_layer(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"ffn": {"128": 1.0, "256": 3.0}, "embedding": {"128": 0.5}}))
    cost = CostModel(TINY, CostSpec("latency", latency_table=str(path)))
    layers = TINY.num_layers  # embedding touches every layer; ffn only the one '-' layer
    assert cost.full() == pytest.approx(3.0 + 0.5 * layers)
    ffn = torch.tensor(192.0, requires_grad=True)
    value = cost({"ffn": ffn})
    assert value.item() == pytest.approx(2.0 + 0.5 * layers)
    value.backward()
    assert ffn.grad.item() == pytest.approx(2.0 / 128)


def test_spec_and_widths_are_validated_with_the_field_named(tmp_path):
    with pytest.raises(ConfigError, match=r"cost\.kind"):
        CostSpec("flops")
    with pytest.raises(ConfigError, match=r"cost\.batch"):
        CostSpec("memory", batch=0)
    with pytest.raises(ConfigError, match=r"cost\.kv_bytes"):
        CostSpec("memory", kv_bytes=-1)
    with pytest.raises(ConfigError, match=r"cost\.latency_table"):
        CostSpec("latency", latency_table=str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"depth": {"4": 1.0}}))
    with pytest.raises(ConfigError, match=r"cost\.latency_table"):
        CostModel(TINY, CostSpec("latency", latency_table=str(bad)))
    cost = CostModel(TINY, CostSpec("params"))
    with pytest.raises(ValueError, match="unknown axis"):
        cost({"hidden": 64})
    with pytest.raises(ValueError, match="0-dim"):
        cost({"ffn": torch.tensor([128.0])})

"""The depth axis: layer importance, ranking, skipped layers, slicing, cost and decoding.

A skipped layer is the identity on the residual stream; masked compute runs it and drops
its output, narrow compute does not run it. Tolerances: an exact identity is checked with
``torch.equal``; masked vs narrow vs sliced logits differ only by fp32 summation order
(the other axes' narrow GEMMs), <= 1e-5 as in test_elastic_layers.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_ext.elastic.config import Budget, ElasticConfig
from megatron_ext.elastic.controller import ElasticController, StripeLayout
from megatron_ext.elastic.convert import convert_to_elastic
from megatron_ext.elastic.cost import CostModel, CostSpec
from megatron_ext.elastic.depth import kept_pattern, layer_order, layer_removal_scores
from megatron_ext.elastic.feasible import feasible_set
from megatron_ext.elastic.router import ElasticRouter, RouterConfig
from megatron_ext.elastic.slicing import build_slice, slice_model
from megatron_ext.generate.decode import CachedDecoder, generate
from megatron_ext.generate.sampling import Sampler
from megatron_ext.generate.sources import ElasticBudgets, SliceBudgets
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.parallel import ParallelConfig
from tests.unit.test_elastic_layers import ATOL, MODEL, SMALL, batch, build, logits, make_world

# "M*ME-M*E": keep 0 (M), 1 (*), 3 (E), 4 (-) first, then 2 (M), 5 (M), 6 (*), 7 (E)
ORDER = (1, 0, 3, 4, 5, 2, 7, 6)
STRIPES = StripeLayout(layer_order=ORDER)
DEPTHS = [8, 6, 4]


@pytest.fixture(scope="module")
def world():
    return make_world()


def elastic_model(world, seed: int = 7, mode: str = "masked"):
    model = build(world, seed=seed)
    ctrl = ElasticController(MODEL, STRIPES, mode=mode)
    return convert_to_elastic(model, ctrl), ctrl


def calibration(n: int = 2) -> list[dict[str, torch.Tensor]]:
    tokens, pos, _ = batch()
    return [{"tokens": tokens.roll(17 * i, dims=1), "position_ids": pos} for i in range(n)]


# ---- importance and ranking --------------------------------------------------------------


def _without_layer(world, model, j: int):
    """The plain model of the pattern without layer ``j``, its weights copied by hand."""
    cfg = dataclasses.replace(MODEL, pattern=MODEL.pattern[:j] + MODEL.pattern[j + 1 :])
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("decoder.layers."):
            i, rest = key[len("decoder.layers.") :].split(".", 1)
            if int(i) == j:
                continue
            key = f"decoder.layers.{int(i) - (int(i) > j)}.{rest}"
        state[key] = value
    return build_slice(cfg, state, pg_collection=world[1]).eval()


def test_depth_importance_matches_a_brute_force_recomputation(world):
    model = build(world, seed=11)
    data = calibration()
    got = layer_removal_scores(model, data, world[1])
    _, _, mask = batch()
    full = [model(b["tokens"], b["position_ids"], mask).double() for b in data]
    den = sum(float(f.square().sum()) for f in full)
    assert sorted(got) == list(range(MODEL.num_layers))
    for j in range(MODEL.num_layers):
        small = _without_layer(world, model, j)
        with torch.no_grad():
            num = sum(
                float((f - small(b["tokens"], b["position_ids"], mask).double()).square().sum())
                for f, b in zip(full, data)
            )
        # the same fp32 logits, summed in float64: agreement to float64 rounding
        assert got[j] == pytest.approx(num / den, rel=1e-9), j
        assert got[j] > 0


def test_layer_ranking_is_across_kinds_with_every_kinds_best_layer_first():
    pattern = "M*ME-M*E"
    scores = {0: 0.1, 1: 0.02, 2: 0.9, 3: 0.5, 4: 0.01, 5: 0.3, 6: 0.04, 7: 0.2}
    order = layer_order(scores, pattern)
    # leaders (best of each kind, by score): M2, E3, *6, -4; then the rest by score
    assert order == (2, 3, 6, 4, 5, 7, 0, 1)
    for depth in range(len(set(pattern)), len(pattern) + 1):
        assert set(kept_pattern(pattern, order[:depth])) == set(pattern)
    with pytest.raises(ValueError, match="no depth score for layers"):
        layer_order({0: 1.0}, pattern)


def test_depth_keeps_nested_prefixes_of_the_ranking():
    ctrl = ElasticController(MODEL, STRIPES)
    masks = [ctrl.global_mask("depth", d) for d in range(1, MODEL.num_layers + 1)]
    for small, large in zip(masks, masks[1:]):
        assert bool((small <= large).all()) and int(large.sum()) == int(small.sum()) + 1
    assert ctrl.global_mask("depth", 4).nonzero().flatten().tolist() == sorted(ORDER[:4])
    with pytest.raises(ValueError, match="needs a layer ranking"):
        ElasticController(MODEL).set_widths({"depth": 6})


# ---- masked and narrow compute -----------------------------------------------------------


def _layer_io(model, j: int):
    seen: dict[str, torch.Tensor] = {}

    def hook(_m, args, kwargs, out):
        seen["in"] = kwargs["hidden_states"]
        seen["out"] = out[0] if isinstance(out, tuple) else out

    return seen, model.decoder.layers[j].register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize(
    ("depth", "j", "inner"),
    [(4, 2, "mixer"), (6, 6, "self_attention"), (6, 7, "mlp")],
    ids=["mamba", "attention", "moe"],
)
def test_masked_skipped_layer_is_the_identity_on_the_residual_stream(world, depth, j, inner):
    model, ctrl = elastic_model(world)
    assert j not in STRIPES.kept_layers(depth, 8)
    seen, handle = _layer_io(model, j)
    ran = []
    inner_handle = getattr(model.decoder.layers[j], inner).register_forward_hook(
        lambda *a: ran.append(True)
    )
    try:
        with ctrl.at({"depth": depth}, mode="masked"):
            masked = logits(model)
    finally:
        handle.remove()
        inner_handle.remove()
    assert ran  # masked compute runs the skipped layer...
    assert torch.equal(seen["out"], seen["in"])  # ...and hands its input on unchanged
    # and the whole model is the parent with exactly those layers made the identity
    reference = build(world)
    skipped = set(range(8)) - set(STRIPES.kept_layers(depth, 8))
    hooks = [
        reference.decoder.layers[i].register_forward_hook(_identity, with_kwargs=True)
        for i in skipped
    ]
    try:
        assert torch.equal(masked, logits(reference))
    finally:
        for h in hooks:
            h.remove()


def _identity(_module, _args, kwargs, out):
    hidden = kwargs["hidden_states"]
    return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


def _inner_modules(model) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, the mixer / attention / MLP of that layer) for every layer."""
    out = []
    for i, layer in enumerate(model.decoder.layers):
        for name in ("mixer", "self_attention", "mlp"):
            module = getattr(layer, name, None)
            if module is not None and type(module).__name__ != "IdentityOp":
                out.append((i, module))
    return out


@pytest.mark.parametrize(
    "widths", [{"depth": 6}, {"depth": 4}, {**SMALL, "depth": 4}], ids=["6", "4", "4_small"]
)
def test_narrow_depth_does_not_run_skipped_layers_and_equals_masked(world, widths):
    model, ctrl = elastic_model(world)
    ran: list[int] = []
    handles = [
        m.register_forward_pre_hook(lambda mod, a, i=i: ran.append(i))
        for i, m in _inner_modules(model)
    ]
    kept = set(STRIPES.kept_layers(widths["depth"], 8))
    try:
        with ctrl.at(widths, mode="masked"):
            masked = logits(model)
        assert set(ran) == set(range(8))  # masked: every layer runs
        ran.clear()
        with ctrl.at(widths, mode="narrow"):
            narrow = logits(model)
        assert set(ran) == kept  # narrow: the skipped layers do not
    finally:
        for h in handles:
            h.remove()
    assert (narrow - masked).abs().max().item() <= ATOL


def test_narrow_depth_gradients_equal_masked_gradients(world):
    """Skipped layers get no gradient in either mode (masked runs them but drops their
    output); the rest agree to fp32 rounding (<= 1e-5 relative to the largest, as for the
    width axes)."""
    model = build(world).train()
    ctrl = ElasticController(MODEL, STRIPES)
    convert_to_elastic(model, ctrl)
    tokens, pos, mask = batch()
    widths = {"depth": 5, "ffn": 128, "embedding": 96}
    grads = {}
    for mode in ("masked", "narrow"):
        model.zero_grad(set_to_none=True)
        with ctrl.at(widths, mode=mode):
            model(tokens, pos, mask, labels=tokens).mean().backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
    skipped = set(range(8)) - set(STRIPES.kept_layers(5, 8))
    for name, g in grads["masked"].items():
        narrow = grads["narrow"][name]
        if name.startswith("decoder.layers.") and int(name.split(".")[2]) in skipped:
            assert narrow is None and (g is None or not g.any()), name
            continue
        g0 = torch.zeros_like(g) if g is None else g
        n0 = torch.zeros_like(g0) if narrow is None else narrow
        scale = max(g0.abs().max().item(), 1e-12)
        assert (n0 - g0).abs().max().item() / scale <= 1e-5, name


def _st_onehot(logits: torch.Tensor, index: int) -> torch.Tensor:
    soft = torch.softmax(logits, dim=-1)
    hard = torch.nn.functional.one_hot(torch.tensor(index), logits.numel()).to(soft)
    return hard - soft.detach() + soft


@pytest.mark.parametrize("mode", ["masked", "narrow"])
def test_depth_gate_leaves_logits_bit_identical_and_reaches_the_router(world, mode):
    model, ctrl = elastic_model(world, mode=mode)
    with ctrl.at({"depth": 6}):
        plain = logits(model)
        router_logits = torch.zeros(len(DEPTHS), requires_grad=True)
        ctrl.set_gates({"depth": (_st_onehot(router_logits, 1), DEPTHS)})
        tokens, pos, mask = batch()
        gated = model(tokens, pos, mask)
        gated.float().square().mean().backward()
        ctrl.set_gates(None)
    assert torch.equal(gated, plain)
    assert router_logits.grad is not None and router_logits.grad.abs().sum() > 0


# ---- slicing, cost, router ---------------------------------------------------------------


@pytest.mark.parametrize(
    "widths", [{"depth": 6}, {"depth": 4}, {**SMALL, "depth": 4}], ids=["6", "4", "4_small"]
)
def test_depth_slice_drops_and_renumbers_layers_and_equals_the_elastic_logits(world, widths):
    model, ctrl = elastic_model(world)
    config, state = slice_model(model, widths)
    kept = STRIPES.kept_layers(widths["depth"], 8)
    assert config.pattern == "".join(MODEL.pattern[j] for j in kept)
    assert {int(k.split(".")[2]) for k in state if k.startswith("decoder.layers.")} == set(
        range(len(kept))
    )
    # the slice's layer i holds elastic layer kept[i]'s weights (their norm, untouched here)
    i, j = len(kept) - 1, kept[-1]
    norm = "norm" if MODEL.pattern[j] == "M" else "pre_mlp_layernorm"
    if MODEL.pattern[j] == "*":
        norm = "input_layernorm"
    if "embedding" not in widths:
        assert torch.equal(
            state[f"decoder.layers.{i}.{norm}.weight"],
            model.state_dict()[f"decoder.layers.{j}.{norm}.weight"],
        )
    small = build_slice(config, state, pg_collection=world[1]).eval()
    with ctrl.at(widths, mode="masked"):
        masked = logits(model)
    with ctrl.at(widths, mode="narrow"):
        narrow = logits(model)
    assert (logits(small) - masked).abs().max().item() <= ATOL
    assert (logits(small) - narrow).abs().max().item() <= ATOL
    params = CostModel(MODEL, CostSpec(kind="params"), ORDER).params(widths)
    assert int(params) == sum(p.numel() for p in small.parameters())


def test_depth_cost_counts_only_kept_layers_and_has_a_gradient():
    spec = CostSpec(kind="memory", seq_length=256)
    cost = CostModel(MODEL, spec, ORDER)
    full, at4 = float(cost.memory({})), float(cost.memory({"depth": 4}))
    # depth 4 keeps layers 0 (M), 1 (*), 3 (E), 4 (-): one KV cache, one SSM state
    small_model = dataclasses.replace(MODEL, pattern=kept_pattern(MODEL.pattern, ORDER[:4]))
    assert at4 == pytest.approx(float(CostModel(small_model, spec).memory({})), rel=1e-12)
    assert at4 < full
    depth = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    value = cost.memory({"depth": depth})
    value.backward()
    assert float(value) == pytest.approx(at4) and depth.grad is not None and depth.grad > 0
    with pytest.raises(ValueError, match="needs the layer ranking"):
        CostModel(MODEL, spec).params({"depth": 4})


def test_budget_feasible_selection_chooses_depth_jointly_with_the_widths():
    axes = {"embedding": [128, 96, 64], "ffn": [256, 128], "depth": DEPTHS}
    cost = CostModel(MODEL, CostSpec(kind="latency", seq_length=64), ORDER)
    budgets = [Budget("L", 1.0, "latency"), Budget("S", 0.52, "latency")]
    elastic = ElasticConfig(axes=axes, budgets=budgets)
    elastic.validate_for(MODEL, ParallelConfig())
    feasible = feasible_set(axes, cost, 0.52, 0.05)
    depths = {DEPTHS[int(row[2])] for row in feasible.index}
    # 0.52 of the latency is met at full depth with a narrow stream, or at depth 4 with a
    # wide one: depth and widths are one joint choice
    assert depths == {8, 4}
    cfg = RouterConfig(mode="heterogeneous")
    router = ElasticRouter(elastic, cfg, layers={"ffn": 1})  # depth needs no layer count
    widths = router.select("S")
    assert isinstance(widths["depth"], int)  # model-wide in either mode
    homogeneous = ElasticRouter(elastic, RouterConfig(budget_tolerance=0.05))
    picked = homogeneous.select_homogeneous("S", feasible)
    assert abs(float(cost(picked)) / cost.full() - 0.52) <= 0.05 * 0.52


# ---- decoding ----------------------------------------------------------------------------


def test_narrow_decode_allocates_no_cache_for_skipped_layers_and_equals_the_slice(world):
    model, ctrl = elastic_model(world, seed=5)
    widths = {**SMALL, "depth": 4}
    kept = STRIPES.kept_layers(4, 8)
    config, state = slice_model(model, widths)
    small = build_slice(config, state, pg_collection=world[1]).eval()
    prompt = torch.tensor(list(b"def main(argv):\n    return 0\n" * 2)[:42]).view(2, 21)
    kwargs = dict(vocab_size=256, record_logits=True)
    with ElasticBudgets(model, ctrl, {"S": widths}, mode="narrow").decoder("S") as decoder:
        assert isinstance(decoder, CachedDecoder)
        out = generate(decoder, prompt, 10, Sampler(), **kwargs)
        caches = dict(decoder.context.key_value_memory_dict)  # type: ignore[union-attr]
    with SliceBudgets({"S": small}).decoder("S") as decoder:
        sliced = generate(decoder, prompt, 10, Sampler(), **kwargs)
        slice_caches = dict(decoder.context.key_value_memory_dict)  # type: ignore[union-attr]
    assert out.tokens == sliced.tokens
    for a, b in zip(out.logits, sliced.logits):
        assert (a - b).abs().max().item() <= 1e-4  # as test_generate: cached fp32 paths
    # cache entries are keyed by layer_number (1-based): only the kept M and * layers
    cached_kinds = {j + 1 for j in kept if MODEL.pattern[j] in "M*"}
    assert set(caches) == cached_kinds
    assert len(slice_caches) == len(caches)
    with ElasticBudgets(model, ctrl, {"S": widths}, mode="masked").decoder("S") as decoder:
        generate(decoder, prompt, 2, Sampler())
        masked_caches = set(decoder.context.key_value_memory_dict)  # type: ignore[union-attr]
    assert masked_caches == {j + 1 for j in range(8) if MODEL.pattern[j] in "M*"}


def test_a_model_without_depth_ranking_still_converts_and_runs_at_full_depth(world):
    model = build(world)
    plain = logits(model)
    ctrl = ElasticController(HybridModelConfig())
    convert_to_elastic(model, ctrl)
    assert torch.equal(logits(model), plain)
    assert ctrl.full_widths["depth"] == 8

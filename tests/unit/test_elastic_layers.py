"""Elastic megatron-core layers by conversion: round trip, full width, narrow, norms, experts.

The tiny hybrid (M*ME-M*E) with seeded random weights; the residual norms' weights are
perturbed away from 1 so that a norm that mixes up channels is visible. Inputs are real text
bytes (this Python's ``os.py``).

Tolerances. Everything is fp32. At full width the elastic classes call upstream's forward
unchanged, so logits are bit-identical. Narrow compute sums the same products as masked
compute minus exact zeros, in a possibly different GEMM blocking: rounding only, ~1e-7
(measured 0), so <= 1e-5. Garbage in inactive hidden channels is masked before any
arithmetic, so the logits are bit-identical with and without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from megatron.core.ssm.mamba_mixer import MambaMixer
from megatron.core.transformer.moe.router import TopKRouter

from megatron_ext.elastic.config import Budget, ElasticConfig
from megatron_ext.elastic.controller import ElasticController, StripeLayout
from megatron_ext.elastic.convert import (
    convert_to_elastic,
    elastic_controller,
    elastic_modules,
    export,
)
from megatron_ext.models.builder import build_model, causal_mask
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.parallel import ParallelConfig, init_distributed, set_seed

SEQ, BATCH = 64, 2
ATOL = 1e-5
MODEL = HybridModelConfig()
CHOICES = {
    "embedding": [128, 96],
    "attn_heads": [4, 2],
    "mamba_heads": [8, 4],
    "mamba_head_dim": [16, 8],
    "ffn": [256, 128],
    "moe_experts": [8, 4],
    "moe_ffn": [64, 32],
}
SMALL = {axis: choices[-1] for axis, choices in CHOICES.items()}
ALONE = [{axis: width} for axis, width in SMALL.items()]


def make_world():
    """A one-process world; the test widths pass the elastic config's validation first."""
    parallel = ParallelConfig()
    budgets = [Budget("small", 0.5, widths=SMALL)]
    ElasticConfig(axes=CHOICES, budgets=budgets).validate_for(MODEL, parallel)
    return parallel, init_distributed(parallel)


@pytest.fixture(scope="module")
def world():
    return make_world()


def build(world, cfg: HybridModelConfig = MODEL, seed: int = 7) -> torch.nn.Module:
    parallel, pgs = world
    set_seed(seed)
    model = build_model(cfg, parallel, pgs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    raw = Path(os.__file__).read_bytes()[2048 : 2048 + BATCH * SEQ]
    tokens = torch.tensor(list(raw)).view(BATCH, SEQ)
    return tokens, torch.arange(SEQ)[None].expand(BATCH, SEQ), causal_mask(SEQ)


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(*batch())


def elastic(world, cfg: HybridModelConfig = MODEL) -> tuple[torch.nn.Module, ElasticController]:
    """A seeded model converted with a TP=1 controller (narrow needs the run's stripes)."""
    model = build(world, cfg)
    ctrl = ElasticController(cfg)
    convert_to_elastic(model, ctrl)
    return model, ctrl


def masked_and_narrow(model: torch.nn.Module, ctrl: ElasticController, widths) -> tuple:
    """The logits of ``model`` at ``widths`` in masked, then in narrow compute."""
    with ctrl.at(widths, mode="masked"):
        masked = logits(model)
    with ctrl.at(widths, mode="narrow"):
        narrow = logits(model)
    return masked, narrow


def test_convert_export_round_trip_leaves_plain_upstream_classes_and_same_state(world):
    model = build(world)
    classes = {name: type(m) for name, m in model.named_modules()}
    state = model.state_dict()
    sharded = sorted(model.sharded_state_dict())
    convert_to_elastic(model, ElasticController(MODEL, StripeLayout(tp=2, ep=2)))
    converted = elastic_modules(model)
    # every layer kind an axis touches, and its class name says so
    for piece in ("embedding", "mixer.norm", "linear_proj", "linear_fc1", "router", "final_norm"):
        assert any(name.endswith(piece) for name in converted), piece
    assert type(model.decoder.layers[3].mlp.router).__name__ == "ElasticTopKRouter"
    assert isinstance(model.decoder.layers[3].mlp.router, TopKRouter)
    assert list(model.state_dict()) == list(state)
    assert sorted(model.sharded_state_dict()) == sharded
    export(model)
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert not elastic_modules(model)
    assert not any("Elastic" in type(m).__name__ for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(state)
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert after[key].data_ptr() == value.data_ptr(), key  # the same storage, untouched
    with pytest.raises(TypeError):
        elastic_controller(model)


def test_full_width_elastic_logits_equal_plain_logits_exactly(world):
    model = build(world)
    plain = logits(model)
    ctrl = ElasticController(MODEL, StripeLayout(tp=2, ep=2))
    convert_to_elastic(model, ctrl)
    assert torch.equal(logits(model), plain)
    with ctrl.at(SMALL):
        assert not torch.equal(logits(model), plain)  # the budget does change the model
    ctrl.set_full()
    assert torch.equal(logits(model), plain)
    ctrl.set_mode("narrow")
    assert torch.equal(logits(model), plain)


@pytest.mark.parametrize("widths", [*ALONE, SMALL], ids=[*SMALL, "all"])
def test_narrow_compute_equals_masked_compute(world, widths):
    model, ctrl = elastic(world)
    masked, narrow = masked_and_narrow(model, ctrl, widths)
    assert (narrow - masked).abs().max().item() <= ATOL


def test_narrow_mixer_and_attention_compute_only_the_active_heads(world):
    model, ctrl = elastic(world)
    mixer = model.decoder.layers[0].mixer
    attn = model.decoder.layers[1].self_attention
    seen: dict[str, list[int]] = {"ssm": [], "attn": []}
    mixer.norm.register_forward_hook(lambda m, a, out: seen["ssm"].append(a[0].shape[-1]))
    attn.core_attention.register_forward_hook(lambda m, a, out: seen["attn"].append(out.shape[-1]))
    widths = {"mamba_heads": 4, "mamba_head_dim": 8, "attn_heads": 2}
    masked, narrow = masked_and_narrow(model, ctrl, widths)
    assert seen["ssm"] == [8 * 16, 4 * 8]  # the SSM output: every channel, then the 4 x 8 active
    assert seen["attn"] == [4 * 32, 2 * 32]  # the heads' context: 4 heads, then the 2 active
    assert (narrow - masked).abs().max().item() <= ATOL
    assert attn.num_attention_heads_per_partition == 4 and mixer.headdim == 16  # restored


def test_narrow_compute_with_tied_embeddings_equals_masked_compute(world):
    """The output layer then reads the embedding's weight, handed in as ``weight=``."""
    model, ctrl = elastic(world, HybridModelConfig(tie_embeddings=True))
    masked, narrow = masked_and_narrow(model, ctrl, SMALL)
    assert (narrow - masked).abs().max().item() <= ATOL


def test_kept_narrow_weights_are_reused_and_follow_in_place_updates(world):
    """Serving keeps each budget's narrowed weights; a weight update must not go stale."""
    model, ctrl = elastic(world)
    ctrl.keep_narrow_weights = True
    masked, narrow = masked_and_narrow(model, ctrl, SMALL)
    kept = sum(1 for key in ctrl._cache if key[0] == "frozen")
    assert kept > 0 and (narrow - masked).abs().max().item() <= ATOL
    with ctrl.at(SMALL, mode="narrow"):
        assert torch.equal(logits(model), narrow)
    assert sum(1 for key in ctrl._cache if key[0] == "frozen") == kept  # reused, not regathered
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.05)
    masked2, narrow2 = masked_and_narrow(model, ctrl, SMALL)
    assert (narrow2 - masked2).abs().max().item() <= ATOL
    assert not torch.allclose(narrow2, narrow, atol=1e-3)


def test_narrow_hidden_width_reaches_every_linear_on_the_residual_stream(world):
    """With a narrow ``embedding`` every reader of the residual stream sees 96 channels."""
    model, ctrl = elastic(world)
    readers = [
        "decoder.layers.0.mixer.in_proj",
        "decoder.layers.1.self_attention.linear_qkv",
        "decoder.layers.3.mlp.router",
        "decoder.layers.3.mlp.shared_experts.linear_fc1",
        "decoder.layers.4.mlp.linear_fc1",
        "decoder.final_norm",
        "output_layer",
    ]
    seen: dict[str, int] = {}
    for name in readers:
        model.get_submodule(name).register_forward_hook(
            lambda m, a, out, name=name: seen.__setitem__(name, a[0].shape[-1])
        )
    widths = {"embedding": 96}
    with ctrl.at(widths, mode="masked"):
        masked = logits(model)
    assert set(seen.values()) == {128}
    with ctrl.at(widths, mode="narrow"):
        narrow = logits(model)
    assert seen == dict.fromkeys(readers, 96)
    assert (narrow - masked).abs().max().item() <= ATOL


@pytest.mark.parametrize(
    "widths",
    [{"mamba_heads": 4}, {"mamba_head_dim": 8}, {"attn_heads": 2}, {"embedding": 96}, SMALL],
    ids=["mamba_heads", "mamba_head_dim", "attn_heads", "embedding", "all"],
)
def test_narrow_gradients_equal_masked_gradients(world, widths):
    """The backward pass of narrow compute fills the full parameters as masked compute does.

    Inactive rows get no gradient in either mode (exact zeros vs untouched); the active ones
    differ by rounding only: fp32 sums in another order, <= 1e-5 relative to the largest.
    """
    model = build(world).train()
    ctrl = ElasticController(MODEL)
    convert_to_elastic(model, ctrl)
    tokens, pos, mask = batch()
    grads = {}
    for mode in ("masked", "narrow"):
        model.zero_grad(set_to_none=True)
        with ctrl.at(widths, mode=mode):
            model(tokens, pos, mask, labels=tokens).mean().backward()
        grads[mode] = {
            n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
            for n, p in model.named_parameters()
        }
    worst = max(
        (grads["narrow"][n] - g).abs().max().item() / max(g.abs().max().item(), 1e-12)
        for n, g in grads["masked"].items()
    )
    assert worst <= 1e-5
    a_log = grads["narrow"]["decoder.layers.0.mixer.A_log"]
    assert a_log.any() and (a_log == 0).any() == ("mamba_heads" in widths)


def test_narrow_compute_rejects_weights_striped_for_another_tp_size(world):
    model = build(world)
    ctrl = ElasticController(MODEL, StripeLayout(tp=2))
    convert_to_elastic(model, ctrl)
    with ctrl.at({"ffn": 128}, mode="narrow"), pytest.raises(ValueError, match="not a prefix"):
        logits(model)


def test_norms_see_only_active_channels(world):
    """Garbage in inactive hidden channels of the residual stream changes no output."""
    model = build(world)
    ctrl = ElasticController(MODEL)
    convert_to_elastic(model, ctrl)
    with ctrl.at(SMALL):
        clean = logits(model)
        inactive = ~ctrl.local_mask("embedding")
        gen = torch.Generator().manual_seed(0)

        def pollute(module, args, out):
            noise = 1e3 * torch.randn(out.shape, generator=gen)
            return out + noise * inactive

        handle = model.embedding.register_forward_hook(pollute)
        try:
            dirty = logits(model)
        finally:
            handle.remove()
    assert torch.equal(dirty, clean)


def test_elastic_rmsnorm_equals_rmsnorm_of_the_active_channels(world):
    model = build(world)
    ctrl = ElasticController(MODEL)
    convert_to_elastic(model, ctrl)
    norm = model.decoder.final_norm
    x = torch.randn(5, 3, MODEL.hidden_size)
    with ctrl.at({"embedding": 96}):
        active = ctrl.local_mask("embedding")
        y = norm(x)
    ref = torch.nn.functional.rms_norm(x[..., active], (96,), norm.weight[active], norm.eps)
    assert (y[..., active] - ref).abs().max().item() <= ATOL
    assert torch.equal(y[..., ~active], torch.zeros_like(y[..., ~active]))


def test_mamba_gated_norm_groups_use_only_active_head_channels(world):
    model = build(world)
    ctrl = ElasticController(MODEL)
    convert_to_elastic(model, ctrl)
    mixer = model.decoder.layers[0].mixer
    assert isinstance(mixer, MambaMixer)
    x, z = torch.randn(2, 4, 128), torch.randn(2, 4, 128)
    with ctrl.at({"mamba_heads": 4, "mamba_head_dim": 8}):
        channels = mixer.norm.elastic_channel_mask(x.device)
        y = mixer.norm(x, z)
    assert int(channels.sum()) == 4 * 8
    gated = (x * torch.nn.functional.silu(z))[..., channels].view(2, 4, 2, 16)  # 2 groups
    rms = gated.square().mean(-1, keepdim=True).add(mixer.norm.eps).rsqrt()
    ref = (gated * rms).reshape(2, 4, 32) * mixer.norm.weight[channels]
    assert (y[..., channels] - ref).abs().max().item() <= ATOL
    assert torch.equal(y[..., ~channels], torch.zeros_like(y[..., ~channels]))


@pytest.mark.parametrize("expert_bias", [False, True])
def test_masked_expert_receives_zero_tokens(world, expert_bias):
    cfg = HybridModelConfig(moe_router_enable_expert_bias=expert_bias)
    model = build(world, cfg)
    ctrl = ElasticController(cfg, StripeLayout(ep=2))  # active experts striped: 0, 1, 4, 5
    convert_to_elastic(model, ctrl)
    moe = model.decoder.layers[3].mlp
    if expert_bias:  # a large bias on half the experts, inactive ones included
        moe.router.expert_bias.copy_(torch.tensor([0.0, 5, 0, 5, 0, 5, 0, 5]))
    tokens: dict[int, int] = {}

    def count(j):
        def hook(module, args, out):
            tokens[j] = tokens.get(j, 0) + args[0].shape[0]

        return hook

    for j, expert in enumerate(moe.experts.local_experts):
        expert.register_forward_hook(count(j))
    with ctrl.at({"moe_experts": 4}):
        active = ctrl.local_mask("moe_experts")
        logits(model)
    assert active.tolist() == [True, True, False, False, True, True, False, False]
    assert all(tokens.get(j, 0) == 0 for j in range(8) if not active[j])
    assert sum(tokens.get(j, 0) for j in range(8) if active[j]) == 2 * BATCH * SEQ  # top-2


def test_training_at_a_budget_gives_finite_gradients(world):
    model = build(world).train()
    ctrl = ElasticController(MODEL, StripeLayout(tp=2, ep=2))
    convert_to_elastic(model, ctrl)
    tokens, pos, mask = batch()
    with ctrl.at(SMALL):
        loss = model(tokens, pos, mask, labels=tokens).mean()
    loss.backward()
    assert torch.isfinite(loss)
    bad = [
        n for n, p in model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()
    ]
    assert not bad
    # an inactive expert gets no tokens and so no gradient
    inactive = model.decoder.layers[3].mlp.experts.local_experts[2].linear_fc1.weight.grad
    assert inactive is None or not inactive.any()


def test_controller_rejects_widths_the_layout_cannot_split(world):
    ctrl = ElasticController(MODEL, StripeLayout(tp=2))
    with pytest.raises(ValueError, match="attn_heads"):
        ctrl.set_widths({"attn_heads": 3})  # 2 query groups keep equal head counts
    with pytest.raises(ValueError, match="ffn"):
        ctrl.set_widths({"ffn": 127})  # striped over 2 TP shards
    with pytest.raises(ValueError, match="not in this model"):
        ctrl.set_widths({"experts": 4})
    with ctrl.at({"ffn": 128}):
        assert ctrl.width("ffn") == 128 and ctrl.is_full("embedding")
    assert ctrl.is_full("ffn")

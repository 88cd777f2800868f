"""Importance scores (shapes, known zeros, direct recomputation) and exact reordering.

The reorder property is the issue's "done when": the reordered model computes the same
function, so its logits equal the parent's (fp32, max abs diff <= 1e-5), for every axis alone
and all together, with non-trivial (reversed, striped) permutations, on real text.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from megatron_ext.checkpoint import CheckpointManager
from megatron_ext.config.compose import compose_recipe
from megatron_ext.elastic.config import AXES
from megatron_ext.elastic.importance import (
    ImportanceConfig,
    compute_importance,
    embedding_scores,
)
from megatron_ext.elastic.reorder import (
    EMBEDDING_LAYER,
    apply_permutations,
    compute_permutations,
    permutations_from_json,
    permutations_to_json,
)
from megatron_ext.models.builder import build_model, causal_mask, squared_relu
from megatron_ext.models.config import ConfigError, HybridModelConfig
from megatron_ext.parallel import ParallelConfig, init_distributed, set_seed
from megatron_ext.run_format import find_elastic_layout

CFG = HybridModelConfig(moe_router_enable_expert_bias=True)  # M*ME-M*E
SEQ, MICRO, SEED = 64, 2, 7
MOE, DENSE, MAMBA, ATTN = 3, 4, 0, 1
ATOL = 1e-5


def text_batch(i: int) -> dict[str, torch.Tensor]:
    """Real text: bytes of a stdlib source file, as byte-level tokens."""
    raw = Path(inspect.getfile(json.decoder)).read_bytes()
    start = 512 + i * MICRO * SEQ
    ids = torch.tensor(list(raw[start : start + MICRO * SEQ])).view(MICRO, SEQ)
    return {"tokens": ids, "position_ids": torch.arange(SEQ)[None].expand(MICRO, SEQ)}


CALIB = [text_batch(i) for i in range(2)]
HELD_OUT = text_batch(5)


@pytest.fixture(scope="module")
def world():
    par = ParallelConfig()
    return par, init_distributed(par)


@pytest.fixture(scope="module")
def parent(world):
    par, pgs = world
    set_seed(SEED)
    model = build_model(CFG, par, pgs).eval()
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():  # randomise what init leaves constant (norm weights, D, ...)
        for p in model.parameters():
            if p.numel() > 1 and bool((p == p.reshape(-1)[0]).all()):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    for layer in (3, 7):  # a little expert bias, so its permutation is exercised too
        bias = model.decoder.layers[layer].mlp.router.expert_bias
        bias.copy_(0.02 * torch.randn(bias.shape, generator=gen))
    return model


def clone(model, world):
    par, pgs = world
    copy = build_model(CFG, par, pgs)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


def logits(model, batch=HELD_OUT) -> torch.Tensor:
    with torch.no_grad():
        return model(batch["tokens"], batch["position_ids"], causal_mask(SEQ))


@pytest.fixture(scope="module")
def result(parent, world):
    return compute_importance(parent, CALIB, world[1])


def test_every_axis_has_one_score_tensor_per_layer_of_its_kind(result):
    s, c = result.scores, CFG
    layers = {sym: [i for i, k in enumerate(c.pattern) if k == sym] for sym in "M*-E"}
    expect = {
        "embedding": (list(range(c.num_layers)), (c.hidden_size,)),
        "attn_heads": (layers["*"], (c.num_attention_heads,)),
        "mamba_heads": (layers["M"], (c.mamba_num_heads,)),
        "mamba_head_dim": (layers["M"], (c.mamba_head_dim,)),
        "ffn": (layers["-"], (c.ffn_hidden_size,)),
        "moe_experts": (layers["E"], (c.num_experts,)),
        "moe_ffn": (layers["E"], (c.num_experts, c.moe_ffn_hidden_size)),
    }
    assert set(s) == set(AXES)
    for axis, (idx, shape) in expect.items():
        assert sorted(s[axis]) == idx, axis
        for t in s[axis].values():
            assert tuple(t.shape) == shape, axis
            assert torch.isfinite(t).all() and (t >= 0).all(), axis
    assert result.tokens == 2 * MICRO * SEQ
    for layer in layers["E"]:  # every token goes to top-k experts
        assert int(result.expert_tokens[layer].sum()) == c.moe_router_topk * result.tokens
    json.dumps(result.summary())  # JSON-able


def test_scores_and_summary_are_deterministic(parent, world, result):
    again = compute_importance(parent, CALIB, world[1])
    assert again.summary() == result.summary()
    for axis, layers in result.scores.items():
        for i, t in layers.items():
            assert torch.equal(t, again.scores[axis][i])


def test_scores_match_a_direct_computation_from_the_pre_norm_outputs(parent, result):
    """Embedding, Mamba, FFN, REAP and expert-FFN scores recomputed from the weights."""
    layers = parent.decoder.layers
    norms = {MAMBA: layers[MAMBA].norm, DENSE: layers[DENSE].pre_mlp_layernorm}
    norms[MOE] = layers[MOE].pre_mlp_layernorm
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in norms}
    hooks = [
        n.register_forward_hook(lambda _m, _a, out, i=i: seen[i].append(out.detach()))
        for i, n in norms.items()
    ]
    for batch in CALIB:
        logits(parent, batch)
    for h in hooks:
        h.remove()
    x = {
        i: torch.cat([t.reshape(-1, CFG.hidden_size) for t in v]).double() for i, v in seen.items()
    }

    def close(a, b):
        assert float((a - b).abs().max()) <= 1e-6 * float(b.abs().max()), (a, b)

    for i in norms:
        close(result.scores["embedding"][i], x[i].abs().sum(0))
    di, hd = CFG.mamba_d_inner, CFG.mamba_head_dim
    w_x = layers[MAMBA].mixer.in_proj.weight.double()[di : 2 * di]
    s = (x[MAMBA] @ w_x.T).norm(dim=0).view(-1, hd)
    close(result.scores["mamba_heads"][MAMBA], s.norm(dim=1))
    close(result.scores["mamba_head_dim"][MAMBA], s.sum(0))
    mlp = layers[DENSE].mlp
    close(
        result.scores["ffn"][DENSE],
        squared_relu(x[DENSE] @ mlp.linear_fc1.weight.double().T).abs().sum(0),
    )

    moe = layers[MOE].mlp
    with torch.no_grad():
        probs, routed = moe.router(x[MOE].float().view(-1, 1, CFG.hidden_size))
    reap = torch.zeros(CFG.num_experts, dtype=torch.float64)
    ffn = torch.zeros(CFG.num_experts, CFG.moe_ffn_hidden_size, dtype=torch.float64)
    for j, expert in enumerate(moe.experts.local_experts):
        tok = routed[:, j]
        act = squared_relu(x[MOE][tok] @ expert.linear_fc1.weight.double().T)
        out = act @ expert.linear_fc2.weight.double().T
        gate = probs[tok, j].double()
        reap[j] = (gate * out.norm(dim=1)).mean() if tok.any() else 0.0
        ffn[j] = act.abs().sum(0)
    close(result.scores["moe_experts"][MOE], reap)
    close(result.scores["moe_ffn"][MOE], ffn)
    assert torch.equal(result.expert_tokens[MOE], routed.sum(0).double())


def test_a_zeroed_fc1_channel_gets_the_lowest_ffn_score(parent, world):
    model = clone(parent, world)
    channel = 37
    with torch.no_grad():
        model.decoder.layers[DENSE].mlp.linear_fc1.weight[channel] = 0.0
    scores = compute_importance(model, CALIB, world[1]).scores["ffn"][DENSE]
    assert float(scores[channel]) == 0.0
    assert float(scores.min()) == 0.0 and int((scores == 0).sum()) == 1
    perm = compute_permutations({"ffn": {DENSE: scores}}, CFG)["ffn"][DENSE]
    assert int(perm[-1]) == channel  # ranked last


def test_an_expert_never_routed_to_scores_zero(parent, world):
    model = clone(parent, world)
    expert = 5
    with torch.no_grad():
        model.decoder.layers[MOE].mlp.router.expert_bias[expert] = -1e4
    res = compute_importance(model, CALIB, world[1])
    assert int(res.expert_tokens[MOE][expert]) == 0
    assert float(res.scores["moe_experts"][MOE][expert]) == 0.0
    assert float(res.scores["moe_ffn"][MOE][expert].abs().max()) == 0.0
    others = torch.cat(
        [res.scores["moe_experts"][MOE][:expert], res.scores["moe_experts"][MOE][expert + 1 :]]
    )
    assert bool((others > 0).any())


def reversed_scores(scores):
    """Scores rising with the index: the most important component is the last one."""
    return {
        axis: {
            i: torch.arange(t.numel(), dtype=torch.float64).view(t.shape) for i, t in layers.items()
        }
        for axis, layers in scores.items()
    }


def assert_non_trivial(perms, axes):
    for axis in axes:
        for p in perms[axis].values():
            flat = p.reshape(-1, p.shape[-1])
            assert not torch.equal(flat, torch.arange(flat.shape[1]).expand_as(flat)), axis


@pytest.mark.parametrize("axes", [(a,) for a in AXES] + [AXES], ids=[*AXES, "all"])
def test_reordering_by_reversed_scores_keeps_the_logits(parent, world, result, axes):
    reference = logits(parent)
    model = clone(parent, world)
    perms = compute_permutations(
        reversed_scores(result.scores), CFG, stripe_tp=2, stripe_ep=2, axes=axes
    )
    assert set(perms) == set(axes)
    assert_non_trivial(perms, axes)
    apply_permutations(model, perms)
    diff = float((logits(model) - reference).abs().max())
    assert diff <= ATOL, (axes, diff)


def test_reordering_by_real_scores_keeps_logits_and_permutes_the_scores(parent, world, result):
    model = clone(parent, world)
    perms = compute_permutations(result.scores, CFG, stripe_tp=2, stripe_ep=2)
    apply_permutations(model, perms)
    assert float((logits(model) - logits(parent)).abs().max()) <= ATOL
    again = compute_importance(model, CALIB, world[1]).scores
    emb = perms["embedding"][EMBEDDING_LAYER]
    for axis, layers in result.scores.items():
        for i, before in layers.items():
            if axis == "embedding":
                expect = before[emb]
            elif axis == "moe_ffn":
                order = perms["moe_experts"][i]
                expect = torch.stack(
                    [before[order[e]][perms["moe_ffn"][i][e]] for e in range(len(order))]
                )
            else:
                expect = before[perms[axis][i]]
            assert float((again[axis][i] - expect).abs().max()) <= 1e-5 * float(expect.abs().max())
    # striped for TP=2: each TP half of the FFN holds every other rank, best first on each
    ffn = again["ffn"][DENSE]
    half = ffn.numel() // 2
    assert bool((ffn[:half].diff() <= 0).all() and (ffn[half:].diff() <= 0).all())
    assert float(ffn[0]) == float(ffn.max())
    assert float(embedding_scores(again)[0]) == float(embedding_scores(again).max())


def test_permutations_round_trip_through_json(result):
    perms = compute_permutations(result.scores, CFG, stripe_tp=2, stripe_ep=2)
    back = permutations_from_json(json.loads(json.dumps(permutations_to_json(perms))))
    assert back.keys() == perms.keys()
    for axis in perms:
        for i in perms[axis]:
            assert torch.equal(back[axis][i], perms[axis][i])


def test_importance_config_validates_the_stripe_layout():
    with pytest.raises(ConfigError, match="importance.calib_batches"):
        ImportanceConfig(calib_batches=0)
    with pytest.raises(ConfigError, match="stripe_ep"):
        ImportanceConfig(stripe_ep=3).check_model(CFG)
    ImportanceConfig(stripe_tp=2, stripe_ep=4).check_model(CFG)


def test_recipe_scores_reorders_and_saves_a_loadable_checkpoint(
    world, parent, tmp_path, data_overrides
):
    """Must stay last in this module: the recipe tears the process groups down."""
    par, pgs = world
    reference = logits(parent)
    parent_dir = tmp_path / "parent"
    CheckpointManager(parent_dir / "checkpoints", pgs).save(3, parent, None, {"step": 3})
    OmegaConf.save({"model": asdict(CFG)}, parent_dir / "config.yaml")
    run_dir = tmp_path / "importance"
    cfg = compose_recipe(
        "importance",
        [
            f"parent.dir={parent_dir}",
            f"run.dir={run_dir}",
            *data_overrides,
            "importance.calib_batches=2",
            "importance.seq_length=64",
            "importance.micro_batch_size=2",
            "importance.stripe_tp=2",
        ],
    )
    from recipes import importance

    summary = importance.run(cfg)
    assert summary["tokens"] == 2 * 2 * 64
    assert summary["reorder_logits_max_abs_diff"] <= ATOL
    for name in ("scores.pt", "permutations.json", "summary.json", "config.yaml"):
        assert (run_dir / name).is_file(), name
    layout = find_elastic_layout(summary["checkpoint"])
    assert layout == find_elastic_layout(Path(summary["checkpoint"]).parent)
    assert CheckpointManager(run_dir / "checkpoints", pgs).problem(summary["checkpoint"]) is None
    assert (layout["tp"], layout["ep"]) == (2, 1)
    assert set(layout["permutations"]) == set(AXES)
    scores = torch.load(run_dir / "scores.pt")
    assert set(scores) == set(AXES)

    par, pgs = ParallelConfig(), init_distributed(ParallelConfig())
    reordered = build_model(CFG, par, pgs)
    CheckpointManager(run_dir / "checkpoints", pgs).load(
        summary["checkpoint"], reordered, weights_only=True
    )
    perms = permutations_from_json(layout["permutations"])
    expect = clone(parent, (par, pgs))
    apply_permutations(expect, perms)
    for key, value in expect.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, reordered.state_dict()[key]), key
    assert float((logits(reordered.eval()) - reference).abs().max()) <= ATOL

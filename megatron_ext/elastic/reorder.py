"""Turn importance scores into per-axis permutations and apply them to a model's weights.

A permutation ``perm`` of an axis means: after reordering, position ``q`` holds the component
that was at ``perm[q]`` (``index_select(axis, perm)``). Permutations come from
:func:`megatron_ext.elastic.layout.reorder_permutation`, striped for a target TP/EP layout
(docs/design.md invariant 3), and are applied in place to the unsharded (TP=1, EP=1) model, to
exactly the tensors listed for each axis in the elastic-axes conventions. The function the
model computes is unchanged: only the order of channels, heads and experts moves.

``perms`` has the shape of the scores: ``axis -> {layer: LongTensor}``, except
``embedding``, one permutation for the whole residual stream stored under layer ``-1``,
and ``moe_ffn``, ``[experts, channels]`` whose row ``e`` is the channel order of the expert
that ends up at position ``e`` (after the ``moe_experts`` permutation).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from megatron_ext.elastic.importance import Scores, embedding_scores
from megatron_ext.elastic.layout import reorder_permutation

Perms = dict[str, dict[int, Tensor]]
"""``axis -> {layer: permutation}`` (``embedding`` under layer ``-1``)."""

EMBEDDING_LAYER = -1


def compute_permutations(
    scores: Scores,
    shape: Any,
    *,
    stripe_tp: int = 1,
    stripe_ep: int = 1,
    axes: tuple[str, ...] | None = None,
) -> Perms:
    """Per-axis permutations of ``scores`` for a checkpoint striped over ``stripe_tp`` TP
    ranks (FFN and expert-FFN channels) and ``stripe_ep`` EP ranks (experts).

    ``shape`` gives the head grouping (``num_attention_heads``, ``num_query_groups``,
    ``mamba_num_heads``, ``mamba_num_groups``): a ``HybridModelConfig`` or megatron's
    ``TransformerConfig``. Attention and Mamba heads are ranked within their groups (whole
    groups go to TP ranks, so no striping); ``mamba_head_dim`` and ``embedding`` are not split.
    ``axes`` limits the result to those axes (default: every axis in ``scores``).
    """
    wanted = set(scores) if axes is None else set(axes) & set(scores)
    perms: Perms = {}
    if "embedding" in wanted:
        perms["embedding"] = {EMBEDDING_LAYER: reorder_permutation(embedding_scores(scores))}
    grouping = {
        "attn_heads": lambda: shape.num_attention_heads // (shape.num_query_groups or 1),
        "mamba_heads": lambda: shape.mamba_num_heads // shape.mamba_num_groups,
    }
    for axis in sorted(wanted - {"embedding"}):
        out: dict[int, Tensor] = {}
        for layer, s in sorted(scores[axis].items()):
            if axis in grouping:
                out[layer] = reorder_permutation(s, stripe_tp, group_size=grouping[axis]())
            elif axis == "ffn":
                out[layer] = reorder_permutation(s, stripe_tp)
            elif axis == "moe_experts":
                out[layer] = reorder_permutation(s, stripe_ep)
            elif axis == "mamba_head_dim":
                out[layer] = reorder_permutation(s)
            elif axis == "moe_ffn":
                out[layer] = torch.stack([reorder_permutation(row, stripe_tp) for row in s])
            else:
                raise ValueError(f"unknown axis {axis!r}")
        perms[axis] = out
    if "moe_ffn" in perms and "moe_experts" in perms:  # rows follow their expert
        for layer, rows in perms["moe_ffn"].items():
            perms["moe_ffn"][layer] = rows[perms["moe_experts"][layer]]
    return perms


# -- primitive in-place permutations ----------------------------------------------------
def _take(t: Tensor | None, dim: int, idx: Tensor) -> None:
    if t is not None:
        with torch.no_grad():
            t.data.copy_(t.data.index_select(dim, idx.to(t.device)))


def _out(linear: Any, idx: Tensor) -> None:
    """Permute a linear's output features (weight rows and bias)."""
    _take(linear.weight, 0, idx)
    _take(getattr(linear, "bias", None), 0, idx)


def _in(linear: Any, idx: Tensor) -> None:
    """Permute a linear's input features (weight columns, and a fused pre-norm's weight)."""
    _take(linear.weight, 1, idx)
    for name in ("layer_norm_weight", "layer_norm_bias"):
        _take(getattr(linear, name, None), 0, idx)


def _norm(norm: Any, idx: Tensor | None) -> None:
    if idx is not None and norm is not None and getattr(norm, "weight", None) is not None:
        _take(norm.weight, 0, idx)
        _take(getattr(norm, "bias", None), 0, idx)


def _glu(idx: Tensor, width: int, gated: bool) -> Tensor:
    """fc1 row index: the same order on both halves of a gated (GLU) fc1."""
    return torch.cat([idx, idx + width]) if gated else idx


def _blocks(order: Tensor, size: int) -> Tensor:
    """Expand a permutation of blocks of ``size`` rows into a row permutation."""
    return (order[:, None] * size + torch.arange(size)).reshape(-1)


def _is_identity(module: Any) -> bool:
    from megatron.core.transformer.identity_op import IdentityOp

    return module is None or isinstance(module, IdentityOp)


# -- per-layer-kind application ----------------------------------------------------------
def _mamba(mixer: Any, heads: Tensor | None, hdim: Tensor | None, emb: Tensor | None) -> None:
    if emb is not None:
        _in(mixer.in_proj, emb)
        _out(mixer.out_proj, emb)
    if heads is None and hdim is None:
        return
    nh, hd = mixer.nheads_local_tp, mixer.headdim
    heads = torch.arange(nh) if heads is None else heads
    hdim = torch.arange(hd) if hdim is None else hdim
    chan = (heads[:, None] * hd + hdim[None, :]).reshape(-1)  # d_inner channel order
    di, bc = nh * hd, 2 * mixer.ngroups_local_tp * mixer.d_state
    rest = torch.arange(bc)
    in_rows = torch.cat([chan, di + chan, 2 * di + rest, 2 * di + bc + heads])  # z x B C dt
    _out(mixer.in_proj, in_rows)
    conv = torch.cat([chan, di + rest])  # x B C
    _take(mixer.conv1d.weight, 0, conv)
    _take(mixer.conv1d.bias, 0, conv)
    for p in (mixer.A_log, mixer.dt_bias):
        _take(p, 0, heads)
    _take(mixer.D, 0, chan if mixer.D.numel() == di else heads)
    _norm(mixer.norm, chan)
    _in(mixer.out_proj, chan)


def _attention(attn: Any, heads: Tensor | None, emb: Tensor | None) -> None:
    if emb is not None:
        _in(attn.linear_qkv, emb)
        _out(attn.linear_proj, emb)
    if heads is None:
        return
    kv = attn.hidden_size_per_attention_head
    groups = attn.num_query_groups_per_partition
    per = attn.num_attention_heads_per_partition // groups
    rows = []
    for g in range(groups):  # [q heads of g, k, v] blocks of kv rows, heads kept in g
        local = heads[g * per : (g + 1) * per] - g * per
        if bool((local < 0).any() or (local >= per).any()):
            raise ValueError(f"attn_heads permutation moves a head out of query group {g}")
        block = torch.cat([local, torch.tensor([per, per + 1])])
        rows.append(g * (per + 2) * kv + _blocks(block, kv))
    _out(attn.linear_qkv, torch.cat(rows))
    _in(attn.linear_proj, _blocks(heads, kv))


def _mlp(mlp: Any, chans: Tensor | None, emb: Tensor | None, gated: bool) -> None:
    if emb is not None:
        _in(mlp.linear_fc1, emb)
        _out(mlp.linear_fc2, emb)
    if chans is not None:
        _out(mlp.linear_fc1, _glu(chans, chans.numel(), gated))
        _in(mlp.linear_fc2, chans)


def _moe(moe: Any, experts: Tensor | None, ffn: Tensor | None, emb: Tensor | None, gated: bool):
    local = moe.experts.local_experts
    router = moe.router
    if emb is not None:
        _in(router, emb)
        if moe.shared_experts is not None:
            _mlp(moe.shared_experts, None, emb, gated)
            gate = getattr(moe.shared_experts, "gate_weight", None)
            _take(gate, 1, emb)
    if experts is not None:
        order = experts.tolist()
        states = [{k: v.detach().clone() for k, v in local[j].named_parameters()} for j in order]
        for pos, state in enumerate(states):
            with torch.no_grad():
                for k, v in local[pos].named_parameters():
                    v.copy_(state[k])
        _out(router, experts)
        for name in ("expert_bias", "local_tokens_per_expert"):
            _take(getattr(router, name, None), 0, experts)
    for pos, expert in enumerate(local):
        _mlp(expert, None if ffn is None else ffn[pos], emb, gated)


def apply_permutations(model: Any, perms: Perms) -> None:
    """Reorder ``model``'s weights in place by ``perms`` (see the module docstring).

    ``model`` must be the unsharded (TP=1, EP=1) ``MambaModel``; its logits are unchanged.
    """
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    cfg = model.config
    if cfg.tensor_model_parallel_size != 1 or cfg.expert_model_parallel_size != 1:
        raise ValueError("apply_permutations needs the unsharded model (TP=1, EP=1)")
    gated = bool(cfg.gated_linear_unit)
    emb = perms.get("embedding", {}).get(EMBEDDING_LAYER)

    def get(axis: str, i: int) -> Tensor | None:
        p = perms.get(axis, {}).get(i)
        return None if p is None else p.cpu().long()

    if emb is not None:
        emb = emb.cpu().long()
        _take(model.embedding.word_embeddings.weight, 1, emb)
        learned = getattr(model.embedding, "position_embeddings", None)
        _take(None if learned is None else learned.weight, 1, emb)
        _norm(model.decoder.final_norm, emb)
        if not getattr(model, "share_embeddings_and_output_weights", False):
            _in(model.output_layer, emb)
    for i, layer in enumerate(model.decoder.layers):
        if hasattr(layer, "mixer"):
            _norm(layer.norm, emb)
            _mamba(layer.mixer, get("mamba_heads", i), get("mamba_head_dim", i), emb)
            continue
        if not _is_identity(getattr(layer, "self_attention", None)):
            _norm(layer.input_layernorm, emb)
            _attention(layer.self_attention, get("attn_heads", i), emb)
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, (MLP, MoELayer)) and emb is not None:
            _norm(layer.pre_mlp_layernorm, emb)
        if isinstance(mlp, MoELayer):
            _moe(mlp, get("moe_experts", i), get("moe_ffn", i), emb, gated)
        elif isinstance(mlp, MLP):
            _mlp(mlp, get("ffn", i), emb, gated)


def permutations_to_json(perms: Perms) -> dict[str, dict[str, list]]:
    """``perms`` as JSON-able lists (layer keys as strings)."""
    return {
        axis: {str(i): p.tolist() for i, p in sorted(layers.items())}
        for axis, layers in sorted(perms.items())
    }


def permutations_from_json(data: dict[str, dict[str, list]]) -> Perms:
    """Inverse of :func:`permutations_to_json`."""
    return {
        axis: {int(i): torch.tensor(p, dtype=torch.long) for i, p in layers.items()}
        for axis, layers in data.items()
    }


def layout_record(perms: Perms, stripe_tp: int, stripe_ep: int, **extra: Any) -> dict[str, Any]:
    """The content of ``elastic_layout.json``: stripe layout, per-axis split, permutations."""
    split = {
        "embedding": {"shards": 1},
        "attn_heads": {"shards": 1, "grouped": True},
        "mamba_heads": {"shards": 1, "grouped": True},
        "mamba_head_dim": {"shards": 1},
        "ffn": {"shards": stripe_tp},
        "moe_experts": {"shards": stripe_ep},
        "moe_ffn": {"shards": stripe_tp},
    }
    return {
        "tp": stripe_tp,
        "ep": stripe_ep,
        "axes": {axis: split[axis] for axis in sorted(perms)},
        "permutations": permutations_to_json(perms),
        **extra,
    }

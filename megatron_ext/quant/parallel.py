"""What quantization needs across ranks: global module names and agreed input scales.

A rank holds one pipeline stage's layers (numbered from 0 in its ``decoder.layers``) and,
under expert parallelism, a part of every MoE layer's experts (numbered from 0 in its
``local_experts``). :func:`global_names` maps each of this rank's module names to the name
the same module has in the unsharded (TP=1, EP=1, PP=1) model: the names of
``quant_state.json`` and of the slicing rules, whatever the layout.

Input scales must be equal on every rank holding the same linear: the TP ranks of one
linear (its calibration passes already take the amax over TP, see
:meth:`megatron_ext.quant.layers.QuantLinearMixin.quant_observe`) and its data-parallel
replicas (:func:`agree_over_replicas`: the MAX over DP for dense linears, over expert-DP for
routed experts; DP ranks calibrate on the same batches, so this changes nothing but makes the
agreement a guarantee). Routed experts that no token reached take the largest scale of their
siblings over every expert-parallel rank (:func:`sibling_max_over_experts`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def _size(group: Any) -> int:
    return dist.get_world_size(group) if dist.is_initialized() and group is not None else 1


def global_names(model: nn.Module) -> dict[str, str]:
    """``{local name: unsharded name}`` of every module of ``model`` (this rank's stage/shard).

    Layers are renumbered by megatron's global ``layer_number``; routed experts by their
    MoE layer's ``local_expert_indices``. Equal to the identity on one rank.
    """
    layers = list(getattr(getattr(model, "decoder", None), "layers", []))
    layer_index = [int(layer.layer_number) - 1 for layer in layers]
    out = {}
    for name, _ in model.named_modules():
        glob = name
        match = _LAYER.match(name + ".")
        if match is not None:
            local = int(match[1])
            glob = f"decoder.layers.{layer_index[local]}." + (name + ".")[match.end() :]
            glob = glob.rstrip(".")
            expert = _EXPERT.search(glob + ".")
            if expert is not None:
                moe = getattr(layers[local], "mlp", None)
                indices = list(getattr(moe, "local_expert_indices", []))
                if indices:
                    number = indices[int(expert[1])]
                    head, tail = (glob + ".")[: expert.start()], (glob + ".")[expert.end() :]
                    glob = f"{head}.local_experts.{number}.{tail}".rstrip(".")
        out[name] = glob
    return out


def is_routed_expert(name: str) -> bool:
    """Whether module ``name`` belongs to a routed expert (not a shared one)."""
    return _EXPERT.search(name + ".") is not None


def _max_in_place(values: Tensor, group: Any) -> None:
    """MAX-all-reduce ``values`` over ``group``; NaN (unseen) counts as below every scale."""
    if _size(group) == 1 or values.numel() == 0:
        return
    unseen = torch.isnan(values)
    values[unseen] = -1.0  # scales are positive
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
    values[values < 0] = float("nan")


@torch.no_grad()
def agree_over_replicas(modules: Mapping[str, Any], pg_collection: Any) -> None:
    """Set every input scale to its MAX over the ranks that hold the same linear (DP replicas;
    expert-DP replicas for routed experts). Collective over those groups, in name order."""
    if pg_collection is None:
        return
    for experts, group_name in ((False, "dp"), (True, "expt_dp")):
        group = getattr(pg_collection, group_name, None)
        chosen = [m for n, m in sorted(modules.items()) if is_routed_expert(n) == experts]
        if not chosen or _size(group) == 1:
            continue
        values = torch.stack([m.quant_input_scale.detach().float().cpu() for m in chosen])
        _max_in_place(values, group)
        for m, value in zip(chosen, values):
            m.quant_input_scale.copy_(value.to(m.quant_input_scale.device))


def sibling_max_over_experts(seen: dict[str, float], pg_collection: Any) -> dict[str, float]:
    """``seen`` (``{expert-linear key: largest scale on this rank}``) maxed over the EP group.

    NaN marks a key none of this rank's experts saw; the result holds only the keys some
    expert saw. Every rank of the group holds the same MoE layers, so the keys (sorted) are
    the same.
    """
    group = getattr(pg_collection, "ep", None) if pg_collection is not None else None
    keys = sorted(seen)
    values = torch.tensor([seen[k] for k in keys], dtype=torch.float32)
    _max_in_place(values, group)
    return {k: float(v) for k, v in zip(keys, values) if v == v}

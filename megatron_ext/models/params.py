"""Parameter counts of a built model: total, and active per token (MoE top-k)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_ext.models.config import HybridModelConfig


@dataclass(frozen=True)
class ParamCounts:
    """Global (all-rank) parameter counts of one model."""

    total: int
    active: int
    routed_expert: int

    def as_dict(self) -> dict[str, int]:
        """The counts under the names ``summary.json`` uses."""
        return {
            "params_total": self.total,
            "params_active": self.active,
            "params_routed_experts": self.routed_expert,
        }


def _is_routed_expert(name: str) -> bool:
    return ".experts." in name


def _is_tp_replicated(param: torch.nn.Parameter) -> bool:
    return not getattr(param, "tensor_model_parallel", False)


def count_parameters(
    model: torch.nn.Module, cfg: HybridModelConfig, pg_collection=None
) -> ParamCounts:
    """Count parameters across all TP/EP ranks; works on the meta device.

    Replicated tensors are counted once; TP-sharded tensors are summed over the TP group and
    routed-expert tensors over the EP (and expert-TP) group. Active parameters count
    ``top_k / num_experts`` of the routed experts, as every token visits top-k experts.
    """
    dense_sharded = dense_replicated = expert = 0
    for name, param in model.named_parameters():
        n = param.numel()
        if _is_routed_expert(name):
            expert += n
        elif _is_tp_replicated(param):
            dense_replicated += n
        else:
            dense_sharded += n
    if pg_collection is not None and dist.is_initialized():
        dense_sharded = _sum_over(dense_sharded, pg_collection.tp)
        expert = _sum_over(expert, pg_collection.ep)
        expert = _sum_over(expert, pg_collection.expt_tp)
    total = dense_sharded + dense_replicated + expert
    active_expert = expert * cfg.moe_router_topk // cfg.num_experts if cfg.has("E") else 0
    return ParamCounts(total=total, active=total - expert + active_expert, routed_expert=expert)


def _sum_over(value: int, group) -> int:
    if group is None or dist.get_world_size(group) == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return int(t.item())

"""MoE layers: the ``moe_experts`` axis (routed experts, striped over EP) and ``moe_ffn`` (each
routed expert's channels, striped over TP).

Compute: :mod:`megatron_ext.elastic.layers_moe` (the router drops inactive experts' logits to
``-inf`` before top-k, in both modes; an inactive expert gets no tokens) and the experts'
MLPs (:mod:`.mlp` on ``moe_ffn``). Importance (REAP): an expert scores the mean over the
tokens routed to it of ``g_j(x) ||f_j(x)||_2`` (megatron applies the top-k probability
inside the expert, so its output already is ``g_j(x) f_j(x)``; no token: 0); a channel of
an expert ``sum |act|`` over its tokens, the gate divided back out of ``linear_fc2``'s input.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from torch import Tensor, nn

from megatron_ext.elastic.layers_moe import ElasticMoELayerMixin, ElasticRouterMixin
from megatron_ext.elastic.layout import reorder_permutation
from megatron_ext.elastic.sites import linear, mlp, tensors
from megatron_ext.elastic.sites.base import Axis, Num, Perms, Rule, Scorer, Site, Step, check_width
from megatron_ext.elastic.sites.divisibility import Divisible
from megatron_ext.errors import require

if TYPE_CHECKING:
    from megatron_ext.elastic.controller import ElasticController

EXPERTS = Axis("moe_experts", "num_experts", "E", narrow=False, stripe="ep")
EXPERT_FFN = Axis("moe_ffn", "moe_ffn_hidden_size", "E", stripe="tp")

_EXPERT = re.compile(r"^(?P<head>.*\.mlp\.experts\.local_experts\.)(?P<j>\d+)(?P<tail>\..*)$")


class MoESite(Site):
    """Routed experts and their channels (the shared expert reads and writes the stream)."""

    name = "moe"
    axes = (EXPERTS, EXPERT_FFN)
    upstream = (MoELayer,)
    hf_names = {
        "nemotron_h": {
            "num_experts": "n_routed_experts",
            "moe_ffn_hidden_size": "moe_intermediate_size",
        },
        "llama": {
            "num_experts": "num_local_experts",
            "moe_ffn_hidden_size": "moe_intermediate_size",
        },
    }
    nemo_names = {"num_experts": "num_moe_experts", "moe_ffn_hidden_size": "moe_ffn_hidden_size"}

    def convert(self, module: nn.Module, ctrl: ElasticController, where: str) -> Iterator[Step]:
        """The layer (output mask), the router, every local expert, the shared expert."""
        moe: Any = module
        if not isinstance(moe.router, TopKRouter):
            raise TypeError(f"{where}.router is {type(moe.router).__name__}, not a TopKRouter")
        if not isinstance(moe.experts, SequentialMLP):
            raise TypeError(
                f"{where}.experts is {type(moe.experts).__name__}; elastic experts need "
                "SequentialMLP (moe_grouped_gemm=False)"
            )
        check_width(f"{where}.router", moe.router.weight.shape[0], ctrl, "moe_experts")
        yield moe, ElasticMoELayerMixin, {}
        yield moe.router, ElasticRouterMixin, {}
        for expert in moe.experts.local_experts:
            yield from mlp.mlp_steps(expert, ctrl, "moe_ffn")
        shared = getattr(moe, "shared_experts", None)
        if shared is not None:
            if getattr(shared, "use_shared_expert_gate", False):
                raise TypeError(f"{where}.shared_experts: a shared-expert gate is not elastic yet")
            yield linear.column(shared.linear_fc1)
            yield linear.row(shared.linear_fc2, hidden_out=False)

    def divisibility(self, axis, model, par, choices) -> list[Divisible]:
        """Experts split evenly over EP; expert channels as dense FFN channels."""
        if axis == "moe_experts":
            return [Divisible(1, par.ep, f"must be divisible by parallel.ep={par.ep}")]
        return mlp.channel_divisibility(par.tp, choices.quant_block, "the expert fc2")

    def check_choice(self, axis: str, choice: int, model) -> None:
        """Each token is routed to ``moe_router_topk`` experts: keep at least that many."""
        if axis == "moe_experts":
            require(
                choice >= model.moe_router_topk,
                "elastic.axes.moe_experts",
                f"choice {choice} must be >= model.moe_router_topk="
                f"{model.moe_router_topk} (each token is routed to that many experts)",
            )

    def score(self, scorer: Scorer, index: int, module: nn.Module) -> None:
        """REAP per expert, ``sum |act|`` per expert channel, tokens per expert (router)."""
        moe: Any = module
        experts = getattr(moe.experts, "local_experts", None)
        if experts is None:
            raise ValueError(
                f"decoder.layers.{index}.mlp.experts is {type(moe.experts).__name__}; REAP "
                "scoring needs megatron's SequentialMLP (moe_grouped_gemm=False)"
            )
        n, e_tp = len(experts), scorer.pgs.expt_tp
        reap = scorer.zeros(self, ("moe_reap", index), n)
        count = scorer.zeros(self, ("moe_count", index), n)
        ffn = scorer.zeros(self, ("moe_ffn", index), n, experts[0].linear_fc2.weight.shape[1])
        routed = scorer.zeros(self, ("router_count", index), scorer.config.num_moe_experts)

        def router_hook(_m, _args, out):
            routed.add_(out[1].detach().reshape(-1, routed.numel()).double().sum(0))

        scorer.hook(moe.router, router_hook)
        for k, expert in enumerate(experts):
            gate: dict[str, Tensor] = {}

            def expert_pre(_m, args, gate=gate):
                gate["p"] = args[1].detach().double().reshape(-1, 1)

            def fc2_pre(_m, args, k=k, gate=gate):
                p = gate["p"]
                act = tensors.token_rows(args[0]) / torch.where(p > 0, p, 1.0)
                ffn[k].add_(act.abs().sum(0))

            def expert_post(_m, _args, out, k=k):
                y = out[0].detach()
                if (
                    tensors.group_size(e_tp) > 1 and y.numel()
                ):  # row-parallel partial sums: add them
                    y = y.clone()
                    dist.all_reduce(y, group=e_tp)
                count[k] += y.reshape(-1, y.shape[-1]).shape[0]
                reap[k] += tensors.token_rows(y).norm(dim=-1).sum()

            scorer.hook(expert, expert_pre, pre=True)
            scorer.hook(expert.linear_fc2, fc2_pre, pre=True)
            scorer.hook(expert, expert_post)

    def reduce(self, scorer: Scorer, kind: str, index: int, acc: Tensor) -> dict[str, Tensor]:
        """Expert scores: summed over expert-DP, gathered over EP (and expert-TP)."""
        pgs = scorer.pgs
        if kind == "router_count":
            scorer.routed[index] = scorer.token_sum(acc)
        elif kind == "moe_ffn":
            t = tensors.all_gather(
                tensors.all_reduce(tensors.all_gather(acc, pgs.expt_tp, dim=1), pgs.expt_dp), pgs.ep
            )
            return {"moe_ffn": t}
        elif kind == "moe_reap":
            total = tensors.all_gather(tensors.all_reduce(acc, pgs.expt_dp), pgs.ep)
            counts = scorer.acc(("moe_count", index))
            assert counts is not None
            n = tensors.all_gather(tensors.all_reduce(counts.clone(), pgs.expt_dp), pgs.ep)
            reap = torch.where(n > 0, total / n.clamp(min=1), torch.zeros_like(total))
            return {"moe_experts": reap}
        return {}  # moe_count: read by moe_reap

    def permutations(self, scores, shape, stripe_tp, stripe_ep) -> Perms:
        """Experts striped over EP; each expert's channels over TP."""
        perms = super().permutations(
            {k: v for k, v in scores.items() if k == "moe_experts"}, shape, stripe_tp, stripe_ep
        )
        if "moe_ffn" in scores:
            perms["moe_ffn"] = {
                layer: torch.stack([reorder_permutation(row, stripe_tp) for row in s])
                for layer, s in sorted(scores["moe_ffn"].items())
            }
        return perms

    def finish_permutations(self, perms: Perms) -> None:
        """An expert's channel order follows the expert to its new position."""
        if "moe_ffn" in perms and "moe_experts" in perms:
            for layer, rows in perms["moe_ffn"].items():
                perms["moe_ffn"][layer] = rows[perms["moe_experts"][layer]]

    def permute(
        self, module: Any, get: Callable[[str], Tensor | None], emb: Tensor | None, gated: bool
    ) -> None:
        """Router and shared expert on the stream; experts moved whole; expert channels."""
        moe, experts, ffn = module, get("moe_experts"), get("moe_ffn")
        local, router = moe.experts.local_experts, moe.router
        if emb is not None:
            linear.permute_cols(router, emb)
            if moe.shared_experts is not None:
                mlp.permute_mlp(moe.shared_experts, None, emb, gated)
                linear.take(getattr(moe.shared_experts, "gate_weight", None), 1, emb)
        if experts is not None:
            order = experts.tolist()
            states = [
                {k: v.detach().clone() for k, v in local[j].named_parameters()} for j in order
            ]
            for pos, state in enumerate(states):
                with torch.no_grad():
                    for k, v in local[pos].named_parameters():
                        v.copy_(state[k])
            linear.permute_rows(router, experts)
            for name in ("expert_bias", "local_tokens_per_expert"):
                linear.take(getattr(router, name, None), 0, experts)
        for pos, expert in enumerate(local):
            mlp.permute_mlp(expert, None if ffn is None else ffn[pos], emb, gated)

    def slice_rules(self, masks: Mapping[str, Tensor], model) -> dict[str, Rule]:
        """Router rows of the kept experts, their channels, the shared expert's hidden side."""
        experts = masks.get("moe_experts")
        if experts is None:
            return {}
        h = masks["embedding"]
        rules: dict[str, Rule] = {
            "mlp.router": {
                "weight": {0: experts, 1: h},
                "bias": {0: experts},
                "expert_bias": {0: experts},
            },
            "mlp.shared_experts.linear_fc1": linear.linear_rule(None, h),
            "mlp.shared_experts.linear_fc2": linear.linear_rule(h, None),
            "mlp.shared_experts": {"gate_weight": {1: h}},
        }
        fc = "mlp.experts.local_experts"
        rules.update(mlp.mlp_rules(fc, masks["moe_ffn"], h, mlp.glu_factor(model)))
        return rules

    def slice_rename(self, masks: Mapping[str, Tensor]) -> Callable[[str], str | None] | None:
        """Kept experts renumbered in position order; dropped experts' keys gone."""
        experts = masks.get("moe_experts")
        kept = [] if experts is None else tensors.kept_positions(experts)
        return tensors.renumbering(_EXPERT, "j", kept)

    def params(self, cost: Any, w: Mapping[str, Num]) -> Num:
        """Per layer: norm ``H``, router ``E*H``, shared expert ``glu*H*S + S*H``."""
        m, h = cost.model, w["embedding"]
        if not m.has("E"):
            return 0
        shared = (mlp.glu_factor(m) + 1) * h * m.moe_shared_expert_ffn_hidden_size
        return cost.layers(w, "E") * (h + w["moe_experts"] * h + shared)

    def routed_params(self, cost: Any, w: Mapping[str, Num], active: bool) -> Num:
        """The active experts (``active``: the top-k a token visits) of ``glu*H*F + F*H``
        in every kept MoE layer."""
        m = cost.model
        if not m.has("E"):
            return 0
        experts = m.moe_router_topk if active else w["moe_experts"]
        return (
            cost.layers(w, "E") * experts * (mlp.glu_factor(m) + 1) * w["embedding"] * w["moe_ffn"]
        )

"""Dense MLP layers: the ``ffn`` axis (FFN channels, striped over the TP ranks).

Compute: :mod:`megatron_ext.elastic.layers_linear` (masked: ``linear_fc2``'s input; narrow:
``linear_fc1`` rows and ``linear_fc2`` columns of the active local prefix). Importance:
``sum_{b,l} |act(x W1^T)|`` per channel (the input of ``linear_fc2``). The routed experts
of an MoE layer are MLPs too; :mod:`.moe` converts and reorders them with the functions here
on its ``moe_ffn`` axis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from megatron.core.transformer.mlp import MLP
from torch import Tensor, nn

from megatron_ext.elastic.shard import Shard
from megatron_ext.elastic.sites import linear
from megatron_ext.elastic.sites.base import Axis, Num, Rule, Scorer, Site, Step, check_width
from megatron_ext.elastic.sites.divisibility import Divisible, quant_block, tp_split
from megatron_ext.elastic.sites.tensors import all_gather, all_reduce, token_rows

if TYPE_CHECKING:
    from megatron_ext.elastic.controller import ElasticController

FFN = Axis("ffn", "ffn_hidden_size", "-", stripe="tp")


def glu_factor(model: Any) -> int:
    """2 for swiglu (``linear_fc1`` holds gate and up halves), else 1."""
    return 2 if model.activation == "swiglu" else 1


def mlp_steps(mlp: Any, ctrl: ElasticController, axis: str) -> Iterator[Step]:
    """An MLP's ``linear_fc1`` (narrow rows) and ``linear_fc2`` (masked input) on ``axis``."""
    shard = Shard.of(mlp.tp_group)
    width = mlp.linear_fc2.weight.shape[1] * shard.count
    check_width("mlp.linear_fc2 input", width, ctrl, axis)
    glu = bool(mlp.config.gated_linear_unit)
    yield linear.column(mlp.linear_fc1, (axis, shard), glu)
    # routed experts' outputs are masked once, at the MoE layer's output
    yield linear.row(mlp.linear_fc2, (axis, shard, 1), hidden_out=axis == "ffn")


def channel_divisibility(tp: int, qb: int, gemm: str) -> list[Divisible]:
    """FFN channels: split over TP, ``gemm``'s per-rank input a multiple of the block."""
    return [tp_split(tp, "channels"), quant_block(1, tp, qb, f"choice/{tp}", gemm)]


def permute_mlp(mlp: Any, chans: Tensor | None, emb: Tensor | None, gated: bool) -> None:
    """An MLP's hidden side by ``emb`` and its channels by ``chans``."""
    if emb is not None:
        linear.permute_cols(mlp.linear_fc1, emb)
        linear.permute_rows(mlp.linear_fc2, emb)
    if chans is not None:
        linear.permute_rows(mlp.linear_fc1, linear.glu_rows(chans, chans.numel(), gated))
        linear.permute_cols(mlp.linear_fc2, chans)


def mlp_rules(prefix: str, chans: Tensor, h: Tensor, glu: int) -> dict[str, Rule]:
    """Slicing rules of an MLP at ``prefix`` (``mlp``, the experts' ``linear_fc``)."""
    return {
        f"{prefix}.linear_fc1": linear.linear_rule(chans.repeat(glu), h),
        f"{prefix}.linear_fc2": linear.linear_rule(h, chans),
    }


class MLPSite(Site):
    """Dense MLP channels."""

    name = "mlp"
    axes = (FFN,)
    upstream = (MLP,)
    hf_names = {f: {"ffn_hidden_size": "intermediate_size"} for f in ("nemotron_h", "llama")}
    nemo_names = {"ffn_hidden_size": "ffn_hidden_size"}

    def convert(self, module: nn.Module, ctrl: ElasticController, where: str) -> Iterator[Step]:
        """``linear_fc1`` and ``linear_fc2`` on the ``ffn`` axis."""
        return mlp_steps(module, ctrl, "ffn")

    def divisibility(self, axis, model, par, choices) -> list[Divisible]:
        """Channels split over TP; ``fc2``'s per-rank input a multiple of the block."""
        return channel_divisibility(par.tp, choices.quant_block, "fc2")

    def score(self, scorer: Scorer, index: int, module: nn.Module) -> None:
        """``sum |act|`` per channel at ``linear_fc2``'s input."""
        mlp: Any = module
        acc = scorer.zeros(self, ("ffn", index), mlp.linear_fc2.weight.shape[1])

        def hook(_m, args):
            acc.add_(token_rows(args[0]).abs().sum(0))

        scorer.hook(mlp.linear_fc2, hook, pre=True)

    def reduce(self, scorer: Scorer, kind: str, index: int, acc: Tensor) -> dict[str, Tensor]:
        """Gathered over TP (channels are TP-split), summed over DP."""
        return {"ffn": all_reduce(all_gather(acc, scorer.pgs.tp), scorer.pgs.dp)}

    def permute(
        self, module: Any, get: Callable[[str], Tensor | None], emb: Tensor | None, gated: bool
    ) -> None:
        """The hidden side and the FFN channels."""
        permute_mlp(module, get("ffn"), emb, gated)

    def slice_rules(self, masks: Mapping[str, Tensor], model) -> dict[str, Rule]:
        """The kept channels' ``linear_fc1`` rows (both GLU halves) and ``linear_fc2`` columns."""
        if "ffn" not in masks:
            return {}
        return mlp_rules("mlp", masks["ffn"], masks["embedding"], glu_factor(model))

    def params(self, cost: Any, w: Mapping[str, Num]) -> Num:
        """Per layer: norm ``H``, ``glu*H*f + f*H``."""
        m, h = cost.model, w["embedding"]
        if not m.has("-"):
            return 0
        return cost.layers(w, "-") * (h + (glu_factor(m) + 1) * h * w["ffn"])

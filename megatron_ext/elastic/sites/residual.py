"""The residual stream: the ``embedding`` axis (the hidden channels every layer reads and adds to).

Modules: the embedding, the pre-norms of every layer (``norm``, ``input_layernorm``,
``pre_mlp_layernorm``), the final norm and the output layer; the projections that read or
write the stream belong to their layer's site, which reorders and slices their hidden side
too. Compute: :mod:`megatron_ext.elastic.layers_residual`. Importance: ``sum |norm(x)|`` per
channel at every pre-norm, summed over layers (:func:`embedding_scores`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.identity_op import IdentityOp
from torch import Tensor, nn

from megatron_ext.elastic.layers_residual import ElasticEmbeddingMixin, ElasticRMSNormMixin
from megatron_ext.elastic.layout import reorder_permutation
from megatron_ext.elastic.sites import linear
from megatron_ext.elastic.sites.base import Axis, Num, Perms, Rule, Scorer, Site, Step, check_width
from megatron_ext.elastic.sites.divisibility import Divisible
from megatron_ext.elastic.sites.tensors import token_rows

if TYPE_CHECKING:
    from megatron_ext.elastic.controller import ElasticController

EMBEDDING = Axis("embedding", "hidden_size", None)
EMBEDDING_LAYER = -1
"""The layer key of the one ``embedding`` permutation (the whole residual stream)."""

PRE_NORMS: tuple[tuple[str, str], ...] = (
    ("norm", "mixer"),
    ("input_layernorm", "self_attention"),
    ("pre_mlp_layernorm", "mlp"),
)
"""(pre-norm, the layer child it feeds), upstream's attribute names."""


def embedding_scores(scores: Mapping[str, dict[int, Tensor]]) -> Tensor:
    """The one residual-stream score: per-layer embedding scores summed over layers."""
    layers = scores["embedding"]
    return torch.stack([layers[i] for i in sorted(layers)]).sum(0)


def _residual_norm(owner: nn.Module, attr: str, feeds: str | None, where: str) -> Iterator[Step]:
    norm = getattr(owner, attr, None)
    if norm is None:
        return
    if isinstance(norm, IdentityOp):
        fed = getattr(owner, feeds, None) if feeds else None
        if fed is not None and not isinstance(fed, IdentityOp):
            raise TypeError(
                f"{where}.{attr} is fused into the next linear (Transformer Engine "
                "LayerNormLinear); elastic embedding needs separate norms (the local backend)"
            )
        return
    if not isinstance(norm, torch.nn.RMSNorm):
        raise TypeError(
            f"{where}.{attr} is {type(norm).__name__}; elastic embedding supports "
            "torch.nn.RMSNorm (megatron_ext.compat.norms.TorchNorm with normalization=RMSNorm)"
        )
    yield norm, ElasticRMSNormMixin, {}


class ResidualSite(Site):
    """The ``embedding`` axis: the residual stream's hidden channels."""

    name = "residual"
    axes = (EMBEDDING,)
    hf_names = {family: {"hidden_size": "hidden_size"} for family in ("nemotron_h", "llama")}
    nemo_names = {"hidden_size": "hidden_size"}

    def convert_model(self, model: nn.Module, ctrl: ElasticController) -> Iterator[Step]:
        """The embedding (its output is masked / narrowed)."""
        embedding = getattr(model, "embedding", None)
        if isinstance(embedding, LanguageModelEmbedding):
            check_width("embedding", embedding.word_embeddings.weight.shape[1], ctrl, "embedding")
            yield embedding, ElasticEmbeddingMixin, {}

    def convert_layer(
        self, layer: nn.Module, index: int, ctrl: ElasticController, where: str
    ) -> Iterator[Step]:
        """The layer's pre-norms (RMSNorm over the active channels)."""
        for attr, feeds in PRE_NORMS:
            yield from _residual_norm(layer, attr, feeds, where)

    def convert_model_tail(self, model: nn.Module, ctrl: ElasticController) -> Iterator[Step]:
        """The final norm and the output layer (reads the active hidden columns)."""
        decoder: Any = model.decoder
        if getattr(decoder, "final_norm", None) is not None:
            yield from _residual_norm(decoder, "final_norm", None, "decoder")
        output = getattr(model, "output_layer", None)
        if isinstance(output, ColumnParallelLinear):
            yield linear.column(output)

    def divisibility(self, axis, model, par, choices) -> list[Divisible]:
        """Replicated across TP: the whole width is the input of every in-projection."""
        qb = choices.quant_block
        return [Divisible(1, qb, f"is not a multiple of elastic.quant_block={qb}")]

    def score_layer(self, scorer: Scorer, index: int, layer: nn.Module, fed=()) -> None:
        """``sum |norm(x)|`` per channel at every pre-norm that feeds a scored child."""
        for attr, child in PRE_NORMS:
            if child not in fed:
                continue
            norm = getattr(layer, attr, None)
            if norm is None or isinstance(norm, IdentityOp):
                raise ValueError(
                    f"decoder.layers.{index}.{attr} is fused into the next linear (Transformer "
                    "Engine spec); score importance with model_backend=local"
                )
            key = ("embedding", index)
            acc = scorer.acc(key)
            if acc is None:
                acc = scorer.zeros(self, key, scorer.config.hidden_size)

            def hook(_m, _args, out, acc=acc):
                acc.add_(token_rows(out).abs().sum(0))

            scorer.hook(norm, hook)

    def reduce(self, scorer: Scorer, kind: str, index: int, acc: Tensor) -> dict[str, Tensor]:
        """Token sums over the data-parallel ranks."""
        return {"embedding": scorer.token_sum(acc)}

    def permutations(self, scores, shape, stripe_tp, stripe_ep) -> Perms:
        """One order for the whole stream, from the scores summed over layers."""
        if "embedding" not in scores:
            return {}
        return {"embedding": {EMBEDDING_LAYER: reorder_permutation(embedding_scores(scores))}}

    def permute_model(self, model: Any, emb: Tensor | None) -> None:
        """Embedding columns (word and learned position), final norm, output-layer columns."""
        if emb is None:
            return
        linear.take(model.embedding.word_embeddings.weight, 1, emb)
        learned = getattr(model.embedding, "position_embeddings", None)
        linear.take(None if learned is None else learned.weight, 1, emb)
        linear.permute_norm(model.decoder.final_norm, emb)
        if not getattr(model, "share_embeddings_and_output_weights", False):
            linear.permute_cols(model.output_layer, emb)

    def permute_layer(self, layer: Any, emb: Tensor | None, fed=()) -> None:
        """The pre-norms of the layer's reordered children."""
        for attr, child in PRE_NORMS:
            if child in fed:
                linear.permute_norm(getattr(layer, attr, None), emb)

    def slice_rules(self, masks: Mapping[str, Tensor], model) -> dict[str, Rule]:
        """Embedding columns, output-layer columns, every norm on the stream."""
        h = masks["embedding"]
        norm = {"weight": {0: h}, "bias": {0: h}}
        rules: dict[str, Rule] = {
            "embedding.word_embeddings": {"weight": {1: h}},
            "output_layer": linear.linear_rule(None, h),
            "decoder.final_norm": norm,
        }
        rules.update({attr: norm for attr, _ in PRE_NORMS})
        return rules

    def params(self, cost: Any, w: Mapping[str, Num]) -> Num:
        """Embedding, output layer (not when tied) and the final norm."""
        m, h = cost.model, w["embedding"]
        return m.vocab_size * h * (1 if m.tie_embeddings else 2) + h

"""Forward-only importance scores of every elastic axis (Nemotron Elastic / Minitron, REAP).

Scores come from forward hooks on the stock megatron-core modules of a ``MambaModel``; no
module is replaced or copied. Each site of :mod:`megatron_ext.elastic.sites` hooks and
reduces its own axes (``Site.score``, ``Site.reduce``). Every score is a sum (or a mean) over
calibration tokens:

* ``embedding``: ``sum_{b,l} |norm(x)|`` per hidden channel, from each layer's pre-norm
  (Mamba ``norm``, ``input_layernorm``, ``pre_mlp_layernorm``); per layer, to be summed over
  layers (:func:`embedding_scores`) into the one residual-stream order;
* ``ffn``: ``sum_{b,l} |act(x W1^T)|`` per channel of each dense MLP (the input of ``linear_fc2``);
* ``attn_heads``: ``sum_{b,l} ||o_h||_2`` per head, ``o_h`` the head's slice of the attention
  output (the input of ``linear_proj``);
* ``mamba_heads`` / ``mamba_head_dim``: with ``s_d = ||x_{:,d}||_2`` over all tokens of the
  ``x`` slice of ``in_proj``'s output, a head scores ``f_h = ||s_{h,:}||_2`` and a within-head
  channel ``p`` scores ``sum_h s_{h,p}``;
* ``moe_experts`` (REAP): the mean over the tokens routed to expert ``j`` of
  ``g_j(x) ||f_j(x)||_2``. megatron applies the router's top-k probability (after its
  normalisation and top-k scaling) inside the expert (``per_token_scale``), so the expert's
  output already is ``g_j(x) f_j(x)``; an expert no token reaches scores 0;
* ``moe_ffn``: ``sum |act|`` per channel of each routed expert over the tokens routed to it
  (the gate divided back out of ``linear_fc2``'s input).

Parallel layouts. TP-sharded scores are all-gathered in megatron's contiguous-shard order,
expert scores are summed over the expert-data-parallel group and all-gathered over EP, and
token sums are summed over DP (and over TP when sequence parallelism splits the tokens).
Every rank ends with the same global tensors, keyed ``axis -> {layer index: tensor}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_ext.elastic.sites.base import Scorer, Site
from megatron_ext.elastic.sites.registry import axes as registry_axes
from megatron_ext.elastic.sites.registry import site_for, sites
from megatron_ext.elastic.sites.residual import embedding_scores
from megatron_ext.elastic.sites.tensors import all_reduce, group_size
from megatron_ext.models.config import HybridModelConfig, require

Scores = dict[str, dict[int, Tensor]]
"""``axis -> {layer index (0-based, as in ``decoder.layers.<i>``): score tensor}``."""


@dataclass
class ImportanceConfig:
    """The ``importance:`` block of the importance recipe.

        ``calib_batches`` micro-batches of ``micro_batch_size x seq_length`` tokens per DP rank
        are scored; the reordered checkpoint is striped for ``stripe_tp`` TP ranks (heads, FFN
        channels) and ``stripe_ep`` EP ranks (experts). The first ``depth_batches`` of them (all,
    when there are fewer) also
        score every layer for the ``depth`` axis (:mod:`megatron_ext.elastic.depth`: one forward
        pass per layer and batch); 0 ranks no layers, and the checkpoint allows only full depth.
    """

    calib_batches: int = 16
    seq_length: int = 128
    micro_batch_size: int = 4
    stripe_tp: int = 1
    stripe_ep: int = 1
    depth_batches: int = 4

    def __post_init__(self) -> None:
        value = self.depth_batches
        require(
            isinstance(value, int) and not isinstance(value, bool) and value >= 0,
            "importance.depth_batches",
            f"{value!r} must be an integer >= 0 (0 = no depth ranking)",
        )
        for name in ("calib_batches", "seq_length", "micro_batch_size", "stripe_tp", "stripe_ep"):
            value = getattr(self, name)
            require(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"importance.{name}",
                f"{value!r} must be an integer >= 1",
            )

    def check_model(self, model: HybridModelConfig) -> None:
        """Raise ``ConfigError`` unless the stripe layout splits every axis of ``model``."""
        for axis in registry_axes():
            if not axis.width or not axis.exists(model):
                continue
            # a grouped axis sends whole groups to the TP ranks; a striped one its positions
            name = axis.group[1] if axis.group is not None else axis.field
            stripe = "tp" if axis.group is not None else axis.stripe
            if stripe is None:
                continue
            parts = self.stripe_tp if stripe == "tp" else self.stripe_ep
            value = getattr(model, name)
            require(
                value % parts == 0,
                f"importance.stripe_{stripe}",
                f"{parts} does not divide model.{name}={value}",
            )


class ImportanceScorer(Scorer):
    """Forward hooks that accumulate importance statistics on a built ``MambaModel``.

    Every site of the registry hooks what its layer kind scores
    (:meth:`megatron_ext.elastic.sites.base.Site.score`) and turns its accumulators into
    scores (``Site.reduce``). Use as a context manager around forward passes, then call
    :meth:`scores` (collective).
    """

    def __init__(self, model: torch.nn.Module, pg_collection: Any) -> None:
        self.model: Any = model
        self.pgs = pg_collection
        self.config: Any = model.config
        self.routed: dict[int, Tensor] = {}
        self._acc: dict[tuple[str, int], Tensor] = {}
        self._owner: dict[tuple[str, int], Site] = {}
        self._handles: list[Any] = []
        require(
            group_size(getattr(pg_collection, "cp", None)) == 1,
            "parallel",
            "importance scoring does not support context parallelism",
        )

    # -- what the sites' hooks use ------------------------------------------------------
    def zeros(self, site: Site, key: tuple[str, int], *shape: int) -> Tensor:
        """A float64 accumulator under ``key``, reduced by ``site``."""
        self._acc[key] = torch.zeros(*shape, dtype=torch.float64)
        self._owner[key] = site
        return self._acc[key]

    def acc(self, key: tuple[str, int]) -> Tensor | None:
        """The accumulator under ``key`` (``None``: none yet)."""
        return self._acc.get(key)

    def hook(self, module: torch.nn.Module, fn: Callable, pre: bool = False) -> None:
        """Register a forward (``pre``: forward-pre) hook, removed on exit."""
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        self._handles.append(register(fn))

    def token_sum(self, t: Tensor) -> Tensor:
        """Sum a per-rank token statistic over every rank that saw other tokens."""
        if self.config.sequence_parallel:
            all_reduce(t, self.pgs.tp)
        return all_reduce(t, self.pgs.dp)

    def __enter__(self) -> ImportanceScorer:
        walk = sites()
        for i, layer in enumerate(self.model.decoder.layers):
            fed = []
            for name, child in layer.named_children():
                owner = site_for(child)
                if owner is not None:
                    owner.score(self, i, child)
                    fed.append(name)
            for site in walk:
                site.score_layer(self, i, layer, fed)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def scores(self) -> tuple[Scores, dict[int, Tensor]]:
        """Global scores on every rank, and the tokens the router sent to each expert.

        Collective over all ranks; call it once, after the forward passes.
        """
        out: Scores = {}
        self.routed = {}
        for key, acc in sorted(self._acc.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            kind, i = key
            for axis, t in self._owner[key].reduce(self, kind, i, acc.clone()).items():
                out.setdefault(axis, {})[i] = t
        return out, self.routed


@dataclass
class ImportanceResult:
    """Scores of every axis, plus what they were computed from."""

    scores: Scores
    tokens: int
    batches: int
    expert_tokens: dict[int, Tensor] = field(default_factory=dict)

    def summary(self, top: int = 5) -> dict[str, Any]:
        """A deterministic, JSON-able digest: per axis and layer, size, range, top/bottom."""
        axes: dict[str, Any] = {}
        for axis in sorted(self.scores):
            axes[axis] = {str(i): describe(t, top) for i, t in sorted(self.scores[axis].items())}
        if "embedding" in self.scores:
            axes["embedding_total"] = describe(embedding_scores(self.scores), top)
        return {
            "tokens": self.tokens,
            "batches": self.batches,
            "axes": axes,
            "expert_tokens": {
                str(i): [int(v) for v in t.round().tolist()]
                for i, t in sorted(self.expert_tokens.items())
            },
        }


def _num(v: float) -> float:
    return float(f"{v:.6g}") if math.isfinite(v) else v


def describe(t: Tensor, top: int = 5) -> dict[str, Any]:
    """Shape, min/mean/max and the ``top`` highest/lowest (flat index, score) of ``t``."""
    flat = t.detach().double().reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    k = min(top, flat.numel())
    pick = lambda idx: [[int(j), _num(float(flat[j]))] for j in idx]  # noqa: E731
    return {
        "shape": list(t.shape),
        "min": _num(float(flat.min())),
        "mean": _num(float(flat.mean())),
        "max": _num(float(flat.max())),
        "top": pick(order[:k].tolist()),
        "bottom": pick(order[-k:].flip(0).tolist()),
    }


def compute_importance(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    pg_collection: Any,
    *,
    num_batches: int | None = None,
    progress: bool = False,
) -> ImportanceResult:
    """Score every elastic axis of ``model`` on ``batches`` (each with ``tokens`` and
    ``position_ids``, ``[b, s]``), forward only, in eval mode; collective over all ranks.

    ``num_batches`` bounds an endless iterator; ``progress`` shows a bar on global rank 0.
    """
    from tqdm import tqdm

    from megatron_ext.models.builder import causal_mask

    was_training = model.training
    model.eval()
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    tokens = torch.zeros(1, dtype=torch.float64)
    done = 0
    bar = tqdm(total=num_batches, desc="importance", unit="batch", disable=not (progress and rank0))
    try:
        with ImportanceScorer(model, pg_collection) as scorer, torch.no_grad():
            for batch in batches:
                if num_batches is not None and done >= num_batches:
                    break
                ids = batch["tokens"]
                model(ids, batch["position_ids"], causal_mask(ids.shape[1], ids.device))
                tokens += ids.numel()
                done += 1
                bar.update(1)
        scores, routed = scorer.scores()
    finally:
        bar.close()
        model.train(was_training)
    total = int(all_reduce(tokens, pg_collection.dp).item())
    return ImportanceResult(scores=scores, tokens=total, batches=done, expert_tokens=routed)

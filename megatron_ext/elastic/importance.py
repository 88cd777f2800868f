"""Forward-only importance scores of every elastic axis (Nemotron Elastic / Minitron, REAP).

Scores come from forward hooks on the stock megatron-core modules of a ``MambaModel``; no
module is replaced or copied. Every score is a sum (or a mean) over calibration tokens:

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
        tp, ep = self.stripe_tp, self.stripe_ep
        checks = [
            ("ffn_hidden_size", tp, "-"),
            ("num_query_groups", tp, "*"),
            ("mamba_num_groups", tp, "M"),
            ("moe_ffn_hidden_size", tp, "E"),
            ("num_experts", ep, "E"),
        ]
        for name, parts, symbol in checks:
            value = getattr(model, name)
            require(
                not model.has(symbol) or value % parts == 0,
                f"importance.stripe_{'ep' if name == 'num_experts' else 'tp'}",
                f"{parts} does not divide model.{name}={value}",
            )


def _size(group: Any) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def _reduce(t: Tensor, group: Any) -> Tensor:
    if _size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def _gather(t: Tensor, group: Any, dim: int = 0) -> Tensor:
    """All-gather ``t`` over ``group`` and concatenate in group-rank (shard) order."""
    n = _size(group)
    if n == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim)


def _rows(t: Tensor) -> Tensor:
    """``[..., c]`` activations as ``[tokens, c]`` float64."""
    return t.detach().reshape(-1, t.shape[-1]).double()


def _is_identity(module: Any) -> bool:
    from megatron.core.transformer.identity_op import IdentityOp

    return module is None or isinstance(module, IdentityOp)


class ImportanceScorer:
    """Forward hooks that accumulate importance statistics on a built ``MambaModel``.

    Use as a context manager around forward passes, then call :meth:`scores` (collective).
    """

    def __init__(self, model: torch.nn.Module, pg_collection: Any) -> None:
        self.model: Any = model
        self.pgs = pg_collection
        self.config: Any = model.config
        self._acc: dict[tuple[str, int], Tensor] = {}
        self._handles: list[Any] = []
        self._expert_offset: dict[int, int] = {}
        require(
            _size(getattr(pg_collection, "cp", None)) == 1,
            "parallel",
            "importance scoring does not support context parallelism",
        )

    # -- hook registration --------------------------------------------------------------
    def _zeros(self, key: tuple[str, int], *shape: int) -> Tensor:
        self._acc[key] = torch.zeros(*shape, dtype=torch.float64)
        return self._acc[key]

    def _hook(self, module: torch.nn.Module, fn: Callable, pre: bool = False) -> None:
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        self._handles.append(register(fn))

    def _add_norm(self, i: int, norm: Any, where: str) -> None:
        if _is_identity(norm):
            raise ValueError(
                f"decoder.layers.{i}.{where} is fused into the next linear (Transformer "
                "Engine spec); score importance with model_backend=local"
            )
        acc = self._acc.get(("embedding", i))
        if acc is None:
            acc = self._zeros(("embedding", i), self.config.hidden_size)

        def hook(_m, _args, out):
            acc.add_(_rows(out).abs().sum(0))

        self._hook(norm, hook)

    def _add_mamba(self, i: int, mixer: Any) -> None:
        dil = mixer.d_inner_local_tp
        acc = self._zeros(("mamba_x_sq", i), dil)

        def hook(_m, _args, out):
            x = out[0][..., dil : 2 * dil]
            acc.add_(_rows(x).square().sum(0))

        self._hook(mixer.in_proj, hook)

    def _add_attention(self, i: int, attn: Any) -> None:
        heads = attn.num_attention_heads_per_partition
        acc = self._zeros(("attn_heads", i), heads)

        def hook(_m, args):
            o = _rows(args[0])
            acc.add_(o.view(o.shape[0], heads, -1).norm(dim=-1).sum(0))

        self._hook(attn.linear_proj, hook, pre=True)

    def _add_mlp(self, i: int, mlp: Any) -> None:
        acc = self._zeros(("ffn", i), mlp.linear_fc2.weight.shape[1])

        def hook(_m, args):
            acc.add_(_rows(args[0]).abs().sum(0))

        self._hook(mlp.linear_fc2, hook, pre=True)

    def _add_moe(self, i: int, moe: Any) -> None:
        experts = getattr(moe.experts, "local_experts", None)
        if experts is None:
            raise ValueError(
                f"decoder.layers.{i}.mlp.experts is {type(moe.experts).__name__}; REAP scoring "
                "needs megatron's SequentialMLP (moe_grouped_gemm=False)"
            )
        self._expert_offset[i] = int(moe.local_expert_indices[0])
        n, e_tp = len(experts), self.pgs.expt_tp
        reap = self._zeros(("moe_reap", i), n)
        count = self._zeros(("moe_count", i), n)
        ffn = self._zeros(("moe_ffn", i), n, experts[0].linear_fc2.weight.shape[1])
        routed = self._zeros(("router_count", i), self.config.num_moe_experts)

        def router_hook(_m, _args, out):
            routed.add_(out[1].detach().reshape(-1, routed.numel()).double().sum(0))

        self._hook(moe.router, router_hook)
        for k, expert in enumerate(experts):
            gate: dict[str, Tensor] = {}

            def expert_pre(_m, args, gate=gate):
                gate["p"] = args[1].detach().double().reshape(-1, 1)

            def fc2_pre(_m, args, k=k, gate=gate):
                p = gate["p"]
                act = _rows(args[0]) / torch.where(p > 0, p, 1.0)
                ffn[k].add_(act.abs().sum(0))

            def expert_post(_m, _args, out, k=k):
                y = out[0].detach()
                if _size(e_tp) > 1 and y.numel():  # row-parallel partial sums: add them up
                    y = y.clone()
                    dist.all_reduce(y, group=e_tp)
                count[k] += y.reshape(-1, y.shape[-1]).shape[0]
                reap[k] += _rows(y).norm(dim=-1).sum()

            self._hook(expert, expert_pre, pre=True)
            self._hook(expert.linear_fc2, fc2_pre, pre=True)
            self._hook(expert, expert_post)

    def __enter__(self) -> ImportanceScorer:
        from megatron.core.transformer.mlp import MLP
        from megatron.core.transformer.moe.moe_layer import MoELayer

        for i, layer in enumerate(self.model.decoder.layers):
            if hasattr(layer, "mixer"):
                self._add_norm(i, layer.norm, "norm")
                self._add_mamba(i, layer.mixer)
                continue
            if not _is_identity(getattr(layer, "self_attention", None)):
                self._add_norm(i, layer.input_layernorm, "input_layernorm")
                self._add_attention(i, layer.self_attention)
            mlp = getattr(layer, "mlp", None)
            if isinstance(mlp, MoELayer):
                self._add_norm(i, layer.pre_mlp_layernorm, "pre_mlp_layernorm")
                self._add_moe(i, mlp)
            elif isinstance(mlp, MLP):
                self._add_norm(i, layer.pre_mlp_layernorm, "pre_mlp_layernorm")
                self._add_mlp(i, mlp)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- reduction ----------------------------------------------------------------------
    def _token_sum(self, t: Tensor) -> Tensor:
        """Sum a per-rank token statistic over every rank that saw other tokens."""
        if self.config.sequence_parallel:
            _reduce(t, self.pgs.tp)
        return _reduce(t, self.pgs.dp)

    def scores(self) -> tuple[Scores, dict[int, Tensor]]:
        """Global scores on every rank, and the tokens the router sent to each expert.

        Collective over all ranks; call it once, after the forward passes.
        """
        pgs = self.pgs
        out: Scores = {}
        routed: dict[int, Tensor] = {}
        for (kind, i), acc in sorted(self._acc.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            t = acc.clone()
            if kind in ("embedding", "router_count"):
                t = self._token_sum(t)
                (routed if kind == "router_count" else out.setdefault(kind, {}))[i] = t
            elif kind in ("ffn", "attn_heads"):
                out.setdefault(kind, {})[i] = _reduce(_gather(t, pgs.tp), pgs.dp)
            elif kind == "mamba_x_sq":
                mixer = self.model.decoder.layers[i].mixer
                s = _reduce(_gather(t, pgs.tp), pgs.dp).sqrt().view(-1, mixer.headdim)
                out.setdefault("mamba_heads", {})[i] = s.norm(dim=1)
                out.setdefault("mamba_head_dim", {})[i] = s.sum(0)
            elif kind == "moe_ffn":
                t = _gather(_reduce(_gather(t, pgs.expt_tp, dim=1), pgs.expt_dp), pgs.ep)
                out.setdefault("moe_ffn", {})[i] = t
            elif kind == "moe_reap":
                total = _gather(_reduce(t, pgs.expt_dp), pgs.ep)
                n = _gather(_reduce(self._acc[("moe_count", i)].clone(), pgs.expt_dp), pgs.ep)
                reap = torch.where(n > 0, total / n.clamp(min=1), torch.zeros_like(total))
                out.setdefault("moe_experts", {})[i] = reap
        return out, routed


def embedding_scores(scores: Scores) -> Tensor:
    """The one residual-stream score: per-layer embedding scores summed over layers."""
    layers = scores["embedding"]
    return torch.stack([layers[i] for i in sorted(layers)]).sum(0)


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
    total = int(_reduce(tokens, pg_collection.dp).item())
    return ImportanceResult(scores=scores, tokens=total, batches=done, expert_tokens=routed)

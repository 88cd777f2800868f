"""The benchmark suite's model: a hybrid with every layer kind, and its elastic budgets.

``bench_model(hidden)`` scales the shape of ``bench/slice_write.py`` (M, *, - and E layers)
to ``hidden``; ``bench_elastic(model)`` gives every axis two or three width choices (all
multiples of 16 along GEMM inputs) and three budgets:

* ``L``: the full model;
* ``M``: about half the active parameters (hidden 3/4, every other axis halved, 6 of 8
  experts), the budget the "small budgets train cheaper" ratio uses;
* ``S``: about a third (hidden 1/2, every other axis halved, 4 of 8 experts).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from megatron_ext.elastic.config import Budget, ElasticConfig
from megatron_ext.models.config import HybridModelConfig

PATTERN = "M*ME-M*E"


def bench_model(hidden: int, dtype: str = "float32") -> HybridModelConfig:
    """The hybrid of hidden width ``hidden`` (a multiple of 64), every layer kind present."""
    if hidden % 64:
        raise ValueError(f"hidden must be a multiple of 64, got {hidden}")
    return HybridModelConfig(
        name=f"bench_h{hidden}",
        pattern=PATTERN,
        hidden_size=hidden,
        ffn_hidden_size=4 * hidden,
        num_attention_heads=hidden // 64,
        num_query_groups=2,
        kv_channels=64,
        mamba_num_heads=hidden // 32,
        mamba_head_dim=64,
        mamba_num_groups=2,
        mamba_state_dim=64,
        moe_ffn_hidden_size=hidden,
        moe_shared_expert_ffn_hidden_size=2 * hidden,
        params_dtype=dtype,
    )


def bench_elastic(model: HybridModelConfig) -> ElasticConfig:
    """Width choices of every axis and the budgets L (full), M (~1/2 active), S (~1/3)."""
    h, f, e = model.hidden_size, model.ffn_hidden_size, model.num_experts
    heads, mamba = model.num_attention_heads, model.mamba_num_heads
    axes = {
        "embedding": [h, 3 * h // 4, h // 2],
        "attn_heads": [heads, heads // 2],
        "mamba_heads": [mamba, mamba // 2],
        "mamba_head_dim": [model.mamba_head_dim, model.mamba_head_dim // 2],
        "ffn": [f, 3 * f // 4, f // 2],
        "moe_experts": [e, 3 * e // 4, e // 2],
        "moe_ffn": [model.moe_ffn_hidden_size, model.moe_ffn_hidden_size // 2],
    }
    halves = {
        "attn_heads": heads // 2,
        "mamba_heads": mamba // 2,
        "ffn": f // 2,
        "moe_ffn": model.moe_ffn_hidden_size // 2,
    }
    mid = {"embedding": 3 * h // 4, "moe_experts": 3 * e // 4, **halves}
    small = {"embedding": h // 2, "moe_experts": e // 2, **halves}
    budgets = [
        Budget("L", 1.0, kind="active_params"),
        Budget("M", 0.5, kind="active_params", widths=mid),
        Budget("S", 0.3, kind="active_params", widths=small),
    ]
    return ElasticConfig(axes=axes, budgets=budgets, compute="narrow")


@dataclass(frozen=True)
class Workload:
    """One training batch: ``batch`` sequences of ``seq_length`` random tokens."""

    batch: int
    seq_length: int

    def make(self, vocab: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
        """The batch dict the training loops read (tokens, labels, positions, loss mask)."""
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (self.batch, self.seq_length + 1), generator=gen)
        pos = torch.arange(self.seq_length)[None].expand(self.batch, -1)
        batch = {
            "tokens": ids[:, :-1],
            "labels": ids[:, 1:],
            "position_ids": pos,
            "loss_mask": torch.ones(self.batch, self.seq_length),
        }
        return {k: v.contiguous().to(device) for k, v in batch.items()}


def describe(model: HybridModelConfig) -> dict[str, object]:
    """The model's shape fields, for ``results.json``."""
    return dataclasses.asdict(model)

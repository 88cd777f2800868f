"""Decode throughput: a standalone slice against the full model, scaled by their sizes.

Both models are plain megatron-core ``MambaModel`` s decoded with the project's cached
decoder (``megatron_ext.generate.decode.CachedDecoder``: KV cache for attention, conv and SSM
states for Mamba), greedy, from the same random prompt. The slice is cut from the parent at
the mid budget with ``slice_model``.

A decode step (one token for every row, one forward pass) takes milliseconds, shorter than
the bursts of a busy machine, so the two models are interleaved token by token: both are
prefilled, then each step of one is followed by the same step of the other (the order
alternates). Tokens/s is the batch size over the median step time.

``slice tokens/s ÷ (full tokens/s × full active params ÷ slice active params)`` is 1 when
the slice is exactly as much faster as it is smaller. Interleaving per step also makes each
model start its step with caches the other one filled; the warm variant (ratio 4b) lets each
model take ``WARM_BLOCK`` steps in a row and does not time the first of them, as a server
decoding one model would. The elastic checkpoint itself, decoding in narrow compute at the
slice's widths, runs in the same interleaving (ratio 4c: its tokens/s over the slice's).
A few more steps of each model are split by layer kind
(``suite_profile``, medians): what keeps the slice from its share.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from suite_profile import layer_kind_timer

from megatron_ext.benchmark import block_schedule, synchronize
from megatron_ext.elastic.controller import ElasticController, StripeLayout
from megatron_ext.elastic.convert import convert_to_elastic
from megatron_ext.elastic.slicing import build_slice, slice_model
from megatron_ext.generate.decode import CachedDecoder
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.models.params import count_parameters

PROFILED_STEPS = 17  # untimed steps split by layer kind (medians)
WARM_BLOCK = 16  # steps per model back to back in the warm-cache variant (ratio 4b)


class _ElasticAt:
    """A cached decoder of the elastic model that runs every call at ``widths`` in ``mode``."""

    def __init__(self, model: torch.nn.Module, ctrl: ElasticController, widths, mode: str):
        self.decoder, self.ctrl, self.widths, self.mode = CachedDecoder(model), ctrl, widths, mode

    def prefill(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """The wrapped decoder's prefill at the widths."""
        with self.ctrl.at(self.widths, mode=self.mode):
            return self.decoder.prefill(ids, new_tokens)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """The wrapped decoder's step at the widths."""
        with self.ctrl.at(self.widths, mode=self.mode):
            return self.decoder.step(tokens)


def _paired_steps(
    makers: dict[str, Callable[[], Any]],
    ids: torch.Tensor,
    new_tokens: int,
    times: dict[str, list[float]],
    block: int = 1,
) -> None:
    """One greedy generation per decoder, decode steps interleaved; appends step seconds.

    ``block`` steps of one decoder run back to back before the next's (``block_schedule``).
    """
    decoders = {name: make() for name, make in makers.items()}
    last = {name: d.prefill(ids, new_tokens).argmax(-1) for name, d in decoders.items()}
    for name, timed in block_schedule(list(makers), new_tokens - 1, block):
        start = time.perf_counter()
        logits = decoders[name].step(last[name])
        synchronize(logits.device)
        if timed:
            times[name].append(time.perf_counter() - start)
        last[name] = logits.argmax(-1)


def decode_speed(
    parent: torch.nn.Module,
    cfg: HybridModelConfig,
    widths: dict[str, int],
    pgs,
    device: torch.device,
    *,
    batch: int,
    prompt: int,
    new_tokens: int,
    reps: int,
) -> dict[str, Any]:
    """Decode tokens/s of ``parent`` and of its slice at ``widths``, interleaved per step."""
    small_cfg, state = slice_model(parent, widths, ElasticController(cfg, StripeLayout()))
    small = build_slice(small_cfg, state, pg_collection=pgs).to(device).eval()
    parent = parent.to(device).eval()
    models = {"full": parent, "slice": small}
    elastic = build_slice(cfg, parent.state_dict(), pg_collection=pgs).to(device).eval()
    ctrl = ElasticController(cfg, StripeLayout(), mode="narrow")
    ctrl.keep_narrow_weights = True  # as generation's ElasticBudgets serves a budget
    convert_to_elastic(elastic, ctrl)
    makers: dict[str, Callable[[], Any]] = {
        "full": lambda: CachedDecoder(parent),
        "slice": lambda: CachedDecoder(small),
        "elastic_narrow": lambda: _ElasticAt(elastic, ctrl, widths, "narrow"),
    }
    active = {
        "full": count_parameters(parent, cfg, pgs).active,
        "slice": count_parameters(small, small_cfg, pgs).active,
    }
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), generator=gen).to(device)
    _paired_steps(makers, ids, 4, {name: [] for name in makers})  # warm-up
    times: dict[str, list[float]] = {name: [] for name in makers}
    warm: dict[str, list[float]] = {name: [] for name in makers}
    for _ in range(reps):
        _paired_steps(makers, ids, new_tokens, times)
        _paired_steps(makers, ids, new_tokens, warm, WARM_BLOCK)
    kinds = {}
    for name, model in models.items():
        pattern = cfg.pattern if name == "full" else small_cfg.pattern
        decoder = CachedDecoder(model)
        token = decoder.prefill(ids, PROFILED_STEPS).argmax(-1)
        per_step: dict[str, list[float]] = {}
        for _ in range(PROFILED_STEPS - 1):
            with layer_kind_timer(model, pattern) as seconds:
                start = time.perf_counter()
                token = decoder.step(token).argmax(-1)
                synchronize(token.device)
                seconds["total"] = time.perf_counter() - start
            for kind, value in seconds.items():
                per_step.setdefault(kind, []).append(value)
        kinds[name] = {kind: statistics.median(v) for kind, v in per_step.items()}
    step = {name: statistics.median(t) for name, t in times.items()}
    full, sliced = batch / step["full"], batch / step["slice"]
    size = active["full"] / active["slice"]
    warm_step = {name: statistics.median(t) for name, t in warm.items()}
    return {
        "batch": batch,
        "prompt_tokens": prompt,
        "new_tokens": new_tokens,
        "steps_per_model": len(times["full"]),
        "full_tokens_per_s": full,
        "slice_tokens_per_s": sliced,
        "full_active_params": active["full"],
        "slice_active_params": active["slice"],
        "speedup": sliced / full,
        "size_ratio": size,
        "ratio": sliced / full / size,
        "warm_block_steps": WARM_BLOCK,
        "warm_speedup": warm_step["full"] / warm_step["slice"],
        "warm_ratio": warm_step["full"] / warm_step["slice"] / size,
        "elastic_narrow_tokens_per_s": batch / step["elastic_narrow"],
        "elastic_narrow_over_slice": step["slice"] / step["elastic_narrow"],
        "elastic_narrow_over_slice_warm": warm_step["slice"] / warm_step["elastic_narrow"],
        "step_seconds_by_layer_kind": kinds,
    }

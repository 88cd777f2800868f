"""Post-training quantization: amax calibration of the input scales, nothing else.

Weights need no calibration: their per-tensor scale follows the full weight tensor's amax
(:mod:`megatron_ext.quant.layers`). Inputs get a static per-tensor scale from the largest
absolute value seen over the calibration batches, run at every budget's widths
(``quant.calib_budgets=all``) or at full width only (``full``). Routed experts that no
calibration token reached take the largest input scale of the same linear in the other
experts of their layer (they all read the same hidden states).

On several ranks (``pg_collection`` given) every rank runs its own layers: at ``pp > 1`` the
batches go forward only through megatron's schedule, every stage at the same widths; the
scales are then agreed over the ranks holding the same linear and the experts' siblings are
looked up over every expert-parallel rank (:mod:`megatron_ext.quant.parallel`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from megatron_ext.elastic.controller import ElasticController
from megatron_ext.models.builder import causal_mask
from megatron_ext.quant.convert import quant_record
from megatron_ext.quant.parallel import agree_over_replicas, sibling_max_over_experts
from megatron_ext.training.pipeline import pipeline_stages, teacher_logits

_EXPERT = re.compile(r"^(.*\.local_experts\.)\d+(\..*)$")


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    controller: ElasticController | None = None,
    budgets: Mapping[str, Mapping[str, int]] | None = None,
    pg_collection=None,
) -> None:
    """Calibrate the input scales of quantized ``model`` on ``batches`` (at each of
    ``budgets``' widths when ``controller`` is given; else at the model's current widths).

    ``pg_collection``: the process groups of a sharded ``model`` (collective over every
    rank); ``None`` for one unsharded process."""
    record = quant_record(model)
    for m in record.modules.values():
        m.quant_input_scale.fill_(float("nan"))
        m.__dict__["quant_calibrated"] = False
    settings: list[Mapping[str, int] | None] = list((budgets or {}).values()) or [None]
    batches = list(batches)
    was_training = model.training
    model.eval()
    with record.controller.at("calibrate"):
        for widths in settings:
            scope = contextlib.nullcontext()
            if controller is not None and widths is not None:
                controller.set_gates(None)
                scope = controller.at(dict(widths))  # type: ignore[assignment]
            with scope:
                if pipeline_stages(pg_collection) > 1:  # every stage runs its own layers
                    seq = int(batches[0]["tokens"].shape[1])
                    teacher_logits(model, batches, pg_collection, seq_length=seq)
                    continue
                for batch in batches:
                    tokens = batch["tokens"]
                    model(
                        tokens, batch["position_ids"], causal_mask(tokens.shape[1], tokens.device)
                    )
    model.train(was_training)
    agree_over_replicas(record.modules, pg_collection)
    fill_unseen_experts(model, pg_collection)
    for m in record.modules.values():
        m.__dict__["quant_calibrated"] = True


def _fmax(a: float, b: float) -> float:
    """The larger of ``a`` and ``b``, NaN (unseen) counting as smaller than any number."""
    return b if a != a else a if b != b else max(a, b)


def fill_unseen_experts(model: nn.Module, pg_collection=None) -> list[str]:
    """Give every uncalibrated routed-expert linear its siblings' largest input scale (the
    siblings on every expert-parallel rank of ``pg_collection``).

    Returns the names filled. ``RuntimeError`` names a linear that stays uncalibrated (not
    an expert, or no expert of its layer saw a token).
    """
    modules = quant_record(model).modules
    seen: dict[str, float] = {}
    for name, m in modules.items():
        match = _EXPERT.match(name)
        if match is None:
            continue
        key = match[1] + "*" + match[2]
        seen[key] = _fmax(seen.get(key, float("nan")), float(m.quant_input_scale))
    seen = sibling_max_over_experts(seen, pg_collection)
    filled = []
    for name, m in modules.items():
        if not bool(torch.isnan(m.quant_input_scale)):
            continue
        match = _EXPERT.match(name)
        key = None if match is None else match[1] + "*" + match[2]
        if key is None or key not in seen:
            raise RuntimeError(f"{name}: no calibration input reached it; use more calib batches")
        m.quant_input_scale.fill_(seen[key])
        filled.append(name)
    return filled

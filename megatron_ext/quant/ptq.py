"""Post-training quantization: amax calibration of the input scales, nothing else.

Weights need no calibration: their per-tensor scale follows the full weight tensor's amax
(:mod:`megatron_ext.quant.layers`). Inputs get a static per-tensor scale from the largest
absolute value seen over the calibration batches, run at every budget's widths
(``quant.calib_budgets=all``) or at full width only (``full``). Routed experts that no
calibration token reached take the largest input scale of the same linear in the other
experts of their layer (they all read the same hidden states).
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

_EXPERT = re.compile(r"^(.*\.local_experts\.)\d+(\..*)$")


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    controller: ElasticController | None = None,
    budgets: Mapping[str, Mapping[str, int]] | None = None,
) -> None:
    """Calibrate the input scales of quantized ``model`` on ``batches`` (at each of
    ``budgets``' widths when ``controller`` is given; else at the model's current widths)."""
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
                for batch in batches:
                    tokens = batch["tokens"]
                    model(
                        tokens, batch["position_ids"], causal_mask(tokens.shape[1], tokens.device)
                    )
    model.train(was_training)
    fill_unseen_experts(model)
    for m in record.modules.values():
        m.__dict__["quant_calibrated"] = True


def fill_unseen_experts(model: nn.Module) -> list[str]:
    """Give every uncalibrated routed-expert linear its siblings' largest input scale.

    Returns the names filled. ``RuntimeError`` names a linear that stays uncalibrated (not
    an expert, or no expert of its layer saw a token).
    """
    modules = quant_record(model).modules
    seen: dict[str, float] = {}
    for name, m in modules.items():
        match = _EXPERT.match(name)
        scale = float(m.quant_input_scale)
        if match is not None and scale == scale:  # not NaN
            key = match[1] + "*" + match[2]
            seen[key] = max(seen.get(key, 0.0), scale)
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

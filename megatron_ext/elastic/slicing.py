"""Zero-shot slicing: the standalone smaller model of one budget (docs/design.md invariant 1).

:func:`slice_model` selects, from every tensor of an elastic model built at TP=1 / EP=1, the
components active at ``widths`` (the positions :func:`megatron_ext.elastic.layout.active_mask`
keeps under the recorded stripe layout, in position order) and returns the smaller
:class:`HybridModelConfig` with that state dict. The plain megatron-core model of that config
computes exactly what the elastic model computes at ``widths`` in masked mode:

* every hidden-channel GEMM input is zero on inactive channels there, and the residual norms
  use the active channels' statistics, which the smaller RMSNorm computes over all of its;
* heads, Mamba heads, Mamba head channels, FFN channels and experts are independent of each
  other; the Mamba gated norm's group size of the smaller model is its ``d_inner / ngroups``,
  the active channels of each group;
* a layer the ``depth`` axis skips is the identity on the residual stream, so the slice
  drops it: the kept layers are renumbered ``decoder.layers.0..`` in layer order and the
  hybrid pattern shortens to theirs.

Selection copies the kept runs of whole tensors once; :func:`save_slice` writes the result as
a standalone ``torch_dist`` checkpoint with ``model_config.json`` beside it, from a model
built on the meta device that holds the selected tensors themselves (no second copy).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from megatron_ext.elastic.config import DEPTH
from megatron_ext.elastic.controller import ElasticController, StripeLayout
from megatron_ext.elastic.convert import elastic_controller
from megatron_ext.elastic.depth import kept_pattern
from megatron_ext.models.config import (
    HybridModelConfig,
    load_model_config,
    save_model_config,
)
from megatron_ext.parallel import ParallelConfig

_EXPERT = re.compile(r"^(?P<head>.*\.mlp\.experts\.local_experts\.)(?P<j>\d+)(?P<tail>\..*)$")
_LAYER = re.compile(r"^(?P<head>decoder\.layers\.)(?P<i>\d+)(?P<tail>\..*)$")


def sliced_config(
    model: HybridModelConfig, widths: dict[str, int], stripes: StripeLayout | None = None
) -> HybridModelConfig:
    """``model`` with every elastic width replaced by its value in ``widths``; a ``depth``
    below the layer count keeps the layers ``stripes.layer_order`` ranks first (the pattern
    shortens to theirs)."""
    widths = dict(widths)
    depth = widths.pop(DEPTH, model.num_layers)
    kept = (stripes or StripeLayout()).kept_layers(depth, model.num_layers)
    fields = {
        "embedding": "hidden_size",
        "attn_heads": "num_attention_heads",
        "ffn": "ffn_hidden_size",
        "mamba_heads": "mamba_num_heads",
        "mamba_head_dim": "mamba_head_dim",
        "moe_experts": "num_experts",
        "moe_ffn": "moe_ffn_hidden_size",
    }
    changes: dict[str, Any] = {fields[axis]: width for axis, width in widths.items()}
    changes["pattern"] = kept_pattern(model.pattern, kept)
    return dataclasses.replace(model, name=f"{model.name}_slice", **changes)


Rules = dict[int, Tensor]  # {dim: bool mask over that dim} of one tensor
Rule = dict[str, Rules]  # parameter name -> its rules


def _linear(rows: Tensor | None, cols: Tensor | None) -> Rule:
    """A linear layer: ``weight [rows, cols]``; its bias follows the rows."""
    weight = {d: m for d, m in ((0, rows), (1, cols)) if m is not None}
    return {"weight": weight, "bias": {} if rows is None else {0: rows}}


class _Selection:
    """Bool masks over the TP=1 layout of every tensor an axis touches, by module name.

    Module names are upstream's with the layer index (``decoder.layers.<i>.``) and the local
    expert index removed, e.g. ``mixer.in_proj`` or ``mlp.experts.local_experts.linear_fc1``.
    """

    def __init__(self, ctrl: ElasticController) -> None:
        cfg = ctrl.model
        m = {axis: ctrl.global_mask(axis) for axis in ctrl.full_widths}
        h = m["embedding"]
        norm = {"weight": {0: h}, "bias": {0: h}}
        self.table: dict[str, Rule] = {
            "embedding.word_embeddings": {"weight": {1: h}},
            "output_layer": _linear(None, h),
            "decoder.final_norm": norm,
            "norm": norm,  # Mamba layers' pre-norm
            "input_layernorm": norm,
            "pre_mlp_layernorm": norm,
        }
        self.experts: Tensor | None = m.get("moe_experts")
        glu = 2 if cfg.activation == "swiglu" else 1  # fc1 rows are [gate; up] halves
        if "attn_heads" in m:
            heads = m["attn_heads"].view(cfg.num_query_groups, -1)  # [groups, heads per group]
            kv = cfg.kv_channels
            qkv = torch.ones(heads.shape[0], heads.shape[1] + 2, kv, dtype=torch.bool)
            qkv[:, : heads.shape[1]] = heads[:, :, None]  # [q heads.., k, v] per group
            self.table["self_attention.linear_qkv"] = _linear(qkv.reshape(-1), h)
            head_cols = m["attn_heads"].repeat_interleave(kv)
            self.table["self_attention.linear_proj"] = _linear(h, head_cols)
        if "mamba_heads" in m:
            heads = m["mamba_heads"]
            ch = (heads[:, None] & m["mamba_head_dim"][None, :]).reshape(-1)
            bc = torch.ones(2 * cfg.mamba_num_groups * cfg.mamba_state_dim, dtype=torch.bool)
            self.table.update(
                {
                    # per head (D per channel, D_has_hdim, is not built by this project)
                    "mixer": {"A_log": {0: heads}, "dt_bias": {0: heads}, "D": {0: heads}},
                    "mixer.in_proj": _linear(torch.cat([ch, ch, bc, heads]), h),  # z x B C dt
                    "mixer.conv1d": {"weight": {0: torch.cat([ch, bc])}},  # x B C
                    "mixer.norm": {"weight": {0: ch}, "bias": {0: ch}},
                    "mixer.out_proj": _linear(h, ch),
                }
            )
            self.table["mixer.conv1d"]["bias"] = self.table["mixer.conv1d"]["weight"]
        if "ffn" in m:
            self.table["mlp.linear_fc1"] = _linear(m["ffn"].repeat(glu), h)
            self.table["mlp.linear_fc2"] = _linear(h, m["ffn"])
        if self.experts is not None:
            fc = "mlp.experts.local_experts.linear_fc"
            self.table.update(
                {
                    "mlp.router": {
                        "weight": {0: self.experts, 1: h},
                        "bias": {0: self.experts},
                        "expert_bias": {0: self.experts},
                    },
                    f"{fc}1": _linear(m["moe_ffn"].repeat(glu), h),
                    f"{fc}2": _linear(h, m["moe_ffn"]),
                    "mlp.shared_experts.linear_fc1": _linear(None, h),
                    "mlp.shared_experts.linear_fc2": _linear(h, None),
                    "mlp.shared_experts": {"gate_weight": {1: h}},
                }
            )

    def rules(self, key: str) -> Rules:
        """``{dim: bool mask}`` for the tensor named ``key`` (an upstream state-dict name)."""
        owner, _, name = key.rpartition(".")
        generic = re.sub(r"^decoder\.layers\.\d+\.", "", owner)
        generic = re.sub(r"local_experts\.\d+\.", "local_experts.", generic)
        rule = self.table.get(generic, {}).get(name)
        if rule is None:
            raise KeyError(f"no slicing rule for {key!r}; add one in megatron_ext.elastic.slicing")
        return rule


def _index(mask: Tensor, device: torch.device) -> Tensor:
    return mask.nonzero().flatten().to(device)


def _check_unsharded(model: nn.Module) -> None:
    from megatron.core.utils import get_pg_size

    for name, module in model.named_modules():
        for attr in ("tp_group", "ep_group"):
            group = getattr(module, attr, None)
            if group is not None and get_pg_size(group) > 1:
                raise ValueError(
                    f"slice_model needs the model at TP=1 / EP=1; {name}.{attr} has "
                    f"{get_pg_size(group)} ranks (load the elastic checkpoint at TP=1 first)"
                )


def slice_rules(controller: ElasticController, widths: dict[str, int]) -> Callable[[str], Rules]:
    """``rules(key)``: the ``{dim: bool mask}`` :func:`slice_model` applies to state-dict entry
    ``key`` at ``widths`` (with the stripe layout of ``controller``)."""
    probe = ElasticController(controller.model, controller.stripes, widths=widths)
    return _Selection(probe).rules


def slice_key_map(
    keys: Iterable[str], widths: dict[str, int], controller: ElasticController
) -> dict[str, str]:
    """Where each of ``keys`` (full-model state-dict names) lands in the slice at ``widths``:
    routed experts are renumbered in position order; dropped experts are absent."""
    probe = ElasticController(controller.model, controller.stripes, widths=widths)
    kept, layers = _kept_experts(_Selection(probe)), _kept_layers(probe)
    out = {}
    for key in keys:
        renamed = _renamed(key, kept, layers)
        if renamed is not None:
            out[key] = renamed
    return out


def _kept_experts(select: _Selection) -> dict[int, int]:
    if select.experts is None:
        return {}
    kept = _index(select.experts, torch.device("cpu")).tolist()
    return {int(j): i for i, j in enumerate(kept)}


def _kept_layers(ctrl: ElasticController) -> dict[int, int]:
    """Global index of every kept layer -> its index in the slice (layer order)."""
    kept = _index(ctrl.global_mask(DEPTH), torch.device("cpu")).tolist()
    return {int(j): i for i, j in enumerate(kept)}


def _renamed(key: str, kept_experts: dict[int, int], kept_layers: dict[int, int]) -> str | None:
    layer = _LAYER.match(key)
    if layer is not None:
        i = int(layer["i"])
        if i not in kept_layers:
            return None
        key = f"{layer['head']}{kept_layers[i]}{layer['tail']}"
    match = _EXPERT.match(key)
    if match is None:
        return key
    j = int(match["j"])
    if j not in kept_experts:
        return None
    return f"{match['head']}{kept_experts[j]}{match['tail']}"


@torch.no_grad()
def slice_model(
    model: nn.Module, widths: dict[str, int], controller: ElasticController | None = None
) -> tuple[HybridModelConfig, dict[str, Any]]:
    """The smaller config at ``widths`` and its state dict, selected from ``model`` (TP=1).

    ``model`` is an elastic model (its controller gives the full shape and stripe layout) or
    a plain one with ``controller``. Axes missing from ``widths`` stay full. The returned
    tensors are new and contiguous; ``_extra_state`` entries are carried over.
    """
    ctrl = controller or elastic_controller(model)
    _check_unsharded(model)
    probe = ElasticController(ctrl.model, ctrl.stripes, widths=widths)
    select = _Selection(probe)
    kept_experts, kept_layers = _kept_experts(select), _kept_layers(probe)
    out: dict[str, Any] = {}
    for full_key, value in model.state_dict().items():
        key = _renamed(full_key, kept_experts, kept_layers)
        if key is None:
            continue
        if not isinstance(value, Tensor) or key.endswith("_extra_state"):
            out[key] = value
            continue
        out[key] = _select(key, value, select.rules(key))
    return sliced_config(ctrl.model, probe.widths, ctrl.stripes), out


_MAX_RUNS = 64  # more contiguous runs than this: one index_select is cheaper than the pieces


def _runs(mask: Tensor) -> list[tuple[int, int]]:
    """``(start, length)`` of every run of consecutive ``True`` in the 1-D ``mask``."""
    m = mask.to(device="cpu", dtype=torch.int8)
    edge = torch.diff(m, prepend=m.new_zeros(1), append=m.new_zeros(1))
    starts = (edge == 1).nonzero().flatten().tolist()
    ends = (edge == -1).nonzero().flatten().tolist()
    return [(s, e - s) for s, e in zip(starts, ends)]


def _select(key: str, value: Tensor, rules: Rules) -> Tensor:
    """``value`` restricted to the kept positions of every ruled dim, in a new tensor.

    The kept positions of a budget are a few contiguous runs (prefixes per stripe or group),
    so each dim is cut with views and the pieces are copied once; ``index_select`` (a
    per-element gather, several times slower along a weight's columns) is the fallback.
    """
    out = value
    for dim, mask in rules.items():
        if out.shape[dim] != mask.numel():
            raise ValueError(f"{key}: dim {dim} has {out.shape[dim]}, mask {mask.numel()}")
        runs = _runs(mask)
        if len(runs) == 1:
            out = out.narrow(dim, *runs[0])
        elif 1 < len(runs) <= _MAX_RUNS:
            out = torch.cat([out.narrow(dim, start, n) for start, n in runs], dim)
        else:
            out = out.index_select(dim, _index(mask, out.device))
    if out.untyped_storage().data_ptr() == value.untyped_storage().data_ptr():
        return out.clone(memory_format=torch.contiguous_format)
    return out.contiguous()


def build_slice(
    config: HybridModelConfig,
    state_dict: dict[str, Any],
    parallel: ParallelConfig | None = None,
    pg_collection=None,
) -> nn.Module:
    """The plain megatron-core model of ``config`` with ``state_dict`` loaded (strict)."""
    from megatron_ext.models.builder import build_model

    model = build_model(config, parallel or ParallelConfig(), pg_collection, initialize=False)
    model.load_state_dict(state_dict, strict=True)
    return model


def _holding(config: HybridModelConfig, state_dict: dict[str, Any], pg_collection) -> nn.Module:
    """The model of ``config`` whose parameters *are* ``state_dict``'s tensors, for saving.

    Built on the meta device (nothing allocated or initialised), then the tensors are
    assigned, not copied; megatron's per-parameter attributes (``tensor_model_parallel``,
    ``allreduce``, ...) move to the new parameters. Its non-persistent buffers stay on the meta
    device: it writes a checkpoint, it does not run.
    """
    from megatron_ext.models.builder import build_model

    model = build_model(config, ParallelConfig(), pg_collection, meta=True)
    attrs = {name: dict(vars(p)) for name, p in model.named_parameters()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    for name, param in model.named_parameters():
        vars(param).update(attrs.get(name, {}))
    return model


def save_slice(
    model: nn.Module,
    widths: dict[str, int],
    directory: str | Path,
    pg_collection=None,
    controller: ElasticController | None = None,
) -> Path:
    """Slice ``model`` at ``widths`` and save it as a standalone checkpoint under ``directory``.

    Writes ``directory/iter_0000000`` (megatron ``torch_dist`` weights, no optimizer, through
    :class:`megatron_ext.checkpoint.CheckpointManager`) and ``directory/model_config.json``.
    Returns the checkpoint directory.
    """
    from megatron_ext.checkpoint import CheckpointManager

    config, state = slice_model(model, widths, controller)
    small = _holding(config, state, pg_collection)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = CheckpointManager(directory, pg_collection, keep=1).save(
        0, small, None, {"widths": dict(widths), "kind": "elastic_slice"}
    )
    save_model_config(config, directory)
    return path


def load_slice(directory: str | Path, pg_collection=None) -> nn.Module:
    """Build the model of ``directory/model_config.json`` and load its saved weights."""
    from megatron.core import dist_checkpointing

    from megatron_ext.checkpoint import CheckpointManager
    from megatron_ext.models.builder import build_model

    directory = Path(directory)
    config = load_model_config(directory)
    model = build_model(config, ParallelConfig(), pg_collection, initialize=False)
    path = CheckpointManager(directory, pg_collection).path_for(0)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(path)))
    return model

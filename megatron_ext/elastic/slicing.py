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

from megatron_ext.elastic.controller import ElasticController, StripeLayout
from megatron_ext.elastic.convert import elastic_controller
from megatron_ext.elastic.sites.base import Rule, Rules
from megatron_ext.elastic.sites.registry import axes as registry_axes
from megatron_ext.elastic.sites.registry import sites
from megatron_ext.models.config import (
    HybridModelConfig,
    load_model_config,
    save_model_config,
)
from megatron_ext.parallel import ParallelConfig


def sliced_config(
    model: HybridModelConfig, widths: dict[str, int], stripes: StripeLayout | None = None
) -> HybridModelConfig:
    """``model`` with every elastic width replaced by its value in ``widths``; a ``depth``
    below the layer count keeps the layers ``stripes.layer_order`` ranks first (the pattern
    shortens to theirs). Each site names its fields (``Site.sliced_fields``)."""
    unknown = sorted(set(widths) - {a.name for a in registry_axes()})
    if unknown:
        raise KeyError(unknown[0])
    changes: dict[str, Any] = {}
    for site in sites():
        changes.update(site.sliced_fields(model, widths, stripes or StripeLayout()))
    return dataclasses.replace(model, name=f"{model.name}_slice", **changes)


class _Selection:
    """Bool masks over the TP=1 layout of every tensor an axis touches, by module name.

    Module names are upstream's with the layer index (``decoder.layers.<i>.``) and the local
    expert index removed, e.g. ``mixer.in_proj`` or ``mlp.experts.local_experts.linear_fc1``;
    every site adds its own (``Site.slice_rules``) and renames its keys (``Site.slice_rename``).
    """

    def __init__(self, ctrl: ElasticController) -> None:
        masks = {axis: ctrl.global_mask(axis) for axis in ctrl.full_widths}
        self.table: dict[str, Rule] = {}
        self.renames: list[Callable[[str], str | None]] = []
        for site in sites():
            self.table.update(site.slice_rules(masks, ctrl.model))
            rename = site.slice_rename(masks)
            if rename is not None:
                self.renames.append(rename)

    def rules(self, key: str) -> Rules:
        """``{dim: bool mask}`` for the tensor named ``key`` (an upstream state-dict name)."""
        owner, _, name = key.rpartition(".")
        generic = re.sub(r"^decoder\.layers\.\d+\.", "", owner)
        generic = re.sub(r"local_experts\.\d+\.", "local_experts.", generic)
        rule = self.table.get(generic, {}).get(name)
        if rule is None:
            raise KeyError(f"no slicing rule for {key!r}; add one to its site's slice_rules")
        return rule

    def renamed(self, key: str) -> str | None:
        """Where ``key`` lands in the slice (``None``: its component is dropped)."""
        for rename in self.renames:
            renamed = rename(key)
            if renamed is None:
                return None
            key = renamed
        return key


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
    select = _Selection(probe)
    out = {}
    for key in keys:
        renamed = select.renamed(key)
        if renamed is not None:
            out[key] = renamed
    return out


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
    out: dict[str, Any] = {}
    for full_key, value in model.state_dict().items():
        key = select.renamed(full_key)
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

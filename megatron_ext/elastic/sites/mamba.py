"""Mamba layers: the ``mamba_heads`` and ``mamba_head_dim`` axes of megatron's ``MambaMixer``.

Compute: :mod:`megatron_ext.elastic.layers_mamba` (the mixer's gated norm masks the SSM
output per head and head channel, per-group RMS over the active channels; narrow: the mixer
computes only the active heads / head channels). Importance: with ``s_d = ||x_{:,d}||_2``
over all tokens of the ``x`` slice of ``in_proj``'s output, a head scores
``f_h = ||s_{h,:}||_2`` and a within-head channel ``p`` scores ``sum_h s_{h,p}``.

Tensors (``d = heads * head_dim`` channels, ``G`` groups, state ``N``): ``in_proj`` rows
``[z (d), x (d), B C (2GN), dt (heads)]``, ``conv1d`` channels ``[x, B C]``, ``A_log``,
``dt_bias``, ``D`` per head, gated ``norm`` per channel, ``out_proj`` columns per channel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from megatron_ext.elastic.layers_mamba import ElasticGatedNormMixin, ElasticMambaMixerMixin
from megatron_ext.elastic.shard import Shard
from megatron_ext.elastic.sites import linear
from megatron_ext.elastic.sites.base import Axis, Num, Rule, Scorer, Site, Step, check_width
from megatron_ext.elastic.sites.divisibility import Divisible, quant_block, tp_split, whole_groups
from megatron_ext.elastic.sites.tensors import all_gather, all_reduce, token_rows

if TYPE_CHECKING:
    from megatron_ext.elastic.controller import ElasticController

MAMBA_CONV_KERNEL = 4
"""megatron-core ``MambaMixer``'s default ``d_conv``, which the builder keeps."""

HEADS = Axis("mamba_heads", "mamba_num_heads", "M", group=("mamba_num_heads", "mamba_num_groups"))
HEAD_DIM = Axis("mamba_head_dim", "mamba_head_dim", "M")


class MambaSite(Site):
    """Mamba heads and head channels."""

    name = "mamba"
    axes = (HEADS, HEAD_DIM)
    hf_names = {
        "nemotron_h": {"mamba_num_heads": "mamba_num_heads", "mamba_head_dim": "mamba_head_dim"}
    }
    nemo_names = {"mamba_num_heads": "mamba_num_heads", "mamba_head_dim": "mamba_head_dim"}

    @property
    def upstream(self) -> tuple[type, ...]:  # type: ignore[override]
        """megatron's ``MambaMixer``, imported on first use.

        ``ssm/mamba_mixer.py`` imports triton, so on a machine without it the module loads only
        after :func:`megatron_ext.compat.ensure_compat`. This site is reached from the config
        dataclasses, and those must load without any shim: a pickled config (a submitit job's)
        is loaded before any entry point of ours has run.
        """
        from megatron.core.ssm.mamba_mixer import MambaMixer

        return (MambaMixer,)

    def convert(self, module: nn.Module, ctrl: ElasticController, where: str) -> Iterator[Step]:
        """The mixer, its gated norm, and its in / out projections."""
        mixer: Any = module
        if not mixer.rmsnorm:
            raise TypeError(
                f"{where}: elastic Mamba heads need the mixer's gated norm (rmsnorm=True)"
            )
        if mixer.cp.cp_size > 1:
            raise TypeError(f"{where}: elastic Mamba heads do not support context parallelism yet")
        check_width(f"{where} (heads)", mixer.nheads, ctrl, "mamba_heads")
        check_width(f"{where} (head dim)", mixer.headdim, ctrl, "mamba_head_dim")
        heads = {"elastic_heads": Shard.of(mixer.tp_group)}
        yield mixer, ElasticMambaMixerMixin, heads
        yield linear.column(mixer.in_proj)
        yield mixer.norm, ElasticGatedNormMixin, heads
        yield linear.row(mixer.out_proj)

    def divisibility(self, axis, model, par, choices) -> list[Divisible]:
        """Whole heads per group, groups split over TP, and ``out_proj``'s per-rank input
        (heads x head dim) a multiple of the quantization block for every pairing."""
        tp, qb = par.tp, choices.quant_block
        if axis == "mamba_heads":
            head_dims = choices.axes.get("mamba_head_dim", [model.mamba_head_dim])
            return [
                whole_groups(model.mamba_num_groups, "mamba_num_groups"),
                tp_split(tp, "groups"),
            ] + [
                quant_block(d, tp, qb, f"choice*{d}/{tp} with mamba_head_dim {d}", "out_proj")
                for d in head_dims
            ]
        heads = choices.axes.get("mamba_heads", [model.mamba_num_heads])
        return [
            quant_block(h, tp, qb, f"{h}*choice/{tp} with mamba_heads {h}", "out_proj")
            for h in heads
        ]

    def score(self, scorer: Scorer, index: int, module: nn.Module) -> None:
        """``sum x^2`` per ``d_inner`` channel of the ``x`` slice of ``in_proj``'s output."""
        mixer: Any = module
        dil = mixer.d_inner_local_tp
        acc = scorer.zeros(self, ("mamba_x_sq", index), dil)

        def hook(_m, _args, out):
            x = out[0][..., dil : 2 * dil]
            acc.add_(token_rows(x).square().sum(0))

        scorer.hook(mixer.in_proj, hook)

    def reduce(self, scorer: Scorer, kind: str, index: int, acc: Tensor) -> dict[str, Tensor]:
        """Gathered over TP, summed over DP; heads and head channels from one ``s``."""
        mixer = scorer.model.decoder.layers[index].mixer
        pgs = scorer.pgs
        s = all_reduce(all_gather(acc, pgs.tp), pgs.dp).sqrt().view(-1, mixer.headdim)
        return {"mamba_heads": s.norm(dim=1), "mamba_head_dim": s.sum(0)}

    def permute(
        self, module: Any, get: Callable[[str], Tensor | None], emb: Tensor | None, gated: bool
    ) -> None:
        """Every tensor of the mixer: per head, per channel, and the hidden side."""
        mixer = module
        heads, hdim = get("mamba_heads"), get("mamba_head_dim")
        if emb is not None:
            linear.permute_cols(mixer.in_proj, emb)
            linear.permute_rows(mixer.out_proj, emb)
        if heads is None and hdim is None:
            return
        nh, hd = mixer.nheads_local_tp, mixer.headdim
        heads = torch.arange(nh) if heads is None else heads
        hdim = torch.arange(hd) if hdim is None else hdim
        chan = (heads[:, None] * hd + hdim[None, :]).reshape(-1)  # d_inner channel order
        di, bc = nh * hd, 2 * mixer.ngroups_local_tp * mixer.d_state
        rest = torch.arange(bc)
        in_rows = torch.cat([chan, di + chan, 2 * di + rest, 2 * di + bc + heads])  # z x B C dt
        linear.permute_rows(mixer.in_proj, in_rows)
        conv = torch.cat([chan, di + rest])  # x B C
        linear.take(mixer.conv1d.weight, 0, conv)
        linear.take(mixer.conv1d.bias, 0, conv)
        for p in (mixer.A_log, mixer.dt_bias):
            linear.take(p, 0, heads)
        linear.take(mixer.D, 0, chan if mixer.D.numel() == di else heads)
        linear.permute_norm(mixer.norm, chan)
        linear.permute_cols(mixer.out_proj, chan)

    def slice_rules(self, masks: Mapping[str, Tensor], model) -> dict[str, Rule]:
        """The kept heads and channels of every mixer tensor."""
        if "mamba_heads" not in masks:
            return {}
        h, heads = masks["embedding"], masks["mamba_heads"]
        ch = (heads[:, None] & masks["mamba_head_dim"][None, :]).reshape(-1)
        bc = torch.ones(2 * model.mamba_num_groups * model.mamba_state_dim, dtype=torch.bool)
        conv = torch.cat([ch, bc])  # x B C
        return {
            # per head (D per channel, D_has_hdim, is not built by this project)
            "mixer": {"A_log": {0: heads}, "dt_bias": {0: heads}, "D": {0: heads}},
            "mixer.in_proj": linear.linear_rule(torch.cat([ch, ch, bc, heads]), h),  # z x B C dt
            "mixer.conv1d": {"weight": {0: conv}, "bias": {0: conv}},
            "mixer.norm": {"weight": {0: ch}, "bias": {0: ch}},
            "mixer.out_proj": linear.linear_rule(h, ch),
        }

    def params(self, cost: Any, w: Mapping[str, Num]) -> Num:
        """Per layer: norm ``H``, in_proj ``H*(2d + 2GN + h)``, conv1d ``c*K + c``,
        ``A_log``/``dt_bias``/``D`` ``3h``, gated norm ``d``, out_proj ``d*H``."""
        m, h = cost.model, w["embedding"]
        if not m.has("M"):
            return 0
        heads, d = w["mamba_heads"], w["mamba_heads"] * w["mamba_head_dim"]
        bc = 2 * m.mamba_num_groups * m.mamba_state_dim
        conv = (d + bc) * (MAMBA_CONV_KERNEL + 1)  # weight [c, 1, K] and bias [c]
        mamba = h + h * (2 * d + bc + heads) + conv + 3 * heads + d + d * h
        return cost.layers(w, "M") * mamba

    def cache_bytes(self, cost: Any, w: Mapping[str, Num]) -> Num:
        """The SSM state and the convolution window of every kept Mamba layer."""
        m, s = cost.model, cost.spec
        d = w["mamba_heads"] * w["mamba_head_dim"]
        conv = (d + 2 * m.mamba_num_groups * m.mamba_state_dim) * (MAMBA_CONV_KERNEL - 1)
        state = s.batch * (d * m.mamba_state_dim + conv) * s.state_bytes
        return cost.layers(w, "M") * state

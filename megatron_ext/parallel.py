"""Process-group set-up: one typed config, one function that returns the groups.

Everything below the recipes receives a megatron-core ``ProcessGroupCollection`` explicitly;
nothing deeper asks ``parallel_state`` for a group.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from megatron_ext.errors import ConfigError, require


class ModelShape(Protocol):
    """What :meth:`ParallelConfig.check_model` reads of a model config (a ``HybridModelConfig``).

    The layout does not depend on the model package: the model builder takes a layout, not the
    other way round.
    """

    pattern: str
    hidden_size: int
    vocab_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    mamba_num_heads: int
    mamba_num_groups: int
    num_experts: int
    position_embedding_type: str

    @property
    def num_layers(self) -> int:
        """Layers in the pattern."""
        ...

    def has(self, symbol: str) -> bool:
        """Whether the pattern has a layer of kind ``symbol``."""
        ...


@dataclass
class ParallelConfig:
    """Process layout: ``nproc`` ranks split into TP × CP × PP × DP, with EP carved out of DP × TP.

    ``cp`` context-parallel ranks each hold a part of every sequence (megatron-core's
    load-balanced split, :func:`split_for_context_parallel`); offered for stacks without
    attention layers: megatron-core's Mamba mixer runs its all-to-all context parallelism with
    any backend, its attention CP needs TransformerEngine's attention (GPU), which this
    project's layer spec does not use.

    ``pp`` pipeline stages each hold ``num_layers / pp`` consecutive layers of the hybrid
    pattern (megatron-core's even split); the first stage also holds the embedding, the last
    the final norm and the output layer. The schedule is megatron-core's 1F1B. Interleaved
    (virtual) stages are not offered: megatron-core 0.16.1's ``MambaStack`` refuses them.
    """

    nproc: int = 1
    tp: int = 1
    ep: int = 1
    pp: int = 1
    cp: int = 1
    # Sequence parallelism whenever tp > 1 (megatron-core requires it for MoE with TP).
    sequence_parallel: bool = True
    backend: str = "auto"  # auto: nccl with CUDA, gloo without
    timeout_s: int = 600

    def __post_init__(self) -> None:
        for field in ("nproc", "tp", "ep", "pp", "cp"):
            require(getattr(self, field) >= 1, f"parallel.{field}", "must be >= 1")
        require(
            self.nproc % (self.tp * self.pp * self.cp) == 0,
            "parallel.nproc",
            f"must be a multiple of tp*pp*cp = {self.tp * self.pp * self.cp}",
        )
        require(
            self.nproc % self.ep == 0,
            "parallel.ep",
            f"must divide nproc={self.nproc} (expert parallelism is carved out of the ranks)",
        )
        require(
            self.backend in ("auto", "gloo", "nccl"),
            "parallel.backend",
            "must be auto, gloo or nccl",
        )

    @property
    def use_sequence_parallel(self) -> bool:
        """Whether sequence parallelism is on (it needs tp > 1)."""
        return self.sequence_parallel and self.tp > 1

    @property
    def dp(self) -> int:
        """Data-parallel size (context-parallel ranks of one replica read the same samples)."""
        return self.nproc // (self.tp * self.pp * self.cp)

    def check_model(self, model: ModelShape) -> None:
        """Raise :class:`ConfigError` if ``model`` cannot be split this way."""
        tp, ep = self.tp, self.ep
        if model.num_layers % self.pp:
            raise ConfigError(
                f"parallel.pp: the {model.num_layers} layers of model.pattern "
                f"{model.pattern!r} do not split evenly over {self.pp} pipeline stages; "
                f"use a pp that divides {model.num_layers}"
            )
        if self.cp > 1 and model.has("*"):
            raise ConfigError(
                f"parallel.cp: model.pattern {model.pattern!r} has attention layers ('*'); "
                "megatron-core's attention context parallelism needs TransformerEngine's "
                "TEDotProductAttention (GPU), which the local layer spec does not use. Use "
                "cp=1, or a pattern without '*' (Mamba, MLP and MoE layers run at any cp)"
            )
        checks = [
            ("model.hidden_size", model.hidden_size, tp, True),
            ("model.vocab_size", model.vocab_size, tp, True),
            ("model.num_attention_heads", model.num_attention_heads, tp, model.has("*")),
            ("model.num_query_groups", model.num_query_groups, tp, model.has("*")),
            ("model.ffn_hidden_size", model.ffn_hidden_size, tp, model.has("-")),
            ("model.mamba_num_heads", model.mamba_num_heads, tp * self.cp, model.has("M")),
            ("model.mamba_num_groups", model.mamba_num_groups, tp, model.has("M")),
            ("model.num_experts", model.num_experts, ep, model.has("E")),
        ]
        if model.has("E") and self.tp > 1 and not self.sequence_parallel:
            raise ConfigError(
                "parallel.sequence_parallel: megatron-core's MoE layers need sequence parallelism "
                f"at tp={self.tp}; set it to true (or use tp=1)"
            )
        if self.cp > 1 and model.position_embedding_type == "rope":
            raise ConfigError(
                f"model.position_embedding_type: 'rope' at parallel.cp={self.cp}; no layer of "
                f"{model.pattern!r} uses it, and megatron-core 0.16.1 splits the rotary table "
                "over context-parallel ranks on CUDA only; set it to 'none'"
            )
        groups = model.mamba_num_groups // tp
        if model.has("M") and self.cp > 1 and groups % self.cp and self.cp % groups:
            raise ConfigError(
                f"model.mamba_num_groups: {groups} groups per TP rank and parallel.cp={self.cp} "
                "must divide one another (megatron-core's Mamba context parallelism)"
            )
        for field, value, size, applies in checks:
            if applies and value % size:
                raise ConfigError(f"{field}: {value} is not divisible by the parallel size {size}")


def init_distributed(cfg: ParallelConfig, seed: int = 0):
    """Initialise ``torch.distributed`` and megatron-core's model-parallel groups.

    Works under torchrun/srun (reads ``RANK``/``WORLD_SIZE``) and as a single plain process
    (a world of one on an in-process store, so concurrent single-rank jobs on one node never
    race for a port). Also seeds the RNGs with ``seed`` (see
    :func:`set_seed`), since megatron-core cannot build a layer before its RNG tracker has its
    named states. Returns megatron's ``ProcessGroupCollection``.
    """
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    if not dist.is_initialized():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != cfg.nproc:
            raise ConfigError(
                f"parallel.nproc: config says {cfg.nproc} ranks but WORLD_SIZE is {world}"
            )
        store = None
        if world == 1 and "MASTER_ADDR" not in os.environ:
            store = dist.HashStore()
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
        backend = cfg.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend=backend,
            world_size=world,
            rank=int(os.environ["RANK"]),
            store=store,
            timeout=datetime.timedelta(seconds=cfg.timeout_s),
        )
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp,
        context_parallel_size=cfg.cp,
        expert_model_parallel_size=cfg.ep,
    )
    set_seed(seed)
    return ProcessGroupCollection.use_mpu_process_groups()


def set_seed(seed: int) -> None:
    """Seed the CPU generator and megatron's tracked model-parallel RNG states."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    """Tear down megatron's groups and the default process group."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def split_for_context_parallel(batch: dict[str, torch.Tensor], cp_group) -> dict[str, torch.Tensor]:
    """This context-parallel rank's part of ``batch`` (tensors ``[b, s, ...]``).

    megatron-core's load-balanced split (``get_batch_on_this_cp_rank``): the sequence is cut
    into ``2*cp`` chunks and rank ``r`` keeps chunks ``r`` and ``2*cp-1-r``, the layout that
    megatron-core's Mamba context parallelism undoes and redoes around its all-to-all. The
    batch is returned as is at cp=1; ``batch`` itself is never modified.
    """
    from megatron.core.utils import get_batch_on_this_cp_rank

    cp = dist.get_world_size(cp_group) if dist.is_initialized() and cp_group is not None else 1
    if cp == 1:
        return batch
    seq = batch["tokens"].shape[1]
    if seq % (2 * cp):
        raise ConfigError(
            f"train.seq_length: {seq} is not divisible by 2*parallel.cp = {2 * cp} "
            "(each context-parallel rank holds two equal chunks of every sequence)"
        )
    return get_batch_on_this_cp_rank(dict(batch), cp_group=cp_group)


def loss_token_share(loss_mask: torch.Tensor, cp_group) -> torch.Tensor:
    """This context-parallel rank's fraction of the loss tokens of the whole sequences."""
    local = loss_mask.detach().sum().float()
    total = local.clone()
    dist.all_reduce(total, group=cp_group)
    return local / total.clamp(min=1.0)

"""The NeMo 2 export: ``context/`` + ``weights/``, written with nemo-toolkit's own serialization.

Layout (``nemo/lightning/ckpt_utils.py``)::

    context/io.json      fiddle-serialized TrainerContext (``IOMixin.io_dump``)
    context/model.yaml   the model part of it, readable
    context/<artifacts>  the tokenizer files (Hugging Face tokenizers only)
    weights/             megatron-core torch_dist (``.metadata``, ``*.distcp``, ``common.pt``,
                         ``metadata.json`` = {"sharded_backend": "torch_dist", ...})

The model is ``nemo.collections.llm.MambaModel`` with an ``SSMConfig`` holding the slice's
shape (hybrid pattern, Mamba, attention, MoE fields). ``mamba_stack_spec`` is left to NeMo's
default (Transformer Engine's spec), so the weights are stored under that spec's names: the
module prefix ``module.`` and each layer's pre-norm fused into the following linear
(:data:`TE_NORM_NAMES`), the names NeMo's own Nemotron-H importer writes.

``nemo`` must be importable (the ``nemo`` extra, installed in its own environment, see
``make test-nemo``); otherwise :class:`NemoUnavailable` says so.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from megatron_ext.data.tokenizer import SPECIAL_TOKENS, ByteTokenizer, Tokenizer
from megatron_ext.elastic.controller import ElasticController
from megatron_ext.elastic.sites import registry
from megatron_ext.elastic.slicing import build_slice, slice_model
from megatron_ext.export import ExportError, ExportResult
from megatron_ext.export.tokenizer import write_hf_tokenizer
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.models.megatron_config import from_megatron, to_megatron

CONTEXT_DIR = "context"
WEIGHTS_DIR = "weights"
MODULE_PREFIX = "module."
NEMO_INSTALL_HINT = (
    "the NeMo export needs nemo-toolkit 2.7.3 (the project's 'nemo' extra), in its own "
    "environment: `make test-nemo` builds .venv-nemo, or pip install -e '.[nemo]' "
    "'pyarrow<22' nemo-run leptonai==0.27.3 'protobuf~=5.29.5' 'packaging<25'"
)

TE_NORM_NAMES: dict[str, tuple[str, str]] = {
    "M": ("norm.", "mixer.in_proj.layer_norm_"),
    "*": ("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
    "-": ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"),
}
"""Per layer kind: the local spec's pre-norm prefix and the Transformer Engine spec's fused
name for it (MoE layers keep ``pre_mlp_layernorm.``, a ``TENorm`` there too)."""

_LAYER = re.compile(r"^(?P<head>(?:module\.)?decoder\.layers\.(?P<i>\d+)\.)(?P<rest>.+)$")


class NemoUnavailable(ImportError):
    """nemo-toolkit cannot be imported here; the message names the extra to install."""


def require_nemo() -> None:
    """Raise :class:`NemoUnavailable` unless ``nemo.lightning`` and ``nemo.collections.llm``
    import (the import itself can fail in several ways when the environment is incomplete)."""
    try:
        from megatron_ext.compat import ensure_compat

        ensure_compat()  # megatron's Mamba specs import triton; the stub covers CPU machines
        import nemo.collections.llm  # noqa: F401
        import nemo.lightning  # noqa: F401
    except (ImportError, RuntimeError, OSError, AttributeError) as err:
        raise NemoUnavailable(f"{NEMO_INSTALL_HINT} ({type(err).__name__}: {err})") from err


def te_checkpoint_key(key: str, pattern: str) -> str:
    """The Transformer Engine spec's name of local-spec checkpoint key ``key``."""
    match = _LAYER.match(key)
    if match is None:
        return key
    names = TE_NORM_NAMES.get(pattern[int(match["i"])])
    if names is None or not match["rest"].startswith(names[0]):
        return key
    return f"{match['head']}{names[1]}{match['rest'][len(names[0]) :]}"


def nemo_sharded_state_dict(model: nn.Module, pattern: str) -> dict[str, Any]:
    """``model``'s sharded state dict under NeMo's checkpoint names (prefix, TE norm names).

    The dict keys stay the model's own (so a load returns a state dict for ``model``); only
    the storage keys of the sharded tensors change.
    """
    sharded = model.sharded_state_dict(prefix=MODULE_PREFIX)  # type: ignore[operator]
    for item in sharded.values():
        if hasattr(item, "key"):
            item.key = te_checkpoint_key(item.key, pattern)
    return sharded


def _vocab_multiple(cfg: HybridModelConfig, tokenizer_vocab: int) -> int:
    """``make_vocab_size_divisible_by`` with which NeMo pads ``tokenizer_vocab`` to the model's
    vocabulary at TP=1 (128, NeMo's default, when that works)."""
    if tokenizer_vocab > cfg.vocab_size:
        raise ExportError(
            f"the tokenizer has {tokenizer_vocab} ids, the model only {cfg.vocab_size} rows"
        )
    if -(-tokenizer_vocab // 128) * 128 == cfg.vocab_size:
        return 128
    return cfg.vocab_size


# ---- config: ours <-> NeMo's SSMConfig, both ways -------------------------------------------
# SSMConfig is a TransformerConfig: its model fields are the one mapping of
# megatron_ext.models.megatron_config. The elastic axes' fields take their NeMo names from the
# sites (megatron_ext.elastic.sites, ``nemo_names``; the pattern is NeMo's own field there);
# these are the other SSMConfig fields that megatron's MambaModel takes as arguments instead
# (ours, NeMo's).
NEMO_PAIRS = (
    ("max_sequence_length", "seq_length"),
    ("position_embedding_type", "position_embedding_type"),
    ("rotary_base", "rotary_base"),
    ("tie_embeddings", "share_embeddings_and_output_weights"),
)


def nemo_config_kwargs(cfg: HybridModelConfig, tokenizer_vocab: int) -> dict:
    """Keyword arguments of NeMo's ``SSMConfig`` for ``cfg`` (only what differs from NeMo's
    defaults or matters for the shape; fusions NeMo turns on stay NeMo's choice, except RoPE
    fusion, which needs Transformer Engine at config validation)."""
    kwargs: dict[str, Any] = to_megatron(cfg)  # upstream's activation functions, by name
    axes = registry.nemo_names(cfg.pattern)  # the sites of the layer kinds cfg has
    kwargs.update({theirs: getattr(cfg, ours) for ours, theirs in axes.items()})
    kwargs.update({theirs: getattr(cfg, ours) for ours, theirs in NEMO_PAIRS})
    kwargs.update(
        apply_rope_fusion=False,
        make_vocab_size_divisible_by=_vocab_multiple(cfg, tokenizer_vocab),
    )
    return kwargs


def model_config_from_nemo(config: Any, vocab_size: int, name: str = "nemo") -> HybridModelConfig:
    """The :class:`HybridModelConfig` of a NeMo ``SSMConfig`` (as ``load_context`` returns);
    NeMo derives the vocabulary from the tokenizer, so ``vocab_size`` is the padded one."""
    try:
        fields = from_megatron(config)
    except ValueError as err:
        raise ExportError(f"SSMConfig.{err}") from None
    pattern = getattr(config, registry.nemo_names()["pattern"])
    axes = registry.nemo_names(pattern)  # the sites of the layer kinds the pattern has
    fields.update({ours: getattr(config, theirs) for ours, theirs in axes.items()})
    fields.update({ours: getattr(config, theirs) for ours, theirs in NEMO_PAIRS})
    return HybridModelConfig(name=name, vocab_size=vocab_size, **fields)


def nemo_tokenizer(tokenizer: Tokenizer, workdir: Path) -> Any:
    """NeMo's tokenizer object for ``tokenizer``: ``ByteLevelTokenizer`` with the same ids,
    or ``AutoTokenizer`` over a directory holding the ``tokenizer.json`` (copied into
    ``context/`` as an artifact by ``io_dump``)."""
    if isinstance(tokenizer, ByteTokenizer):
        from nemo.collections.common.tokenizers import ByteLevelTokenizer

        # NeMo numbers special tokens downwards from the end: reversed, they land at 256..259
        return ByteLevelTokenizer(
            special_tokens=list(reversed(SPECIAL_TOKENS)),
            vocab_size=256,
            _eos_id=tokenizer.eod,
            _pad_id=tokenizer.pad,
        )
    from nemo.collections.common.tokenizers import AutoTokenizer

    target = workdir / "nemo_tokenizer"
    write_hf_tokenizer(tokenizer, target)
    return AutoTokenizer(pretrained_model_name=str(target))


def write_context(cfg: HybridModelConfig, tokenizer: Tokenizer, context_dir: Path) -> dict:
    """``context/`` of the NeMo checkpoint of ``cfg``; returns the ``SSMConfig`` kwargs."""
    require_nemo()
    from nemo import lightning as nl
    from nemo.collections import llm
    from nemo.lightning.io.pl import TrainerContext

    kwargs = nemo_config_kwargs(cfg, tokenizer.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        tok = nemo_tokenizer(tokenizer, Path(tmp))
        model = llm.MambaModel(llm.SSMConfig(**kwargs), tokenizer=tok)
        strategy = nl.MegatronStrategy(ckpt_save_optimizer=False)
        trainer = nl.Trainer(devices=1, accelerator="cpu", strategy=strategy, logger=False)
        TrainerContext(model=model, trainer=trainer, extra={}).io_dump(
            context_dir, yaml_attrs=["model"]
        )
    return kwargs


def export_nemo(
    model: nn.Module,
    widths: dict[str, int],
    out_dir: str | Path,
    *,
    budget: str = "",
    controller: ElasticController | None = None,
    tokenizer: Tokenizer | None = None,
    pg_collection=None,
) -> ExportResult:
    """Slice ``model`` (TP=1) at ``widths`` and write the NeMo 2 layout into ``out_dir``."""
    from megatron_ext.checkpoint import save_sharded

    require_nemo()
    if tokenizer is None:
        raise ExportError("the NeMo export needs the tokenizer: NeMo sizes the vocabulary by it")
    cfg, state = slice_model(model, widths, controller)
    small = build_slice(cfg, state, pg_collection=pg_collection)
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    (out_dir / WEIGHTS_DIR).mkdir(parents=True)
    save_sharded({"state_dict": nemo_sharded_state_dict(small, cfg.pattern)}, out_dir / WEIGHTS_DIR)
    write_context(cfg, tokenizer, out_dir / CONTEXT_DIR)
    return ExportResult.of("nemo", budget, out_dir, model_class="nemo.collections.llm.MambaModel")


def load_nemo(directory: str | Path, pg_collection=None) -> nn.Module:
    """Read a NeMo export back with NeMo's ``load_context`` and load its weights into the
    project's (local-spec) megatron model of that config."""
    from megatron.core import dist_checkpointing

    from megatron_ext.models.builder import build_model
    from megatron_ext.parallel import ParallelConfig

    require_nemo()
    from nemo.lightning.io import load_context

    directory = Path(directory)
    from nemo.lightning import get_vocab_size

    nemo_model = load_context(directory / CONTEXT_DIR, subpath="model")
    config = nemo_model.config
    vocab = get_vocab_size(
        config, nemo_model.tokenizer.vocab_size, config.make_vocab_size_divisible_by
    )
    cfg = model_config_from_nemo(config, vocab)
    model = build_model(cfg, ParallelConfig(), pg_collection, initialize=False)
    sharded = {"state_dict": nemo_sharded_state_dict(model, cfg.pattern)}
    loaded = dist_checkpointing.load(sharded, str(directory / WEIGHTS_DIR))
    state = {k.removeprefix(MODULE_PREFIX): v for k, v in loaded["state_dict"].items()}
    model.load_state_dict(state, strict=True)
    return model

"""Tiny random Hugging Face models of every family this project imports, built in-process by
``transformers`` from its own config classes (nothing downloaded), and written with
``save_pretrained`` plus a byte-level ``tokenizer.json``.

The weights are ``transformers``' own random initialisation, with every norm weight and bias
(expert-score bias, conv bias, ``dt_bias``) moved off its initial value: a mapping that mixes
up norms, heads or experts then changes the logits.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from megatron_ext.data.tokenizer import ByteTokenizer
from megatron_ext.export.tokenizer import write_hf_tokenizer

VOCAB = 384  # the byte tokenizer's 260 ids, padded
SEQ, BATCH = 48, 2
FAMILIES = ("nemotron_h_moe", "nemotron_h_dense", "llama", "qwen3", "qwen3_moe")
NEMOTRON_MOE_BLOCKS = ["mamba", "moe", "attention", "mamba", "moe"]
NEMOTRON_DENSE_BLOCKS = ["mamba", "mlp", "attention", "mlp"]


def hf_config(family: str, tied: bool):
    """The ``transformers`` config of a tiny ``family`` model (TP=2-divisible shapes)."""
    import transformers

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=tied,
        max_position_embeddings=256,
    )
    if family.startswith("nemotron_h"):
        moe = family == "nemotron_h_moe"
        return transformers.NemotronHConfig(
            **common,
            layers_block_type=NEMOTRON_MOE_BLOCKS if moe else NEMOTRON_DENSE_BLOCKS,
            intermediate_size=96,
            mamba_num_heads=8,
            mamba_head_dim=16,
            ssm_state_size=16,
            n_groups=2,
            chunk_size=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=48,
            routed_scaling_factor=2.5,
            layer_norm_epsilon=1e-5,
        )
    if family == "qwen3_moe":  # norm_topk_prob=False: megatron's moe_router_pre_softmax
        return transformers.Qwen3MoeConfig(
            **common,
            num_hidden_layers=2,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            rms_norm_eps=1e-6,
        )
    cls = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config}[family]
    return cls(**common, num_hidden_layers=2, intermediate_size=96, rms_norm_eps=1e-6)


def build_hf(family: str, tied: bool, seed: int = 7):
    """A random ``*ForCausalLM`` of ``family`` in eval mode, fp32."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, tied))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.add_(0.05 * torch.randn_like(p))
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.05 * torch.randn_like(buf))
        if tied and family.startswith("nemotron_h"):  # transformers' Nemotron-H never ties
            model.lm_head.weight.copy_(model.get_input_embeddings().weight)
    return model.float().eval()


def write_hf(family: str, tied: bool, directory: Path, seed: int = 7):
    """:func:`build_hf`, saved with ``save_pretrained`` and a byte ``tokenizer.json``."""
    model = build_hf(family, tied, seed)
    model.save_pretrained(directory)
    write_hf_tokenizer(ByteTokenizer(), directory, 256)
    return model


def tokens() -> torch.Tensor:
    """``[BATCH, SEQ]`` byte ids of real text (this Python's ``os.py``)."""
    raw = Path(os.__file__).read_bytes()[2048 : 2048 + BATCH * SEQ]
    return torch.tensor(list(raw)).view(BATCH, SEQ)


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor | None = None) -> torch.Tensor:
    """``transformers``' logits of ``ids`` (default :func:`tokens`)."""
    return model(tokens() if ids is None else ids).logits.float()


@torch.no_grad()
def megatron_logits(model, ids: torch.Tensor | None = None) -> torch.Tensor:
    """A megatron-core model's logits of ``ids`` (TP=1)."""
    from megatron_ext.models.builder import causal_mask

    ids = tokens() if ids is None else ids
    b, s = ids.shape
    return model(ids, torch.arange(s)[None].expand(b, s), causal_mask(s)).float()

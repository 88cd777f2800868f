"""Per-layer counts the planner multiplies out: parameters, and activations kept per token.

Parameters follow megatron-core's local layers as :func:`megatron_ext.models.builder.build_model`
builds them (no biases; the Mamba conv has one): each count is split into the part sharded over
tensor parallelism, the part replicated on every TP rank, and the routed experts (sharded over
expert parallelism, and over the expert-TP size, which megatron-core sets to the TP size).

Activations are the elements autograd keeps per token of one layer until its backward, counted
from the tensors the implementation saves: megatron's layers with the project's SDPA core
attention (:mod:`megatron_ext.models.attention`) and pure-PyTorch SSD scan
(:mod:`megatron_ext.compat.mamba_kernels`, whose intra-chunk matrices are ``L x L`` per head
for chunk length ``L``). Every layer starts with its pre-norm (its input, the normalised
copy, the residual and one statistic per token: ``3h + 1``). Routed experts assume balanced
routing (each token visits ``top_k`` experts).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ext.models.config import HybridModelConfig

MAMBA_CONV_KERNEL = 4  # megatron-core's MambaMixer d_conv
MAMBA_SCAN_CHUNK = 128  # megatron-core's MambaMixer chunk_size, the SSD scan's block length


@dataclass(frozen=True)
class LayerParams:
    """Parameter elements of one layer (or the embedding / output), split by sharding."""

    tp_sharded: int = 0
    replicated: int = 0
    experts: int = 0

    def per_rank(self, tp: int, ep: int) -> float:
        """Elements on one rank at tensor-parallel ``tp`` and expert-parallel ``ep``."""
        return self.tp_sharded / tp + self.replicated + self.experts / (ep * tp)

    @property
    def total(self) -> int:
        """Elements over all ranks."""
        return self.tp_sharded + self.replicated + self.experts


def _glu(cfg: HybridModelConfig) -> int:
    return 2 if cfg.activation == "swiglu" else 1


def layer_params(cfg: HybridModelConfig, kind: str) -> LayerParams:
    """Parameters of one layer of ``kind`` (``M``, ``*``, ``-``, ``E``)."""
    h = cfg.hidden_size
    if kind == "M":
        heads, di = cfg.mamba_num_heads, cfg.mamba_d_inner
        gn = cfg.mamba_num_groups * cfg.mamba_state_dim
        conv = di + 2 * gn
        in_proj = h * (2 * di + 2 * gn + heads)
        sharded = in_proj + conv * (MAMBA_CONV_KERNEL + 1) + 3 * heads + di + di * h
        return LayerParams(tp_sharded=sharded, replicated=h)
    if kind == "*":
        q = cfg.num_attention_heads * cfg.kv_channels
        kv = 2 * cfg.num_query_groups * cfg.kv_channels
        qk_norm = 2 * cfg.kv_channels if getattr(cfg, "qk_layernorm", False) else 0
        return LayerParams(tp_sharded=h * (q + kv) + q * h, replicated=h + qk_norm)
    if kind == "-":
        ffn = cfg.ffn_hidden_size
        return LayerParams(tp_sharded=h * ffn * _glu(cfg) + ffn * h, replicated=h)
    if kind == "E":
        mffn, sffn = cfg.moe_ffn_hidden_size, cfg.moe_shared_expert_ffn_hidden_size
        expert = h * mffn * _glu(cfg) + mffn * h
        shared = h * sffn * _glu(cfg) + sffn * h
        router = cfg.num_experts * h  # the expert bias is a buffer, not a parameter
        return LayerParams(
            tp_sharded=shared, replicated=h + router, experts=cfg.num_experts * expert
        )
    raise ValueError(f"unknown layer kind {kind!r}")


def embedding_params(cfg: HybridModelConfig) -> LayerParams:
    """The word embedding (sharded over the vocabulary)."""
    return LayerParams(tp_sharded=cfg.vocab_size * cfg.hidden_size)


def output_params(cfg: HybridModelConfig) -> LayerParams:
    """The final norm and the output layer (none of its own when tied to the embedding)."""
    out = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size
    return LayerParams(tp_sharded=out, replicated=cfg.hidden_size)


def layer_activations(cfg: HybridModelConfig, kind: str, seq_length: int) -> float:
    """Elements kept per token by one layer of ``kind`` for its backward (module docstring)."""
    h = cfg.hidden_size
    norm = 3 * h + 1
    if kind == "M":
        heads, di, n = cfg.mamba_num_heads, cfg.mamba_d_inner, cfg.mamba_state_dim
        g, chunk = cfg.mamba_num_groups, MAMBA_SCAN_CHUNK
        conv = di + 2 * g * n
        chunks = max(1, -(-seq_length // chunk))
        scan = 3 * heads * chunk + g * chunk + 4 * g * n + heads * n + 6 * heads
        states = di * n / chunk * (2 + 1 / chunks)
        return norm + 2 * conv + scan + states + 10 * di + g
    if kind == "*":
        q = cfg.num_attention_heads * cfg.kv_channels
        rope = 4 * cfg.kv_channels if cfg.position_embedding_type == "rope" else 0
        # q, k and v at the query heads' count (GQA repeat), the output and its logsumexp,
        # then linear_proj's input
        return norm + rope + 4 * q + cfg.num_attention_heads
    if kind == "-":
        return norm + 2 * cfg.ffn_hidden_size * _glu(cfg)
    if kind == "E":
        k, e = cfg.moe_router_topk, cfg.num_experts
        shared = 2 * cfg.moe_shared_expert_ffn_hidden_size * _glu(cfg)
        routing = 2.25 * e + 6 * k + 1
        return norm + shared + routing + k * h + 3 * k * cfg.moe_ffn_hidden_size * _glu(cfg)
    raise ValueError(f"unknown layer kind {kind!r}")


def recomputed_activations(cfg: HybridModelConfig, kind: str, mode: str, seq: int) -> float:
    """Elements kept per token by one layer under recompute ``mode`` between forward and backward.

    ``full``: the layer's input only (megatron's ``tensor_parallel.checkpoint`` keeps it);
    ``selective``: attention keeps its core attention's inputs (q, k, v before the GQA repeat)
    instead of what SDPA saves; other layers are unchanged.
    """
    if mode == "full":
        return cfg.hidden_size
    full = layer_activations(cfg, kind, seq)
    if mode == "selective" and kind == "*":
        q = cfg.num_attention_heads * cfg.kv_channels
        kv = 2 * cfg.num_query_groups * cfg.kv_channels
        return full - (3 * q + cfg.num_attention_heads) + (q + kv)
    return full


def backward_working(cfg: HybridModelConfig, kind: str, seq_length: int) -> float:
    """Elements per token of the gradients a layer's backward holds at once (its worst point).

    Mamba: the gradients of the conv's input and output and of four ``d_inner``-wide tensors
    (the scan's ``L x L``-per-head intra-chunk gradients are freed chunk by chunk and never
    reach the peak: measured on train-elastic's step, whose teacher runs before the student);
    other layers: gradients the size of what they keep beyond their pre-norm.
    """
    if kind == "M":
        di = cfg.mamba_d_inner
        conv = di + 2 * cfg.mamba_num_groups * cfg.mamba_state_dim
        return 2 * conv + 4 * di
    return layer_activations(cfg, kind, seq_length) - (3 * cfg.hidden_size + 1)

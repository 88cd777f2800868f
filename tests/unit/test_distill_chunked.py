"""Chunked distillation (megatron_ext.distill_chunked) equals KD on whole logits, at TP=1.

Student and teacher are real tiny hybrids; the reference is ``kd_loss`` (plus megatron's
vocab-parallel cross entropy) on the logits of the models' own forward, backpropagated through
the whole student. Tolerances: both paths run the same float32 GEMMs on the same rows, and
the per-token sums accumulate in float64; only the order in which the chunks' float64 partial
losses are added, and float32 rounding of the smaller output-layer GEMMs, can differ (measured
1.5e-8 on gradients of order 0.2), so 1e-6 absolute on losses of order 0.05..6 and gradients
of order 0.1 catches any missing or doubled chunk, a mis-gathered mask row or a mis-scaled
gradient, which are off by 1e-3 or more.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megatron_ext.distill import kd_loss
from megatron_ext.distill_chunked import chunked_distill_loss, hidden_states_only, output_head
from megatron_ext.models.builder import build_model, causal_mask
from megatron_ext.models.config import HybridModelConfig
from megatron_ext.parallel import ParallelConfig, init_distributed, set_seed

BATCH, SEQ, TEMPERATURE, CE_WEIGHT = 2, 23, 2.0, 0.5
ATOL = 1e-6


@pytest.fixture(scope="module")
def models():
    parallel = ParallelConfig()
    pgs = init_distributed(parallel)
    set_seed(1)
    student = build_model(HybridModelConfig(), parallel, pgs)
    set_seed(2)
    teacher = build_model(HybridModelConfig(), parallel, pgs).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def batch():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 384, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, 384, (BATCH, SEQ), generator=gen)
    mask = (torch.rand(BATCH, SEQ, generator=gen) > 0.3).float()
    return tokens, torch.arange(SEQ)[None].expand(BATCH, SEQ), labels, mask


def whole_logits(student, teacher, ce_weight: float, teacher_dtype=torch.float32):
    tokens, pos, labels, mask = batch()
    logits = student(tokens, pos, causal_mask(SEQ))
    with torch.no_grad():
        t_logits = teacher(tokens, pos, causal_mask(SEQ)).to(teacher_dtype)
    kd = kd_loss(logits, t_logits, temperature=TEMPERATURE, loss_mask=mask)
    ce = (vocab_parallel_cross_entropy(logits.float(), labels) * mask).sum() / mask.sum()
    return kd + ce_weight * ce, kd, ce


def chunked(student, teacher, chunk: int, ce_weight: float):
    tokens, pos, labels, mask = batch()
    with hidden_states_only(student):
        hidden = student(tokens, pos, causal_mask(SEQ))
    with torch.no_grad(), hidden_states_only(teacher):
        t_hidden = teacher(tokens, pos, causal_mask(SEQ))
    return chunked_distill_loss(
        hidden,
        t_hidden,
        output_head(student),
        output_head(teacher),
        chunk_size=chunk,
        temperature=TEMPERATURE,
        loss_mask=mask,
        labels=labels,
        ce_weight=ce_weight,
    )


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("chunk", [5, 1, SEQ, 64])  # 5 does not divide 23; 64 > the sequence
@pytest.mark.parametrize("ce_weight", [0.0, CE_WEIGHT])
def test_chunked_loss_and_every_student_gradient_equal_whole_logits(models, chunk, ce_weight):
    student, teacher = models
    ref_loss, ref_kd, ref_ce = whole_logits(student, teacher, ce_weight)
    ref = grads(student, ref_loss)
    loss, kd, ce = chunked(student, teacher, chunk, ce_weight)
    got = grads(student, loss)
    assert abs(loss.item() - ref_loss.item()) <= ATOL
    assert abs(kd.item() - ref_kd.item()) <= ATOL and ref_kd.item() > 0.01
    if ce_weight:
        assert abs(ce.item() - ref_ce.item()) <= ATOL
    assert got.keys() == ref.keys() and "output_layer.weight" in got
    worst = max((got[n] - ref[n]).abs().max().item() for n in ref)
    assert worst <= ATOL, worst
    assert max(g.abs().max().item() for g in ref.values()) > 1e-2  # a non-trivial gradient


def test_a_bfloat16_teacher_gives_the_loss_of_its_bfloat16_logits(models):
    """The teacher kept in bf16: the KD is that of its (bf16) logits, cast inside the KL."""
    student, teacher = models
    bf16 = build_model(HybridModelConfig(params_dtype="bfloat16"), ParallelConfig()).eval()
    weights = {k: v.bfloat16() for k, v in teacher.state_dict().items() if v is not None}
    bf16.load_state_dict(weights, strict=False)
    for p in bf16.parameters():
        p.requires_grad_(False)
    tokens, pos, labels, mask = batch()
    with torch.no_grad():
        t_logits = bf16(tokens, pos, causal_mask(SEQ))
        with hidden_states_only(bf16):
            t_hidden = bf16(tokens, pos, causal_mask(SEQ))
    assert t_hidden.dtype == t_logits.dtype == torch.bfloat16
    logits = student(tokens, pos, causal_mask(SEQ))
    ref = kd_loss(logits, t_logits, temperature=TEMPERATURE, loss_mask=mask)
    with hidden_states_only(student):
        hidden = student(tokens, pos, causal_mask(SEQ))
    loss, _, _ = chunked_distill_loss(
        hidden,
        t_hidden,
        output_head(student),
        output_head(bf16),
        chunk_size=7,
        temperature=TEMPERATURE,
        loss_mask=mask,
    )
    assert abs(loss.item() - ref.item()) <= ATOL


def test_the_teacher_head_runs_without_autograd_and_gets_no_gradient(models):
    student, teacher = models
    seen = []
    hook = teacher.output_layer.register_forward_hook(
        lambda *_: seen.append(torch.is_grad_enabled())
    )
    try:
        loss, _, _ = chunked(student, teacher, 5, 0.0)
        loss.backward()
    finally:
        hook.remove()
    assert seen == [False] * 5  # ceil(23 / 5) chunks, each under no_grad
    assert all(p.grad is None for p in teacher.parameters())


def test_chunk_size_below_one_is_refused(models):
    student, teacher = models
    h = torch.zeros(SEQ, BATCH, 128)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_distill_loss(h, h, output_head(student), output_head(teacher), chunk_size=0)

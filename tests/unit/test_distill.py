"""Vocab-parallel KD loss at one rank (megatron_ext.distill.kd_loss) against direct formulas.

The reference is ``F.kl_div`` on full-vocabulary log-softmaxes. Tolerances: in float64 both
sides agree to rounding (~1e-15); float32 inputs are computed in float32, whose rounding on
KL terms of order one over 384 classes is ~1e-7 (the per-token sums accumulate in float64;
measured 2.3e-7 on a loss of 6.9, half an ulp of the float32 result), so 1e-6 holds.
Equal logits give exactly zero by construction (the per-token sums cancel term by term).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.distill import kd_loss
from megatron_ext.parallel import ParallelConfig, init_distributed

SHAPE = (2, 16, 384)  # batch, sequence, vocabulary
ATOL = 1e-6


def logits(seed: int, dtype=torch.float64, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(SHAPE, generator=gen, dtype=torch.float64)).to(dtype)


def direct(student, teacher, temperature=1.0, mask=None):
    """Full-vocabulary forward KL(p_t || p_s) * T^2, the masked mean over tokens."""
    log_s = F.log_softmax(student.double() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.double() / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1) * temperature**2
    if mask is None:
        return kl.mean()
    return (kl * mask).sum() / mask.sum()


def token_mask(seed: int = 9) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(SHAPE[:2], generator=gen) > 0.3).double()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("masked", [False, True])
def test_kd_loss_equals_the_direct_full_vocab_kl(dtype, masked):
    s, t = logits(1, dtype), logits(2, dtype)
    mask = token_mask() if masked else None
    got = kd_loss(s, t, loss_mask=mask)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == ()
    assert abs(got.item() - direct(s, t, mask=mask).item()) <= ATOL


def test_kd_loss_is_zero_for_equal_logits():
    s = logits(3, torch.float32)
    assert kd_loss(s, s.clone()).item() == 0.0
    assert kd_loss(s, s + 5.0).item() == pytest.approx(0.0, abs=ATOL)  # a shift is no change


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_temperature_softens_both_sides_and_scales_by_its_square(temperature):
    s, t = logits(4), logits(5)
    got = kd_loss(s, t, temperature=temperature)
    assert abs(got.item() - direct(s, t, temperature).item()) <= ATOL
    unscaled = kd_loss(s / temperature, t / temperature).item()
    assert got.item() == pytest.approx(temperature**2 * unscaled, rel=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gradient_matches_autograd_of_the_direct_formula(temperature):
    mask = token_mask()
    t = logits(7).requires_grad_()
    s1, s2 = logits(6).requires_grad_(), logits(6).requires_grad_()
    kd_loss(s1, t, temperature=temperature, loss_mask=mask).backward()
    direct(s2, t.detach(), temperature, mask).backward()
    assert (s1.grad - s2.grad).abs().max().item() <= 1e-12
    assert t.grad is None  # the teacher side carries no gradient
    # the closed form: T * (p_s - p_t) * mask / sum(mask)
    p_s = F.softmax(s1.detach() / temperature, -1)
    p_t = F.softmax(t.detach() / temperature, -1)
    closed = temperature * (p_s - p_t) * (mask / mask.sum())[..., None]
    assert (s1.grad - closed).abs().max().item() <= 1e-12


def test_a_single_rank_tp_group_and_an_empty_mask():
    pgs = init_distributed(ParallelConfig())
    s, t = logits(8), logits(9)
    assert kd_loss(s, t, tp_group=pgs.tp).item() == kd_loss(s, t).item()
    assert kd_loss(s, t, loss_mask=torch.zeros(SHAPE[:2])).item() == 0.0


def test_bad_inputs_are_named():
    s = logits(1)
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(s, s[..., :-1])
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, s, temperature=0.0)
    with pytest.raises(ValueError, match="loss_mask"):
        kd_loss(s, s, loss_mask=torch.ones(3))

"""Mamba context parallelism through the engine: CP=2 gives CP=1's losses and gradients.

``cases_context_parallel.py`` runs both layouts in one torchrun launch (2 ranks, gloo), from
one seed, on the same micro-batches whose loss masks leave the two CP ranks different numbers
of loss tokens.

Tolerances. fp32. At CP=2 each rank runs the SSM over half of the heads on the whole sequence
(megatron-core's all-to-all) and sums its half of the tokens' gradients, then DDP sums over
the ranks: the same products, added in another order (~1e-7 relative per operation).
Measured: losses within 2.4e-7 (values ~5), grad norms equal to 1e-9 relative, step-1
gradients within 7.5e-9 (largest entry 0.084), parameters within 2.7e-6 after 3 Adam steps.
Weighting the two ranks' means equally instead of by their loss tokens gave losses 5e-3 to
4e-2 off, grad norms 6% off and gradients 3.9e-3 off; a doubled CP reduction doubles the grad
norm (measured on unmasked batches: 14.84 against 7.42). Hence: losses <= 1e-5 apart, grad
norms <= 1e-5 relative, gradients <= 1e-6 (about 1e-5 of the largest entry).
Adam is nearly blind to a gradient's scale, so the parameter bound (1e-4, a twentieth of one
step at lr 2e-3) only guards against a wrong direction.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.launch import case, run_cases

SCRIPT = Path(__file__).with_name("cases_context_parallel.py")


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return case(run_cases(SCRIPT, tmp_path_factory.mktemp("cp")), "mamba_cp2_vs_cp1")


def test_mamba_cp2_losses_and_grad_norms_match_cp1_over_3_steps(measured):
    assert len(measured["cp2"]) == len(measured["cp1"]) == 3
    for (loss2, norm2), (loss1, norm1) in zip(measured["cp2"], measured["cp1"]):
        assert abs(loss2 - loss1) <= 1e-5, measured
        assert abs(norm2 - norm1) <= 1e-5 * norm1, measured


def test_mamba_cp2_gradients_match_cp1_entry_by_entry(measured):
    assert measured["grad_scale"] > 1e-3  # the gradients compared are not all zero
    assert measured["grad_gap"] <= 1e-6, measured["gaps"]


def test_mamba_cp2_parameters_match_cp1_after_3_steps(measured):
    assert measured["param_gap"] <= 1e-4, measured

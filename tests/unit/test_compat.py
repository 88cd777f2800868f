"""The CPU compat layer: applied only where needed, and numerically inert."""

from __future__ import annotations

import importlib

import pytest
import torch

import megatron_ext.models  # noqa: F401  (applies ensure_compat)
from megatron_ext.compat import ensure_compat, optional
from megatron_ext.compat.rng import CpuRNGStatesTracker


def test_cpu_shims_are_applied_exactly_when_cuda_is_absent():
    applied = ensure_compat()
    assert ("cpu_shims" in applied) == (not torch.cuda.is_available())
    assert ensure_compat() == applied  # idempotent
    if not torch.cuda.is_available():
        assert torch.device(torch.cuda.current_device()).type == "cpu"


def test_mamba_mixer_uses_torch_kernels_without_mamba_ssm():
    from megatron.core.ssm import mamba_mixer

    from megatron_ext.compat import mamba_kernels

    if optional.have_mamba_ssm():
        pytest.skip("mamba-ssm is installed: upstream kernels are used")
    assert mamba_mixer.HAVE_MAMBA_SSM
    assert mamba_mixer.mamba_chunk_scan_combined is mamba_kernels.mamba_chunk_scan_combined
    assert issubclass(mamba_mixer.ExtendedRMSNorm, mamba_kernels.RMSNormGated)


def test_rng_tracker_fork_uses_named_stream_and_restores_outer_state():
    tracker = CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 7)
    torch.manual_seed(0)
    outer_expected = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork("model-parallel-rng"):
        inner_first = torch.rand(3)
    outer = torch.rand(3)
    with tracker.fork("model-parallel-rng"):
        inner_second = torch.rand(3)
    assert torch.equal(outer, outer_expected)  # the fork did not consume the outer stream
    assert torch.equal(inner_first, torch.rand(3, generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(inner_first, inner_second)  # the named stream advanced
    with pytest.raises(ValueError, match="already tracked"):
        tracker.add("other", 7)


@pytest.mark.parametrize("error", [ImportError, RuntimeError, OSError])
def test_guarded_import_treats_every_backend_failure_as_absent(monkeypatch, error):
    def boom(name):
        raise error("no backend here")

    optional._probe.cache_clear()
    monkeypatch.setattr(importlib, "import_module", boom)
    try:
        assert optional._probe("transformer_engine.pytorch") is False
    finally:
        monkeypatch.undo()
        optional._probe.cache_clear()


def test_backend_report_names_device_and_backends():
    report = optional.backend_report()
    assert set(report) == {"device", "transformer_engine", "mamba_ssm", "triton"}


def test_pipeline_schedules_build_their_token_counter_on_the_host():
    from megatron.core.pipeline_parallel import schedules

    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the schedules keep torch itself")
    counter = schedules.torch.zeros([], dtype=torch.int, device="cuda")  # upstream's call
    assert counter.device.type == "cpu" and counter.dtype == torch.int
    assert schedules.torch.autograd is torch.autograd  # everything else is torch's own
    assert torch.ones(2).cuda().device.type == "cpu"  # tied embeddings at pp > 1


def test_pipeline_replicated_parameters_are_marked_for_the_stage_sum():
    from megatron.core.transformer import TransformerConfig

    from megatron_ext.compat.pipeline import sum_over_pipeline_stages

    config = TransformerConfig(num_layers=2, hidden_size=8, num_attention_heads=2)
    module = torch.nn.Linear(2, 2)
    assert sum_over_pipeline_stages(module.parameters(), config) == 2
    assert all(p.pipeline_parallel for p in module.parameters())
    assert config.has_cond_embedder  # upstream's switch for _allreduce_conditional_embedding_grads

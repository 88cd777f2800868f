"""The training engine on one rank: bf16, recomputation, gradient accumulation, validation.

Every run is the tiny hybrid parent built from one seed, 5 steps of megatron-core's engine
(DDP, distributed optimizer, ``get_forward_backward_func``) on fixed micro-batches of real
text, so two runs differ only in the setting under test.
"""

from __future__ import annotations

import pytest
import torch

from megatron_ext.config.compose import compose_recipe
from megatron_ext.config.schema import TrainConfig
from megatron_ext.models.config import ConfigError
from megatron_ext.parallel import ParallelConfig, init_distributed
from megatron_ext.training.engine_config import EngineConfig, check_batch_layout
from recipes.cli import main as cli_main
from tests.distributed.cases_engine import MICRO, engine_at, params_of, run_steps

STEPS = 5


@pytest.fixture(scope="module")
def pgs():
    return init_distributed(ParallelConfig())


def run(pgs, global_batch: int = 2 * MICRO, **settings):
    engine = engine_at(ParallelConfig(), pgs, global_batch=global_batch, **settings)
    return run_steps(engine, pgs, 0, STEPS), params_of(engine), engine


def test_bf16_trains_with_fp32_main_params_and_stays_close_to_fp32(pgs):
    fp32, _, _ = run(pgs)
    bf16, params, engine = run(pgs, precision="bf16")
    assert all(p.dtype == torch.bfloat16 for p in params.values())
    main = [p for g in engine.optimizer.param_groups for p in g["params"]]
    assert main and all(p.dtype == torch.float32 for p in main)
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 2e-3 per op); through eight layers
    # and 5 Adam steps the loss moves by a few 1e-3 of its value (measured: <= 3e-3 on this
    # model). A broken cast or a lost update moves it by 1e-1 or more; 2e-2 separates them.
    for (a, _), (b, _) in zip(fp32, bf16):
        assert abs(a - b) <= 2e-2 * abs(a), (fp32, bf16)
    assert bf16[-1][0] < bf16[0][0]  # and it trains


def test_one_rank_bucket_collectives_become_copies_and_leave_every_step_bit_identical(
    pgs, monkeypatch
):
    """Shim E: over a data-parallel group of one rank the distributed optimizer's bucket
    reduce-scatter and all-gather never reach gloo, and the steps are those of upstream's own
    collectives, bit for bit (both are the identity on the bucket there)."""
    from megatron.core.distributed import param_and_grad_buffer as buffers

    from megatron_ext.compat.engine import _identity_over_one_rank

    calls: list[str] = []

    def counted(fn):
        def call(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)

        return call

    upstream = {
        name: getattr(buffers, name).__wrapped__
        for name in ("dist_reduce_scatter_func", "dist_all_gather_func")
    }
    for name, fn in upstream.items():
        monkeypatch.setattr(buffers, name, counted(fn))
    reference, reference_params, engine = run(pgs)
    assert engine.optimizer.config.use_distributed_optimizer
    assert len(calls) == 2 * STEPS  # upstream: one reduce-scatter, one all-gather a step
    calls.clear()
    for name, fn in upstream.items():
        monkeypatch.setattr(buffers, name, _identity_over_one_rank(counted(fn)))
    shimmed, params, _ = run(pgs)
    assert calls == []
    assert shimmed == reference  # losses and grad norms, every step, exactly
    assert all(torch.equal(params[n], reference_params[n]) for n in reference_params)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_is_bit_identical_to_no_recompute(pgs, mode):
    plain, plain_params, _ = run(pgs)
    again, params, _ = run(pgs, recompute=mode)
    assert again == plain  # losses and grad norms, every step, exactly
    assert all(torch.equal(params[n], plain_params[n]) for n in plain_params)


def test_gradient_accumulation_matches_one_micro_batch_of_the_same_samples(pgs):
    """2 micro-batches of 2 accumulate to the step of one micro-batch of 4 (rounding only)."""
    accumulated, _, engine = run(pgs, global_batch=2 * MICRO)
    assert engine.num_microbatches == 2
    # The same 4 sequences per step, as one micro-batch: the batches of run_steps are built
    # per micro-batch, so compare with a run whose micro-batches are the concatenation.
    from tests.distributed import cases_engine as cases

    original = cases.microbatches

    def merged(step, n, dp, rank):
        parts = original(step, 2, dp, rank)
        return [{k: torch.cat([p[k] for p in parts]) for k in parts[0]}]

    cases.microbatches = merged
    try:
        single, _, engine1 = run(pgs, global_batch=0)
    finally:
        cases.microbatches = original
    assert engine1.num_microbatches == 1
    # Mean of two equal-size micro-batch means vs one mean over both: the same sum in
    # another order, so fp32 rounding only (~1e-7 relative per op, ~1e-6 after 5 steps).
    for (a, ga), (b, gb) in zip(accumulated, single):
        assert abs(a - b) <= 1e-5 * abs(a)
        assert abs(ga - gb) <= 1e-4 * abs(ga)


def test_engine_fields_are_validated_with_the_field_named():
    with pytest.raises(ConfigError, match="train.precision"):
        TrainConfig(precision="fp16")
    with pytest.raises(ConfigError, match="train.recompute"):
        TrainConfig(recompute="some")
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        TrainConfig(micro_batch_size=4, global_batch_size=6)
    with pytest.raises(ConfigError, match="train.global_batch_size.*micro_batch_size x"):
        EngineConfig(micro_batch_size=2, global_batch_size=6).microbatches(2)


def test_a_global_batch_that_does_not_split_over_dp_fails_before_torchrun(capsys):
    overrides = ["parallel.nproc=2", "train.micro_batch_size=2", "train.global_batch_size=6"]
    with pytest.raises(ConfigError, match="train.global_batch_size: 6 is not divisible"):
        check_batch_layout(compose_recipe("train_parent", overrides))
    assert cli_main(["train-parent", *overrides]) == 2  # exit code 2, nothing started
    assert "train.global_batch_size" in capsys.readouterr().err

"""``parallel.cp``: which stacks and recipes may split sequences, refused before any rank starts."""

from __future__ import annotations

import pytest
import torch

from megatron_ext.models.config import ConfigError, HybridModelConfig
from megatron_ext.parallel import ParallelConfig, split_for_context_parallel
from recipes.cli import main

MAMBA_ONLY = HybridModelConfig(pattern="MEM-", position_embedding_type="none")


def test_a_stack_without_attention_splits_over_two_context_parallel_ranks():
    par = ParallelConfig(nproc=4, cp=2, ep=2)
    par.check_model(MAMBA_ONLY)
    assert par.dp == 2


def test_attention_layers_at_cp2_are_refused_naming_the_field_and_the_gpu_path():
    with pytest.raises(ConfigError, match=r"parallel\.cp: .*attention.*TEDotProductAttention"):
        ParallelConfig(nproc=2, cp=2).check_model(HybridModelConfig())


def test_rope_at_cp2_is_refused_since_megatron_splits_its_table_on_cuda_only():
    with pytest.raises(ConfigError, match=r"model\.position_embedding_type"):
        ParallelConfig(nproc=2, cp=2).check_model(HybridModelConfig(pattern="MM"))


def test_mamba_heads_must_split_over_tp_times_cp():
    model = HybridModelConfig(pattern="MM", position_embedding_type="none", mamba_num_heads=6)
    with pytest.raises(ConfigError, match=r"model\.mamba_num_heads: 6 .* 4"):
        ParallelConfig(nproc=4, tp=2, cp=2).check_model(model)


def test_cp_must_divide_the_ranks_with_tp_and_pp():
    with pytest.raises(ConfigError, match=r"parallel\.nproc: must be a multiple of tp\*pp\*cp = 4"):
        ParallelConfig(nproc=2, tp=2, cp=2)
    with pytest.raises(ConfigError, match=r"parallel\.cp: must be >= 1"):
        ParallelConfig(cp=0)


def test_cp_is_refused_before_torchrun_for_recipes_other_than_train_parent(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["train-elastic", "parallel.nproc=2", "parallel.cp=2", f"run.dir={run_dir}"]
    assert main(args) == 2
    assert "parallel.cp: 2 is not supported by train-elastic" in capsys.readouterr().err
    assert not run_dir.exists()


@pytest.mark.parametrize(("other", "value"), [("tp", 2), ("pp", 2)])
def test_cp_with_tp_or_pp_is_refused_before_torchrun_naming_both_fields(
    tmp_path, capsys, other, value
):
    run_dir = tmp_path / "run"
    args = ["train-parent", "parallel.nproc=4", "parallel.cp=2", f"parallel.{other}={value}"]
    args += ["parallel.ep=1", "model.pattern=MM", "model.position_embedding_type=none"]
    assert main([*args, f"run.dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert f"parallel.cp: 2 together with parallel.{other}={value} is refused" in err
    assert not run_dir.exists()  # nothing started, nothing written


def test_train_parent_refuses_a_sequence_length_cp_cannot_halve_per_rank(tmp_path, capsys):
    args = ["train-parent", "parallel.nproc=2", "parallel.cp=2", "parallel.ep=1"]
    args += ["model.pattern=MM", "model.position_embedding_type=none", "train.seq_length=30"]
    assert main([*args, f"run.dir={tmp_path / 'r'}"]) == 2
    assert "train.seq_length: 30 is not divisible by 2*parallel.cp = 4" in capsys.readouterr().err


def test_the_split_at_cp1_is_the_batch_itself():
    batch = {"tokens": torch.arange(8)[None]}
    assert split_for_context_parallel(batch, None) is batch

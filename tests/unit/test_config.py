"""Config validation: every bad value fails with the field named and what to change."""

from __future__ import annotations

import pytest

from megatron_ext.config.compose import compose_recipe, section
from megatron_ext.config.schema import DataConfig, TrainConfig
from megatron_ext.models.config import ConfigError, HybridModelConfig
from megatron_ext.parallel import ParallelConfig
from recipes.cli import RECIPES, main


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"pattern": "M*X"}, "model.pattern"),
        ({"num_attention_heads": 6, "num_query_groups": 4}, "model.num_query_groups"),
        ({"mamba_num_heads": 6, "mamba_num_groups": 4}, "model.mamba_num_groups"),
        ({"moe_router_topk": 9}, "model.moe_router_topk"),
        ({"activation": "tanh"}, "model.activation"),
    ],
)
def test_invalid_model_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        HybridModelConfig(**kwargs)


def test_parallel_split_that_does_not_divide_the_model_names_the_field():
    model = HybridModelConfig(num_attention_heads=6, num_query_groups=3)
    with pytest.raises(ConfigError, match=r"model\.num_query_groups: 3 is not divisible by .* 2"):
        ParallelConfig(nproc=2, tp=2).check_model(model)
    with pytest.raises(ConfigError, match=r"parallel\.nproc"):
        ParallelConfig(nproc=3, tp=2)


def test_train_and_data_configs_name_bad_fields():
    with pytest.raises(ConfigError, match=r"train\.warmup_steps"):
        TrainConfig(steps=10, warmup_steps=10)
    with pytest.raises(ConfigError, match=r"train\.stop_at"):
        TrainConfig(steps=10, warmup_steps=1, stop_at=11)
    with pytest.raises(ConfigError, match=r"data\.tokenizer_path"):
        DataConfig(tokenizer="hf")


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_config_composes_into_typed_sections(recipe):
    cfg = compose_recipe(RECIPES[recipe][0], [])
    if "model" in cfg:
        assert isinstance(section(cfg, "model", HybridModelConfig), HybridModelConfig)
    if "data" in cfg:
        assert isinstance(section(cfg, "data", DataConfig), DataConfig)


def test_override_reaches_the_dataclass_and_is_validated():
    cfg = compose_recipe(
        "train_parent", ["model=nano_v3", "parallel=tp2", "train.steps=7", "train.warmup_steps=2"]
    )
    assert section(cfg, "model", HybridModelConfig).hidden_size == 2688
    assert section(cfg, "parallel", ParallelConfig).tp == 2
    assert section(cfg, "train", TrainConfig).steps == 7
    bad = compose_recipe("train_parent", ["model.pattern=M*Q"])
    with pytest.raises(ConfigError, match=r"model\.pattern"):
        section(bad, "model", HybridModelConfig)


def test_unknown_or_mistyped_override_is_rejected_at_composition():
    with pytest.raises(ConfigError, match="hidden_sise"):
        compose_recipe("train_parent", ["model.hidden_sise=12"])
    with pytest.raises(ConfigError, match="hidden_size"):
        compose_recipe("train_parent", ["model.hidden_size=wide"])


def test_cli_reports_config_errors_with_the_field_and_exit_code_2(capsys):
    assert main(["train-parent", "train.lr=-1"]) == 2
    assert "train.lr" in capsys.readouterr().err
    assert main(["no-such-recipe"]) == 2
    assert main(["--help"]) == 0
    assert "train-parent" in capsys.readouterr().out


def test_moe_with_tensor_parallelism_requires_sequence_parallelism():
    with pytest.raises(ConfigError, match=r"parallel\.sequence_parallel"):
        ParallelConfig(nproc=2, tp=2, sequence_parallel=False).check_model(HybridModelConfig())
    ParallelConfig(nproc=2, tp=2).check_model(HybridModelConfig())  # the default is valid


def test_pipeline_stages_must_split_the_layers_evenly():
    model = HybridModelConfig()  # 8 layers
    with pytest.raises(ConfigError, match=r"parallel\.pp: the 8 layers .* 3 pipeline stages"):
        ParallelConfig(nproc=3, pp=3).check_model(model)
    ParallelConfig(nproc=4, pp=4).check_model(model)  # 2 layers per stage
    with pytest.raises(ConfigError, match=r"parallel\.nproc: must be a multiple of tp\*pp\*cp = 4"):
        ParallelConfig(nproc=2, tp=2, pp=2)


@pytest.mark.parametrize(
    ("recipe", "why"),
    [
        ("import-hf", "does not run pipeline stages yet"),
        ("importance", "reads checkpoints saved at any pp"),
    ],
)
def test_pp_is_refused_before_any_rank_starts_for_recipes_without_stages(
    recipe, why, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    args = [recipe, "parallel.nproc=2", "parallel.pp=2", f"run.dir={run_dir}"]
    assert main(args) == 2  # no torchrun: the launcher would have returned its exit code
    err = capsys.readouterr().err
    assert "parallel.pp: 2 is not supported" in err and why in err
    assert not run_dir.exists()  # nothing written


def test_a_layout_the_model_cannot_split_fails_before_torchrun(tmp_path, capsys):
    args = ["train-parent", "parallel.nproc=3", "parallel.pp=3", f"run.dir={tmp_path / 'r'}"]
    assert main(args) == 2
    assert "parallel.pp: the 8 layers" in capsys.readouterr().err


def test_a_recipe_takes_the_tokenizer_of_the_run_it_reads_unless_the_command_names_one(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    saved = "data:\n  tokenizer: hf\n  tokenizer_path: /a/tokenizer.json\n"
    (run / "config.yaml").write_text(saved)
    cfg = compose_recipe("slice", [f"source.dir={run}"])
    assert (cfg.data.tokenizer, cfg.data.tokenizer_path) == ("hf", "/a/tokenizer.json")
    cfg = compose_recipe("importance", [f"parent.dir={run}"])
    assert cfg.data.tokenizer_path == "/a/tokenizer.json"
    named = ["data.tokenizer=hf", "data.tokenizer_path=/b/tokenizer.json"]
    cfg = compose_recipe("slice", [f"source.dir={run}", *named])
    assert cfg.data.tokenizer_path == "/b/tokenizer.json"  # the command line wins
    cfg = compose_recipe("slice", [f"source.dir={tmp_path / 'none'}"])
    assert (cfg.data.tokenizer, cfg.data.tokenizer_path) == ("byte", "")  # no run: the default

"""Hugging Face checkpoints in and out, per family, against ``transformers``' own logits.

Each family's tiny random model is built in-process by ``transformers`` from its own config
class (:mod:`tests.export.hf_tiny`), saved with ``save_pretrained``, imported by
:func:`megatron_ext.export.hf.import_run.import_hf` into a torch_dist parent run, loaded back
into megatron-core and compared with ``transformers``' logits; then written back to HF
(:func:`megatron_ext.export.hf.save_hf`) and loaded by ``transformers`` again.

Tolerance: fp32 everywhere; the two implementations compute the same products in a different
order (fused QKV vs three projections, Mamba's chunked scan in two codes, RMSNorm in one
call vs two), so logits of magnitude ~1 differ by rounding: measured <= 7.2e-7. A mapping
error (a swapped head, norm, expert or gate/up half) gives differences of order 0.1-1.
ATOL = 1e-5 keeps a factor >10 above rounding and >1e4 below any mapping error.
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_ext.checkpoint import CheckpointManager
from megatron_ext.export.hf import hf_to_megatron, load_hf, read_safetensors, save_hf
from megatron_ext.export.hf.import_run import import_hf
from megatron_ext.models.builder import build_model
from megatron_ext.models.config import load_model_config
from megatron_ext.parallel import ParallelConfig, init_distributed
from tests.export.hf_tiny import FAMILIES, hf_logits, megatron_logits, write_hf

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")

ATOL = 1e-5
CASES = [(f, t) for f in FAMILIES for t in (False, True)]
CLASSES = {
    "nemotron_h_moe": "NemotronHForCausalLM",
    "nemotron_h_dense": "NemotronHForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


def case_id(case: tuple[str, bool]) -> str:
    return f"{case[0]}-{'tied' if case[1] else 'untied'}"


@pytest.fixture(scope="module")
def pgs():
    return init_distributed(ParallelConfig())


@pytest.fixture(scope="module")
def imported(tmp_path_factory, pgs):
    """Per case: (HF dir, its transformers logits, the imported run dir)."""
    root = tmp_path_factory.mktemp("hf_import")
    out = {}
    for family, tied in CASES:
        name = case_id((family, tied))
        hf_dir, run_dir = root / f"hf_{name}", root / f"run_{name}"
        model = write_hf(family, tied, hf_dir)
        import_hf(hf_dir, run_dir, pgs)
        out[(family, tied)] = (hf_dir, hf_logits(model), run_dir)
    return out


def load_run(run_dir, pgs):
    """The imported run's megatron model at TP=1, from its torch_dist checkpoint."""
    cfg = load_model_config(run_dir)
    model = build_model(cfg, ParallelConfig(), pgs, initialize=False)
    ckpts = CheckpointManager(run_dir / "checkpoints", pgs)
    ckpts.load(ckpts.latest_valid(), model, weights_only=True)
    return model.eval(), cfg


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_imported_checkpoint_computes_transformers_logits(imported, pgs, case):
    _, expected, run_dir = imported[case]
    model, cfg = load_run(run_dir, pgs)
    assert cfg.tie_embeddings == case[1]
    diff = (megatron_logits(model) - expected).abs().max().item()
    assert diff <= ATOL, f"{case_id(case)}: max |megatron - transformers| = {diff:.3g}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_export_back_loads_in_transformers_as_the_same_class_and_logits(
    imported, pgs, tmp_path, case
):
    hf_dir, expected, run_dir = imported[case]
    model, cfg = load_run(run_dir, pgs)
    save_hf(cfg, model.state_dict(), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [CLASSES[case[0]]]
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.float32, output_loading_info=True
    )
    assert type(reloaded).__name__ == CLASSES[case[0]]
    assert not info["missing_keys"] and not info["unexpected_keys"]
    diff = (hf_logits(reloaded.eval()) - expected).abs().max().item()
    assert diff <= ATOL, f"{case_id(case)}: max |exported - original| = {diff:.3g}"


def test_every_imported_tensor_is_used(imported, pgs):
    """The mapping leaves nothing of the HF checkpoint behind (except a tied duplicate head)."""
    for case, (hf_dir, _, _) in imported.items():
        model = load_hf(hf_dir, pgs)
        tensors = read_safetensors(hf_dir)
        state = hf_to_megatron(tensors, load_model_config(imported[case][2]), model.state_dict())
        assert set(state) == set(model.state_dict()), case_id(case)


def test_import_recipe_refuses_another_model_type_naming_it(tmp_path, capsys):
    from recipes.cli import main

    hf_dir = tmp_path / "gpt2"
    gpt2 = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2)
    transformers.GPT2LMHeadModel(gpt2).save_pretrained(hf_dir)
    (hf_dir / "tokenizer.json").write_text("{}")
    rc = main(["import-hf", f"hf.dir={hf_dir}", f"run.dir={tmp_path / 'run'}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "model_type='gpt2'" in err and "llama" in err and "nemotron_h" in err
    run = tmp_path / "run"  # refused before anything is written (the run lock aside)
    assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()

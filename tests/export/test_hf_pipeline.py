"""A Hugging Face parent through the whole pipeline: import-hf -> importance ->
train-elastic (a few steps) -> export / slice, and back into ``transformers``.

Per family (the Nemotron-H MoE hybrid and the Llama RoPE transformer), a tiny random model
written by ``transformers`` is imported and elastified with the recipes themselves. Then,
for every budget:

* ``export format=hf`` and ``slice`` write the same config: the router's chosen widths, not
  the config's (the budgets here give no fixed widths, so the config's fallback would be the
  full model and the router, aiming at 0.75 / 0.5 of the parameters, never chooses that);
* ``transformers`` loads the export (its parent's own class) and computes the elastic
  model's logits at that budget.

Tolerance: the elastic model at a budget (masked, fp32) equals its slice to rounding
(~1e-7 here), and ``transformers`` equals the megatron slice to rounding (<= 7.2e-7 in
``test_hf_import``); 1e-5 bounds both with a wide margin, while a wrong width, head or
expert changes logits by order 0.1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from megatron_ext.config.compose import compose_recipe
from megatron_ext.data.tokenizer import build_tokenizer
from megatron_ext.elastic.config import Budget
from megatron_ext.elastic.controller import ElasticController
from megatron_ext.elastic.convert import convert_to_elastic
from megatron_ext.elastic.slice_run import load_source
from megatron_ext.export.hf import read_safetensors
from megatron_ext.models.config import load_model_config
from megatron_ext.parallel import ParallelConfig, init_distributed
from recipes import export, generate, import_hf, importance, slice, train_elastic
from tests.export.hf_tiny import hf_logits, megatron_logits, write_hf

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")

ATOL = 1e-5
BUDGETS = [Budget("L", 1.0, "params"), Budget("M", 0.75, "params"), Budget("S", 0.5, "params")]
AXES = {
    "nemotron_h_moe": {
        "embedding": [64, 48, 32],
        "attn_heads": [4, 2],
        "mamba_heads": [8, 4],
        "moe_experts": [4, 2],
        "moe_ffn": [32, 16],
    },
    "llama": {"embedding": [64, 48, 32], "attn_heads": [4, 2], "ffn": [96, 64, 32]},
}
CLASSES = {"nemotron_h_moe": "NemotronHForCausalLM", "llama": "LlamaForCausalLM"}
SMOKE = [
    "curriculum=smoke",
    "elastic_train.micro_batch_size=2",
    "elastic_train.eval_batches=1",
    "elastic_train.eval_seq_length=32",
    "elastic_train.eval_interval=8",
    "elastic_train.warmup_steps=2",
    "logger=none",
]


def _with_elastic(cfg, family: str):
    """The recipe config with this family's elastic axes and width-free budgets."""
    OmegaConf.set_struct(cfg, False)
    cfg.elastic.axes = AXES[family]
    cfg.elastic.budgets = BUDGETS
    return cfg


@pytest.fixture(scope="module", params=sorted(AXES))
def pipeline(request, tmp_path_factory, data_overrides):
    """Every stage's run dir of one family, and the recipes' summaries."""
    family = request.param
    root = tmp_path_factory.mktemp(f"pipeline_{family}")
    write_hf(family, tied=False, directory=root / "hf")
    dirs = {k: root / k for k in ("parent", "importance", "elastic", "export", "slice")}
    out: dict = {"family": family, "dirs": dirs}
    out["import"] = import_hf.run(
        compose_recipe("import_hf", [f"hf.dir={root / 'hf'}", f"run.dir={dirs['parent']}"])
    )
    # no tokenizer overrides: each recipe takes it from the run it reads (config.yaml)
    out["importance"] = importance.run(
        compose_recipe(
            "importance",
            [
                f"parent.dir={dirs['parent']}",
                f"run.dir={dirs['importance']}",
                *data_overrides,
                "importance.calib_batches=2",
                "importance.seq_length=32",
            ],
        )
    )
    train = compose_recipe(
        "train_elastic",
        [f"source.dir={dirs['importance']}", f"run.dir={dirs['elastic']}", *data_overrides, *SMOKE],
    )
    out["train"] = train_elastic.run(_with_elastic(train, family))
    source = [f"source.dir={dirs['elastic']}", "budget=all"]
    exp = compose_recipe(
        "export", [*source, f"run.dir={dirs['export']}", "format=hf", "sizes.separate=false"]
    )
    out["export"] = export.run(_with_elastic(exp, family))
    sl = compose_recipe("slice", [*source, f"run.dir={dirs['slice']}", "eval.enabled=false"])
    out["slice"] = slice.run(_with_elastic(sl, family))
    whole = [f"source.dir={dirs['elastic']}", "budget=elastic", "format=hf"]
    exp = compose_recipe("export", [*whole, f"run.dir={root / 'whole'}", "sizes.separate=false"])
    out["whole"] = export.run(_with_elastic(exp, family))
    (entry,) = out["whole"]["exports"]
    from_hf = [f"source.dir={entry['path']}", "budget=all", f"run.dir={root / 'from_hf'}"]
    out["from_hf"] = slice.run(compose_recipe("slice", from_hf))
    return out


def test_import_writes_a_parent_run_with_its_tokenizer(pipeline):
    parent = pipeline["dirs"]["parent"]
    saved = OmegaConf.load(parent / "config.yaml")
    assert saved.data.tokenizer == "hf"
    assert saved.data.tokenizer_path == str((parent / "tokenizer.json").resolve())
    # no command line named it: every later run took it from the run it read
    for stage in ("importance", "elastic", "slice"):
        data = OmegaConf.load(pipeline["dirs"][stage] / "config.yaml").data
        assert (data.tokenizer, data.tokenizer_path) == ("hf", saved.data.tokenizer_path), stage
    assert pipeline["export"]["tokenizer"]["kind"] == "hf"
    assert saved.model.pattern == load_model_config(parent).pattern
    assert pipeline["import"]["family"] == (
        "llama" if pipeline["family"] == "llama" else "nemotron_h"
    )


def test_export_uses_the_routers_widths_exactly_as_slice(pipeline):
    exports = {e["budget"]: e for e in pipeline["export"]["exports"]}
    choices = {name: b["router_choice"] for name, b in pipeline["train"]["budgets"].items()}
    for name, figures in pipeline["slice"]["budgets"].items():
        assert exports[name]["widths"] == figures["widths"]
        assert exports[name]["widths_from"].startswith("router")
        assert figures["widths_from"].startswith("router")
        exported = load_model_config(exports[name]["path"])
        assert exported == load_model_config(Path(figures["checkpoint"]).parent)
        if name != "L":  # the config's fallback would be full width; the router chose less
            assert any(choices[name][a] < AXES[pipeline["family"]][a][0] for a in choices[name])


def test_export_loads_in_transformers_with_the_elastic_models_logits(pipeline):
    pgs = init_distributed(ParallelConfig())
    model, stripes, cfg = load_source(pipeline["dirs"]["elastic"], pgs)
    ctrl = ElasticController(cfg, stripes=stripes, mode="masked")
    elastic = convert_to_elastic(model, ctrl).eval()
    for entry in pipeline["export"]["exports"]:
        with ctrl.at(entry["widths"]):
            expected = megatron_logits(elastic)
        config = json.loads((Path(entry["path"]) / "config.json").read_text())
        assert config["architectures"] == [CLASSES[pipeline["family"]]]
        hf = transformers.AutoModelForCausalLM.from_pretrained(entry["path"], dtype=torch.float32)
        diff = (hf_logits(hf.eval()) - expected).abs().max().item()
        assert diff <= ATOL, f"{entry['budget']}: max |transformers - elastic| = {diff:.3g}"


def test_one_elastic_hf_dir_slices_into_the_same_standalone_models(pipeline):
    """``export budget=elastic format=hf`` then ``slice source.dir=<it>``, without the run,
    gives for every budget the very tensors and config the run's own export wrote."""
    (whole,) = pipeline["whole"]["exports"]
    config = json.loads((Path(whole["path"]) / "config.json").read_text())
    assert config["architectures"] == [CLASSES[pipeline["family"]]]
    exports = {e["budget"]: e for e in pipeline["export"]["exports"]}
    assert config["elastic"]["budgets"] == {name: e["widths"] for name, e in exports.items()}
    for name, entry in pipeline["from_hf"]["budgets"].items():
        ours, theirs = Path(entry["path"]), Path(exports[name]["path"])
        assert load_model_config(ours) == load_model_config(theirs)
        a, b = read_safetensors(ours), read_safetensors(theirs)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # transformers reads the elastic directory itself as the full-width elastic model
    hf = transformers.AutoModelForCausalLM.from_pretrained(whole["path"], dtype=torch.float32)
    model, _, _ = load_source(pipeline["dirs"]["elastic"], init_distributed(ParallelConfig()))
    diff = (hf_logits(hf.eval()) - megatron_logits(model)).abs().max().item()
    assert diff <= ATOL, f"full width: max |transformers - elastic| = {diff:.3g}"


# ---- generate: the recipe's greedy tokens are transformers' own -----------------------------
# Both decode greedily from the same prompt ids in fp32; their logits differ by rounding
# (<= 1e-5, above), so an argmax can only flip at a near-tie of that size, which the few
# tokens here do not meet. A wrong cache, mask or width changes logits by order 0.1 and the
# tokens within a step or two. transformers picks over the model's padded vocabulary, the
# recipe over the tokenizer's ids: the padding ids are suppressed on the transformers side.
PROMPT = "def fibonacci(n):"
THINK, ANSWER = 6, 5  # new tokens per phase (K and the answer limit)


def _generate(pipeline, source: Path, name: str, think: str, answer: str) -> dict:
    """The generate recipe on ``source`` for one prompt: its one generation's summary."""
    overrides = [
        f"source.dir={source}",
        f"run.dir={pipeline['dirs']['parent'].parent / name}",
        f"generation.think_budget={think}",
        f"generation.answer_budget={answer}",
        f"generation.max_think_tokens={THINK}",
        f"generation.max_answer_tokens={ANSWER}",
        "generation.stop_at_newline=false",
        "generation.warmup=false",
    ]
    cfg = _with_elastic(compose_recipe("generate", overrides), pipeline["family"])
    cfg.generation.prompts = [PROMPT]
    assert cfg.data.tokenizer == "hf"  # taken from the run, no override
    (pair,) = generate.run(cfg)["pairs"].values()
    (out,) = pair["generations"]
    return out


def _hf_greedy(model, ids: list[int], new: int, vocab: int) -> list[int]:
    """``transformers``' greedy continuation of ``ids``: ``new`` tokens among ids < ``vocab``."""
    model.generation_config.eos_token_id = None  # the recipe stops on its own rules
    padding = list(range(vocab, model.config.vocab_size))
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=new,
        do_sample=False,
        suppress_tokens=padding or None,
        pad_token_id=0,
    )
    return out[0, len(ids) :].tolist()


def _assert_same_greedy_tokens(out: dict, think_hf, answer_hf, tokenizer) -> None:
    """The recipe's think and answer tokens are ``transformers``' greedy tokens."""
    head = tokenizer.encode(PROMPT + "<think>")
    think = out["think_ids"]
    assert think and think == _hf_greedy(think_hf, head, THINK, tokenizer.vocab_size)[: len(think)]
    assert len(think) == THINK or out["think_stop"] == "think_close"
    closed = think if out["think_stop"] == "think_close" else think + tokenizer.encode("</think>")
    answer = out["answer_ids"]
    expected = _hf_greedy(answer_hf, head + closed, ANSWER, tokenizer.vocab_size)
    assert answer and answer == expected[: len(answer)]
    assert len(answer) == ANSWER or answer[-1] == tokenizer.eod


def _hf(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_generate_on_the_imported_run_decodes_transformers_greedy_tokens(pipeline):
    parent = pipeline["dirs"]["parent"]
    out = _generate(pipeline, parent, "gen_parent", "L", "L")
    hf = _hf(parent.parent / "hf")
    _assert_same_greedy_tokens(out, hf, hf, build_tokenizer("hf", parent / "tokenizer.json"))


def test_generate_on_the_slices_decodes_the_exports_greedy_tokens(pipeline):
    """Think at S, answer at M on the slice run; ``transformers`` runs the S and M exports."""
    out = _generate(pipeline, pipeline["dirs"]["slice"], "gen_slices", "S", "M")
    exports = {e["budget"]: Path(e["path"]) for e in pipeline["export"]["exports"]}
    tokenizer = build_tokenizer("hf", pipeline["dirs"]["parent"] / "tokenizer.json")
    _assert_same_greedy_tokens(out, _hf(exports["S"]), _hf(exports["M"]), tokenizer)

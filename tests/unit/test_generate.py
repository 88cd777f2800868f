"""Generation: cached decoding, budget control (think at one budget, answer at another), sampling.

Models are the tiny hybrid (M*ME-M*E: Mamba, attention, MLP and MoE layers) with seeded
random weights in fp32; the properties below do not need trained weights.

Tolerances. The cached path computes a Mamba layer's prompt with the chunked scan and each
later token with the one-step recurrence, and an attention layer's new query against cached
keys instead of inside a full causal product; the uncached oracle runs the chunked scan and
the full product over the whole sequence every step. Same arithmetic, different summation
order: fp32 rounding only, measured <= 6e-7 on logits of order 1, so the logits must agree
to 1e-4 at every position. Random weights leave gaps of order 1e-2 between the two best
logits, so the tokens must be identical. Elastic masked decoding against the standalone
slice adds invariant 1's rounding (<= 1e-5): the same 1e-4 and identical tokens.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from megatron_ext.data.tokenizer import ByteTokenizer
from megatron_ext.elastic.controller import ElasticController
from megatron_ext.elastic.convert import convert_to_elastic
from megatron_ext.elastic.slicing import build_slice, slice_model
from megatron_ext.generate.budget import LENGTH, THINK_CLOSED, StopOn, think_then_answer
from megatron_ext.generate.config import GenerateConfig, load_prompts
from megatron_ext.generate.decode import CachedDecoder, RecomputeDecoder, generate
from megatron_ext.generate.sampling import Sampler
from megatron_ext.generate.sources import ElasticBudgets, SliceBudgets
from megatron_ext.models.config import ConfigError
from tests.unit.test_elastic_layers import MODEL, SMALL, build, make_world

ATOL = 1e-4
TOKENIZER = ByteTokenizer()


@pytest.fixture(scope="module")
def world():
    return make_world()


@pytest.fixture(scope="module")
def model(world):
    return build(world, seed=3)


def prompts(length: int, rows: int = 2) -> torch.Tensor:
    """Real text bytes (this Python's ``os.py``), ``rows`` prompts of ``length`` tokens."""
    raw = Path(os.__file__).read_bytes()[4096 : 4096 + rows * length]
    return torch.tensor(list(raw)).view(rows, length)


def _compare(cached, full) -> None:
    assert cached.tokens == full.tokens
    assert len(cached.logits) == len(full.logits)
    for a, b in zip(cached.logits, full.logits):
        assert (a - b).abs().max().item() <= ATOL


# ---- cached decoding ---------------------------------------------------------------------


@pytest.mark.parametrize("length", [9, 37], ids=["short_prompt", "prompt_over_a_mamba_chunk"])
def test_cached_decoding_equals_full_recompute_token_for_token(model, length):
    # 37 > mamba_chunk_size (32): the prefill's SSM state crosses a chunk boundary.
    prompt = prompts(length)
    kwargs = dict(vocab_size=TOKENIZER.vocab_size, record_logits=True)
    cached = generate(CachedDecoder(model), prompt, 12, Sampler(), **kwargs)
    full = generate(RecomputeDecoder(model), prompt, 12, Sampler(), **kwargs)
    assert all(len(row) == 12 for row in cached.tokens)
    _compare(cached, full)


def test_cached_decode_step_runs_one_token_through_the_model(model):
    seen: list[tuple[int, ...]] = []
    hook = model.embedding.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True,
    )
    try:
        generate(CachedDecoder(model), prompts(9), 5, Sampler())
    finally:
        hook.remove()
    assert seen == [(2, 9)] + [(2, 1)] * 4  # one prefill, then one token per step


def test_cached_decoder_refuses_a_model_in_training_mode(world):
    model = build(world, seed=3).train()
    with pytest.raises(ValueError, match="eval mode"):
        CachedDecoder(model)


@pytest.mark.parametrize("mode", ["masked", "narrow"])
def test_elastic_decoding_equals_the_slice_token_for_token(world, mode):
    model = build(world, seed=5)
    ctrl = ElasticController(MODEL)
    convert_to_elastic(model, ctrl)
    config, state = slice_model(model, SMALL)
    small = build_slice(config, state, pg_collection=world[1]).eval()
    elastic = ElasticBudgets(model, ctrl, {"S": SMALL}, mode=mode)
    core = model.decoder.layers[1].self_attention.core_attention
    widths: set[int] = set()
    core.register_forward_hook(lambda m, a, out: widths.add(out.shape[-1]))
    prompt = prompts(21)
    kwargs = dict(vocab_size=TOKENIZER.vocab_size, record_logits=True)
    with elastic.decoder("S") as decoder:
        assert ctrl.keep_narrow_weights == (mode == "narrow")  # reused narrowed weights
        out = generate(decoder, prompt, 10, Sampler(), **kwargs)
        caches = decoder.context.key_value_memory_dict  # type: ignore[attr-defined]
    assert not ctrl.keep_narrow_weights  # training after serving gathers fresh weights again
    with SliceBudgets({"S": small}).decoder("S") as decoder:
        sliced = generate(decoder, prompt, 10, Sampler(), **kwargs)
    _compare(out, sliced)
    assert ctrl.is_full("embedding")  # the budget's widths apply inside the block only
    # Mamba layer 1's SSM state: (batch, heads, head dim, state); narrow keeps the 4 x 8 active
    heads_and_dim = tuple(caches[1][1].shape[1:3])
    assert heads_and_dim == ((4, 8) if mode == "narrow" else (8, 16))
    assert widths == {(2 if mode == "narrow" else 4) * 32}  # attention heads, prefill and steps


# ---- sampling ------------------------------------------------------------------------------


def test_sampled_decoding_is_reproducible_with_a_seed_and_cache_independent(model):
    prompt = prompts(9)

    def run(decoder, seed: int):
        sampler = Sampler(temperature=1.0, top_k=20, seed=seed)
        return generate(decoder, prompt, 16, sampler, vocab_size=TOKENIZER.vocab_size)

    first = run(CachedDecoder(model), seed=7)
    assert run(CachedDecoder(model), seed=7).tokens == first.tokens
    assert run(RecomputeDecoder(model), seed=7).tokens == first.tokens
    assert run(CachedDecoder(model), seed=8).tokens != first.tokens  # 20^-32 to collide


def test_top_k_sampling_draws_only_among_the_k_best():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    picks = Sampler(temperature=2.0, top_k=3, seed=1)(logits)
    best = logits.topk(3, dim=-1).indices
    assert (best == picks[:, None]).any(dim=-1).all()
    assert torch.equal(Sampler()(logits), logits.argmax(dim=-1))


# ---- budget control ------------------------------------------------------------------------


class ScriptedDecoder:
    """Emits ``script`` (one-hot logits), whatever it is fed; records its prefill."""

    def __init__(self, script: list[int], log: list) -> None:
        self.script, self.log, self.at = script, log, 0

    def _next(self) -> torch.Tensor:
        logits = torch.full((1, TOKENIZER.vocab_size + 8), -1e9)
        logits[0, self.script[min(self.at, len(self.script) - 1)]] = 0.0
        self.at += 1
        return logits

    def prefill(self, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        self.log.append(ids[0].tolist())
        return self._next()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._next()


class ScriptedBudgets:
    """A budget source whose budgets emit fixed scripts; records which budget ran, in order."""

    def __init__(self, **scripts: str | list[int]) -> None:
        self.scripts = {
            name: TOKENIZER.encode(s) if isinstance(s, str) else s for name, s in scripts.items()
        }
        self.used: list[str] = []
        self.prefills: list[list[int]] = []

    @contextmanager
    def decoder(self, budget: str):
        self.used.append(budget)
        yield ScriptedDecoder(self.scripts[budget], self.prefills)


def _budget_control(models, **overrides):
    cfg = GenerateConfig(think_budget="S", answer_budget="L", **overrides)
    return think_then_answer(models, "S", "L", TOKENIZER, "q:", cfg, Sampler())


@pytest.mark.parametrize(
    "think", [b"ab</think>zzzz", "ab</think>zzzz"], ids=["marker_as_bytes", "marker_as_token"]
)
def test_budget_switches_at_the_think_close_marker(think):
    # As bytes: eight byte tokens; as the tokenizer's special </think> id: one token.
    script = list(think) if isinstance(think, bytes) else think
    models = ScriptedBudgets(S=script, L="42\nmore")
    out = _budget_control(models, max_think_tokens=50)
    trace = TOKENIZER.encode("ab</think>", parse_special=isinstance(think, str))
    assert models.used == ["S", "L"]
    assert out.think_stop == THINK_CLOSED
    assert out.think_tokens == trace  # nothing after the marker
    head = TOKENIZER.encode("q:<think>")
    assert models.prefills == [head, head + trace]  # the marker is not appended twice
    assert (out.answer_text, out.answer_stop) == ("42\n", "newline")


def test_budget_switches_after_max_think_tokens_and_closes_the_trace():
    models = ScriptedBudgets(S="x" * 100, L="7" * 100)
    out = _budget_control(models, max_think_tokens=5, max_answer_tokens=3)
    assert (out.think_stop, out.think_tokens) == (LENGTH, TOKENIZER.encode("xxxxx"))
    head = TOKENIZER.encode("q:<think>")
    assert models.prefills[1] == head + TOKENIZER.encode("xxxxx</think>")
    assert (out.answer_text, out.answer_stop) == ("777", LENGTH)
    assert out.think.decode_tokens == 4 and out.think.prefill_tokens == len(head)


def test_answer_stops_at_end_of_document():
    models = ScriptedBudgets(S="</think>", L=[ord("4"), TOKENIZER.eod, ord("5")])
    out = _budget_control(models, stop_at_newline=False)
    assert (out.answer_text, out.answer_stop) == ("4", "eod")


def test_stop_on_finds_text_completed_by_the_newest_token_only():
    stop = StopOn(TOKENIZER, texts={"</think>": "closed"}, token_ids={TOKENIZER.eod: "eod"})
    ids = TOKENIZER.encode("hello </think")
    assert stop(ids) is None
    assert stop(ids + [ord(">")]) == "closed"
    assert stop([TOKENIZER.end_think]) == "closed"
    assert stop(ids + [TOKENIZER.eod]) == "eod"


def test_generate_config_errors_name_the_field_and_pairs_cover_the_four_configurations():
    with pytest.raises(ConfigError, match="generation.max_think_tokens"):
        GenerateConfig(max_think_tokens=0)
    with pytest.raises(ConfigError, match="generation.temperature"):
        GenerateConfig(temperature=-1.0)
    cfg = GenerateConfig(think_budget="S", answer_budget="L", all_pairs=True)
    assert cfg.pairs() == [("S", "L"), ("S", "S"), ("L", "S"), ("L", "L")]
    assert cfg.budgets() == ["S", "L"]


def test_pair_budgets_give_every_think_answer_pair_over_them():
    cfg = GenerateConfig(all_pairs=True, pair_budgets=["L", "M", "S"])
    pairs = cfg.pairs()
    assert pairs[0] == ("S", "L") and len(pairs) == len(set(pairs)) == 9
    assert set(pairs) == {(a, b) for a in "LMS" for b in "LMS"}
    assert set(cfg.budgets()) == {"L", "M", "S"}
    assert GenerateConfig(pair_budgets=["L", "M", "S"]).pairs() == [("S", "L")]  # all_pairs off
    with pytest.raises(ConfigError, match="generation.pair_budgets.*add \\['S'\\]"):
        GenerateConfig(all_pairs=True, pair_budgets=["L", "M"])
    with pytest.raises(ConfigError, match="generation.pair_budgets.*twice"):
        GenerateConfig(all_pairs=True, pair_budgets=["L", "S", "L"])


def test_prompts_file_is_read_as_plain_lines_or_json_lines(tmp_path):
    plain = tmp_path / "prompts.txt"
    plain.write_text("def f():\n\nimport os\n")
    assert load_prompts(GenerateConfig(prompts_file=str(plain))) == ["def f():", "import os"]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('"a\\nb"\n{"prompt": "c"}\n')
    assert load_prompts(GenerateConfig(prompts_file=str(jsonl))) == ["a\nb", "c"]
    jsonl.write_text('{"text": "c"}\n')
    with pytest.raises(ConfigError, match="generation.prompts_file"):
        load_prompts(GenerateConfig(prompts_file=str(jsonl)))


def test_mamba_decode_step_runs_on_torch_kernels_without_mamba_ssm():
    from megatron.core.ssm import mamba_mixer

    from megatron_ext.compat import have_mamba_ssm, mamba_kernels

    if have_mamba_ssm():
        pytest.skip("mamba-ssm is installed: upstream's fused decode kernels are used")
    assert mamba_mixer.selective_state_update is mamba_kernels.selective_state_update
    assert mamba_mixer.causal_conv1d_update is None  # upstream's torch conv step


# ---- the recipe ----------------------------------------------------------------------------


def test_generate_recipe_agrees_on_elastic_and_sliced_checkpoints(world, tmp_path):
    """Elastic checkpoint (masked widths) and its slices give the same answers; every phase
    is timed. Runs last in this module: the recipe tears the process groups down."""
    from megatron_ext.checkpoint import CheckpointManager
    from megatron_ext.config.compose import compose_recipe, section
    from megatron_ext.elastic.config import ElasticConfig
    from megatron_ext.elastic.slicing import save_slice
    from megatron_ext.models.config import save_model_config
    from recipes import generate as recipe

    common = [
        "generation.all_pairs=true",
        "generation.max_think_tokens=6",
        "generation.max_answer_tokens=4",
        "generation.warmup=false",
        "generation.prompts=['def f(x):','import os']",
    ]
    elastic = section(compose_recipe("generate", common), "elastic", ElasticConfig)
    model = build(world, seed=9)
    CheckpointManager(tmp_path / "elastic" / "checkpoints", world[1]).save(0, model, None, {})
    save_model_config(MODEL, tmp_path / "elastic")
    ctrl = ElasticController(MODEL)
    for name in ("S", "L"):
        save_slice(
            model,
            elastic.widths_for(name, MODEL),
            tmp_path / "sliced" / "slices" / name,
            world[1],
            controller=ctrl,
        )
    summaries = {}
    for kind in ("elastic", "sliced"):
        overrides = [f"source.dir={tmp_path / kind}", f"run.dir={tmp_path / ('run_' + kind)}"]
        summaries[kind] = recipe.run(compose_recipe("generate", [*common, *overrides]))
    assert summaries["elastic"]["source_kind"] == "elastic"
    assert summaries["sliced"]["source_kind"] == "slices"
    written = json.loads((tmp_path / "run_sliced" / "summary.json").read_text())
    assert set(written["pairs"]) == {"S->L", "S->S", "L->S", "L->L"}
    for pair, figures in written["pairs"].items():
        for phase in ("think", "answer"):
            assert figures[phase]["prefill_tokens_per_s"] > 0
            assert figures[phase]["time_to_first_token_ms"] > 0
        assert figures["think"]["decode_tokens_per_s"] > 0  # 6 think tokens: 5 decode steps
        texts = [g["answer"] for g in figures["generations"]]
        assert texts == [g["answer"] for g in summaries["elastic"]["pairs"][pair]["generations"]]

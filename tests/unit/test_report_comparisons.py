"""The report's comparisons: the second held-out corpus reader, the equal-parameters width /
depth picker, a budget's share of an elastic run, the interleaved timing figures, and the
report sections that read them (from small fake run directories)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from megatron_ext.data.system_corpus import corpus_batches, read_system_corpus
from megatron_ext.elastic.config import Budget, ElasticConfig
from megatron_ext.elastic.cost import CostModel, CostSpec
from megatron_ext.elastic.curriculum import CurriculumConfig, Stage, sample_budget
from megatron_ext.elastic.equal_params import equal_params_budgets
from megatron_ext.elastic.standalone import budget_stages, share_tokens
from megatron_ext.elastic.train_config import ElasticTrainConfig
from megatron_ext.errors import ConfigError
from megatron_ext.generate.budget import timing_summary
from megatron_ext.generate.config import GenerateConfig
from megatron_ext.report.comparison_sections import (
    nested_section,
    second_corpus_section,
    stage2_section,
    width_depth_section,
)
from megatron_ext.report.config import ReportConfig
from megatron_ext.report.generation_sections import _verdict, with_timing_rounds
from megatron_ext.report.run_section import run_section
from tests.unit.test_elastic_layers import MODEL

# --- the second corpus -------------------------------------------------------------------


def test_system_corpus_reads_each_file_once_and_refuses_a_missing_folder(tmp_path):
    (tmp_path / "GPL-3").write_text("GNU GENERAL PUBLIC LICENSE\n")
    (tmp_path / "BSD").write_text("Redistribution and use\n")
    (tmp_path / "empty").write_text("  \n")
    (tmp_path / "GPL").symlink_to(tmp_path / "GPL-3")  # Debian links GPL -> GPL-3
    corpus = read_system_corpus(tmp_path)
    assert corpus.names == ["BSD", "GPL"]  # sorted; GPL-3 is the file GPL already gave
    assert corpus.chars == len("Redistribution and use\n") + len("GNU GENERAL PUBLIC LICENSE\n")
    with pytest.raises(ConfigError, match="nowhere.*does not exist"):
        read_system_corpus(tmp_path / "nowhere")
    (tmp_path / "only").mkdir()
    with pytest.raises(ConfigError, match="no non-empty text"):
        read_system_corpus(tmp_path / "only")


def test_corpus_batches_are_consecutive_windows_with_labels_shifted_by_one():
    docs = [list(range(10, 20)), list(range(30, 45))]  # 10 + 15 tokens, eod after each
    batches = corpus_batches(docs, eod=0, seq_length=4, batch_size=2, max_batches=10)
    stream = [*range(10, 20), 0, *range(30, 45), 0]  # 27 tokens: 5 windows of 5, 2 batches
    assert len(batches) == 2
    for i, batch in enumerate(batches):
        for row in range(2):
            start = (2 * i + row) * 5
            assert batch["tokens"][row].tolist() == stream[start : start + 4]
            assert batch["labels"][row].tolist() == stream[start + 1 : start + 5]
        assert batch["loss_mask"].sum() == 8
        assert batch["position_ids"][1].tolist() == [0, 1, 2, 3]
    assert len(corpus_batches(docs, 0, 4, 2, max_batches=1)) == 1
    with pytest.raises(ConfigError, match="do not fill one batch"):
        corpus_batches(docs, 0, seq_length=20, batch_size=2, max_batches=1)


# --- width vs depth at equal parameters ----------------------------------------------------


def _depth_config() -> ElasticConfig:
    axes = {
        "embedding": [MODEL.hidden_size, MODEL.hidden_size * 3 // 4, MODEL.hidden_size // 2],
        "ffn": [MODEL.ffn_hidden_size, MODEL.ffn_hidden_size * 3 // 4, MODEL.ffn_hidden_size // 2],
        "mamba_heads": [MODEL.mamba_num_heads, MODEL.mamba_num_heads // 2],
        "depth": [MODEL.num_layers, MODEL.num_layers - 1],
    }
    return ElasticConfig(axes=axes, budgets=[Budget(name="L", target=1.0, kind="params")])


def test_equal_params_pair_is_width_only_and_depth_only_with_the_nearest_parameter_count():
    elastic = _depth_config()
    order = list(range(MODEL.num_layers))[::-1]
    depth = MODEL.num_layers - 1
    pair = equal_params_budgets(elastic, MODEL, order, depth, tolerance=0.5)
    full = elastic.full_widths(MODEL)
    assert pair.depth_only == {**full, "depth": depth}
    assert pair.width_only["depth"] == MODEL.num_layers
    cost = CostModel(MODEL, CostSpec(kind="params"), order)
    assert pair.depth_params == round(float(cost.params(pair.depth_only)))
    assert pair.width_params == round(float(cost.params(pair.width_only)))
    # no other width choice comes nearer (brute force over the grid)
    axes = [a for a in elastic.axes if a != "depth"]
    gaps = [
        abs(float(cost.params({**full, **dict(zip(axes, c))})) - pair.depth_params)
        for c in itertools.product(*(elastic.axes[a] for a in axes))
    ]
    assert abs(pair.width_params - pair.depth_params) == pytest.approx(min(gaps), abs=1)
    with pytest.raises(ConfigError, match="within 0%"):
        if pair.mismatch > 0:
            equal_params_budgets(elastic, MODEL, order, depth, tolerance=0.0)
        else:  # an exact tie: no refusal to check at this tolerance
            raise ConfigError("within 0%")
    with pytest.raises(ConfigError, match="elastic.axes.depth"):
        equal_params_budgets(elastic, MODEL, order, MODEL.num_layers)


# --- a budget's share of the elastic run ---------------------------------------------------


def test_budget_shares_partition_every_step_of_the_run_by_the_trainers_draws():
    curriculum = CurriculumConfig(
        seed=3,
        stages=[
            Stage(name="a", seq_length=8, steps=40, lr=1e-3),
            Stage(name="b", seq_length=16, steps=30, lr=5e-4, budget_probs=[0.5, 0.3, 0.2]),
        ],
    )
    train = ElasticTrainConfig(micro_batch_size=2)
    shares = [budget_stages(curriculum, train, 1, 3, i, seed=7) for i in range(3)]
    for stage, st in enumerate(curriculum.resolve(2, 3)):
        chosen = [s[stage].chosen for s in shares]
        assert all(sum(step) == 1 for step in zip(*chosen))  # each step trains one budget
        for k in range(st.steps):  # and it is the budget the trainer's draw picks
            assert shares[sample_budget(st.budget_probs, 3, stage, st.start_step + k)][
                stage
            ].chosen[k]
    assert sum(share_tokens(s) for s in shares) == 2 * (40 * 8 + 30 * 16)
    assert [s.seed for s in shares[0]] == [7 + 101, 7 + 202]  # the trainer's stage seeds
    assert shares[2][1].as_dict()["of"] == 30


# --- interleaved timing --------------------------------------------------------------------


def test_pair_grid_same_runs_think_equals_answer_pairs_and_names_its_field():
    gen = GenerateConfig(
        think_budget="L", answer_budget="L", all_pairs=True, pair_budgets=["L", "M", "S"]
    )
    assert len(gen.pairs()) == 9
    gen = GenerateConfig(
        think_budget="L",
        answer_budget="L",
        all_pairs=True,
        pair_budgets=["L", "M", "S"],
        pair_grid="same",
    )
    assert gen.pairs() == [("L", "L"), ("M", "M"), ("S", "S")]
    with pytest.raises(ConfigError, match="generation.pair_grid"):
        GenerateConfig(pair_grid="diagonal")
    with pytest.raises(ConfigError, match="generation.pair_grid"):
        GenerateConfig(think_budget="S", answer_budget="L", pair_grid="same")
    with pytest.raises(ConfigError, match="generation.timing_rounds"):
        GenerateConfig(timing_rounds=-1)


def test_timing_rounds_run_every_pair_once_per_round_in_a_rotated_order(monkeypatch):
    """Round r runs each pair once on the first ``timing_prompts`` prompts, in the pairs'
    order rotated by r; each pair gets one entry per round with that round's figures."""
    from megatron_ext.generate import budget

    calls: list[tuple[str, str, str]] = []

    def fake_think_then_answer(models, think, answer, codec, prompt, cfg, sampler):
        calls.append((think, answer, prompt))
        return len(calls)  # the call's number stands in for the answer

    class FakeReport:
        def __init__(self, think, answer, answers):
            self.answers = answers

        def as_dict(self):
            last = self.answers[-1]
            return {
                "latency_s": float(last),
                "think": {"decode_tokens_per_s": 10.0 * last},
                "answer": {"decode_tokens_per_s": 100.0 * last},
            }

    monkeypatch.setattr(budget, "think_then_answer", fake_think_then_answer)
    monkeypatch.setattr(budget, "PairReport", FakeReport)
    gen = GenerateConfig(
        think_budget="L",
        answer_budget="L",
        all_pairs=True,
        pair_budgets=["L", "S"],
        timing_rounds=5,
        timing_prompts=2,
    )
    pairs = gen.pairs()
    assert len(pairs) == 4
    rounds = budget.time_pairs_interleaved(None, None, gen, ["p0", "p1", "p2"], progress=False)
    assert {p for _, _, p in calls} == {"p0", "p1"}  # only the first timing_prompts
    order = [(t, a) for t, a, p in calls if p == "p0"]
    assert len(order) == 5 * 4
    for r in range(5):
        shift = r % 4
        assert order[4 * r : 4 * r + 4] == pairs[shift:] + pairs[:shift], r
    for t, a in pairs:
        entries = rounds[f"{t}->{a}"]
        assert len(entries) == 5
        # each entry is that round's run of the pair: call numbers grow round by round
        latencies = [e["latency_s"] for e in entries]
        assert latencies == sorted(latencies) and len(set(latencies)) == 5
        assert all(e["think_tokens_per_s"] == 10.0 * e["latency_s"] for e in entries)


def test_timing_summary_gives_the_median_and_the_relative_spread_of_the_rounds():
    rounds = [
        {"latency_s": lat, "think_tokens_per_s": tps, "answer_tokens_per_s": 2 * tps}
        for lat, tps in ((0.30, 100.0), (0.20, 150.0), (0.25, 120.0))
    ]
    t = timing_summary(rounds)
    assert t["latency_median_s"] == pytest.approx(0.25)
    assert (t["latency_min_s"], t["latency_max_s"]) == (0.20, 0.30)
    assert t["latency_spread"] == pytest.approx(0.10 / 0.25)
    assert t["think_tokens_per_s"] == 120.0 and t["answer_tokens_per_s"] == 240.0


def test_verdict_uses_the_rounds_median_and_counts_a_gap_only_beyond_their_spread():
    def pair(median: float, spread: float, accuracy: float) -> dict:
        timing = {"latency_median_s": median, "latency_min_s": median, "latency_max_s": median}
        timing |= {"latency_spread": spread, "think_tokens_per_s": 1.0, "answer_tokens_per_s": 1.0}
        return {"latency_s": 9.9, "accuracy": accuracy, "timing": timing}

    sizes = {"M": 1, "L": 2}
    close = with_timing_rounds({"M->L": pair(0.9, 0.2, 0.9), "L->L": pair(1.0, 0.05, 0.9)})
    assert close["M->L"]["latency_s"] == 0.9 and close["M->L"]["latency_s_scored"] == 9.9
    text = _verdict(close, "slices", sizes, None)
    assert "M->L is 10% faster than L->L (within the timing noise of 20%)" in text
    assert "it does not beat L->L" in text
    clear = with_timing_rounds({"M->L": pair(0.5, 0.1, 0.9), "L->L": pair(1.0, 0.1, 0.9)})
    assert "M->L is 50% faster than L->L at accuracy 90.0% vs 90.0%: it beats L->L" in (
        _verdict(clear, "slices", sizes, None)
    )


# --- the report sections -------------------------------------------------------------------


def _write(path: Path, data: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "summary.json").write_text(json.dumps(data))


def _model(loss: float, other: float, correct: int, sem: float = 0.01) -> dict:
    return {
        "held_out": {"loss": loss, "sem": sem, "batches": 8},
        "second_corpus": {"loss": other, "sem": sem, "batches": 8},
        "task": {"accuracy": correct / 100, "correct": correct, "total": 100},
        "params": 1000,
    }


@pytest.fixture
def cfg(tmp_path: Path) -> ReportConfig:
    budgets = {}
    # L: standalone and elastic within noise; S: elastic better by 0.2 (> 2 standard errors)
    for name, alone, nested, other in (
        ("L", 1.00, 1.01, 3.0),
        ("M", 1.1, 1.1, 3.2),
        ("S", 1.6, 1.4, 3.1),
    ):
        budgets[name] = {
            "steps": 10,
            "tokens": 1280,
            "zero_shot": _model(alone + 1, other + 1, 0),
            "standalone": _model(alone, other, 50),
            "elastic": _model(nested, other, 60),
        }
    wd = {
        "depth": 6,
        "full_params": 2000,
        "mismatch": 0.004,
        "steps": 10,
        "tokens": 1280,
        "width_only": {"widths": {"ffn": 64}, "params": 1500, "zero_shot": _model(2, 4, 0)},
        "depth_only": {"widths": {"depth": 6}, "params": 1494, "zero_shot": _model(3, 4, 0)},
    }
    wd["width_only"]["distilled"] = _model(1.2, 3.0, 72)
    wd["depth_only"]["distilled"] = _model(1.5, 3.0, 54)
    summary = {"budgets": budgets, "width_vs_depth": wd, "parent": _model(1.0, 2.9, 80)}
    summary |= {"prompts": 100, "second_corpus": {"root": "/x", "files": ["a"], "chars": 9}}
    _write(tmp_path / "comparisons", summary)
    sizes = {"L": 300, "M": 200, "S": 100}
    two = {n: {"val_loss": v, "active_params": sizes[n]} for n, v in zip("LMS", (1.0, 1.1, 1.3))}
    one = {n: {"val_loss": v, "active_params": sizes[n]} for n, v in zip("LMS", (1.01, 1.12, 1.5))}
    _write(tmp_path / "elastic", {"budgets": two})
    _write(tmp_path / "elastic_stage1_only", {"budgets": one})
    for run, acc in (("generate_elastic", 0.9), ("generate_stage1_only", 0.5)):
        pairs = {f"{n}->{n}": {"accuracy": acc, "total": 100} for n in "LMS"}
        _write(tmp_path / run, {"pairs": pairs})
    (tmp_path / "stage_times.tsv").write_text(
        "100\t1.5\tparent\n160\t2.5\telastic\n400\t3.0\treport\n"
    )
    return ReportConfig(
        elastic=str(tmp_path / "elastic"),
        generate_elastic=str(tmp_path / "generate_elastic"),
        comparisons=str(tmp_path / "comparisons"),
        elastic_stage1_only=str(tmp_path / "elastic_stage1_only"),
        generate_stage1_only=str(tmp_path / "generate_stage1_only"),
        stage_times=str(tmp_path / "stage_times.tsv"),
    )


def test_nested_section_says_per_budget_whether_standalone_differs_beyond_noise(cfg, tmp_path):
    section = nested_section(cfg, tmp_path)
    assert section.ran
    # L: 1.00 - 1.01 = -0.01, standard error hypot(0.01, 0.01) = 0.0141: within noise
    assert "L: within noise on loss (-0.0100 ± 0.0141)" in section.body
    assert "S: elastic better on loss (+0.2000 ± 0.0141)" in section.body
    assert section.figures["S"]["accuracy_difference"] == pytest.approx(0.10)
    assert (tmp_path / section.images[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_width_depth_section_reports_accuracy_kept_of_the_parent(cfg, tmp_path):
    section = width_depth_section(cfg, tmp_path)
    # width 72/80 = 90%, depth 54/80 = 67.5%; loss 1.5 - 1.2 = 0.3 > 2 x 0.0141
    assert "width-only has the lower held-out loss by 0.3000 ± 0.0141;" in section.body
    assert "width 90.0%, depth 67.5%" in section.body
    assert "mismatch 0.40%" in section.body
    assert (tmp_path / section.images[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_corpus_section_says_whether_the_budgets_keep_their_order(cfg, tmp_path):
    section = second_corpus_section(cfg, tmp_path)
    assert "L < M < S on the training data's split, L < S < M on the second corpus" in section.body
    assert section.figures["kept_order"] is False


def test_stage2_section_finds_the_budget_it_helps_most(cfg, tmp_path):
    section = stage2_section(cfg, tmp_path)
    assert section.figures["gain"]["S"] == pytest.approx(0.2)
    assert "stage 2 lowers held-out loss most at S (+0.2000): it helps the smallest" in section.body
    assert "0.500 ± 0.050" in section.body  # stage-1-only accuracy with its binomial error


def test_run_section_gives_each_stage_its_wall_time_and_load(cfg, tmp_path):
    section = run_section(cfg, tmp_path)
    assert "| parent | 60 | 1.5 |" in section.body and "| elastic | 240 | 2.5 |" in section.body
    assert section.figures == {"total_s": 300.0, "load_min": 1.5, "load_max": 3.0}
    missing = run_section(ReportConfig(stage_times=str(tmp_path / "none.tsv")), tmp_path)
    assert not missing.ran


def test_stage2_section_says_so_when_stage_2_helps_no_budget(cfg, tmp_path):
    better = {n: {"val_loss": 0.5, "active_params": 1} for n in "LMS"}  # below every two-stage loss
    _write(tmp_path / "elastic_stage1_only", {"budgets": better})
    section = stage2_section(cfg, tmp_path)
    assert "stage 2 lowers no budget's held-out loss at equal tokens (gains L -0.5000" in (
        section.body
    )

"""``star-elastic report``: the Markdown report renders from small fake run directories with
every section and its PNGs, and missing inputs become "not run" sections, never a crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_ext.config.compose import compose_recipe
from megatron_ext.models.config import ConfigError
from megatron_ext.report.config import ReportConfig
from megatron_ext.report.generation_sections import pair_order
from megatron_ext.report.inputs import budget_throughput, run_checkpoint_size
from megatron_ext.report.model_sections import recovery_notes, task_recovery
from megatron_ext.report.render import build_report
from recipes import report as report_recipe

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TITLES = (
    "Held-out loss vs active parameters",
    "Budget control",
    "Quantization",
    "Checkpoint size",
    "Slice throughput",
)


def _write(path: Path, data: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "summary.json").write_text(json.dumps(data))


def _phase(tokens: int, seconds: float) -> dict:
    return {
        "generations": 4,
        "new_tokens": tokens + 4,
        "prefill_tokens": 40,
        "prefill_s": 0.01,
        "decode_tokens": tokens,
        "decode_s": seconds,
        "decode_tokens_per_s": tokens / seconds,
    }


def _generate(correct: dict[str, int], speed: dict[str, float]) -> dict:
    pairs = {}
    for name in ("S->L", "S->S", "L->S", "L->L"):  # generate lists the configured pair first
        think, answer = name.split("->")
        pairs[name] = {
            "think_budget": think,
            "answer_budget": answer,
            "think": _phase(120, 120 / speed[think]),
            "answer": _phase(20, 20 / speed[answer]),
            "latency_s": 30 / speed[think] + 5 / speed[answer],
            "think_closed": 4,
            "think_at_limit": 0,
            "correct": correct[name],
            "total": 4,
            "accuracy": correct[name] / 4,
        }
    return {"prompts": 4, "prompts_from": "test.jsonl", "scored": True, "pairs": pairs}


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """Fake outputs of every stage but the NVFP4 QAD run."""
    budgets = {
        "L": {"target": 1.0, "params": 800, "active_params": 600, "val_loss": 1.1},
        "S": {"target": 0.5, "params": 400, "active_params": 300, "val_loss": 1.4},
    }
    for b in budgets.values():
        b |= {"zero_shot_val_loss": b["val_loss"] + 0.5, "router_choice": {"ffn": 64}}
    _write(tmp_path / "elastic", {"budgets": budgets, "parent_val_loss": 1.0})
    ckpt = tmp_path / "elastic" / "checkpoints" / "iter_0000010"
    ckpt.mkdir(parents=True)
    files = {"__0_0.distcp": 3000, "common.pt": 100, "rank_state/rank_00000.pt": 6000}
    (ckpt / "manifest.json").write_text(json.dumps({"files": files, "complete": True}))
    (ckpt.parent / "latest.txt").write_text("iter_0000010\n")
    slices = {
        "L": {"bytes": 3100, "params_total": 800, "params_active": 600},
        "S": {"bytes": 1600, "params_total": 400, "params_active": 300},
    }
    _write(tmp_path / "slices", {"budgets": slices})
    all_right = dict.fromkeys(("S->L", "S->S", "L->S", "L->L"), 3)
    _write(tmp_path / "generate_elastic", _generate(all_right, {"S": 100.0, "L": 100.0}))
    correct = {"S->S": 1, "S->L": 3, "L->S": 2, "L->L": 3}
    _write(tmp_path / "generate_slices", _generate(correct, {"S": 200.0, "L": 100.0}))
    quant = {
        n: {"ref_loss": 1.0, "ptq_loss": 1.5, "qad_loss": 1.1, "recovery": 0.8} for n in ("L", "S")
    }
    _write(tmp_path / "qad_fp8", {"format": "fp8", "reference_dtype": "float32", "budgets": quant})
    return tmp_path


def _config(root: Path) -> ReportConfig:
    return ReportConfig(
        parent=str(root / "parent"),
        elastic=str(root / "elastic"),
        slices=str(root / "slices"),
        generate_elastic=str(root / "generate_elastic"),
        generate_slices=str(root / "generate_slices"),
        comparisons=str(root / "comparisons"),
        elastic_stage1_only=str(root / "elastic_stage1_only"),
        generate_stage1_only=str(root / "generate_stage1_only"),
        qad=[str(root / "qad_fp8"), str(root / "qad_nvfp4")],
    )


def test_report_renders_every_section_with_its_pngs_from_run_dirs(runs, tmp_path):
    out = tmp_path / "out" / "REPORT.md"
    sections = build_report(_config(runs), out)
    shown = [s for s in sections if s.title.startswith(TITLES)]
    assert len(shown) == 5 and all(s.ran for s in shown)
    text = out.read_text()
    for title in TITLES:
        assert f"## {title}" in text
    for section in shown:
        assert section.images
        for name in section.images:
            assert (out.parent / name).read_bytes()[:8] == PNG_MAGIC
            assert f"]({name})" in text
    # the four configurations, S and L ordered by size, with accuracy and latency
    assert text.index("| S → S |") < text.index("| S → L |") < text.index("| L → S |")
    assert "| S → L | 0.75 | 3/4 |" in text
    # S->L: 30/200 + 5/100 = 0.2 s against L->L: 30/100 + 5/100 = 0.35 s
    assert "- slices: S->L is 43% faster than L->L at accuracy 75.0% vs 75.0%: it beats" in text
    # checkpoint sizes: 3100 weights, 9100 with the optimizer, slices 4700
    assert "| all slices (separate checkpoints) | 4,700 |" in text
    assert "| elastic checkpoint: weights | 3,100 |" in text
    # QAD: FP8 ran, NVFP4 not
    assert "| L | 1 | 1.5 | 1.1 | 0.8 |" in text
    assert "qad_nvfp4/summary.json` does not exist" in text


def test_missing_inputs_give_not_run_sections_that_say_what_to_run(tmp_path):
    out = tmp_path / "REPORT.md"
    sections = build_report(_config(tmp_path / "nothing"), out)
    assert len(sections) >= 5 and [s.ran for s in sections] == [False] * len(sections)
    text = out.read_text()
    assert text.count("**Not run.**") == len(sections)
    for command in (
        "train-elastic",
        "star-elastic slice",
        "star-elastic generate",
        "star-elastic qad",
    ):
        assert command in text
    assert not list(tmp_path.glob("*.png"))


def test_partial_and_unreadable_inputs_only_switch_off_their_sections(runs, tmp_path):
    (runs / "generate_slices" / "summary.json").write_text("{not json")
    (runs / "slices" / "summary.json").unlink()
    sections = {s.title.split(":")[0]: s for s in build_report(_config(runs), tmp_path / "r.md")}
    assert sections["Held-out loss vs active parameters"].ran
    assert sections["Budget control"].ran  # the elastic source alone
    assert not sections["Checkpoint size"].ran
    assert not sections["Slice throughput vs full"].ran
    text = (tmp_path / "r.md").read_text()
    assert "generate_slices/summary.json` is unreadable" in text


def test_report_recipe_composes_from_conf_and_writes_report_and_summary(runs):
    cfg = compose_recipe("report", [f"run.dir={runs}"])
    summary = report_recipe.run(cfg)
    assert Path(summary["report"]) == runs / "REPORT.md"
    on_disk = json.loads((runs / "summary.json").read_text())
    assert on_disk["sections"]["Checkpoint size: elastic vs separate"]["ran"]
    assert (runs / "REPORT.md").is_file()


def test_report_config_names_the_field_it_rejects():
    with pytest.raises(ConfigError, match="report.out"):
        ReportConfig(out="report.html")
    with pytest.raises(ConfigError, match="report.elastic"):
        ReportConfig(elastic="")


def test_pairs_are_ordered_small_small_to_large_large_by_budget_size():
    pairs = ["L->L", "S->L", "S->S", "L->S"]
    assert pair_order(pairs, {"S": 1, "L": 2}) == ["S->S", "S->L", "L->S", "L->L"]
    assert pair_order(["S->L", "L->L"]) == ["S->L", "L->L"]  # no sizes: the first pair is S->L


def test_three_budgets_give_nine_pairs_in_size_order_and_a_verdict_per_think_budget(tmp_path):
    from megatron_ext.report.generation_sections import budget_control_section
    from megatron_ext.report.plots import pareto_front

    sizes = {"S": 1, "M": 2, "L": 3}
    names = [f"{a}->{b}" for a in "LMS" for b in "SML"]
    order = pair_order(names, sizes)
    assert order == [f"{a}->{b}" for a in "SML" for b in "SML"]
    # latency: think at S 0.1 s, M 0.2 s, L 0.3 s; accuracy only when answering at L
    pairs = {
        n: {"latency_s": 0.1 * (1 + "SML".index(n[0])), "accuracy": 0.2 + 0.6 * (n[-1] == "L")}
        for n in names
    }
    pairs["M->L"]["accuracy"] = 0.7  # M->L is faster than L->L but less accurate
    points = [(p["latency_s"], p["accuracy"]) for p in pairs.values()]
    assert [names[i] for i in pareto_front(points)] == ["S->L"]  # fastest and most accurate
    summary = {"prompts": 1, "prompts_from": "x", "scored": True, "compute": "narrow"}
    summary["pairs"] = pairs
    _write(tmp_path / "generate_elastic", summary)
    _write(tmp_path / "elastic", {"budgets": {n: {"active_params": v} for n, v in sizes.items()}})
    cfg = ReportConfig(
        elastic=str(tmp_path / "elastic"),
        slices=str(tmp_path / "none"),
        generate_elastic=str(tmp_path / "generate_elastic"),
        generate_slices=str(tmp_path / "none"),
    )
    section = budget_control_section(cfg, tmp_path)
    assert "### elastic (narrow)" in section.body
    assert (
        "- elastic (narrow): S->L is 67% faster than L->L at accuracy 80.0% vs 80.0%: it "
        "beats L->L." in section.body
    )
    assert "M->L is 33% faster than L->L at accuracy 70.0% vs 80.0%: it does not beat" in (
        section.body
    )
    assert section.images == ["budget_control.png", "budget_frontier.png"]
    assert (tmp_path / "budget_frontier.png").read_bytes()[:8] == PNG_MAGIC


def test_pareto_front_keeps_the_points_no_other_beats_on_latency_and_accuracy():
    from megatron_ext.report.plots import pareto_front

    points = [(0.3, 0.8), (0.1, 0.2), (0.2, 0.8), (0.25, 0.5), (0.1, 0.1)]
    assert pareto_front(points) == [1, 2]  # (0.3, 0.8) is beaten by (0.2, 0.8)


def test_throughput_pools_every_phase_run_at_a_budget():
    summary = _generate(
        dict.fromkeys(("S->L", "S->S", "L->S", "L->L"), 0), {"S": 200.0, "L": 100.0}
    )
    rates = budget_throughput(summary)
    assert rates["S"]["decode_tokens_per_s"] == pytest.approx(200.0)
    assert rates["L"]["decode_tokens_per_s"] == pytest.approx(100.0)
    assert rates["S"]["decode_tokens"] == 2 * 120 + 2 * 20


@pytest.mark.parametrize("compute", ["masked", "narrow"])
def test_throughput_divides_by_the_reference_that_the_elastic_compute_mode_gives(
    runs, tmp_path, compute
):
    from megatron_ext.report.generation_sections import throughput_section

    # slices decode S at 200 tok/s and L at 100; the elastic run at 100 (masked: full width
    # at both budgets) or at 160 / 90 (narrow: each budget its own cost)
    speed = {"S": 100.0, "L": 100.0} if compute == "masked" else {"S": 160.0, "L": 90.0}
    summary = _generate(dict.fromkeys(("S->L", "S->S", "L->S", "L->L"), 3), speed)
    _write(runs / "generate_elastic", summary | {"compute": compute})
    section = throughput_section(_config(runs), tmp_path)
    assert f"elastic ({compute}) decode tok/s" in section.body
    assert section.figures[f"elastic_{compute}"]["S"]["decode_tokens_per_s"] == pytest.approx(
        speed["S"]
    )
    if compute == "masked":  # slice S 200 / full width 100
        assert "× full width" in section.body and section.headline == "S: 2.00x full width"
        assert "| S | 300 | 200 | 4,000 | 100 | 2 | 2 |" in section.body
    else:  # elastic ÷ slice: 160 / 200 at S, 90 / 100 at L; the headline is slice S ÷ slice L
        assert "elastic ÷ slice" in section.body and "full width" not in section.body
        assert section.headline == "S: 2.00x slice L"
        assert "| S | 300 | 200 | 4,000 | 160 | 0.8 | 2 |" in section.body
        assert "| L | 600 | 100 | 4,000 | 90 | 0.9 | 1 |" in section.body


def test_checkpoint_size_separates_weights_from_optimizer_state(runs):
    size = run_checkpoint_size(runs / "elastic")
    assert size is not None and (size.weights, size.total) == (3100, 9100)


def test_quantization_notes_say_when_qad_ends_above_ptq_or_there_was_nothing_to_recover():
    worse = {
        "L": {"ref_loss": 0.357, "ptq_loss": 0.3572, "qad_loss": 0.3575},
        "S": {"ref_loss": 0.4399, "ptq_loss": 0.4435, "qad_loss": 0.4469},
    }
    text = " ".join(recovery_notes("FP8", worse))
    assert "FP8 QAD ends above its PTQ loss at L, S (by up to 0.0034 nats/token)" in text
    assert "PTQ lost at most 0.0036" in text
    tiny = {n: {"ref_loss": 1.0, "ptq_loss": 1.0002, "qad_loss": 1.0003} for n in ("L", "S")}
    assert "nothing for QAD to recover" in " ".join(recovery_notes("FP8", tiny))
    recovered = {"L": {"ref_loss": 1.0, "ptq_loss": 1.5, "qad_loss": 1.1}}
    assert recovery_notes("NVFP4", recovered) == []
    # a change of 0.0003 with a standard error of 0.0002 is within 2 SE; 0.4 ± 0.01 is not
    noisy = {
        "L": {"ref_loss": 1.0, "ptq_loss": 1.006, "qad_loss": 1.0057, "qad_change_se": 0.0002},
        "S": {"ref_loss": 1.0, "ptq_loss": 1.5, "qad_loss": 1.1, "qad_change_se": 0.01},
    }
    text = " ".join(recovery_notes("NVFP4", noisy))
    assert "within 2 standard errors at L +0.0003 ± 0.0002: no measurable change" in text
    assert "S +" not in text


def test_paired_standard_error_is_that_of_the_mean_per_batch_difference():
    from megatron_ext.quant.qad import paired_se
    from megatron_ext.quant.report import recovery_noise

    # differences 0.1, 0.3: mean 0.2, sample sd sqrt(0.02), SE sqrt(0.02 / 2) = 0.1
    assert paired_se([1.1, 2.3], [1.0, 2.0]) == pytest.approx(0.1)
    assert paired_se([5.0, 7.0, 9.0], [4.0, 6.0, 8.0]) == pytest.approx(0.0)  # a constant shift
    assert paired_se([1.0], [0.5]) is None
    figures = {"ref_loss": 1.0, "ptq_loss": 1.1, "qad_change_se": 0.01}
    assert recovery_noise(figures) == pytest.approx(0.2)  # 2 * 0.01 / 0.1
    assert recovery_noise({"ref_loss": 1.0, "ptq_loss": 1.1}) == "-"


def test_quantization_task_table_gives_each_stage_with_its_standard_error_and_the_recovery():
    def scored(correct: int) -> dict:
        return {"correct": correct, "total": 16, "accuracy": correct / 16}

    task = {"ref": scored(12), "ptq": scored(8), "qad": scored(11), "recovery": 0.75}
    runs = {"NVFP4": {"budgets": {"L": {"task": task}, "S": {}}}}
    lines = "\n".join(task_recovery(runs, ["L", "S"])).splitlines()
    row = next(line for line in lines if line.startswith("| L"))
    # 12/16 = 0.75 ± sqrt(0.75 * 0.25 / 16) = 0.108; 8/16 = 0.5 ± 0.125; 11/16 = 0.6875 ± 0.116
    for cell in ("16", "0.750 ± 0.108", "0.500 ± 0.125", "0.688 ± 0.116", "0.75"):
        assert cell in row, row
    assert task_recovery({"FP8": {"budgets": {"L": {}}}}, ["L"]) == []  # no task scored

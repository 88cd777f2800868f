"""The suite's figures: one :class:`Ratio` per row, and the Markdown report of results.json."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KINDS = ("mamba", "attention", "moe", "mlp")


@dataclass
class Ratio:
    """A ratio with its target (``op`` ``"<="`` or ``">="``); no target means "report it"."""

    id: str
    name: str
    value: float
    op: str | None = None
    target: float | None = None

    @property
    def passed(self) -> bool | None:
        """Whether the value meets the target (``None`` when there is none)."""
        if self.op is None or self.target is None:
            return None
        return self.value <= self.target if self.op == "<=" else self.value >= self.target

    def as_dict(self) -> dict[str, object]:
        """The row as results.json holds it."""
        target = None if self.op is None else f"{self.op} {self.target:g}"
        result = {True: "pass", False: "miss", None: "report"}[self.passed]
        return {
            "id": self.id,
            "ratio": self.name,
            "value": self.value,
            "target": target,
            "result": result,
        }


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def _kind_table(title: str, rows: dict[str, dict[str, float]], unit: float) -> list[str]:
    """Milliseconds per layer kind, one row per case."""
    kinds = [k for k in KINDS if any(k in r for r in rows.values())]
    extra = ["total"] if any("total" in r for r in rows.values()) else []
    head = f"| {title} | " + " | ".join(kinds + extra) + " |"
    lines = [head, "|---" * (1 + len(kinds) + len(extra)) + "|"]
    for name, r in rows.items():
        cells = [f"{r.get(k, 0.0) * unit:.1f}" for k in kinds + extra]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    """The results table with the model, workload and device, and the evidence behind it."""
    m, w, d = result["model"], result["workload"], result["details"]
    load = result["load_average"]
    lines = [
        "# Benchmark suite results",
        "",
        f"Model `{m['name']}`: pattern `{m['pattern']}`, hidden {m['hidden_size']}, "
        f"{m['params'] / 1e6:.1f}M params ({m['active_params'] / 1e6:.1f}M active), "
        f"{result['dtype']}, on `{result['device']}` ({result['device_name']}; "
        f"{result['threads']} threads). Training batch {w['batch']} x {w['seq_length']} "
        f"tokens; {w['reps']} interleaved repetitions, medians. Load average "
        f"{load['start']:.1f} at the start, {load['end']:.1f} at the end; "
        f"{result['seconds']:.0f} s in all.",
        "",
        "| # | ratio | value | target | result |",
        "|---|---|---|---|---|",
    ]
    for r in result["ratios"]:
        target = r["target"] or "report"
        lines.append(f"| {r['id']} | {r['ratio']} | {r['value']:.3f} | {target} | {r['result']} |")
    mem, dec, ck, sw = d["memory"], d["decode"], d["checkpoints"], d["slice_write"]
    lines += [
        "",
        "Training forward pass by layer kind (ms; ratio 2: what the small budget saves):",
        "",
        *_kind_table("case", d["train"]["forward_seconds_by_layer_kind"], 1e3),
        "",
        f"Decode step by layer kind (ms, batch {dec['batch']}; ratio 4): the slice is "
        f"{dec['speedup']:.2f}x faster ({dec['full_tokens_per_s']:.0f} → "
        f"{dec['slice_tokens_per_s']:.0f} tokens/s) for {dec['size_ratio']:.2f}x fewer active "
        f"params; {dec['warm_speedup']:.2f}x when each model decodes {dec['warm_block_steps']} "
        "steps in a row (4b). The elastic checkpoint decoding in narrow compute at the slice's "
        f"widths: {dec['elastic_narrow_tokens_per_s']:.0f} tokens/s (4c; "
        f"{dec['elastic_narrow_over_slice_warm']:.2f} of the slice with warm caches).",
        "",
        *_kind_table("model", dec["step_seconds_by_layer_kind"], 1e3),
        "",
        f"Slice write (ratio 3, hidden {sw['hidden']}, {_mib(sw['slice_bytes'])}): write "
        f"{sw['write']['median_s'] * 1e3:.0f} ms, copy {sw['copy']['median_s'] * 1e3:.0f} ms, "
        f"copy + fsync {sw['copy_fsync']['median_s'] * 1e3:.0f} ms "
        f"({sw['copy_fsync_mb_per_s']:.0f} MB/s).",
        f"Checkpoints (ratio 5): parent {_mib(ck['parent_bytes'])}, elastic "
        f"{_mib(ck['elastic_bytes'])}; separate per budget "
        + ", ".join(f"{k} {_mib(v)}" for k, v in ck["separate_bytes"].items())
        + ".",
        f"Peak memory (ratio 6) above the process's start: plain "
        f"{_mib(mem['probes']['plain']['used_bytes'])}, elastic "
        f"{_mib(mem['probes']['elastic']['used_bytes'])}, elastic without the teacher "
        f"{_mib(mem['probes']['elastic_replay']['used_bytes'])}. The teacher costs "
        f"{_mib(mem['teacher_bytes'])}, of which its weights are "
        f"{_mib(mem['teacher_weight_bytes'])}.",
        "",
    ]
    return "\n".join(lines)

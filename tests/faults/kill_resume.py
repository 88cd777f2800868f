"""Helpers of the SIGKILL suite: start a recipe from the command line in its own session,
kill its whole process group at a seeded step, find surviving ranks, compare final states."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from megatron_ext.checkpoint import CheckpointManager

REPO = Path(__file__).parents[2]

ELASTIC = [
    "curriculum=smoke",
    "elastic_train.save_interval=1",
    "elastic_train.micro_batch_size=2",
    "elastic_train.eval_batches=1",
    "elastic_train.eval_seq_length=32",
    "elastic_train.eval_interval=4",
    "elastic_train.warmup_steps=2",
    "logger=none",
]
"""train-elastic for the suite: the smoke curriculum, 8 steps, a checkpoint at every step."""

QAD = [
    "quant=nvfp4",
    "qad_train.steps=8",
    "qad_train.save_interval=1",
    "qad_train.warmup_steps=2",
    "qad_train.micro_batch_size=2",
    "qad_train.seq_length=32",
    "qad_train.eval_batches=1",
    "qad_train.eval_seq_length=32",
    "quant.calib_batches=1",
]
"""qad for the suite: NVFP4, 8 QAD steps, a checkpoint at every step."""


def command(recipe: str, run_dir: Path, overrides: list[str]) -> list[str]:
    """``star-elastic <recipe> run.dir=<run_dir> <overrides>`` as this interpreter runs it."""
    return [sys.executable, "-m", "recipes.cli", recipe, f"run.dir={run_dir}", *overrides]


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{path}" if path else str(REPO))


def run_to_end(recipe: str, run_dir: Path, overrides: list[str], timeout: int = 300) -> None:
    """Run the recipe to completion; fail with its stderr otherwise."""
    proc = subprocess.run(
        command(recipe, run_dir, overrides),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{recipe} exited {proc.returncode}:\n{proc.stderr[-4000:]}"


def processes_of(run_dir: Path) -> list[int]:
    """Live processes (launcher, torchrun agent, ranks) working on ``run_dir``: their command
    line names it. Independent of how they were started, so it finds orphans too."""
    needle = f"run.dir={run_dir}"
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and needle in (
                proc.info["cmdline"] or []
            ):
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def interrupt_at_step(
    recipe: str,
    run_dir: Path,
    overrides: list[str],
    step: int,
    sig: int = signal.SIGKILL,
    timeout: int = 300,
) -> dict[str, Any]:
    """Start the recipe and send ``sig`` once the save of ``step`` has begun.

    SIGKILL goes to the launcher's whole process group (what ``kill -9 -PGID`` or a
    scheduler does); other signals to the launcher only. The signal is sent while that save
    is in flight when the poll sees its temporary directory, else right after it. Returns
    the exit code, where it hit (``mid-save`` / ``after save``), the processes seen, and
    the checkpoint directories present and unfinished or corrupt right after.
    """
    ckpts = run_dir / "checkpoints"
    final, tmp = ckpts / f"iter_{step:07d}", ckpts / f".tmp_iter_{step:07d}"
    proc = subprocess.Popen(
        command(recipe, run_dir, overrides),
        env=_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout
    seen: set[int] = set()
    polls = 0
    while not (tmp.exists() or final.exists()):
        if proc.poll() is not None:
            raise AssertionError(f"{recipe} ended before step {step}: {proc.stderr.read()[-3000:]}")  # type: ignore[union-attr]
        assert time.monotonic() < deadline, f"{recipe} did not reach step {step}"
        polls += 1
        if polls % 20 == 0:
            seen.update(processes_of(run_dir))
        time.sleep(0.005)
    where = "mid-save" if not final.exists() else "after save"
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    seen.update(processes_of(run_dir))
    try:
        code = proc.wait(timeout=timeout)
    finally:
        proc.stderr.close()  # type: ignore[union-attr]
    manager = CheckpointManager(ckpts, None)
    present = sorted(p.name for p in ckpts.iterdir() if p.is_dir())
    bad = [n for n in present if n.startswith(".tmp_") or manager.problem(ckpts / n)]
    return {"code": code, "where": where, "seen": sorted(seen), "present": present, "bad": bad}


def survivors(run_dir: Path, wait: float = 10.0) -> list[int]:
    """Processes still working on ``run_dir`` after up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        alive = processes_of(run_dir)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def final_state(run_dir: Path) -> dict[str, Any]:
    """The newest checkpoint's tensors and every rank's state, minus wall-clock timings."""
    manager = CheckpointManager(run_dir / "checkpoints", None)
    latest = manager.latest_valid()
    assert latest is not None
    files = {
        rel: (latest / rel).read_bytes()
        for rel in json.loads((latest / "manifest.json").read_text())["files"]
        if rel.endswith(".distcp")
    }
    ranks = {}
    for path in sorted((latest / "rank_state").glob("*.pt")):
        state = torch.load(path, map_location="cpu", weights_only=False)
        history = state["extra"].get("history")
        for timing in ("train_seconds", "seconds"):  # wall time: what a resume cannot repeat
            if history is not None and hasattr(history, timing):
                setattr(history, timing, 0.0)
        ranks[path.name] = state
    return {"checkpoint": latest.name, "distcp": files, "ranks": ranks}


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Exact equality of nested states (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {a.keys()} != {b.keys()}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dataclass_fields__"):
        assert_identical(vars(a), vars(b), where)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


SUMMARY_KEYS = ("final_train_loss", "val_loss", "val_curve", "budgets", "tokens", "qad_curve")
"""What a resumed run's ``summary.json`` must repeat exactly (those a recipe writes)."""


def assert_same_run(whole: Path, resumed: Path, steps: int) -> None:
    """The run in ``resumed`` ended bit-identical to the uninterrupted one in ``whole``: the
    losses and figures of ``summary.json`` and the final checkpoint of step ``steps``."""
    # losses (and every metric) of the resumed run equal the uninterrupted run's, bit for bit
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, resumed))
    for key in SUMMARY_KEYS:
        assert a.get(key) == b.get(key), key
    # the final checkpoint: weight files, optimizer, RNG, data position and loss history
    final_a, final_b = final_state(whole), final_state(resumed)
    assert final_a["checkpoint"] == final_b["checkpoint"] == f"iter_{steps:07d}"
    assert_identical(final_a["distcp"], final_b["distcp"], "distcp")
    assert_identical(final_a["ranks"], final_b["ranks"], "rank_state")


def whole_runs(out_dir: Path, runs: dict[str, tuple[str, list[str]]]) -> dict[str, Path]:
    """The uninterrupted runs ``name -> (recipe, overrides)``, each into ``out_dir/<name>``:
    the 2-rank ones (``parallel=`` other than ``single``) in one torchrun launch
    (``cases_whole_runs.py``), the single-process ones here, in this process, with as many
    threads as a command-line run of the suite has."""
    from tests.distributed.launch import case, run_cases

    two_rank = {n: r for n, r in runs.items() if "parallel=single" not in r[1]}
    inputs = {n: {"recipe": r, "overrides": o} for n, (r, o) in two_rank.items()}
    (out_dir / "inputs.json").write_text(json.dumps({"runs": inputs}))
    results = run_cases(Path(__file__).with_name("cases_whole_runs.py"), out_dir)
    for name in two_rank:
        print(f"whole run {name}: {case(results, name)['seconds']} s in the launch")
    for name, (recipe, overrides) in runs.items():
        if name not in two_rank:
            run_in_process(recipe, out_dir / name, overrides)
    return {name: out_dir / name for name in runs}


def run_in_process(recipe: str, run_dir: Path, overrides: list[str]) -> None:
    """``recipe``'s ``run`` in this process (alone, or one rank of a launch), into ``run_dir``,
    with ``OMP_NUM_THREADS`` threads: the bit-identical comparisons must not depend on how a
    GEMM splits its sums over threads."""
    import importlib

    from megatron_ext.config.compose import compose_recipe
    from recipes.cli import RECIPES

    config_name, module_name, _ = RECIPES[recipe]
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", threads)))
    try:
        cfg = compose_recipe(config_name, [f"run.dir={run_dir}", *overrides])
        importlib.import_module(module_name).run(cfg)
    finally:
        torch.set_num_threads(threads)


def kill_step(recipe: str, layout: str, steps: int) -> int:
    """The seeded step of a case to kill at: never the last (a finished run has nothing to
    resume)."""
    return random.Random(f"{recipe}/{layout}").randint(1, steps - 2)


def kill_and_resume(
    tmp_path: Path,
    recipe: str,
    layout: str,
    overrides: list[str],
    steps: int,
    *,
    whole: Path,
    sig: int = signal.SIGKILL,
) -> dict[str, Any]:
    """Run ``recipe`` at ``parallel=<layout>``, killed by ``sig`` at a seeded step, and
    resume it; assert it ends bit-identical to the finished uninterrupted run ``whole``
    (:func:`whole_runs`),
    nothing outlived the launcher and nothing unfinished or corrupt was deleted. Returns
    :func:`interrupt_at_step`'s report plus the step."""
    overrides = [f"parallel={layout}", *overrides]
    split = tmp_path / "split"
    step = kill_step(recipe, layout, steps)
    hit = interrupt_at_step(recipe, split, overrides, step, sig)
    assert hit["code"] != 0
    assert not survivors(split), "processes outlived the launcher"
    run_to_end(recipe, split, overrides)
    assert_same_run(whole, split, steps)
    # nothing unfinished or corrupt at the kill was deleted: each is kept aside
    names = [p.name for p in (split / "checkpoints").iterdir()]
    for bad in hit["bad"]:
        stem = bad.removeprefix(".tmp_")
        assert any(re.fullmatch(rf"{stem}\.(partial|corrupt)-.*", n) for n in names), bad
    print(
        f"{recipe} {layout} {signal.Signals(sig).name} at step {step} ({hit['where']}): "
        f"exit {hit['code']}, kept aside {hit['bad']}, bit-identical"
    )
    return {**hit, "step": step, "split": split}

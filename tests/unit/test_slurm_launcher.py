"""The Slurm launcher without Slurm: the rendered script, its quoting, its requeue logic.

The script is run with bash in a temporary directory where ``srun`` and ``scontrol`` are
stand-ins that record what they receive, so hostile config values (spaces, quotes, ``$(...)``,
backticks, newlines) are checked to arrive verbatim and never execute.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.slurm import job_overrides, render
from megatron_ext.config.compose import compose_recipe
from megatron_ext.config.schema import ClusterConfig
from megatron_ext.models.config import ConfigError
from megatron_ext.training.preemption import REQUEUE_EXIT_CODE
from recipes import cli

PRODUCTION = [
    "model=nano_v3",
    "cluster=slurm",
    "cluster.nodes=4",
    "cluster.gpus_per_node=8",
    "parallel.nproc=32",
    "parallel.tp=2",
    "parallel.ep=8",
]
CPU = ["cluster=slurm", "cluster.gpus_per_node=0", "cluster.cpus_per_task=1", "parallel=tp2"]

FAKE_SRUN = """#!/bin/bash
printf '%s\\0' "$@" > "$FAKE_OUT/srun_args"
printf '%s' "${HOSTILE_ENV-unset}" > "$FAKE_OUT/env_value"
printf '%s\\n' "$MASTER_ADDR:$MASTER_PORT" > "$FAKE_OUT/rendezvous"
pwd > "$FAKE_OUT/cwd"
if [ -n "${FAKE_SRUN_WAIT:-}" ]; then
  trap 'exit 75' USR1
  touch "$FAKE_OUT/started"
  for _ in $(seq 200); do sleep 0.05; done
fi
exit "${FAKE_SRUN_RC:-0}"
"""
FAKE_SCONTROL = """#!/bin/bash
if [ "$1" = show ]; then echo node-a; echo node-b; exit 0; fi
printf '%s\\n' "$*" >> "$FAKE_OUT/scontrol_calls"
"""
FAKE_SBATCH = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_OUT/sbatch_args"
echo 4242
"""


MARKER = "pwned"


def _hostile() -> list[str]:
    """Strings that would create a file named ``pwned`` if any shell evaluated them."""
    m = MARKER
    return [
        f"$(touch {m})",
        f"`touch {m}`",
        f"'; touch {m}; '",
        f'"; touch {m}; "',
        f"a b\ntouch {m}\n#SBATCH --wrap=evil",
        f"x\\\ntouch {m} #",
        f"${{IFS}}; touch {m} &",
    ]


@pytest.fixture
def sandbox(tmp_path, monkeypatch) -> dict:
    """A bin dir of stand-ins (srun, scontrol, sbatch) and the dir they report into."""
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    out.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("sbatch", FAKE_SBATCH)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "FAKE_OUT": str(out),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_NTASKS": "2",
        "HOME": str(tmp_path),
    }
    monkeypatch.delenv("STAR_ELASTIC_IN_SLURM", raising=False)
    return {"env": env, "out": out, "bin": bin_dir, "tmp": tmp_path}


def _run_script(script: str, sandbox: dict, **env: str) -> subprocess.CompletedProcess:
    path = sandbox["tmp"] / "job.sbatch"
    path.write_text(script)
    return subprocess.run(
        ["bash", str(path)],
        env={**sandbox["env"], **env},
        cwd=sandbox["tmp"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _directives(script: str) -> list[str]:
    """The ``#SBATCH`` lines sbatch reads: those before the first command line."""
    out = []
    for line in script.splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break
        if line.startswith("#SBATCH"):
            out.append(line)
    return out


def test_dry_run_prints_a_four_node_gpu_script(capsys):
    assert cli.main(["train-parent", *PRODUCTION, "cluster.dry_run=true"]) == 0
    script = capsys.readouterr().out
    directives = _directives(script)
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --signal=USR1@120",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
    ):
        assert line in directives
    assert "scontrol show hostnames" in script
    assert f"REQUEUE_EXIT_CODE={REQUEUE_EXIT_CODE}" in script
    command = script[script.index("star-elastic-task") :].split(" &\n")[0]
    args = shlex.split(command.replace("\\\n", " "))  # bash drops backslash-newlines
    assert args[args.index("recipes.cli") + 1 :] == [
        "train-parent",
        "model=nano_v3",
        "parallel.nproc=32",
        "parallel.tp=2",
        "parallel.ep=8",
        "cluster=local",
    ]
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_cpu_tasks_without_gpus_and_configurable_signal_and_requeue(capsys):
    extra = ["cluster.signal_seconds=0", "cluster.requeue=false", "cluster.dry_run=true"]
    assert cli.main(["train-parent", *CPU, *extra, "cluster.extra_sbatch=[--exclusive]"]) == 0
    directives = _directives(capsys.readouterr().out)
    assert "#SBATCH --ntasks-per-node=2" in directives
    assert "#SBATCH --no-requeue" in directives
    assert "#SBATCH --exclusive" in directives
    assert not any("gpus" in d or "--signal" in d for d in directives)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("partition", "debug; touch x"),
        ("partition", "$(touch x)"),
        ("account", "a b"),
        ("account", "`touch x`"),
        ("time", "1:00:00\ntouch x"),
        ("time", "$(date)"),
        ("job_name", "ok\ntouch x"),
        ("extra_sbatch", ["--wrap=$(touch x)"]),
        ("extra_sbatch", ["--comment=a b"]),
        ("env", {"BAD NAME": "x"}),
    ],
)
def test_simple_fields_are_validated_with_the_field_named(field, value):
    with pytest.raises(ConfigError, match=rf"^cluster\.{field}"):
        ClusterConfig(kind="slurm", **{field: value})


def test_cli_rejects_a_hostile_partition_with_exit_code_2(tmp_path, capsys):
    marker = tmp_path / "pwned"
    code = cli.main(["train-parent", *CPU, f"cluster.partition='a; touch {marker}'"])
    assert code == 2
    assert "cluster.partition" in capsys.readouterr().err
    assert not marker.exists()


def test_hostile_values_arrive_verbatim_and_never_execute(sandbox):
    hostile = _hostile()
    workdir = sandbox["tmp"] / f"work $(touch {MARKER}) `touch {MARKER}` 'q'"
    workdir.mkdir()
    cfg = compose_recipe("train_parent", CPU)
    cfg.cluster.job_name = f"job 'q' \"d\" $(touch {MARKER}) `touch {MARKER}`"
    cfg.cluster.env = {"HOSTILE_ENV": hostile[4] + hostile[0]}
    cfg.cluster.python = f"/opt/my python/$(touch {MARKER})/python"
    cfg.cluster.workdir = str(workdir)
    cfg.run.dir = f"runs/'x' $(touch {MARKER})"
    overrides = [*CPU, *hostile]
    script = render("train-parent", overrides, cfg)

    directives = _directives(script)
    assert not any("evil" in d for d in directives)
    name = next(d for d in directives if d.startswith("#SBATCH --job-name="))
    assert shlex.split(name.split("=", 1)[1]) == [cfg.cluster.job_name]
    proc = _run_script(script, sandbox)
    assert proc.returncode == 0, proc.stderr
    assert not list(sandbox["tmp"].rglob(MARKER))
    args = (sandbox["out"] / "srun_args").read_text().split("\0")[:-1]
    task = args[args.index("star-elastic-task") + 1 :]
    assert job_overrides(overrides) == ["parallel=tp2", *hostile, "cluster=local"]
    assert task == [
        cfg.cluster.python,
        "-m",
        "recipes.cli",
        "train-parent",
        *job_overrides(overrides),
    ]
    assert (sandbox["out"] / "env_value").read_text() == hostile[4] + hostile[0]
    assert (sandbox["out"] / "cwd").read_text().strip() == str(workdir)
    assert (sandbox["out"] / "rendezvous").read_text().startswith("node-a:")
    assert not (sandbox["out"] / "scontrol_calls").exists()
    assert not list(sandbox["tmp"].rglob(MARKER)) and not Path(MARKER).exists()


@pytest.mark.parametrize(
    ("srun_rc", "requeue", "script_rc", "calls"),
    [
        (REQUEUE_EXIT_CODE, "true", 0, "requeue 4242\n"),
        (REQUEUE_EXIT_CODE, "false", REQUEUE_EXIT_CODE, None),
        (1, "true", 1, None),
        (0, "true", 0, None),
    ],
)
def test_script_requeues_only_after_a_checkpointed_preemption(
    sandbox, srun_rc, requeue, script_rc, calls
):
    cfg = compose_recipe("train_parent", [*CPU, f"cluster.requeue={requeue}"])
    proc = _run_script(render("train-parent", CPU, cfg), sandbox, FAKE_SRUN_RC=str(srun_rc))
    assert proc.returncode == script_rc, proc.stdout + proc.stderr
    log = sandbox["out"] / "scontrol_calls"
    assert (log.read_text() if log.exists() else None) == calls


def test_usr1_sent_to_the_batch_shell_only_is_forwarded_and_requeues(sandbox):
    """``--signal=B:USR1@...`` / ``scancel -b``: the shell forwards it to the training step."""
    cfg = compose_recipe("train_parent", CPU)
    path = sandbox["tmp"] / "job.sbatch"
    path.write_text(render("train-parent", CPU, cfg))
    env = {**sandbox["env"], "FAKE_SRUN_WAIT": "1"}
    proc = subprocess.Popen(["bash", str(path)], env=env, cwd=sandbox["tmp"], text=True)
    started = sandbox["out"] / "started"
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started.exists()
    os.kill(proc.pid, signal.SIGUSR1)
    assert proc.wait(timeout=30) == 0
    assert (sandbox["out"] / "scontrol_calls").read_text() == "requeue 4242\n"


def test_job_runs_the_same_overrides_with_cluster_local():
    given = ["model=nano_v3", "cluster=slurm", "cluster.nodes=4", "+cluster.env.A=b", "x=1"]
    assert job_overrides(given) == ["model=nano_v3", "x=1", "cluster=local"]


def test_world_size_must_fill_the_gpus(capsys):
    bad = [*PRODUCTION[:-3], "parallel.nproc=16", "parallel.tp=2", "parallel.ep=8"]
    assert cli.main(["train-parent", *bad, "cluster.dry_run=true"]) == 2
    err = capsys.readouterr().err
    assert "parallel.nproc" in err and "parallel.nproc=32" in err


def test_submit_writes_the_script_and_calls_sbatch(sandbox, monkeypatch, capsys):
    monkeypatch.setenv("PATH", sandbox["env"]["PATH"])
    monkeypatch.setenv("FAKE_OUT", sandbox["env"]["FAKE_OUT"])
    run_dir = sandbox["tmp"] / "run"
    assert cli.main(["train-parent", *CPU, f"run.dir={run_dir}", "cluster.wait=true"]) == 0
    script = run_dir / "slurm" / "train-parent.sbatch"
    args = (sandbox["out"] / "sbatch_args").read_text().split()
    assert args == ["--parsable", "--wait", str(script)]
    out = capsys.readouterr().out
    assert "submitted batch job 4242" in out and str(run_dir / "slurm" / "slurm-4242.out") in out


def test_inside_the_job_the_recipe_runs_instead_of_submitting(monkeypatch):
    ran = []
    monkeypatch.setenv("STAR_ELASTIC_IN_SLURM", "1")
    monkeypatch.setattr("launch.slurm.submit", lambda *a: pytest.fail("submitted again"))
    monkeypatch.setattr("recipes.train_parent.run", lambda cfg: ran.append(cfg.cluster.kind))
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under srun: no torchrun either
    assert cli.main(["train-parent", *CPU]) == 0
    assert ran == ["slurm"]


def _sweep_command() -> list[str]:
    script = shutil.which("star-elastic-sweep", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "recipes.sweep"]


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--cfg", "job"], "name: tiny_hybrid"),
        (["model-info", "--cfg", "job", "model=nano_v3"], "name: nano_v3"),
    ],
)
def test_sweep_entry_point_composes_with_hydra_main(tmp_path, args, expect):
    proc = subprocess.run(
        [*_sweep_command(), *args], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expect in proc.stdout
    assert ("train:" in proc.stdout) == (args[0] == "--cfg")


def test_a_split_the_model_cannot_take_fails_before_queueing(capsys):
    # Nemotron Nano v3 has 2 query groups: TP=4 cannot split them.
    bad = [*PRODUCTION[:-2], "parallel.tp=4", "parallel.ep=8", "cluster.dry_run=true"]
    assert cli.main(["train-parent", *bad]) == 2
    assert "model.num_query_groups: 2 is not divisible by the parallel size 4" in (
        capsys.readouterr().err
    )

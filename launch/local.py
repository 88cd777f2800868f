"""The local launcher: run in this process, or start torchrun for ``parallel.nproc > 1``.

The ranks it starts die with it, SIGKILL included: torchrun's agent and each rank ask the
kernel for SIGKILL when their parent dies (``PR_SET_PDEATHSIG``, Linux), and each rank also
watches the launcher's PID, for a parent death the kernel signal cannot see (the launcher
gone before the rank set it up). torchrun starts every rank in its own session, so killing
the launcher's process group alone would not reach them. Ranks started by srun are left to
Slurm: this applies only to ranks whose launcher set :data:`LAUNCHER_PID`. A SIGTERM or
SIGUSR1 to the launcher is passed on, so the ranks checkpoint and exit as on preemption.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

LAUNCHER_PID = "STAR_ELASTIC_LAUNCHER_PID"
"""Environment variable: the PID of the launcher whose death ends this rank."""

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

FORWARDED = (signal.SIGTERM, signal.SIGUSR1)
"""Signals the launcher passes on to torchrun (as SIGTERM) instead of dying of them."""


def under_distributed_launcher() -> bool:
    """Whether this process was started by torchrun/srun (``WORLD_SIZE`` is set)."""
    return "WORLD_SIZE" in os.environ


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def die_with_launcher(interval: float = 0.5) -> None:
    """In a rank started by :func:`launch_torchrun`: end this process when the launcher ends.

    Sets the parent-death signal and starts a daemon thread polling the launcher's PID; does
    nothing when :data:`LAUNCHER_PID` is not set (srun, a user's own torchrun).
    """
    pid = int(os.environ.get(LAUNCHER_PID, "0") or 0)
    if pid <= 0:
        return
    set_parent_death_signal()

    def watch() -> None:
        while _alive(pid):
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="launcher-watchdog", daemon=True).start()


def torchrun_command(nproc: int, recipe: str, overrides: list[str]) -> list[str]:
    """The torchrun command that runs ``recipe`` with ``overrides`` on ``nproc`` local ranks."""
    return [
        sys.executable,
        "-m",
        "launch.agent",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "recipes.cli",
        recipe,
        *overrides,
    ]


def launch_torchrun(
    nproc: int, recipe: str, overrides: list[str], extra_env: dict[str, str] | None = None
) -> int:
    """Start ``nproc`` ranks with torchrun and wait; return its exit code."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env[LAUNCHER_PID] = str(os.getpid())
    env.update(extra_env or {})
    agent = subprocess.Popen(torchrun_command(nproc, recipe, overrides), env=env)

    def forward(signum: int, frame: object) -> None:
        # torchrun passes SIGTERM on to its ranks, whose preemption handler checkpoints;
        # SIGUSR1 it does not handle (it would die and take the ranks with it).
        agent.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        return agent.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

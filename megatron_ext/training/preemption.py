"""Checkpoint-and-exit on preemption: ``SIGTERM`` / ``SIGUSR1`` set a flag the loop polls.

Slurm sends ``SIGUSR1`` ahead of the time limit (``--signal=USR1@120``) and ``SIGTERM`` on
preemption or cancel. The handler only records the signal; the training loop asks
:meth:`PreemptionHandler.requested` after every optimizer step, which all-reduces (MAX) the
signal number so every rank stops after the same step even if only some were signalled. The
loop then saves a checkpoint and raises :class:`Preempted`; the recipe exits with
:data:`REQUEUE_EXIT_CODE`, on which the sbatch script requeues the job, and the next start
resumes from that checkpoint.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

import torch
import torch.distributed as dist

from megatron_ext.compat import collective_device

# EX_TEMPFAIL from sysexits.h ("temporary failure; the user is invited to retry"): the job
# checkpointed and wants to be run again. Distinct from 1 (an error) and 2 (a config error).
REQUEUE_EXIT_CODE = 75

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Training stopped on a preemption signal after ``step`` steps, checkpointed there."""

    def __init__(self, step: int, signum: int = 0) -> None:
        self.step = step
        self.signum = signum
        super().__init__(f"preempted by {signal_name(signum)} after step {step}")


def signal_name(signum: int) -> str:
    """``SIGUSR1`` for 10, etc.; ``a signal`` when unknown or 0."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "a signal"


class PreemptionHandler:
    """Records ``SIGTERM``/``SIGUSR1``; :meth:`requested` agrees on it across ranks.

    Use as a context manager, or :meth:`install` / :meth:`uninstall`. Handlers can only be
    installed from the main thread; elsewhere :meth:`install` leaves them alone, and only
    :meth:`request` (or a signal another rank received) stops the run.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS, group=None):
        self.signals = signals
        self.group = group
        self.signum = 0  # the last signal this process received (0: none)
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def install(self) -> PreemptionHandler:
        """Install the handlers (remembering the previous ones); returns ``self``."""
        if threading.current_thread() is threading.main_thread() and not self._previous:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were there before :meth:`install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def request(self, signum: int = signal.SIGUSR1) -> None:
        """Ask for a stop as if ``signum`` had arrived (for callers other than a signal)."""
        self.signum = int(signum)

    def requested(self) -> bool:
        """Whether any rank got a signal. Collective: every rank must call it at each step.

        The agreed signal number (the largest any rank received) is kept in ``signum``.
        """
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            device = collective_device(self.group)
            flag = torch.tensor([self.signum], dtype=torch.int32, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            self.signum = int(flag.item())
        return self.signum != 0

    @property
    def signal_name(self) -> str:
        """The name of the agreed signal, e.g. ``SIGUSR1``."""
        return signal_name(self.signum)

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uninstall()


def save_or_stop(
    done: int,
    end: int,
    save_interval: int,
    checkpoint: Callable[[int, dict[str, Any]], object] | None,
    state: Callable[[int], dict[str, Any]],
    preemption: PreemptionHandler | None,
    bar: Any,
) -> None:
    """After step ``done`` of ``end``: the checkpoint cadence every training loop shares.

    Saves ``state(done)`` every ``save_interval`` steps and at the end. On a preemption signal
    agreed by every rank before the last step, saves (unless it just did), closes ``bar`` and
    raises :class:`Preempted` with the step reached.
    """
    saved = done % save_interval == 0 or done == end
    if checkpoint is not None and saved:
        checkpoint(done, state(done))
    if preemption is not None and preemption.requested() and done < end:
        if checkpoint is not None and not saved:
            checkpoint(done, state(done))
        bar.close()
        raise Preempted(done, preemption.signum)

"""What a resumed run needs beyond the weights: step, RNG, data position, metrics so far."""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.tensor_parallel import get_cuda_rng_tracker


def capture_rng() -> dict[str, Any]:
    """The CPU generator's state and megatron's tracked model-parallel RNG states."""
    state: dict[str, Any] = {
        "cpu": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["device"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng` captured."""
    torch.set_rng_state(state["cpu"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "device" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["device"])


def loop_state(step: int, batches: Any, history: Any) -> dict[str, Any]:
    """What a bit-identical resume of a training loop needs at ``step``: the step, the RNG,
    the position of ``batches`` (a resumable iterator) and the ``history`` so far."""
    return {"step": step, "rng": capture_rng(), "data": batches.state_dict(), "history": history}


def restore_loop_state(state: dict[str, Any] | None, batches: Any, history: Any) -> tuple[int, Any]:
    """Undo :func:`loop_state`: RNG and data position restored; returns (step, history).

    With no ``state`` (a fresh run): ``(0, history)``, nothing touched.
    """
    if not state:
        return 0, history
    restore_rng(state["rng"])
    batches.load_state_dict(state["data"])
    return int(state["step"]), state["history"]

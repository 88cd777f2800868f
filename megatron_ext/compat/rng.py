"""A CPU implementation of megatron-core's model-parallel RNG tracker.

Upstream site: ``megatron/core/tensor_parallel/random.py`` — ``CudaRNGStatesTracker.add`` and
``.fork`` read and write ``torch.cuda`` generator states, which do not exist without CUDA.
This tracker keeps the same named states (data-parallel, model-parallel, expert-parallel,
seeded by ``model_parallel_cuda_manual_seed`` exactly as upstream) on the CPU generator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from megatron.core.tensor_parallel import random as mcore_random


class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """``CudaRNGStatesTracker`` whose named states live on the CPU default generator."""

    def add(self, name: str, seed: int) -> None:
        """Register a named RNG state seeded with ``seed`` without disturbing the current one."""
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} is already tracked")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} is already tracked")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        """Run the body under the named state, then restore the CPU generator's state."""
        if name not in self.states_:
            raise KeyError(f"RNG state {name!r} was never added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)

"""Measured memory on any device: live tensor bytes, tracked tensor by tensor.

:class:`LiveTensorMeter` is a ``TorchDispatchMode``: every tensor an operator returns while it
is active is recorded by its storage (views share it) with the storage's size, and dropped
when the storage is freed (a weak reference's callback). ``peak`` is the largest sum of live
storages seen, ``current`` the sum now. Tensors that existed before the meter (parameters, a
frozen teacher) are added with :meth:`LiveTensorMeter.add_existing`. Unlike the process's
resident set size, this counts exactly what torch's tensors hold, not the C allocator's
freed-but-kept heap; unlike ``torch.cuda.max_memory_allocated`` it does not round every block
up to the caching allocator's 512-byte granularity, so on a GPU the two differ by well under a
percent for the tensor sizes that matter.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorMeter(TorchDispatchMode):
    """Peak and current bytes of live tensor storages (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}

    def _record(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = storage.data_ptr()
        size = storage.nbytes()
        if key == 0 or size == 0:
            return
        if key in self._live:
            if self._live[key] >= size:
                return
            self.current -= self._live[key]  # a storage that grew in place (resize_)
        self._live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        self._refs[key] = weakref.ref(storage, functools.partial(self._on_free, key))

    def _on_free(self, key: int, _ref: object) -> None:
        size = self._live.pop(key, 0)
        self._refs.pop(key, None)
        self.current -= size

    def add_existing(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors allocated before the meter started (parameters, buffers)."""
        for t in tensors:
            self._record(t.detach())

    def reset_peak(self) -> None:
        """Start a new peak window at the bytes live now."""
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        """Run the operator and record the storages of the tensors it returns."""
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._record(t)
        return out

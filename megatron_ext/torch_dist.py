"""megatron-core's ``torch_dist`` save, synchronous and in this process.

:func:`save_sharded` writes a sharded state dict with upstream's planning, file format and
finalisation; only the per-bucket writer runs inline instead of in forked writer processes.
"""

from __future__ import annotations

import queue
from pathlib import Path


def _inline_save_strategy():
    """megatron-core's ``torch_dist`` save strategy with every file written by this process.

    Upstream's ``FileSystemWriterAsync`` forks one writer process per bucket even for a
    synchronous save. This keeps upstream's planning, file format and finalisation and runs
    its per-bucket writer function inline (one bucket, so one file per rank).
    """
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    class InlineTorchDistSave(TorchDistSaveShardedStrategy):
        def _get_save_and_finalize_callbacks(self, writer, save_state_dict_ret) -> AsyncRequest:
            request = super()._get_save_and_finalize_callbacks(writer, save_state_dict_ret)
            if request.async_fn is None:  # nothing to write on this rank
                return request
            transforms = [writer.transforms] if hasattr(writer, "transforms") else []

            def write_inline() -> None:
                buckets = request.preload_fn() if request.preload_fn else writer.write_buckets
                done: queue.Queue = queue.Queue()
                count: queue.Queue = queue.Queue()
                for idx, bucket in enumerate(buckets):
                    count.put(idx)
                    FileSystemWriterAsync.write_preloaded_data(
                        transforms, idx, bucket, done, count, True
                    )
                outs = dict(done.get_nowait() for _ in buckets)
                errors = [out for out in outs.values() if isinstance(out, Exception)]
                writer.results_queue.put(errors[0] if errors else outs)

            return AsyncRequest(write_inline, (), request.finalize_fns)

    return InlineTorchDistSave("torch_dist", 1, thread_count=1)


def save_sharded(sharded_state_dict: dict, directory: str | Path) -> None:
    """Save a megatron-core sharded state dict to ``directory`` (torch_dist), synchronously.

    Collective over all ranks; ``directory`` must exist. No worker processes are started.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    # Upstream's ``_get_write_results_queue`` would start a spawn-context multiprocessing
    # Manager (~3 s; its child re-imports ``__main__``): the inline writer needs a thread queue.
    seeded = filesystem_async._results_queue is None
    if seeded:
        filesystem_async._results_queue = queue.Queue()
    try:
        strategy = _inline_save_strategy()
        dist_checkpointing.save(sharded_state_dict, str(directory), sharded_strategy=strategy)
    finally:
        if seeded:
            filesystem_async._results_queue = None

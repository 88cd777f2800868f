"""Where the time goes: forward seconds per layer kind (M, *, -, E), by module hooks.

A breakdown by layer kind says which part of the model a ratio's two sides differ in, e.g.
which layers a small budget does not make cheaper. Hooks time each layer's mixer
(``mixer``, ``self_attention``, ``mlp``) forward call; norms, residual adds, embedding and
output layer are the rest of the model's forward.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

MIXERS = ("mixer", "self_attention", "mlp")
KINDS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}


@contextmanager
def layer_kind_timer(model: nn.Module, pattern: str) -> Iterator[dict[str, float]]:
    """Yield a dict that accumulates forward seconds per layer kind while the block runs."""
    seconds: dict[str, float] = defaultdict(float)
    handles = []
    for layer, symbol in zip(model.decoder.layers, pattern):  # type: ignore[union-attr,arg-type]
        for name, child in layer.named_children():
            if name not in MIXERS:
                continue
            kind = KINDS[symbol]

            def pre(module, args, kind=kind):
                module.__dict__["_bench_t0"] = time.perf_counter()

            def post(module, args, output, kind=kind):
                seconds[kind] += time.perf_counter() - module.__dict__.pop("_bench_t0")

            handles += [child.register_forward_pre_hook(pre), child.register_forward_hook(post)]
    try:
        yield seconds
    finally:
        for handle in handles:
            handle.remove()

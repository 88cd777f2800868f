"""Next-token choice: greedy, or temperature / top-k sampling from a seeded generator."""

from __future__ import annotations

import torch
from torch import Tensor


class Sampler:
    """Pick one token per row of ``[b, vocab]`` logits.

    ``temperature == 0`` is greedy (``argmax``, the lowest id on ties). Otherwise the logits
    are divided by ``temperature``, restricted to the ``top_k`` largest (0: all) and sampled
    with a ``torch.Generator`` seeded with ``seed`` on the logits' device, so two samplers
    with the same settings fed the same logits draw the same tokens.
    """

    def __init__(self, temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> None:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed
        self._generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        """Whether this sampler always takes the most likely token."""
        return self.temperature == 0.0

    def _rng(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def __call__(self, logits: Tensor) -> Tensor:
        """The chosen ids, ``[b]`` int64, for ``logits`` of shape ``[b, vocab]``."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
        if self.greedy:
            return logits.argmax(dim=-1)
        scores = logits.float() / self.temperature
        ids = None
        if 0 < self.top_k < scores.shape[-1]:
            scores, ids = scores.topk(self.top_k, dim=-1)
        probs = torch.softmax(scores, dim=-1)
        pick = torch.multinomial(probs, 1, generator=self._rng(probs.device))
        if ids is not None:
            pick = ids.gather(-1, pick)
        return pick.squeeze(-1)

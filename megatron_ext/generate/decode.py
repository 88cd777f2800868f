"""Autoregressive decoding on megatron-core's own inference path, and its uncached oracle.

:class:`CachedDecoder` passes a ``StaticInferenceContext`` as ``inference_context`` to the
``MambaModel`` forward: the prefill runs the prompt once and fills the caches, then every
step runs one token.

* attention layers append that token's key and value to the context's KV buffers and attend
  over them (``Attention._adjust_key_value_for_inference``);
* Mamba layers keep a conv state (the last ``d_conv`` inputs of the short convolution) and
  an SSM state per head in the context, and ``MambaMixer._decode`` advances both by one step
  (on machines without mamba-ssm the SSM step is the pure-torch ``selective_state_update`` of
  :mod:`megatron_ext.compat.mamba_kernels`, the conv step upstream's own torch fallback);
* MLP and MoE layers are per token and need no cache.

:class:`RecomputeDecoder` runs the whole sequence again at every step (no cache): the
reference the cached path is tested against. :func:`generate` drives either one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from torch import Tensor, nn

from megatron_ext.generate.sampling import Sampler
from megatron_ext.models.builder import causal_mask

StopFn = Callable[[Sequence[int]], str | None]
"""Given the tokens a row generated so far: why it stops now (a short reason), or ``None``."""


class Decoder(Protocol):
    """Prefill a prompt, then extend it one token at a time; both return next-token logits."""

    def prefill(self, ids: Tensor, max_new_tokens: int) -> Tensor:
        """Logits ``[b, vocab]`` after the prompt ``ids [b, s]``; room for ``max_new_tokens``."""
        ...

    def step(self, tokens: Tensor) -> Tensor:
        """Logits ``[b, vocab]`` after appending ``tokens [b]``."""
        ...


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_eval(model: nn.Module) -> None:
    if model.training:
        raise ValueError("decoding needs the model in eval mode (call model.eval())")


def _positions(start: int, length: int, batch: int, device: torch.device) -> Tensor:
    return torch.arange(start, start + length, device=device)[None].expand(batch, -1)


class CachedDecoder:
    """Decode ``model`` (a megatron-core ``MambaModel``, eval mode) with KV and SSM caches."""

    def __init__(self, model: nn.Module) -> None:
        _check_eval(model)
        self.model = model
        self.context: StaticInferenceContext | None = None

    @torch.no_grad()
    def prefill(self, ids: Tensor, max_new_tokens: int) -> Tensor:
        """Run the prompt once into a fresh context sized for ``max_new_tokens`` more tokens."""
        batch, length = ids.shape
        ctx = StaticInferenceContext(batch, length + max_new_tokens)
        device = _device(self.model)
        ids = ids.to(device)
        logits = self.model(
            ids,
            _positions(0, length, batch, device),
            causal_mask(length, device),
            inference_context=ctx,
            runtime_gather_output=True,
        )
        ctx.increment_sequence_len_offset(length)
        ctx.enable_decode_mode()
        self.context = ctx
        return logits[:, -1]

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        """One token per row through every layer, reading and extending the caches."""
        ctx = self.context
        if ctx is None:
            raise RuntimeError("call prefill() before step()")
        if ctx.sequence_len_offset >= ctx.max_sequence_length:
            raise ValueError(
                f"the cache holds {ctx.max_sequence_length} tokens; prefill with a larger "
                "max_new_tokens"
            )
        device = _device(self.model)
        batch = tokens.shape[0]
        logits = self.model(
            tokens.to(device)[:, None],
            _positions(ctx.sequence_len_offset, 1, batch, device),
            None,  # one query over the cached keys: nothing to mask
            inference_context=ctx,
            runtime_gather_output=True,
        )
        ctx.increment_sequence_len_offset(1)
        return logits[:, -1]


class RecomputeDecoder:
    """The uncached oracle: each call runs ``model`` on the whole sequence so far."""

    def __init__(self, model: nn.Module) -> None:
        _check_eval(model)
        self.model = model
        self.ids: Tensor | None = None

    @torch.no_grad()
    def _last_logits(self) -> Tensor:
        assert self.ids is not None
        batch, length = self.ids.shape
        device = self.ids.device
        logits = self.model(
            self.ids, _positions(0, length, batch, device), causal_mask(length, device)
        )
        return logits[:, -1]

    def prefill(self, ids: Tensor, max_new_tokens: int) -> Tensor:
        """Logits after ``ids`` (``max_new_tokens`` is unused: nothing is cached)."""
        self.ids = ids.to(_device(self.model))
        return self._last_logits()

    def step(self, tokens: Tensor) -> Tensor:
        """Logits after ``tokens`` are appended, from a full forward pass."""
        if self.ids is None:
            raise RuntimeError("call prefill() before step()")
        self.ids = torch.cat([self.ids, tokens.to(self.ids.device)[:, None]], dim=1)
        return self._last_logits()


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` so wall-clock timings are complete."""
    if device.type != "cpu" and torch.accelerator.is_available():
        torch.accelerator.synchronize(device)


@dataclass
class PhaseTiming:
    """Tokens and seconds of a generation's two halves, summed over generations.

    The prefill runs the prompt and yields the first new token (time to first token); the
    decode yields every later token, one forward pass each.
    """

    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    new_tokens: int = 0  # every generated token: the prefill's first ones and the decoded
    count: int = 0  # generations summed here

    def add(self, other: PhaseTiming) -> None:
        """Accumulate ``other`` into this one."""
        self.prefill_tokens += other.prefill_tokens
        self.prefill_s += other.prefill_s
        self.decode_tokens += other.decode_tokens
        self.decode_s += other.decode_s
        self.new_tokens += other.new_tokens
        self.count += other.count

    def figures(self) -> dict[str, float | int]:
        """Throughput and latency, under the names ``summary.json`` uses."""
        n = max(self.count, 1)
        return {
            "generations": self.count,
            "new_tokens": self.new_tokens,
            "prefill_tokens": self.prefill_tokens,
            "prefill_s": self.prefill_s,
            "prefill_tokens_per_s": _rate(self.prefill_tokens, self.prefill_s),
            "time_to_first_token_ms": 1e3 * self.prefill_s / n,
            "decode_tokens": self.decode_tokens,
            "decode_s": self.decode_s,
            "decode_tokens_per_s": _rate(self.decode_tokens, self.decode_s),
            "decode_ms_per_token": 1e3 * self.decode_s / self.decode_tokens
            if self.decode_tokens
            else 0.0,
            "latency_s": (self.prefill_s + self.decode_s) / n,
        }


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


@dataclass
class Generation:
    """What :func:`generate` produced: new tokens and stop reason per row, timing, logits."""

    tokens: list[list[int]]
    stopped: list[str]
    timing: PhaseTiming
    logits: list[Tensor] = field(default_factory=list)  # per position, [b, vocab]


def generate(
    decoder: Decoder,
    prompt: Tensor,
    max_new_tokens: int,
    sampler: Sampler,
    stop: StopFn | None = None,
    *,
    vocab_size: int | None = None,
    record_logits: bool = False,
) -> Generation:
    """Extend every row of ``prompt [b, s]`` by up to ``max_new_tokens`` tokens.

    A row ends when ``stop`` returns a reason for its tokens so far (the token that made it
    stop is kept) or at ``max_new_tokens`` (reason ``"length"``); decoding ends when every
    row has. Rows that ended keep being fed their samples, which are discarded. Only the
    first ``vocab_size`` logits are candidates (the tokenizer's ids; the model's vocabulary
    is padded). ``record_logits`` keeps the candidate logits of every position, for tests.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    batch = prompt.shape[0]
    out: list[list[int]] = [[] for _ in range(batch)]
    stopped: list[str | None] = [None] * batch
    recorded: list[Tensor] = []
    timing = PhaseTiming(prefill_tokens=prompt.numel(), count=1)

    def choose(logits: Tensor) -> Tensor:
        logits = logits[:, :vocab_size] if vocab_size else logits
        if record_logits:
            recorded.append(logits.detach().float().cpu())
        tokens = sampler(logits)
        for row, token in enumerate(tokens.tolist()):
            if stopped[row] is None:
                out[row].append(int(token))
                stopped[row] = stop(out[row]) if stop else None
                if stopped[row] is None and len(out[row]) >= max_new_tokens:
                    stopped[row] = "length"
        return tokens

    start = time.perf_counter()
    tokens = choose(decoder.prefill(prompt, max_new_tokens))
    synchronize(tokens.device)
    timing.prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    while any(reason is None for reason in stopped):
        tokens = choose(decoder.step(tokens))
    synchronize(tokens.device)
    timing.decode_s = time.perf_counter() - start
    timing.new_tokens = sum(len(row) for row in out)
    timing.decode_tokens = timing.new_tokens - batch
    return Generation(out, [str(r) for r in stopped], timing, recorded)

"""Budget control at inference: think at one budget, answer at another.

The think budget generates after the prompt until the closing marker (``</think>``) appears
in the generated text or K tokens are reached; at K the marker is appended to the trace.
The answer budget then prefills ``prompt + trace`` into fresh caches (the think budget's
caches hold another model's states) and decodes until end-of-document, a newline or its
own token limit.

The marker is detected on the decoded text, not on a token id, so it is found whether the
model emits the tokenizer's special ``</think>`` id or the eight bytes ``</think>``.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from megatron_ext.generate.config import GenerateConfig
from megatron_ext.generate.decode import Decoder, PhaseTiming, generate
from megatron_ext.generate.sampling import Sampler

THINK_CLOSED = "think_close"
LENGTH = "length"


class TextCodec(Protocol):
    """What budget control needs of a tokenizer (both of :mod:`megatron_ext.data.tokenizer`)."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        ...

    def decode(self, ids: Any) -> str:
        """Text of ``ids``."""
        ...

    @property
    def eod(self) -> int:
        """End-of-document id."""
        ...

    @property
    def vocab_size(self) -> int:
        """Number of valid ids."""
        ...


class BudgetModels(Protocol):
    """Hands out a decoder running the model at a named budget, for the ``with`` block."""

    def decoder(self, budget: str) -> AbstractContextManager[Decoder]:
        """A fresh decoder at ``budget``, valid inside the ``with`` block."""
        ...


class StopOn:
    """A stop rule: the last token is one of ``token_ids``, or the text now holds one of ``texts``.

    ``texts`` and ``token_ids`` map what to look for to the reason reported. A text is searched
    in the decoded last ``len(text)`` tokens: every token decodes to at least one character, so
    a text that the newest token completes lies in that window, and each check costs the same
    however long the generation is.
    """

    def __init__(
        self,
        codec: TextCodec,
        texts: Mapping[str, str] | None = None,
        token_ids: Mapping[int, str] | None = None,
    ) -> None:
        self.codec = codec
        self.texts = {text: reason for text, reason in (texts or {}).items() if text}
        self.token_ids = dict(token_ids or {})

    def __call__(self, tokens: Sequence[int]) -> str | None:
        """Why ``tokens`` (the generation so far) stop now, or ``None``."""
        if not tokens:
            return None
        if tokens[-1] in self.token_ids:
            return self.token_ids[tokens[-1]]
        for text, reason in self.texts.items():
            if text in self.codec.decode(tokens[-len(text) :]):
                return reason
        return None


@dataclass
class BudgetAnswer:
    """One prompt answered under budget control: both phases' tokens, texts, stops, timings."""

    think_budget: str
    answer_budget: str
    prompt: str
    think_tokens: list[int]  # what the think budget generated
    answer_tokens: list[int]  # what the answer budget generated, its stop token included
    think_text: str  # the trace the answer budget read (the closing marker appended at K)
    answer_text: str  # the answer, without a final end-of-document token
    think_stop: str  # THINK_CLOSED or LENGTH
    answer_stop: str  # "eod", "newline" or LENGTH
    think: PhaseTiming
    answer: PhaseTiming

    def as_dict(self) -> dict[str, Any]:
        """The texts, token ids and stops (timings are aggregated elsewhere)."""
        return {
            "prompt": self.prompt,
            "think": self.think_text,
            "answer": self.answer_text,
            "think_stop": self.think_stop,
            "answer_stop": self.answer_stop,
            "think_tokens": len(self.think_tokens),
            "answer_tokens": len(self.answer_tokens),
            "think_ids": list(self.think_tokens),
            "answer_ids": list(self.answer_tokens),
        }


def _row(ids: list[int]) -> torch.Tensor:
    return torch.tensor([ids], dtype=torch.long)


def think_then_answer(
    models: BudgetModels,
    think_budget: str,
    answer_budget: str,
    codec: TextCodec,
    prompt: str,
    cfg: GenerateConfig,
    sampler: Sampler,
) -> BudgetAnswer:
    """Think at ``think_budget``, then answer at ``answer_budget`` (see the module docstring)."""
    head = codec.encode(prompt + cfg.think_open)
    think_stop = StopOn(codec, texts={cfg.think_close: THINK_CLOSED})
    with models.decoder(think_budget) as decoder:
        think = generate(
            decoder,
            _row(head),
            cfg.max_think_tokens,
            sampler,
            think_stop,
            vocab_size=codec.vocab_size,
        )
    trace = think.tokens[0]
    closed = trace if think.stopped[0] == THINK_CLOSED else trace + codec.encode(cfg.think_close)
    answer_stop = StopOn(
        codec,
        texts={"\n": "newline"} if cfg.stop_at_newline else None,
        token_ids={codec.eod: "eod"},
    )
    with models.decoder(answer_budget) as decoder:
        answer = generate(
            decoder,
            _row(head + closed),
            cfg.max_answer_tokens,
            sampler,
            answer_stop,
            vocab_size=codec.vocab_size,
        )
    answer_tokens = answer.tokens[0]
    shown = answer_tokens[:-1] if answer.stopped[0] == "eod" else answer_tokens
    return BudgetAnswer(
        think_budget,
        answer_budget,
        prompt,
        trace,
        answer_tokens,
        codec.decode(closed),
        codec.decode(shown),
        think.stopped[0],
        answer.stopped[0],
        think.timing,
        answer.timing,
    )


def pair_name(think_budget: str, answer_budget: str) -> str:
    """``S->L`` for thinking at S and answering at L."""
    return f"{think_budget}->{answer_budget}"


@dataclass
class PairReport:
    """Every prompt of one (think, answer) pair, with the phases' timings summed."""

    think_budget: str
    answer_budget: str
    answers: list[BudgetAnswer]

    def phase(self, name: str) -> PhaseTiming:
        """The summed timing of phase ``"think"`` or ``"answer"`` over the prompts."""
        total = PhaseTiming()
        for answer in self.answers:
            total.add(getattr(answer, name))
        return total

    def as_dict(self) -> dict[str, Any]:
        """Per-phase throughput and latency, stop counts and the texts, for ``summary.json``."""
        think, answer = self.phase("think"), self.phase("answer")
        latency = [
            a.think.prefill_s + a.think.decode_s + a.answer.prefill_s + a.answer.decode_s
            for a in self.answers
        ]
        return {
            "think_budget": self.think_budget,
            "answer_budget": self.answer_budget,
            "think": think.figures(),
            "answer": answer.figures(),
            "latency_s": sum(latency) / max(len(latency), 1),
            "think_closed": sum(a.think_stop == THINK_CLOSED for a in self.answers),
            "think_at_limit": sum(a.think_stop == LENGTH for a in self.answers),
            "generations": [a.as_dict() for a in self.answers],
        }


def run_pairs(
    models: BudgetModels,
    codec: TextCodec,
    cfg: GenerateConfig,
    prompts: Sequence[str],
    progress: bool = True,
) -> Iterator[PairReport]:
    """Answer every prompt under every pair of ``cfg.pairs()``, one pair at a time.

    The sampler is re-seeded per pair, so each pair's draws do not depend on the pairs run
    before it. With ``cfg.warmup`` the first prompt is answered once, untimed, before each
    pair's measured pass (the first calls allocate caches and warm kernels up).
    """
    from tqdm import tqdm

    for think_budget, answer_budget in cfg.pairs():
        name = pair_name(think_budget, answer_budget)
        if cfg.warmup:
            warm = Sampler(cfg.temperature, cfg.top_k, cfg.seed)
            think_then_answer(models, think_budget, answer_budget, codec, prompts[0], cfg, warm)
        sampler = Sampler(cfg.temperature, cfg.top_k, cfg.seed)
        answers = [
            think_then_answer(models, think_budget, answer_budget, codec, prompt, cfg, sampler)
            for prompt in tqdm(prompts, desc=f"generate {name}", disable=not progress)
        ]
        yield PairReport(think_budget, answer_budget, answers)


def time_pairs_interleaved(
    models: BudgetModels,
    codec: TextCodec,
    cfg: GenerateConfig,
    prompts: Sequence[str],
    progress: bool = True,
) -> dict[str, list[dict[str, float]]]:
    """Time every pair ``cfg.timing_rounds`` more times on the first ``cfg.timing_prompts``
    prompts, interleaved: round ``r`` runs each pair once, in ``cfg.pairs()`` order rotated
    by ``r``. Per pair, one entry per round: the mean latency per prompt and both phases'
    decode tokens/s."""
    from tqdm import tqdm

    pairs = cfg.pairs()
    chosen = list(prompts[: cfg.timing_prompts])
    rounds: dict[str, list[dict[str, float]]] = {pair_name(t, a): [] for t, a in pairs}
    for r in tqdm(range(cfg.timing_rounds), desc="timing rounds", disable=not progress):
        shift = r % len(pairs)
        for think_budget, answer_budget in pairs[shift:] + pairs[:shift]:
            sampler = Sampler(cfg.temperature, cfg.top_k, cfg.seed)
            answers = [
                think_then_answer(models, think_budget, answer_budget, codec, p, cfg, sampler)
                for p in chosen
            ]
            figures = PairReport(think_budget, answer_budget, answers).as_dict()
            rounds[pair_name(think_budget, answer_budget)].append(
                {
                    "latency_s": figures["latency_s"],
                    "think_tokens_per_s": figures["think"]["decode_tokens_per_s"],
                    "answer_tokens_per_s": figures["answer"]["decode_tokens_per_s"],
                }
            )
    return rounds


def timing_summary(rounds: Sequence[dict[str, float]]) -> dict[str, Any]:
    """Median, min and max latency over ``rounds`` and the relative spread (max - min) /
    median; the median of both phases' tokens/s; the rounds themselves."""
    latencies = sorted(r["latency_s"] for r in rounds)
    if not latencies:
        return {"rounds": []}
    median = statistics.median(latencies)
    return {
        "rounds": list(rounds),
        "latency_median_s": median,
        "latency_min_s": latencies[0],
        "latency_max_s": latencies[-1],
        "latency_spread": (latencies[-1] - latencies[0]) / median if median else 0.0,
        "think_tokens_per_s": statistics.median(r["think_tokens_per_s"] for r in rounds),
        "answer_tokens_per_s": statistics.median(r["answer_tokens_per_s"] for r in rounds),
    }

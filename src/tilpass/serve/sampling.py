"""Choosing each row's next token, and turning a sequence's tokens into text with stop strings.

Greedy rows (temperature 0) take the arg-max; sampled rows scale by their temperature, keep
the smallest set of tokens whose probability reaches `top_p`, and draw with their own
generator, so a request with a `seed` gets the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings (OpenAI's names)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # vLLM's extension: always generate max_tokens (benchmarks)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self) -> torch.Generator | None:
        """The request's own random generator (seeded when `seed` is given)."""
        if self.greedy:
            return None
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


def next_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """Each row's next token from last-position logits (B, V)."""
    logits = logits.float()
    chosen = logits.argmax(-1).tolist()  # greedy for every row, replaced where sampled
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            chosen[row] = sample(logits[row], p, generator)
    return chosen


def sample(logits: torch.Tensor, params: SamplingParams, generator: Any) -> int:
    """One token drawn from logits (V,) by temperature and nucleus (top-p) sampling."""
    probs = torch.softmax(logits / params.temperature, dim=-1)  # (V,)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above
        sorted_probs = torch.where(before < params.top_p, sorted_probs, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class TextTracker:
    """A sequence's text so far: what may be sent, and whether a stop string appeared.

    Text is decoded from all tokens each time (a token may complete a multi-byte character);
    the tail that could still become a stop string, or an incomplete character, is held back.
    """

    tokenizer: Any
    stop: tuple[str, ...]
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters already handed out
    text: str = ""
    stopped: bool = False

    def add(self, token: int, special: bool) -> str:
        """Add a token (`special`: an end-of-sequence token, not part of the text); return
        the new text that may be sent now."""
        self.tokens.append(token)
        if special:
            return ""
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.stop:
            start = max(0, self.sent - max(len(s) for s in self.stop))
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[: min(hits)], True
                return self.flush()
        hold = max((len(s) - 1 for s in self.stop), default=0)
        safe = len(self.text) - hold
        while safe > self.sent and self.text[safe - 1] == "\ufffd":
            safe -= 1  # an incomplete character: wait for its other bytes
        return self.take(safe)

    def flush(self) -> str:
        """Everything not sent yet (at the end of the sequence)."""
        return self.take(len(self.text))

    def take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : upto], upto
        return out

"""Choosing the next token: greedy or temperature + nucleus sampling with a per-request generator, and
the log-probabilities the API reports (of the model's own distribution, before temperature, as vLLM does)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the serve stage's import must not load it
    import torch


@dataclass
class Sampling:
    """One request's decoding settings."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    top_logprobs: int | None = None
    """None: no logprobs; k >= 0: the chosen token's logprob and the k most likely alternatives."""
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        import torch

        self.generator = torch.Generator()
        if self.seed is not None:
            self.generator.manual_seed(self.seed)
        else:
            self.generator.seed()


@dataclass
class Choice:
    """A sampled token with its logprob and the top alternatives (empty unless asked)."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero out the tail beyond cumulative probability `top_p` (the most likely token always stays)."""
    import torch

    sorted_p, order = probs.sort(descending=True)
    drop = sorted_p.cumsum(0) - sorted_p > top_p
    sorted_p[drop] = 0.0
    return torch.zeros_like(probs).scatter(0, order, sorted_p)


def sample_row(logits: torch.Tensor, s: Sampling) -> Choice:
    """Pick the next token from one row's logits `(vocab,)`."""
    import torch

    if s.temperature <= 0:
        token = int(logits.argmax())
    else:
        probs = torch.softmax(logits / s.temperature, dim=-1)
        if s.top_p < 1.0:
            probs = _nucleus(probs, s.top_p)
        token = int(torch.multinomial(probs, 1, generator=s.generator))
    if s.top_logprobs is None:
        return Choice(token)
    logp = torch.log_softmax(logits, dim=-1)
    return Choice(token, float(logp[token]), top_k(logp, s.top_logprobs))


def top_k(logp: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The k most likely tokens with their logprobs."""
    if k <= 0:
        return []
    values, ids = logp.topk(min(k, logp.shape[-1]))
    return [(int(i), float(v)) for i, v in zip(ids, values, strict=True)]


def sample(logits: torch.Tensor, settings: list[Sampling]) -> list[Choice]:
    """Next tokens for a batch `(rows, vocab)`; one argmax for the whole batch when every row is greedy."""
    if all(s.temperature <= 0 and s.top_logprobs is None for s in settings):
        return [Choice(int(t)) for t in logits.argmax(-1)]
    return [sample_row(row, s) for row, s in zip(logits, settings, strict=True)]


def prompt_logprobs(logits: torch.Tensor, prompt: list[int], k: int) -> list[Choice]:
    """Logprob of each prompt token after the first given the ones before (for `echo` + `logprobs`).

    Args:
        logits: the prefill logits of this row's real positions `(len(prompt), vocab)`.
        prompt: the prompt's token ids.
        k: alternatives per position.
    """
    import torch

    if len(prompt) < 2:
        return []
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    target = torch.tensor(prompt[1:], dtype=torch.long)
    chosen = logp.gather(1, target[:, None])[:, 0]
    return [Choice(t, float(lp), top_k(row, k)) for t, lp, row in zip(prompt[1:], chosen, logp, strict=True)]

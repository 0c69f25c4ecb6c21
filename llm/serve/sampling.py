"""Choosing the next token: greedy, or sampled through `transformers`' logits processors (repetition
penalty, temperature, top-k, top-p, min-p) with a per-request generator on the logits' device; OpenAI's
presence/frequency penalties and `logit_bias`, which `transformers` does not have, are added here. Reported
logprobs are of the model's own distribution, before any processing, as vLLM reports them.

A row's failure (say a `logit_bias` that leaves no token possible) is that row's alone: `sample` returns
the exception in its place and the other rows of the batch carry on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: the serve stage's import must not load it
    import torch

SAMPLING_EPS = 1e-5
"""Temperatures below this decode greedily (vLLM's floor): dividing by 1e-40 would make the logits inf."""


@dataclass
class Sampling:
    """One request's decoding settings."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 or -1: off."""
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    top_logprobs: int | None = None
    """None: no logprobs; k >= 0: the chosen token's logprob and the k most likely alternatives."""
    track_logprob: bool = False
    """Compute the chosen token's logprob even when none is reported (`best_of` ranks by it)."""
    _generator: Any = field(default=None, init=False, repr=False)
    _warpers: Any = field(default=None, init=False, repr=False)

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def needs_history(self) -> bool:
        """Whether the tokens so far change the next token's distribution (penalties)."""
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty or self.frequency_penalty)

    @cached_property
    def plain(self) -> bool:
        """Greedy with nothing to adjust: the batch's one argmax serves it (read every decode step for every
        row, so computed once: a request's settings do not change while it runs)."""
        return (self.greedy and not self.needs_history and not self.logit_bias and self.top_logprobs is None
                and not self.track_logprob)

    @cached_property
    def simple(self) -> bool:
        """Sampled at a temperature with nothing else to adjust and no seed: drawn with the batch's other
        such rows in one softmax and one multinomial (`sample`). Computed once, as `plain`."""
        return (not self.greedy and self.top_k <= 0 and self.top_p >= 1.0 and self.min_p <= 0.0
                and not self.needs_history and not self.logit_bias and self.top_logprobs is None
                and not self.track_logprob and self.seed is None)

    def generator(self, device: torch.device) -> torch.Generator:
        """This request's generator, made on the logits' device at first use (CUDA sampling needs it there)."""
        import torch

        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            if self.seed is not None:
                self._generator.manual_seed(self.seed)
            else:
                self._generator.seed()
        return self._generator

    def warpers(self) -> Any:
        """`transformers` warpers for temperature, top-k, top-p and min-p (built once per request)."""
        if self._warpers is None:
            from transformers import (
                LogitsProcessorList,
                MinPLogitsWarper,
                TemperatureLogitsWarper,
                TopKLogitsWarper,
                TopPLogitsWarper,
            )

            warpers = LogitsProcessorList([TemperatureLogitsWarper(self.temperature)])
            if self.top_k > 0:
                warpers.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                warpers.append(TopPLogitsWarper(self.top_p))
            if self.min_p > 0.0:
                warpers.append(MinPLogitsWarper(self.min_p))
            self._warpers = warpers
        return self._warpers


@dataclass
class Choice:
    """A sampled token with its logprob and the top alternatives (empty unless asked)."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Row:
    """What choosing one row's next token needs besides its logits."""

    sampling: Sampling
    prompt: list[int]
    generated: list[int]
    banned: list[int] = field(default_factory=list)
    """Tokens that may not come yet (stop tokens before `min_tokens`)."""


def adjust(logits: torch.Tensor, row: Row) -> torch.Tensor:
    """Logits `(vocab,)` after bans, `logit_bias` and penalties: what temperature and the filters then see."""
    import torch

    s = row.sampling
    out = logits.float().clone()
    if row.banned:
        out[torch.tensor(row.banned, device=out.device)] = float("-inf")
    for token, bias in s.logit_bias.items():
        if token < out.shape[-1]:
            out[token] += bias
    if s.repetition_penalty != 1.0:
        from transformers import RepetitionPenaltyLogitsProcessor

        history = torch.tensor([row.prompt + row.generated], dtype=torch.long, device=out.device)
        out = RepetitionPenaltyLogitsProcessor(s.repetition_penalty)(history, out[None])[0]
    if (s.presence_penalty or s.frequency_penalty) and row.generated:
        # OpenAI's formula, on the generated tokens only: logit -= count * frequency + (count > 0) * presence
        counts = torch.bincount(torch.tensor(row.generated, device=out.device), minlength=out.shape[-1])
        counts = counts[: out.shape[-1]].to(out.dtype)
        out -= counts * s.frequency_penalty + (counts > 0).to(out.dtype) * s.presence_penalty
    return out


def sample_row(logits: torch.Tensor, row: Row) -> Choice:
    """Pick the next token from one row's logits `(vocab,)`."""
    import torch

    s = row.sampling
    scores = adjust(logits, row)
    if s.greedy:
        token = int(scores.argmax())
    else:
        scores = s.warpers()(None, scores[None])[0]
        probs = torch.softmax(scores, dim=-1)
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
            raise ValueError("no token is possible after logit_bias and the sampling filters")
        token = int(torch.multinomial(probs, 1, generator=s.generator(probs.device)))
    if not torch.isfinite(scores[token]):
        raise ValueError("no token is possible after logit_bias, min_tokens and the sampling filters")
    if s.top_logprobs is None and not s.track_logprob:
        return Choice(token)
    logp = torch.log_softmax(logits.float(), dim=-1)
    return Choice(token, float(logp[token]), top_k(logp, s.top_logprobs or 0))


def top_k(logp: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The k most likely tokens with their logprobs."""
    if k <= 0:
        return []
    values, ids = logp.topk(min(k, logp.shape[-1]))
    return [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]


_BATCH_GENERATORS: dict[str, Any] = {}
"""Per device, the generator unseeded rows sampled together draw from (seeded rows keep their own)."""


def _draw_together(logits: torch.Tensor, rows: list[Row], which: list[int]) -> dict[int, int]:
    """Tokens for the rows `which` (`Sampling.simple`): one softmax at each row's temperature and one
    multinomial for all of them, the distribution `sample_row` draws from. A row whose probabilities are not
    finite is left out (`sample_row` then names its error)."""
    import torch

    if not which:
        return {}
    index = torch.tensor(which, device=logits.device)
    temps = torch.tensor([rows[i].sampling.temperature for i in which], device=logits.device)
    probs = torch.softmax(logits.index_select(0, index).float() / temps[:, None], dim=-1)
    ok = torch.isfinite(probs).all(-1) & (probs.sum(-1) > 0)
    if not bool(ok.all()):
        which = [i for i, good in zip(which, ok.tolist(), strict=True) if good]
        probs = probs[ok]
        if not which:
            return {}
    key = str(logits.device)
    if key not in _BATCH_GENERATORS:
        _BATCH_GENERATORS[key] = torch.Generator(device=logits.device)
        _BATCH_GENERATORS[key].seed()
    tokens = torch.multinomial(probs, 1, generator=_BATCH_GENERATORS[key])[:, 0].tolist()
    return dict(zip(which, tokens, strict=True))


def sample(logits: torch.Tensor, rows: list[Row]) -> list[Choice | Exception]:
    """Next tokens for a batch `(rows, vocab)`: one argmax for the rows with nothing to adjust, one draw for
    the rows sampled at a temperature alone, the rest row by row. A row that fails gets its exception in its
    place; the others are unaffected."""
    plain = [r.sampling.plain and not r.banned for r in rows]
    if all(plain):  # the common batch (every row greedy, nothing to adjust): one argmax, nothing per row
        return [Choice(t) for t in logits.argmax(-1).tolist()]
    greedy = logits.argmax(-1).tolist() if any(plain) else []
    drawn = _draw_together(logits, rows, [i for i, r in enumerate(rows) if r.sampling.simple and not r.banned])
    out: list[Choice | Exception] = []
    for i, row in enumerate(rows):
        if plain[i]:
            out.append(Choice(int(greedy[i])))
            continue
        if i in drawn:
            out.append(Choice(int(drawn[i])))
            continue
        try:
            out.append(sample_row(logits[i], row))
        except Exception as e:  # this request's settings made it impossible: fail it alone
            out.append(e)
    return out


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
    target = torch.tensor(prompt[1:], dtype=torch.long, device=logp.device)
    chosen = logp.gather(1, target[:, None])[:, 0].tolist()
    return [Choice(t, float(lp), top_k(row, k)) for t, lp, row in zip(prompt[1:], chosen, logp, strict=True)]

"""SamplingParams and token sampling (greedy, temperature, top-k, top-p; seeded per request)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How a request samples and when it stops.

    max_tokens: tokens to generate at most. temperature 0 = greedy. top_k <= 0 and top_p = 1 disable
    those filters. seed makes sampling reproducible per request. The request stops after a token in
    stop_token_ids or, unless ignore_eos, the model's eos token (the stop token is returned).
    logprobs=True also returns the full log-softmax row [vocab] of every generated step.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not (self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int):
            raise TypeError(f"top_k must be an int, got {type(self.top_k).__name__}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int or None, got {type(self.seed).__name__}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in (self.stop_token_ids or ())))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(params: SamplingParams, device) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator(device=device)
    if params.seed is not None:
        g.manual_seed(params.seed)
    else:
        g.seed()
    return g


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """One token id from a row of logits [vocab] (float32)."""
    if params.greedy:
        return int(torch.argmax(logits))
    x = logits / params.temperature
    if 0 < params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sp, si = torch.sort(x, descending=True)
        cum = torch.softmax(sp, -1).cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p (always the top token)
        drop = cum - torch.softmax(sp, -1) >= params.top_p
        x = x.scatter(0, si, sp.masked_fill(drop, float("-inf")))
    probs = torch.softmax(x, -1)
    return int(torch.multinomial(probs, 1, generator=gen))

"""SamplingParams and token sampling (greedy, temperature, top-k, top-p; seeded per request)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

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


def _draw(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """One token id from a row of logits [vocab] (float32) as a 0-d/1-element device tensor (no
    device->host transfer)."""
    if params.greedy:
        return torch.argmax(logits)
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
    return torch.multinomial(probs, 1, generator=gen)


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """One token id from a row of logits [vocab] (float32)."""
    return int(_draw(logits, params, gen))


@dataclass
class Sampled:
    """What `sample_rows` drew: per row the token, its log-prob, and the log-softmax rows
    [M, vocab] (float32, on the logits' device) for callers that keep them."""
    tokens: list[int]
    logprobs: list[float]
    rows: torch.Tensor


class Drawn:
    """Tokens drawn on the device, on their way to the host (`draw_rows`).

    `tokens` (int64 [M]) stays on the device for the next forward to read; `host()` waits for
    the one device->host copy (started when drawn, into pinned memory on CUDA, so the host is
    free to plan the next step meanwhile) and returns the `Sampled` lists."""

    def __init__(self, tokens: torch.Tensor, picked: torch.Tensor, rows: torch.Tensor):
        self.tokens, self.rows = tokens, rows
        # token ids (< 2**53) and float32 log-probs are exact in float64: one tensor, one transfer
        both = torch.stack((tokens.to(torch.float64), picked.to(torch.float64)))
        self._event = None
        if both.device.type == "cuda":
            self._buf = torch.empty(both.shape, dtype=torch.float64, pin_memory=True)
            self._buf.copy_(both, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._buf = both
        self._host: Sampled | None = None

    def host(self) -> Sampled:
        """The drawn tokens and log-probs as host lists (waits for the copy, once)."""
        if self._host is None:
            if self._event is not None:
                self._event.synchronize()
            t, lp = self._buf.tolist()
            self._host = Sampled([int(x) for x in t], lp, self.rows)
        return self._host


def draw_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
              gens: Sequence[torch.Generator | None]) -> Drawn:
    """A token for every row of `logits` [M, vocab] (row i with params[i] and gens[i], drawn in
    row order, exactly as `sample` would), left on the device with its copy to the host started
    (`Drawn.host()` collects it: one transfer for the whole batch, no wait until asked)."""
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(gens):
        raise ValueError(f"need logits [M, vocab] and M params and generators, got {list(logits.shape)}, "
                         f"{len(params)} params, {len(gens)} generators")
    lp = torch.log_softmax(logits.float(), -1)
    toks = torch.argmax(logits, dim=-1)  # every greedy row; the others are drawn below
    for i, (p, g) in enumerate(zip(params, gens)):
        if not p.greedy:
            toks[i] = _draw(logits[i], p, g).view(())
    picked = lp.gather(1, toks[:, None])[:, 0]
    return Drawn(toks, picked, lp)


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                gens: Sequence[torch.Generator | None]) -> Sampled:
    """`draw_rows` collected at once: the tokens and log-probs on the host (one device->host
    transfer for the batch; on a GPU each transfer is a sync: one per step, not two per request)."""
    return draw_rows(logits, params, gens).host()

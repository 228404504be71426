"""Sessions (shared token trajectories), requests and their outputs."""
from __future__ import annotations

import enum
import time

import torch

from .sampling import SamplingParams


PLACEHOLDER = -1  # a session token drawn on the device and not yet read back


class GenerationOutput(list):
    """The generated token ids (it IS a list) plus what was measured on the way.

    Attributes: request_id, session_id, agent, prompt_token_ids, finished, finish_reason
    ("length" | "stop" | "error": the request could not run on, e.g. it needs more KV cache
    than max_kv_bytes holds; the tokens generated before that are kept here, while the session
    is left as it was before the request), error (the message when "error"), ttft_s
    (add_request -> first token), latency_s, tpot_s (mean time per output token after the
    first), token_logprobs (log-prob of each chosen token), logprobs (float32 [n, vocab] when
    SamplingParams.logprobs, else None), recomputed_tokens (tokens re-run after preemption or
    cache invalidation), cached_tokens
    (tokens not computed because another session holds the same prefix blocks).
    """

    def __init__(self, request_id: int, session_id: int, agent: str, prompt: list[int]):
        super().__init__()
        self.request_id, self.session_id, self.agent = request_id, session_id, agent
        self.prompt_token_ids = list(prompt)
        self.finished = False
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.ttft_s: float | None = None
        self.latency_s: float | None = None
        self.tpot_s: float | None = None
        self.token_logprobs: list[float] = []
        self.logprobs: torch.Tensor | None = None
        self.recomputed_tokens = 0
        self.cached_tokens = 0  # tokens whose K/V came from blocks other sessions hold (prefix sharing)

    def __repr__(self) -> str:
        return (f"GenerationOutput({list.__repr__(self)}, agent={self.agent!r}, "
                f"finish_reason={self.finish_reason!r}, ttft_s={self.ttft_s})")


class Status(enum.Enum):
    QUEUED = "queued"  # behind another request of its session
    WAITING = "waiting"  # may run; its cache may need (re)computing
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    def __init__(self, rid: int, session: "Session", agent: str, prompt: list[int],
                 params: SamplingParams, gen):
        self.id, self.session, self.agent, self.params = rid, session, agent, params
        self.prompt = list(prompt)
        self.gen = gen
        self.status = Status.QUEUED
        self.out = GenerationOutput(rid, session.id, agent, prompt)
        self.t_arrival = time.perf_counter()
        self.t_first: float | None = None
        self.new_tokens: list[int] = []  # since the last step() (streaming)
        self.rows: list[torch.Tensor] = []
        # its latest token, still on its way from the device, is its last (max_tokens): the
        # scheduler gives it no more work (engine.py, overlapped steps)
        self.held = False
        # the session's length before this request's prompt was appended (set when it starts):
        # a request that fails is taken back out of its session from here (Engine._fail)
        self.start: int | None = None

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


class Session:
    """A token trajectory that several agents extend in turn.

    `tokens[i]` was added by agent `procs[i]` (its prompt or its output); the K/V of a token come
    from the forward pass of the agent that processed it. The cache state lives in engine/cache.py.
    With overlapped steps (Engine(async_steps=True)) the last token may be PLACEHOLDER between
    two `step()` calls: drawn on the device, not yet read back (never once a request finishes).
    """

    def __init__(self, sid: int):
        self.id = sid
        self.tokens: list[int] = []
        self.procs: list[str] = []
        self.queue: list[Request] = []
        self.active: Request | None = None
        self.closed = False
        self.high: dict = {}  # coverage key -> most tokens ever cached (to count recomputation)

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"Session(id={self.id}, tokens={len(self.tokens)})"

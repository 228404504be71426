"""Continuous batching: which requests run in the next step, with how many tokens, and who is
preempted when the KV budget is full.

One request per session runs at a time (a session is one trajectory; the next agent's request
starts when the previous one finishes). Each step packs, oldest first, every running request's
pending tokens (a prefill chunk, a recompute after preemption, or one decode token) up to
`max_batched_tokens`. When the budget cannot hold a request's blocks, caches are freed —
first those of idle sessions (least recently used), then those of the newest running requests,
which go back to waiting and later recompute their cache from their session's tokens
(free + recompute: the session's tokens are kept, so nothing is lost or corrupted).
"""
from __future__ import annotations

from dataclasses import dataclass

from .cache import ALL_AGENTS, KVManager
from .kvcache import CacheFull
from .sequence import Request, Session, Status


class CacheCapacityError(RuntimeError):
    """A single session needs more KV bytes than the whole budget (max_kv_bytes) holds.

    Raised by `Engine.generate` (and `score`). `output`: the failed request's GenerationOutput
    (the tokens generated before it failed, finish_reason "error") when raised by `generate`,
    else None. The session is left as it was before the failed call."""

    def __init__(self, message: str, output=None):
        super().__init__(message)
        self.output = output


@dataclass
class Work:
    req: Request
    segments: list[tuple[str | None, int, int]]  # (processing agent, start, end)
    sample: bool  # the last segment reaches the end of the trajectory: sample a token


class Scheduler:
    def __init__(self, kv: KVManager, max_batched_tokens: int = 512, max_running: int = 64):
        self.kv = kv
        self.max_batched_tokens = max_batched_tokens
        self.max_running = max_running
        self.running: list[Request] = []
        self.sessions: dict[int, Session] = {}
        self.last_used: dict[int, int] = {}
        self.clock = 0
        self.preemptions = 0  # running requests whose cache (holding blocks) was freed (to be recomputed)
        self.evictions = 0  # idle sessions whose cache (holding blocks) was freed

    # ---- bookkeeping -------------------------------------------------------------------------
    def activate(self) -> None:
        for s in self.sessions.values():
            if s.active is None and s.queue and len(self.running) < self.max_running:
                req = s.queue.pop(0)
                s.active = req
                req.start = len(s.tokens)
                s.tokens.extend(req.prompt)
                s.procs.extend([req.agent] * len(req.prompt))
                req.status = Status.WAITING
                self.running.append(req)

    def finish(self, req: Request) -> None:
        req.status = Status.FINISHED
        if req in self.running:
            self.running.remove(req)
        if req.session.active is req:
            req.session.active = None
        elif req in req.session.queue:
            req.session.queue.remove(req)

    def pending(self, req: Request) -> list[tuple[str | None, int, int]]:
        """The tokens of req's session that are not in the cache the request reads, split into
        runs of one processing agent."""
        s = req.session
        end = len(s.tokens)
        if self.kv.mode == "non_shared":
            start = self.kv.coverage(s.id, req.agent)
            return [(req.agent, start, end)] if start < end else []
        start = self.kv.coverage(s.id, None)
        runs: list[tuple[str | None, int, int]] = []
        for i in range(start, end):
            p = s.procs[i]
            if runs and runs[-1][0] == p:
                runs[-1] = (p, runs[-1][1], i + 1)
            else:
                runs.append((p, i, i + 1))
        return runs

    def stream_agent(self, req: Request) -> str | None:
        return req.agent if self.kv.mode == "non_shared" else None

    # ---- making room -------------------------------------------------------------------------
    def make_room(self, sid: int, agent: str | None, end: int, protected: set[int]) -> bool:
        """Free caches until session `sid` can hold [0, end); False if even freeing all others
        cannot make it fit. Sessions in `protected` are never freed."""
        return self._room_for(sid, agent, end, protected) is not None

    def _room_for(self, sid: int, agent: str | None, end: int, protected: set[int]) -> int | None:
        """`make_room`, answering the bytes `kv.reserve(sid, agent, end)` will take once the room
        is made (freeing other sessions does not change them), or None when it cannot be made."""
        need = self.kv.bytes_to_reserve(sid, agent, end)
        kv = self.kv
        if kv.budget.used + need <= kv.budget.capacity:
            return need
        victims = self._victims(sid, agent, protected)
        # Count first, in the order they would be freed, up to the first that makes room: a
        # request that cannot run then costs the other sessions nothing, and one that can pays
        # only for reading the caches it frees anyway.
        if kv.caches_to_free([(x, keep) for x, keep, _ in victims],
                             kv.budget.used + need - kv.budget.capacity) is None:
            return None
        for x, keep, req in victims:
            if keep is not ALL_AGENTS:  # non_shared's last resort: the other agents' copies of this session
                kv.free_other_agents(x, keep)
                self.preemptions += 1
            else:
                kv.free_session(x)
                if req is None:
                    self.evictions += 1
                else:
                    req.status = Status.WAITING
                    self.preemptions += 1
            if kv.budget.used + need <= kv.budget.capacity:
                return need
        return None

    def _victims(self, sid: int, agent: str | None, protected: set[int]) -> list[tuple[int, object, Request | None]]:
        """What `_room_for` may free for session `sid`, in the order it frees them, as (session,
        agents kept or ALL_AGENTS, its running request or None): idle sessions' caches, least
        recently used first, then those of running requests, newest first, then in non_shared the
        other agents' copies of `sid` itself. Only caches that hold blocks: freeing an empty one
        makes no room and would count as an eviction or preemption."""
        kv = self.kv
        active = {r.session.id for r in self.running}
        idle = sorted((x for x in kv.sessions if x not in active and x not in protected and x != sid
                       and kv.session_bytes(x)), key=lambda x: self.last_used.get(x, -1))
        out = [(x, ALL_AGENTS, None) for x in idle]
        out += [(r.session.id, ALL_AGENTS, r) for r in reversed(self.running)
                if r.session.id != sid and r.session.id not in protected and kv.session_bytes(r.session.id)]
        if kv.mode == "non_shared" and sid not in protected:
            out.append((sid, agent, None))
        return out

    # ---- the step plan -----------------------------------------------------------------------
    def schedule(self) -> tuple[list[Work], list[tuple[Request, str]]]:
        """(works to run now, requests that failed because they can never fit)."""
        self.activate()
        self.clock += 1
        budget = self.max_batched_tokens
        works: list[Work] = []
        failed: list[tuple[Request, str]] = []
        scheduled: set[int] = set()
        for req in list(self.running):
            if budget <= 0:
                break
            if req.held:  # its last token is still on its way back: nothing more to run
                continue
            s = req.session
            if not s.tokens:  # an empty prompt after a request that failed and was taken back out
                failed.append((req, f"request {req.id} has an empty prompt and session {s.id} is empty "
                                    "(the request whose prompt it followed failed)"))
                continue
            req.out.cached_tokens += self.kv.attach_prefix(s.id, self.stream_agent(req), s.tokens, s.procs)
            runs = self.pending(req)
            if not runs:
                # its whole session is cached (an overlapped step ran the token the previous
                # request stopped on), yet it must sample after the last token: compute that again
                self.kv.reopen_last(s.id, self.stream_agent(req))
                runs = self.pending(req)
            total_end = runs[-1][2]
            take_end = min(total_end, runs[0][1] + budget)
            sid, agent = req.session.id, self.stream_agent(req)
            need = self._room_for(sid, agent, take_end, scheduled)
            if need is None:
                if not scheduled:  # alone and still too big: it can never run
                    need = self.kv.bytes_to_reserve(sid, agent, take_end)
                    failed.append((req, f"request {req.id}: caching {take_end} tokens of session {sid} "
                                        f"needs {need} more KV bytes, which max_kv_bytes="
                                        f"{self.kv.budget.capacity} cannot hold even with every other "
                                        "cache freed; the session is left as it was before the request"))
                continue
            if need:  # else every block [0, take_end) needs is held already (most decode steps)
                try:
                    self.kv.reserve(sid, agent, take_end)
                except CacheFull:
                    continue
            segs = [(p, a, min(b, take_end)) for (p, a, b) in runs if a < take_end]
            works.append(Work(req, segs, sample=take_end == total_end))
            req.status = Status.RUNNING
            scheduled.add(sid)
            self.last_used[sid] = self.clock
            budget -= take_end - runs[0][1]
        return works, failed

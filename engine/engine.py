"""The Engine: agents (LoRA / ESFT adapters) over one base model, sessions, continuous batching."""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import asdict, dataclass
from typing import Iterable

import torch

from .attention import Chunk, PagedAttention, Uploads
from .builtin import BUILTIN, builtin_weights
from .cache import MODES, Agent, KVManager
from .config import ModelConfig, load_config
from .graphs import StepGraphs
from .kernel_policy import default_block_size, kernel_impl, use_kernels
from .loader import LoadError, load_weights
from .lora import LoraSet, load_peft_adapter, same_v_a
from .model import BatchInputs, DecoderModel
from .sampling import Drawn, SamplingParams, draw_rows, make_generator
from .scheduler import CacheCapacityError, Scheduler, Work
from .sequence import PLACEHOLDER, GenerationOutput, Request, Session, Status


@dataclass(frozen=True)
class StepInfo:
    """What one `Engine.step()` computed: `chunks` holds (session id, start, end) of every run of
    tokens its forward processed (empty: nothing ran), `sampled` the tokens it generated."""
    chunks: tuple[tuple[int, int, int], ...] = ()
    sampled: int = 0

    @property
    def decode_only(self) -> bool:
        """Every chunk was one token: a pure decode step (no prefill or recompute rode along)."""
        return bool(self.chunks) and all(end - start == 1 for _, start, end in self.chunks)


@dataclass
class EngineCounters:
    """Work the engine has done since it was built (steps, forwards and what they computed;
    `score()` runs forwards too, outside any step).

    `kernel_chunks` / `torch_chunks`: chunks the attention backend planned onto the paged kernels
    and onto its torch fallback (on the kernel path the fallback is for what no kernel covers)."""
    steps: int = 0
    forwards: int = 0
    computed_tokens: int = 0  # tokens run through the model (prefill, recompute and decode)
    decode_steps: int = 0  # steps whose every chunk was a single token
    recomputed_tokens: int = 0  # tokens computed again after preemption or cache invalidation
    kernel_chunks: int = 0
    torch_chunks: int = 0
    graph_replays: int = 0  # forwards replayed from a CUDA graph (engine/graphs.py)


@dataclass
class _InFlight:
    """A step's draws not yet read back. Each live request's session ends in a PLACEHOLDER
    token at `places[i]`; `where[session id] = (position, row of drawn.tokens)` tells the next
    forward which input ids to take from the device."""
    reqs: list[Request]
    drawn: Drawn
    places: dict[int, int]  # index in reqs -> position of its placeholder
    where: dict[int, tuple[int, int]]


def _env_flag(name: str, default: bool) -> bool:
    """An on/off environment switch: unset gives `default`, "0" off, anything else on."""
    v = os.environ.get(name)
    return default if v is None else v != "0"


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device an engine runs on: `device`, or the GPU when one is usable else the CPU.
    ValueError for a name torch does not know or a CUDA device where none is usable."""
    try:
        dev = torch.device(device) if device is not None else _default_device()
    except (RuntimeError, TypeError) as e:  # torch's message lists every device type it knows
        raise ValueError(f"device must be e.g. 'cpu', 'cuda' or 'cuda:0', got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' asked for but no CUDA device is usable")
    return dev


def _default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return 1 << 30


class Engine:
    """Serve many agents on one base model. Build with `Engine.from_pretrained`.

    Agents: `add_lora_agent(name, peft_dir or None)`; on MoE models `add_esft_adapter(name, dir)`
    registers agent `name` whose tokens are routed to that ESFT adapter's experts. A session is
    one token trajectory; `generate(session, agent, prompt, params)` appends the prompt and the
    output to it. `add_request` / `step` are the same machinery driven from outside;
    `last_step` says what the latest step computed and `stats()` counts the work so far.
    """

    def __init__(self, model: DecoderModel, cache_mode: str, max_kv_bytes: int | None,
                 block_size: int | None = None, max_batched_tokens: int = 512, max_running: int = 64,
                 prefix_caching: bool = True, cuda_graphs: bool | None = None,
                 async_steps: bool | None = None):
        if cache_mode not in MODES:
            raise ValueError(f"cache_mode must be one of {MODES}, got {cache_mode!r}")
        if block_size is None:
            block_size = default_block_size(model.device, model.dtype)
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if max_batched_tokens < 1 or max_running < 1:
            raise ValueError("max_batched_tokens and max_running must be >= 1")
        if max_kv_bytes is not None and (not isinstance(max_kv_bytes, int) or max_kv_bytes <= 0):
            raise ValueError(f"max_kv_bytes must be a positive int or None, got {max_kv_bytes!r}")
        self.model = model
        self.config: ModelConfig = model.config
        self.device = model.device
        self.cache_mode = cache_mode
        budget = max_kv_bytes if max_kv_bytes is not None else _default_budget(self.device)
        self.kv = KVManager(self.config, cache_mode, block_size, budget, self.device, model.dtype,
                            prefix_caching=prefix_caching)
        self._uids = itertools.count(1)
        self.sched = Scheduler(self.kv, max_batched_tokens, max_running)
        self.lora = LoraSet()
        self.agents: dict[str, Agent] = self.kv.agents
        self.esft = None
        self._ids = itertools.count()
        self._sids = itertools.count()
        self._requests: dict[int, Request] = {}
        self.counters = EngineCounters()
        self.last_step = StepInfo()
        # decode forwards replayed from CUDA graphs (engine/graphs.py): on by default on a GPU,
        # where a decode step is otherwise bound by kernel launches; None reads
        # VMWEAVE_CUDA_GRAPHS ("0" turns them off) so a server can opt out without code changes
        if cuda_graphs is None:
            cuda_graphs = _env_flag("VMWEAVE_CUDA_GRAPHS", True)
        use_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        self.graphs: StepGraphs | None = StepGraphs(device=self.device) if use_graphs else None
        # Overlapped steps: a step's sampled tokens stay on the device and the next step's forward
        # reads them there, so the host plans step n+1 while the GPU runs step n (the tokens are
        # read back one step() later). On by default on a GPU, where the host work of a step is
        # about as long as its device work; VMWEAVE_ASYNC_STEPS="0" turns it off.
        if async_steps is None:
            async_steps = _env_flag("VMWEAVE_ASYNC_STEPS", self.device.type == "cuda")
        self.async_steps = bool(async_steps)
        self._inflight: _InFlight | None = None

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_builtin_name: str, cache_mode: str = "base_lr_shared",
                        device: str | torch.device | None = None, max_kv_bytes: int | None = None, *,
                        dtype: torch.dtype = torch.float32, block_size: int | None = None,
                        max_batched_tokens: int = 512, max_running: int = 64, seed: int = 0,
                        prefix_caching: bool = True, cuda_graphs: bool | None = None,
                        async_steps: bool | None = None) -> "Engine":
        """Load a HF checkpoint directory or a built-in model ("tiny", "tiny-moe", "tiny-s2").

        device None: cuda if usable, else cpu. max_kv_bytes None: half the free GPU memory, or
        1 GiB on CPU. dtype: weights and caches (float32 default, for parity with transformers).
        block_size: tokens per KV block; None: 128 where GPU decode streams K/V through TMA
        (compute capability 9.0+, half precision), else 16 (`kernel_policy.default_block_size`).
        max_batched_tokens: tokens per step (prefill chunks + decodes). prefix_caching: share full
        blocks of identical prefixes between sessions.
        cuda_graphs: replay decode steps from CUDA graphs on a GPU (engine/graphs.py; about 2x
        decode throughput on a 4-layer 8B-shaped model, bench/RESULTS.md); None: the
        VMWEAVE_CUDA_GRAPHS environment variable ("0" turns them off), on by default on a GPU.
        async_steps: overlap the host's planning of a step with the device's run of the previous
        one (sampled tokens are read back one `step()` later; `generate` is unaffected); None:
        VMWEAVE_ASYNC_STEPS ("0" turns it off), on by default on a GPU.
        """
        if cache_mode not in MODES:
            raise ValueError(f"cache_mode must be one of {MODES}, got {cache_mode!r}")
        dev = resolve_device(device)
        if not isinstance(path_or_builtin_name, (str, os.PathLike)):
            raise TypeError(f"path_or_builtin_name must be a str path or built-in name, "
                            f"got {type(path_or_builtin_name).__name__}")
        name = str(path_or_builtin_name)
        if name in BUILTIN and not os.path.isdir(name):
            config, weights = builtin_weights(name, dev, dtype, seed)
        else:
            if not os.path.isdir(name):
                raise LoadError(f"{name!r} is neither a model directory nor a built-in model "
                                f"({', '.join(sorted(BUILTIN))})")
            config = load_config(name)
            weights = load_weights(name, config, dev, dtype)
        model = DecoderModel(config, weights, dev, dtype)
        eng = cls(model, cache_mode, max_kv_bytes, block_size, max_batched_tokens, max_running,
                  prefix_caching, cuda_graphs, async_steps)
        eng.model_path = name
        return eng

    @property
    def tokenizer(self):
        """The model directory's tokenizer (transformers.AutoTokenizer) when it has one, else None
        (built-in models work on token ids)."""
        if not hasattr(self, "_tokenizer"):
            self._tokenizer = None
            path = getattr(self, "model_path", None)
            names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
            if path and os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n in names):
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(path)
        return self._tokenizer

    # ---- agents ------------------------------------------------------------------------------
    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"agent name must be a non-empty str, got {name!r}")
        if name in self.agents:
            raise ValueError(f"agent {name!r} is already registered")

    def add_lora_agent(self, name: str, peft_dir: str | None = None) -> None:
        """Register agent `name` with the PEFT LoRA adapter in `peft_dir` (None: no adapter)."""
        self._check_new_name(name)
        self._drain()
        adapter = None
        if peft_dir is not None:
            adapter = load_peft_adapter(peft_dir, self.config, self.device, self.model.dtype, name)
        agent = Agent(name)
        if adapter is not None:
            agent.lora, agent.k_lora, agent.v_rank = adapter, adapter.has("self_attn.k_proj"), adapter.v_rank()
        if self.cache_mode == "base_lr_shared" and agent.v_rank:
            for other in self.agents.values():
                if other.v_rank and not same_v_a(other.lora, adapter):
                    raise ValueError(
                        f"cache_mode 'base_lr_shared' needs one v_proj LoRA A shared by all agents; "
                        f"{name!r} and {other.name!r} have different A (use 'base_shared')")
        self._register(agent)

    def _adapters_changed(self) -> None:
        # graphs hold what was derived from the adapter set (stacked A/B, expert maps, pools)
        if self.graphs is not None:
            self.graphs.clear()

    def _register(self, agent: Agent) -> None:
        self._adapters_changed()
        if agent.lora is not None:
            agent.lora_id = self.lora.add(agent.lora)
        changes_streams = self.kv.shared and (
            agent.k_lora or (agent.v_rank and (self.cache_mode == "base_shared"
                                               or not any(a.v_rank for a in self.agents.values()))))
        self.agents[agent.name] = agent
        self.kv.uids[agent.name] = next(self._uids)
        if changes_streams:
            # the new agent's K namespace / low-rank V must cover every cached token; they are
            # rebuilt by replaying each session (same tokens, same processing agents)
            self._invalidate_all()

    def _invalidate_all(self) -> None:
        for sid in list(self.kv.sessions):
            self.kv.free_session(sid)
        for req in self.sched.running:
            req.status = Status.WAITING

    def add_esft_adapter(self, name: str, esft_dir: str) -> None:
        """Load an ESFT expert adapter and register agent `name` whose tokens use its experts
        (MoE models only). The agent has no LoRA; remove it with `remove_adapter(name)`."""
        self._check_new_name(name)
        self._drain()
        if not self.config.is_moe:
            raise ValueError(f"add_esft_adapter needs an MoE model; {self.config.model_type!r} is dense")
        from .esft import EsftManager

        if self.esft is None:
            self.esft = EsftManager(self.model)
            self.model.esft = self.esft
        slot = self.esft.load(name, esft_dir)
        self._register(Agent(name, esft_id=slot, esft=name))

    def remove_adapter(self, name: str) -> None:
        """Unregister agent `name` and free its adapter, ESFT experts and own caches. Tokens it
        added stay in their sessions; if a shared-mode cache must be recomputed later, those
        tokens are re-run without its adapter."""
        if name not in self.agents:
            raise KeyError(f"no agent named {name!r}")
        self._drain()
        busy = [r.id for r in self._requests.values() if r.agent == name and not r.finished]
        if busy:
            raise ValueError(f"agent {name!r} has unfinished requests {busy}")
        self._adapters_changed()
        agent = self.agents.pop(name)
        self.kv.uids.pop(name, None)
        if agent.lora_id >= 0:
            self.lora.remove(agent.lora_id)
        if agent.esft is not None:
            self.esft.unload(agent.esft)
        self.kv.drop_agent(name)
        if self.cache_mode == "base_lr_shared" and not any(a.v_rank for a in self.agents.values()):
            for st in self.kv.sessions.values():
                if ("lr", None) in st.streams:
                    st.streams.pop(("lr", None)).release()

    def list_agents(self) -> list[str]:
        return sorted(self.agents)

    # ---- sessions and requests -------------------------------------------------------------
    def new_session(self) -> Session:
        s = Session(next(self._sids))
        self.sched.sessions[s.id] = s
        return s

    def close_session(self, session: Session | int) -> None:
        s = self._session(session)
        self._drain()
        if s.active is not None or s.queue:
            raise ValueError(f"session {s.id} has unfinished requests")
        self.kv.free_session(s.id)
        del self.sched.sessions[s.id]
        s.closed = True

    def _session(self, session) -> Session:
        sid = session.id if isinstance(session, Session) else session
        s = self.sched.sessions.get(sid) if isinstance(sid, int) else None
        if s is None or (isinstance(session, Session) and s is not session):
            raise ValueError(f"{session!r} is not an open session of this engine")
        return s

    def _tokens(self, token_ids, what: str) -> list[int]:
        if isinstance(token_ids, torch.Tensor):
            if token_ids.dim() != 1 or token_ids.dtype.is_floating_point:
                raise TypeError(f"{what} must be a 1-D integer tensor or a list of ints")
            token_ids = token_ids.tolist()
        if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Iterable):
            raise TypeError(f"{what} must be a list of token ids, got {type(token_ids).__name__}")
        out = list(token_ids)
        for t in out:
            if isinstance(t, bool) or not isinstance(t, int):
                raise TypeError(f"{what} must hold ints, found {t!r}")
            if not 0 <= t < self.config.vocab_size:
                raise ValueError(f"{what}: token id {t} outside the vocabulary [0, {self.config.vocab_size})")
        return out

    def _agent_name(self, agent) -> str | None:
        if agent is None:
            return None
        if agent not in self.agents:
            raise KeyError(f"no agent named {agent!r}; registered: {sorted(self.agents)}")
        return agent

    def add_request(self, session: Session | int, agent: str | None, prompt,
                    params: SamplingParams | None = None) -> int:
        """Queue a generation; returns its request id. Drive it with `step()`. agent None: the base
        model with no adapter. A request that cannot get the KV cache it needs finishes with
        finish_reason "error" (its output so far kept) and is taken back out of its session:
        the session's later requests run on the session as it was before it."""
        s = self._session(session)
        name = self._agent_name(agent)
        toks = self._tokens(prompt, "prompt")
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if not toks and not s.tokens and not any(r.prompt for r in s.queue):
            raise ValueError("prompt is empty and so is the session: nothing to condition on")
        req = Request(next(self._ids), s, name, toks, params, make_generator(params, self.device))
        s.queue.append(req)
        self._requests[req.id] = req
        return req.id

    def get_output(self, request_id: int) -> GenerationOutput:
        """The request's output so far (complete once `.finished`); kept until `pop_output`."""
        if request_id not in self._requests:
            raise KeyError(f"no request {request_id!r} (unknown, or already popped)")
        return self._requests[request_id].out

    def pop_output(self, request_id: int) -> GenerationOutput:
        """The finished request's output, forgotten by the engine (servers call this to keep
        memory flat)."""
        out = self.get_output(request_id)
        if not out.finished:
            raise ValueError(f"request {request_id} is not finished")
        del self._requests[request_id]
        return out

    def has_unfinished(self) -> bool:
        return any(not r.finished for r in self._requests.values())

    def generate(self, session: Session | int, agent: str | None, prompt,
                 params: SamplingParams | None = None) -> GenerationOutput:
        """Append `prompt` to the session, generate with `agent`, append the output; returns the
        generated ids (a GenerationOutput: a list with ttft_s, finish_reason, ... attached).

        CacheCapacityError when the session cannot get the KV cache it needs even with every
        other cache freed (before or during generation): the session is left as it was before
        the call, and the error's `output` holds the tokens generated before the failure
        (finish_reason "error"), as `get_output` does for a request driven through `step()`."""
        rid = self.add_request(session, agent, prompt, params)
        req = self._requests[rid]
        while not req.finished:
            self.step()
        self._requests.pop(rid, None)
        if req.out.finish_reason == "error":
            raise CacheCapacityError(req.out.error, output=req.out)
        return req.out

    def step(self) -> dict[int, list[int]]:
        """Run one batch. Returns {request_id: tokens generated in this step} for every request
        that got tokens or finished (streaming); `get_output(id)` has the whole output. With
        async_steps a step's tokens come back from the next `step()` call (whose forward is
        already on the device by then): `has_unfinished()` stays true until they have."""
        prev, self._inflight = self._inflight, None
        drawn = None
        try:
            works, failed = self.sched.schedule()
            if works:
                logits = self._forward(works, all_rows=False, prev=prev)
                reqs = [w.req for w in works if w.sample]
                if reqs:
                    drawn = (reqs, draw_rows(logits, [r.params for r in reqs], [r.gen for r in reqs]))
        finally:
            if prev is not None:  # read back while this step's forward runs
                self._resolve(prev)
        for req, msg in failed:
            # after the read-back: a failed request keeps the token it drew in the previous step
            # (as with synchronous steps), and one that stopped with that token has not failed
            if not req.finished:
                self._fail(req, msg)
        self._register_blocks(works)
        if drawn is not None:
            held = self._hold(*drawn)
            if self.async_steps:
                self._inflight = held
            elif held is not None:  # synchronous: read this step's draws back now
                self._resolve(held)
        self._count_step(works)
        out = {}
        for req in list(self._requests.values()):
            if req.new_tokens or (req.finished and not req.out.finished):
                out[req.id] = req.new_tokens
                req.new_tokens = []
                req.out.finished = req.finished
        return out

    def _drain(self) -> None:
        """Read back the draws still in flight (before anything that changes agents or caches
        under them, or reads sessions whole)."""
        prev, self._inflight = self._inflight, None
        if prev is not None:
            self._resolve(prev)

    def _hold(self, reqs: list[Request], drawn: Drawn) -> _InFlight | None:
        """This step's draws as in flight: each live request's session gets a PLACEHOLDER token
        (so the scheduler plans its next decode), and a request whose draw is its last by length
        is held back from more work. Synchronous steps resolve it at once."""
        places, where = {}, {}
        for i, req in enumerate(reqs):
            if req.finished:  # stopped when the previous step's draws came back: this one is void
                continue
            s = req.session
            places[i] = len(s.tokens)
            where[s.id] = (len(s.tokens), i)
            s.tokens.append(PLACEHOLDER)
            s.procs.append(req.agent)
            req.held = len(req.out) + 1 >= req.params.max_tokens
        return _InFlight(reqs, drawn, places, where) if places else None

    def _resolve(self, f: _InFlight) -> None:
        """Put the draws of a step in flight in their sessions' places (waits for them)."""
        rows = self._kept_rows(f.reqs, f.drawn)
        host = f.drawn.host()
        for i, pos in f.places.items():
            req = f.reqs[i]
            req.held = False
            if req.finished:  # finished while its token was in flight: the token goes with it
                del req.session.tokens[pos:], req.session.procs[pos:]
                continue
            self._sampled(req, host.tokens[i], host.logprobs[i], rows.get(i), place=pos)

    @staticmethod
    def _kept_rows(reqs: list[Request], drawn: Drawn) -> dict[int, torch.Tensor]:
        """The log-softmax rows of the requests that keep them, on the host. One copy of the
        kept rows; each request keeps its own row, not a view that would pin every other
        request's row of this step until it finishes."""
        keep = [i for i, r in enumerate(reqs) if r.params.logprobs and not r.finished]
        return {i: row.clone() for i, row in zip(keep, drawn.rows[keep].cpu())} if keep else {}

    def _register_blocks(self, works: list[Work]) -> None:
        """Make the full blocks the works completed findable by content (after every token in
        them is known: a token drawn by the previous step is read back only now)."""
        for w in works:
            sess = w.req.session
            self.kv.register(sess.id, self.sched.stream_agent(w.req), sess.tokens, sess.procs)

    def _count_step(self, works: list[Work]) -> None:
        self.last_step = StepInfo(tuple((w.req.session.id, a, b) for w in works for _, a, b in w.segments),
                                  sum(1 for w in works if w.sample))
        self.counters.steps += 1
        self.counters.decode_steps += int(self.last_step.decode_only)

    def stats(self) -> dict:
        """The work counters (see EngineCounters) with the scheduler's preemptions (running
        requests whose cache was freed) and evictions (idle sessions' caches freed)."""
        return {**asdict(self.counters), "preemptions": self.sched.preemptions,
                "evictions": self.sched.evictions}

    # ---- forward -----------------------------------------------------------------------------
    def _forward(self, works: list[Work], all_rows: bool, prev: _InFlight | None = None) -> torch.Tensor:
        """The model over the works' tokens; the logits of every row (`all_rows`) or of each
        sampling work's last row. Tokens that `prev` drew are read from the device."""
        chunks: list[Chunk] = []
        ids, pos, lids, eids, rows = [], [], [], [], []
        dst, src = [], []  # input rows whose token is prev's draw, and which draw
        where = prev.where if prev is not None else {}
        row = 0
        for w in works:
            s = w.req.session
            stream_agent = self.sched.stream_agent(w.req)
            streams = self.kv.streams(s.id, stream_agent)
            late = where.get(s.id)
            for proc, a, b in w.segments:
                if late is not None and a <= late[0] < b:
                    dst.append(row + late[0] - a)
                    src.append(late[1])
                agent = self.agents.get(proc) if proc is not None else None
                chunks.append(Chunk(s.id, agent, a, b, row, streams))
                ids += s.tokens[a:b]
                pos += range(a, b)
                lids += [agent.lora_id if agent else -1] * (b - a)
                eids += [agent.esft_id if agent else -1] * (b - a)
                if all_rows:
                    rows += range(row, row + b - a)
                row += b - a
            if w.sample and not all_rows:
                rows.append(row - 1)
        # the batch's index arrays and the attention plan's go to the device in one copy
        uploads, got = Uploads(), []
        for x in (ids, pos, lids, eids, rows, *((dst, src) if dst else ())):
            uploads.add(x, torch.int64, got.append)
        kern = kernel_impl(self.device) if use_kernels(self.device, self.model.dtype) else None
        backend = PagedAttention(self.kv, chunks, self.lora, uploads, s2=self._s2(), kernels=kern)
        uploads.send(self.device)
        inp = BatchInputs(*got[:5])
        backend.sent(inp.lora_ids)
        if dst:  # stream-ordered after prev's draw: the host never waits for it
            inp.input_ids.index_copy_(0, got[5], prev.drawn.tokens.index_select(0, got[6]))
        self.lora.prepare(inp.lora_ids, kern, host_ids=lids)
        logits = self._run_model(inp, backend, kern, graphable=not all_rows and len(ids) == len(chunks))
        self._count_forward(len(ids), len(chunks), len(backend.torch_chunks))
        for w in works:
            sess, key = w.req.session, self.sched.stream_agent(w.req)
            high = sess.high.get(key, 0)
            again = sum(max(0, min(b, high) - a) for _, a, b in w.segments)
            w.req.out.recomputed_tokens += again
            self.counters.recomputed_tokens += again
            sess.high[key] = max(high, w.segments[-1][2])
            self.kv.advance(sess.id, key, w.segments[-1][2])
        return logits

    def _run_model(self, inp: BatchInputs, backend: PagedAttention, kern: str | None, graphable: bool) -> torch.Tensor:
        """The model's forward, from a CUDA graph where the step allows one (decode steps on the
        kernel path: see engine/graphs.py); `graphable`: the caller's part of that judgement."""
        lora_state = self.lora.step_state()

        def forward() -> torch.Tensor:
            # a captured forward may run again (emulated graphs) after later steps changed these
            self.lora.use_step(lora_state)
            self.model.moe_impl = kern
            return self.model.forward(inp, backend, self.lora)

        if self.graphs is None or not graphable:
            return forward()
        bkey, lkey = backend.graph_key(), self.lora.graph_key()  # None off the kernel path
        if bkey is None or lkey is None:
            return forward()
        inputs = [inp.input_ids, inp.positions, inp.lora_ids, inp.expert_ids, inp.logits_rows,
                  *self.lora.graph_inputs(), *backend.graph_inputs()]
        before = self.graphs.replays
        out = self.graphs.run((bkey, lkey, self.model.esft is not None), inputs, forward)
        self.counters.graph_replays += self.graphs.replays - before
        return out

    def _count_forward(self, tokens: int, chunks: int, torch_chunks: int) -> None:
        c = self.counters
        c.forwards += 1
        c.computed_tokens += tokens
        c.torch_chunks += torch_chunks
        c.kernel_chunks += chunks - torch_chunks

    def _s2(self):
        if self.config.s2 is None:
            return None
        if not hasattr(self, "_s2_helper"):
            from .s2 import S2Masks

            self._s2_helper = S2Masks(self.config)
        return self._s2_helper

    def _sampled(self, req: Request, tok: int, logprob: float, row: torch.Tensor | None, place: int) -> None:
        """Put a drawn token in its session's placeholder at `place` and append it (its
        log-prob, and its log-softmax row when the request keeps them) to the request; finish
        the request if it stops here."""
        now = time.perf_counter()
        s = req.session
        s.tokens[place] = tok
        req.out.append(tok)
        req.out.token_logprobs.append(logprob)
        if row is not None:
            req.rows.append(row)
        req.new_tokens.append(tok)
        if req.t_first is None:
            req.t_first = now
            req.out.ttft_s = now - req.t_arrival
        stops = set(req.params.stop_token_ids)
        if not req.params.ignore_eos:
            stops |= set(self.config.eos_token_ids)
        if tok in stops:
            req.out.finish_reason = "stop"
        elif len(req.out) >= req.params.max_tokens:
            req.out.finish_reason = "length"
        if req.out.finish_reason:
            self._finish(req)

    def _fail(self, req: Request, msg: str) -> None:
        """Finish a request that cannot get its KV cache with finish_reason "error", and take its
        prompt and output back out of its session and the session's caches: the session is as
        it was before the request started (the output so far stays in `req.out`)."""
        req.out.error, req.out.finish_reason = msg, "error"
        s, n = req.session, req.start
        del s.tokens[n:], s.procs[n:]
        self.kv.truncate(s.id, n)
        # tokens at n and after are new ones from now on, not recomputation
        s.high = {k: min(v, n) for k, v in s.high.items()}
        self._finish(req)

    def _finish(self, req: Request) -> None:
        now = time.perf_counter()
        req.out.latency_s = now - req.t_arrival
        if req.t_first is not None and len(req.out) > 1:
            req.out.tpot_s = (now - req.t_first) / (len(req.out) - 1)
        if req.rows:
            req.out.logprobs = torch.stack(req.rows)
        self.sched.finish(req)

    # ---- scoring -----------------------------------------------------------------------------
    def score(self, token_ids, agent: str | None = None) -> torch.Tensor:
        """Log-probs [len, vocab] (float32, on CPU): row i = log-softmax of the logits after token
        i, from `agent`'s pass (its adapters everywhere) on a fresh trajectory."""
        name = self._agent_name(agent)
        toks = self._tokens(token_ids, "token_ids")
        if not toks:
            raise ValueError("token_ids is empty")
        self._drain()
        s = Session(-1 - next(self._sids))
        s.tokens, s.procs = list(toks), [name] * len(toks)
        req = Request(-1, s, name, [], SamplingParams(), None)
        stream_agent = self.sched.stream_agent(req)
        outs = []
        try:
            start = 0
            while start < len(toks):
                end = min(len(toks), start + self.sched.max_batched_tokens)
                if not self.sched.make_room(s.id, stream_agent, end, set()):
                    raise CacheCapacityError(f"scoring {len(toks)} tokens needs more KV bytes than "
                                             f"max_kv_bytes={self.kv.budget.capacity}")
                self.kv.reserve(s.id, stream_agent, end)
                w = Work(req, [(name, start, end)], sample=False)
                outs.append(self._forward([w], all_rows=True))
                self._register_blocks([w])
                start = end
        finally:
            self.kv.free_session(s.id)
        return torch.log_softmax(torch.cat(outs).float(), -1).cpu()

    # ---- accounting --------------------------------------------------------------------------
    def memory_report(self) -> dict:
        """Bytes per pool and per namespace for the current cache mode, pages/blocks mapped,
        bytes per token under each mode for the registered agents, and adapter bytes."""
        rep = self.kv.report()
        rep["agents"] = sorted(self.agents)
        rep["lora_bytes"] = sum(a.nbytes() for a in self.lora.adapters.values())
        rep["preemptions"] = self.sched.preemptions
        rep["evictions"] = self.sched.evictions
        if self.esft is not None:
            rep["experts"] = self.esft.report()
        return rep

"""Multi-agent trajectories through the cache modes: what each costs (the end-to-end benchmark)
and how far each shared mode drifts from `non_shared` (fidelity).

A trajectory is a list of turns: an agent, the tokens it is given, then a greedy continuation, all
appended to one session that every agent reads. `run_trajectory` drives it through an Engine and
records what the demo and the benchmark print (tokens/s, TTFT, KV bytes).

Fidelity is measured on each mode's *own* trajectory, so no position is lost to divergence: for
every token a shared mode generated, the `non_shared` answer for that exact context is what
`Engine.score` gives for the session's tokens so far with the same agent (non_shared means each
agent computes its own K/V over the whole trajectory, which is one full forward pass). Reported per
mode: mean and max KL(non_shared ‖ mode) of the next-token distributions, and greedy agreement, the
fraction of positions where both pick the same argmax. `non_shared` itself is a check: KL ≈ 0 and
agreement 1 say cached step-by-step decode equals a fresh forward pass.
"""
from __future__ import annotations

import gc
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

import torch

from .cache import MODES

DEFAULT_AGENTS = ("plan", "act", "reflect")

Progress = Callable[[str], None] | None
T = TypeVar("T")


def model_config(model: str):
    """The engine's ModelConfig of a built-in name or a checkpoint directory."""
    from .builtin import BUILTIN, builtin_config
    from .config import load_config

    if model in BUILTIN:
        return builtin_config(model)
    return load_config(model)


def demo_adapters(model: str, out_dir: str, names: Sequence[str] = DEFAULT_AGENTS, r: int = 8,
                  targets: Sequence[str] = ("q_proj", "v_proj"), seed: int = 0,
                  gain: float = 0.2) -> dict[str, str]:
    """Random PEFT-format LoRA adapters, one per agent, all with one shared A for v_proj (so
    base_lr_shared applies) and their own B's and q_proj adapters. `gain` sets the size of each
    adapter's change relative to the base projection (fine-tuned adapters are small changes; at 1
    the agents would be unrelated models and every shared mode meaningless)."""
    from .builtin import save_random_lora

    if not names:
        raise ValueError("need at least one agent name")
    cfg = model_config(model)
    shared_a_seed = 10_000 + seed
    return {n: save_random_lora(os.path.join(out_dir, n), cfg, r=r, targets=tuple(targets),
                                seed=seed * 101 + i, a_seed=shared_a_seed, gain=gain)
            for i, n in enumerate(names)}


@dataclass(frozen=True)
class Turn:
    agent: str
    prompt: list[int]


def make_turns(agents: Sequence[str], steps: int, prompt_len: int, vocab: int, seed: int = 0) -> list[Turn]:
    """`steps` turns cycling through `agents`, each given `prompt_len` seeded random tokens."""
    if steps < 1 or prompt_len < 1:
        raise ValueError(f"steps and prompt_len must be >= 1, got {steps}, {prompt_len}")
    if not agents:
        raise ValueError("need at least one agent")
    g = torch.Generator().manual_seed(seed)
    return [Turn(agents[i % len(agents)], torch.randint(0, vocab, (prompt_len,), generator=g).tolist())
            for i in range(steps)]


@dataclass
class TurnResult:
    agent: str
    start: int  # session position of the first generated token
    tokens: list[int]
    logprobs: torch.Tensor | None  # [n, vocab] float32 when requested
    ttft_s: float
    latency_s: float


@dataclass
class RunResult:
    mode: str
    turns: list[TurnResult]
    session_tokens: list[int]
    wall_s: float
    memory: dict = field(default_factory=dict)

    @property
    def generated(self) -> int:
        return sum(len(t.tokens) for t in self.turns)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens over the wall time of all turns (prefill included)."""
        return self.generated / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after each turn's first, over the time spent after each turn's first token."""
        n = sum(max(0, len(t.tokens) - 1) for t in self.turns)
        s = sum(max(0.0, t.latency_s - t.ttft_s) for t in self.turns)
        return n / s if s > 0 else float("nan")

    @property
    def mean_ttft_s(self) -> float:
        return sum(t.ttft_s for t in self.turns) / len(self.turns)

    @property
    def kv_bytes(self) -> int:
        return kv_bytes(self.memory)


def kv_bytes(report: dict) -> int:
    """KV bytes held by sessions (every namespace: base K/V, per-agent K, low-rank V)."""
    kv = report.get("kv", report)
    ns = kv.get("namespaces")
    if ns:
        return int(sum(ns.values()))
    return int(kv.get("used_bytes", 0))


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: str | None) -> torch.dtype:
    """None / "auto": bfloat16 on CUDA (the Triton kernel path), float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        return torch.bfloat16 if cuda else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


class SetupError(ValueError):
    """`open_engine` was refused what it was asked for (a device that is not there, an ESFT
    adapter on a dense model, a cache mode the adapters do not allow, ...): the engine's
    ValueError, as message and cause."""


def open_engine(model: str, mode: str, device: str | None, agents: dict[str, str | None],
                esft: dict[str, str] | None = None, max_kv_bytes: int | None = None,
                dtype: str | torch.dtype | None = None, cuda_graphs: bool | None = None,
                async_steps: bool | None = None):
    """An Engine in `mode` with every agent and ESFT adapter registered (`cuda_graphs`,
    `async_steps`: see `Engine.from_pretrained`). A ValueError of the engine's input checks
    comes out as SetupError; ConfigError and LoadError (bad directories) as themselves."""
    from . import ConfigError, Engine, LoadError

    try:
        eng = Engine.from_pretrained(model, cache_mode=mode, device=device, max_kv_bytes=max_kv_bytes,
                                     dtype=resolve_dtype(dtype, device), cuda_graphs=cuda_graphs,
                                     async_steps=async_steps)
        for name, d in (esft or {}).items():
            eng.add_esft_adapter(name, d)
        for name, d in agents.items():
            eng.add_lora_agent(name, d)
    except (ConfigError, LoadError):
        raise
    except ValueError as e:
        raise SetupError(str(e)) from e
    return eng


def run_trajectory(eng, turns: Sequence[Turn], max_tokens: int, *, logprobs: bool = False,
                   progress: Progress = None, label: str = "") -> RunResult:
    """Drive `turns` through one new session of `eng`, greedily, and time each turn."""
    from . import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=logprobs)
    s = eng.new_session()
    pos = 0
    results: list[TurnResult] = []
    t_all = time.perf_counter()
    for i, turn in enumerate(turns):
        t0 = time.perf_counter()
        out = eng.generate(s, agent=turn.agent, prompt=turn.prompt, params=params)
        lat = time.perf_counter() - t0
        pos += len(turn.prompt)
        ttft = out.ttft_s if getattr(out, "ttft_s", None) is not None else lat
        lp = out.logprobs if logprobs else None
        if logprobs and (lp is None or tuple(lp.shape[:1]) != (len(out),)):
            raise RuntimeError(f"engine returned logprobs {None if lp is None else tuple(lp.shape)} "
                               f"for {len(out)} tokens")
        results.append(TurnResult(turn.agent, pos, list(out), lp, float(ttft), lat))
        pos += len(out)
        if progress is not None:
            progress(f"{label}turn {i + 1}/{len(turns)} {turn.agent:>8}: {len(turn.prompt)} in, "
                     f"{len(out)} out, TTFT {ttft * 1e3:.1f} ms, {lat * 1e3:.1f} ms")
    wall = time.perf_counter() - t_all
    tokens: list[int] = []
    for turn, r in zip(turns, results):
        tokens += turn.prompt + r.tokens
    return RunResult(getattr(eng, "cache_mode", ""), results, tokens, wall, eng.memory_report())


@dataclass(frozen=True)
class ModeFidelity:
    mode: str
    mean_kl: float
    max_kl: float
    greedy_agreement: float
    positions: int


def fidelity_of(run: RunResult, reference) -> ModeFidelity:
    """Compare `run` (made with logprobs=True) against `reference.score` (a non_shared Engine with
    the same agents) on run's own trajectory."""
    kls: list[torch.Tensor] = []
    agree = 0
    n = 0
    for t in run.turns:
        if not t.tokens:
            continue
        if t.logprobs is None:
            raise ValueError("run_trajectory(..., logprobs=True) is needed for fidelity")
        end = t.start + len(t.tokens)
        ref = reference.score(run.session_tokens[:end], agent=t.agent)[t.start - 1:end - 1].double()
        got = t.logprobs.to(ref.device).double()
        if ref.shape != got.shape:
            raise RuntimeError(f"score rows {tuple(ref.shape)} vs generate logprobs {tuple(got.shape)}")
        kls.append((ref.exp() * (ref - got)).sum(-1).clamp_min(0.0))
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        n += len(t.tokens)
    kl = torch.cat(kls) if kls else torch.zeros(0, dtype=torch.float64)
    return ModeFidelity(run.mode, float(kl.mean()) if n else float("nan"),
                        float(kl.max()) if n else float("nan"), agree / n if n else float("nan"), n)


def fidelity_report(model: str = "tiny", agents: dict[str, str | None] | None = None,
                    modes: Sequence[str] = MODES, *, steps: int = 6, prompt_len: int = 12,
                    max_tokens: int = 8, device: str | None = None, seed: int = 0,
                    esft: dict[str, str] | None = None, tmp_dir: str | None = None,
                    dtype: str | torch.dtype | None = "float32", progress: Progress = None) -> list[ModeFidelity]:
    """Fidelity of each mode in `modes` against non_shared over one multi-agent trajectory.

    agents: name -> PEFT dir (None: no adapter); when omitted, random plan/act/reflect adapters
    with a shared v_proj A are written to `tmp_dir` (a temporary directory if None)."""
    import tempfile

    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown cache modes {bad}; choose from {MODES}")
    with tempfile.TemporaryDirectory(prefix="vmweave-fidelity-") as tmp:
        if agents is None:
            agents = demo_adapters(model, tmp_dir or tmp, seed=seed)
        vocab = model_config(model).vocab_size
        turns = make_turns(list(agents) + list(esft or {}), steps, prompt_len, vocab, seed)
        reference = open_engine(model, "non_shared", device, agents, esft, dtype=dtype)
        out = []
        for mode in modes:
            try:
                eng = reference if mode == "non_shared" else open_engine(model, mode, device, agents, esft,
                                                                         dtype=dtype)
            except ValueError as e:  # e.g. base_lr_shared with agents whose v_proj A differ
                if progress is not None:
                    progress(f"[{mode}] skipped: {e}")
                continue
            run = run_trajectory(eng, turns, max_tokens, logprobs=True, progress=progress, label=f"[{mode}] ")
            run.mode = mode
            out.append(fidelity_of(run, reference))
            if progress is not None:
                f = out[-1]
                progress(f"[{mode}] mean KL {f.mean_kl:.3g}, greedy agreement {f.greedy_agreement:.3f}")
        return out


def format_fidelity(rows: Sequence[ModeFidelity]) -> str:
    lines = [f"{'mode':<16}{'mean KL':>12}{'max KL':>12}{'greedy agree':>14}{'positions':>11}"]
    for r in rows:
        lines.append(f"{r.mode:<16}{r.mean_kl:>12.4g}{r.max_kl:>12.4g}{r.greedy_agreement:>14.3f}{r.positions:>11d}")
    return "\n".join(lines)


# ---- end-to-end benchmark ---------------------------------------------------------------------

# Llama-3.1-8B's shape (random weights); `layers` trims the depth to fit a time budget.
LLAMA31_8B = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256,
                  hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                  max_position_embeddings=131072, rms_norm_eps=1e-5,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192},
                  tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
SMALL_LLAMA = dict(LLAMA31_8B, vocab_size=256, hidden_size=64, intermediate_size=128,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)


class _RandomWeights:
    """A checkpoint reader (engine.loader.map_weights' protocol) that makes seeded random weights
    straight on the device, so an 8B-shaped model needs no file and no host copy."""

    def __init__(self, device, dtype, seed: int):
        self.device, self.dtype = torch.device(device), dtype
        self.gen = torch.Generator(device=self.device).manual_seed(seed)

    def has(self, name: str) -> bool:
        return "block_sparse_moe" not in name and not name.endswith(("gate_up_proj", "experts.down_proj"))

    def get(self, name: str, shape: tuple | None = None) -> torch.Tensor:
        if shape is None:
            raise ValueError(f"random weights need a shape for {name!r}")
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=self.gen, device=self.device)
        elif name.endswith(".bias"):
            t = 0.1 * torch.randn(shape, generator=self.gen, device=self.device)
        else:
            t = torch.randn(shape, generator=self.gen, device=self.device) / shape[-1] ** 0.5
        return t.to(self.dtype)


def random_model(config: dict, device, dtype, seed: int = 0):
    """A DecoderModel of HF-style `config` with seeded random weights made on `device`."""
    from .config import config_from_dict
    from .loader import map_weights
    from .model import DecoderModel

    cfg = config_from_dict(dict(config), where="random model")
    return DecoderModel(cfg, map_weights(_RandomWeights(device, dtype, seed), cfg), torch.device(device), dtype)


@dataclass
class E2ERow:
    length: int  # the trajectory length asked for
    tokens: int  # the trajectory length reached (context turns + the measured round)
    mode: str
    sessions: int
    decode_tok_s: float  # all sessions together, decode-only steps (see RoundTiming)
    tpot_ms: float  # wall time of one decode-only step
    ttft_ms: float  # a new turn at full context (non_shared: the agent first catches up)
    kv_bytes: int
    wall_s: float
    preemptions: int = 0  # over the measured pass: running requests whose cache was freed
    recomputed_tokens: int = 0  # tokens computed again (preemption or cache invalidation)
    torch_chunks: int = 0  # chunks the attention backend sent to its torch fallback
    tpot_median_ms: float = float("nan")  # the median decode-only step (tpot_ms is the mean)
    tpot_max_ms: float = float("nan")
    # KV bytes once every agent has caught up with the whole trajectory (after one more 1-token
    # turn each, untimed): at the end of the measured round a non_shared agent that spoke before
    # the others has not yet re-run their turns, so `kv_bytes` credits it with less than it
    # needs to speak again (0: not measured)
    kv_bytes_all_agents: int = 0


@dataclass
class RoundTiming:
    """One lockstep round (one turn on every session at once), timed step by step.

    Decode throughput and TPOT come from *decode-only* steps, where every chunk is one token: a
    step that also carries another request's prefill or catch-up (non_shared agents re-running
    what others added) measures prefill, not decode, and is left out."""
    outputs: list  # GenerationOutput per session
    decode_s: float  # wall time of the decode-only steps
    decode_tokens: int  # tokens they generated, all sessions together
    decode_steps: int
    shapes: list[tuple]  # per step, the (start, end) of every chunk computed: what kernels ran on
    step_s: list[float] = field(default_factory=list)  # wall time of each decode-only step

    @property
    def median_step_s(self) -> float:
        """The typical decode step: unmoved by a rare slow one (a garbage collection, a first
        launch of some shape), which the mean `tpot_s` includes."""
        return statistics.median(self.step_s) if self.step_s else float("nan")

    @property
    def max_step_s(self) -> float:
        return max(self.step_s) if self.step_s else float("nan")

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def tpot_s(self) -> float:
        """Time per output token of a request decoding in the lockstep batch (one decode step)."""
        return self.decode_s / self.decode_steps if self.decode_steps else float("nan")

    @classmethod
    def merged(cls, rounds: Sequence[RoundTiming]) -> RoundTiming:
        """Several rounds as one: outputs, decode time, tokens, steps and shapes together."""
        return cls([o for r in rounds for o in r.outputs], sum(r.decode_s for r in rounds),
                   sum(r.decode_tokens for r in rounds), sum(r.decode_steps for r in rounds),
                   [sh for r in rounds for sh in r.shapes], [t for r in rounds for t in r.step_s])


def _timed_round(eng, sessions, agent, prompts: list[list[int]], max_tokens: int) -> RoundTiming:
    """One turn on every session at once (one batch); `agent` is one name for all or a list with
    one per session."""
    from . import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    names = agent if isinstance(agent, list) else [agent] * len(sessions)
    rids = [eng.add_request(s, a, p, params) for s, a, p in zip(sessions, names, prompts)]
    decode_s, decode_tokens, decode_steps, shapes, step_s = 0.0, 0, 0, [], []
    overlapped = eng.async_steps
    after_decode = False
    while eng.has_unfinished():
        t0 = time.perf_counter()
        # returns after sampling, which reads the logits: the device work is done; with
        # overlapped steps it returns once the previous step's draws are back and this one runs
        eng.step()
        dt = time.perf_counter() - t0
        info = eng.last_step
        shapes.append(tuple((a, b) for _, a, b in info.chunks))
        if info.decode_only:
            # overlapped: the first decode step waits for the prefill before it, not counted
            if after_decode or not overlapped:
                decode_s, decode_tokens, decode_steps = decode_s + dt, decode_tokens + info.sampled, decode_steps + 1
                step_s.append(dt)
            after_decode = True
            continue
        if overlapped and after_decode and not info.chunks:
            decode_s += dt  # the wait for the last decode step's draws
        after_decode = False
    return RoundTiming([eng.get_output(r) for r in rids], decode_s, decode_tokens, decode_steps, shapes, step_s)


def _fresh_round(eng, agents: list, prompts: list[list[int]], max_tokens: int) -> RoundTiming:
    """`_timed_round` on new sessions, closed afterwards (their blocks freed, so a later round
    with the same prompts shares nothing with this one)."""
    ss = [eng.new_session() for _ in prompts]
    try:
        return _timed_round(eng, ss, agents, prompts, max_tokens)
    finally:
        for s in ss:
            eng.close_session(s)


def _after_warmup(run: Callable[[], T]) -> T:
    """`run()` once untimed, then again for the numbers: the first pays Triton compiles (each new
    specialisation of a kernel's integer arguments, e.g. the split-KV count that grows with the
    context), CUDA graph capture and allocator growth for exactly the shapes the second runs."""
    run()
    return run()


@dataclass
class _E2EPass:
    probe: list[RoundTiming]  # the measured round, one per agent
    tokens: int
    kv_bytes: int
    stats: dict
    wall_s: float
    kv_bytes_all_agents: int = 0


def _e2e_pass(model, mode: str, dirs: dict[str, str], context: list, probe: list, decode_tokens: int,
              max_batched_tokens: int, cuda_graphs: bool | None = None, async_steps: bool | None = None) -> _E2EPass:
    """One engine in `mode`: the context turns, then the probe round; the engine is freed before
    returning (its page pool goes back before the next pass maps its own)."""
    from . import Engine

    t0 = time.perf_counter()
    eng = Engine(model, mode, None, max_batched_tokens=max_batched_tokens, cuda_graphs=cuda_graphs,
                 async_steps=async_steps)
    for a, d in dirs.items():
        eng.add_lora_agent(a, d)
    ss = [eng.new_session() for _ in context[0]]
    for a, prompts in zip(dirs, context):
        _timed_round(eng, ss, a, prompts, decode_tokens)
    timed = [_timed_round(eng, ss, a, prompts, decode_tokens) for a, prompts in zip(dirs, probe)]
    out = _E2EPass(timed, len(ss[0]), kv_bytes(eng.memory_report()), eng.stats(), time.perf_counter() - t0)
    for a in dirs:  # every agent caught up with the whole trajectory (see E2ERow)
        _timed_round(eng, ss, a, [p[:1] for p in probe[0]], 1)
    out.kv_bytes_all_agents = kv_bytes(eng.memory_report())
    for s in ss:
        eng.close_session(s)
    del eng
    gc.collect()
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _e2e_row(length: int, mode: str, sessions: int, run: _E2EPass) -> E2ERow:
    probe = RoundTiming.merged(run.probe)
    ttft = [o.ttft_s for o in probe.outputs]
    return E2ERow(length, run.tokens, mode, sessions, probe.decode_tok_s, 1e3 * probe.tpot_s,
                  1e3 * sum(ttft) / len(ttft), run.kv_bytes, run.wall_s,
                  run.stats["preemptions"], run.stats["recomputed_tokens"], run.stats["torch_chunks"],
                  1e3 * probe.median_step_s, 1e3 * probe.max_step_s, run.kv_bytes_all_agents)


def e2e_bench(lengths: Sequence[int] = (1024, 4096, 16384), *, layers: int = 4, decode_tokens: int = 16,
              sessions: int = 4, modes: Sequence[str] = MODES, device: str | None = None,
              small: bool = False, seed: int = 0, progress: Progress = None,
              max_batched_tokens: int = 2048, warmup: bool = True, cuda_graphs: bool | None = None,
              repeats: int = 1, async_steps: bool | None = None) -> list[E2ERow]:
    """LRAgent's end-to-end case: plan / act / reflect (r=8 LoRA on q and v, one shared v_proj A)
    take turns on `sessions` trajectories at once, built up to each length, in every cache mode.

    Per (length, mode): three context turns (each agent adds about a third of the length), then a
    measured round where each agent gets a 32-token prompt and decodes `decode_tokens`: TTFT of
    that round (at full context; in non_shared the agent first re-runs what the others added),
    decode throughput of all sessions together over decode-only steps, and the KV bytes held at
    the end. With `warmup`, every (length, mode) first runs the identical pass untimed on its own
    engine, so no measured step pays a compile the same shapes need (without it, the first mode
    of each kernel family to reach a length paid them inside its TPOT). `cuda_graphs`: decode
    steps replayed from CUDA graphs or run eagerly (None: the Engine's default, on a GPU unless
    VMWEAVE_CUDA_GRAPHS=0). Each pass is
    a new engine, so its graphs are captured inside the measured round (on a decode key's second
    step): the mean TPOT includes captures, the median step does not. `async_steps`: the
    Engine's overlapped steps (None: its default, on on a GPU); overlapped, the first decode step
    of a round (which waits for the prefill before it) is not timed, and the wait for the last
    step's draws is.

    `repeats` > 1: each length's measured passes run that many times, the modes interleaved (in
    reverse order every other time, so that a drift of the machine's speed over the run weighs on
    every mode alike), and each mode's row is its pass of median decode throughput. On an H200
    three passes of one mode spread 1446-1912 tok/s (4K), more than the gap between modes.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    import tempfile

    from .builtin import save_random_lora
    from .config import config_from_dict

    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    hf = dict(SMALL_LLAMA if small else LLAMA31_8B, num_hidden_layers=layers)
    cfg = config_from_dict(dict(hf))
    model = random_model(hf, dev, dtype, seed)
    agents = ("plan", "act", "reflect")
    rows: list[E2ERow] = []
    say = progress or (lambda m: None)
    with tempfile.TemporaryDirectory(prefix="vmweave-e2e-") as tmp:
        dirs = {a: save_random_lora(os.path.join(tmp, a), cfg, r=8, targets=("q_proj", "v_proj"),
                                    seed=seed * 7 + i, a_seed=seed + 999, gain=0.2)
                for i, a in enumerate(agents)}
        g = torch.Generator().manual_seed(seed)

        def toks(n):
            return [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for _ in range(sessions)]

        for length in lengths:
            per_turn = max(1, length // 3 - decode_tokens)
            context = [toks(per_turn) for _ in agents]
            probe = [toks(32) for _ in agents]
            def one_pass(mode):
                return _e2e_pass(model, mode, dirs, context, probe, decode_tokens, max_batched_tokens,
                                 cuda_graphs, async_steps)

            if warmup:  # untimed: see _after_warmup
                for mode in modes:
                    one_pass(mode)
            passes: dict[str, list[E2ERow]] = {m: [] for m in modes}
            for rep in range(repeats):
                for mode in (modes if rep % 2 == 0 else modes[::-1]):
                    row = _e2e_row(length, mode, sessions, one_pass(mode))
                    passes[mode].append(row)
                    say(f"[L={length} {mode}{f' pass {rep + 1}/{repeats}' if repeats > 1 else ''}] "
                        f"{row.decode_tok_s:.1f} tok/s, TPOT {row.tpot_ms:.2f} ms "
                        f"(median {row.tpot_median_ms:.2f}, max {row.tpot_max_ms:.2f}), "
                        f"TTFT {row.ttft_ms:.1f} ms, KV {row.kv_bytes / 2**20:.1f} MiB, "
                        f"{row.preemptions} preemptions, {row.recomputed_tokens} recomputed, "
                        f"{row.torch_chunks} torch-path chunks ({row.wall_s:.1f} s)")
            for mode in modes:
                ranked = sorted(passes[mode], key=lambda r: r.decode_tok_s)
                rows.append(ranked[(len(ranked) - 1) // 2])
    return rows


def format_e2e(rows: Sequence[E2ERow]) -> str:
    lines = [f"{'length':>7}{'tokens':>7} {'mode':<16}{'decode tok/s':>13}{'vs full':>9}{'TPOT ms':>9}{'TTFT ms':>10}"
             f"{'KV MiB':>10}{'vs non_sh':>10}{'all caught up':>14}"]
    by = {(r.length, r.mode): r for r in rows}
    for r in rows:
        full, ns = by.get((r.length, "full_shared")), by.get((r.length, "non_shared"))
        vf = f"{r.decode_tok_s / full.decode_tok_s:.3f}x" if full else "-"
        vn = f"{r.kv_bytes / ns.kv_bytes:.3f}x" if ns and ns.kv_bytes else "-"
        va = (f"{r.kv_bytes_all_agents / ns.kv_bytes_all_agents:.3f}x"
              if ns and ns.kv_bytes_all_agents and r.kv_bytes_all_agents else "-")
        lines.append(f"{r.length:>7}{r.tokens:>7} {r.mode:<16}{r.decode_tok_s:>13.1f}{vf:>9}{r.tpot_ms:>9.2f}{r.ttft_ms:>10.1f}"
                     f"{r.kv_bytes / 2**20:>10.2f}{vn:>10}{va:>14}")
    return "\n".join(lines)


# ---- ESFT adapters on an MoE model ------------------------------------------------------------

# DeepSeek-V2-Lite's expert shape (H 2048, I 1408, 64 routed experts top-6, two shared experts'
# width) in Qwen2-MoE form, random weights; depth and vocabulary trimmed for the time budget.
MOE_LITE = dict(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], vocab_size=32000,
                hidden_size=2048, intermediate_size=10944, num_hidden_layers=4, num_attention_heads=16,
                num_key_value_heads=16, head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_theta=10000.0, num_experts=64, num_experts_per_tok=6, moe_intermediate_size=1408,
                shared_expert_intermediate_size=2816, norm_topk_prob=False, decoder_sparse_step=1,
                mlp_only_layers=[], tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
SMALL_MOE = dict(MOE_LITE, vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                 moe_intermediate_size=32, shared_expert_intermediate_size=64)


@dataclass
class EsftRow:
    adapters: int  # ESFT adapters loaded (0: the base alone)
    sessions: int
    decode_tok_s: float  # all sessions together, decode-only steps of the warm round
    tpot_ms: float  # wall time of one decode-only step
    free_bytes: int  # device memory left (for KV) with these adapters loaded
    merged_free_bytes: int  # what would be left with a full merged model copy per adapter
    adapter_bytes: int  # bytes the expert store mapped for adapters
    merged_bytes: int  # bytes of one full merged model copy per adapter
    note: str = ""
    tpot_median_ms: float = float("nan")  # the median decode-only step (tpot_ms is the mean)
    tpot_max_ms: float = float("nan")
    # one merged model copy per adapter, the copies served one at a time, each decoding its own
    # adapter's sessions: all sessions' decode tokens over the copies' summed decode time
    merged_decode_tok_s: float = float("nan")


def _merged_copy_sizes(sessions: int, n: int) -> list[int]:
    """Sessions per merged copy when `sessions` are spread round-robin over `n` adapters (copies
    with no session left out)."""
    return [k for k in (len(range(i, sessions, n)) for i in range(n)) if k]


def _free_device_bytes(dev: torch.device) -> int:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        return int(torch.cuda.mem_get_info(dev)[0])
    return 0


def _write_random_esft(path: str, model, experts_per_layer: int, seed: int, scale: float = 0.1) -> str:
    """An ESFT adapter directory of `experts_per_layer` perturbed experts per MoE layer, the
    perturbation drawn on the model's device (host randn of GBs would dominate the benchmark)."""
    from experts import save_esft_adapter

    c = model.config
    g = torch.Generator(device=model.device).manual_seed(seed)
    pick = torch.Generator().manual_seed(seed)
    out = {}
    for li in range(c.num_layers):
        if not c.is_moe_layer(li):
            continue
        w = model.layers[li]
        ids = sorted(torch.randperm(c.num_experts, generator=pick)[:experts_per_layer].tolist())
        per = {}
        for e in ids:
            pair = []
            for t in (w["w13"][e], w["w2"][e]):
                noise = torch.randn(t.shape, generator=g, device=t.device, dtype=torch.float32)
                pair.append((t.float() + scale * t.float().std() * noise).to(t.dtype))
            per[e] = (pair[0], pair[1])
        out[li] = per
    return str(save_esft_adapter(path, out))


def esft_bench(counts: Sequence[int] = (1, 5, 20), *, experts_per_layer: int = 2, sessions: int = 16,
               prompt_len: int = 128, decode_tokens: int = 32, device: str | None = None,
               small: bool = False, seed: int = 0, progress: Progress = None,
               cuda_graphs: bool | None = None, async_steps: bool | None = None) -> list[EsftRow]:
    """ExpertWeave's end-to-end case: `sessions` requests decode together, spread round-robin
    over the loaded ESFT adapters (all on the base for the 0-adapter row), on one engine that
    loads more adapters between rows. Each row is timed on its second identical round (fresh
    sessions, same prompts), after an untimed one: every row, the base alone included, is measured
    warm. Memory left for KV is read from the driver before either round; the merged-model
    baseline (one full copy of the model per adapter) is computed from the model's weight bytes;
    its throughput from the base model's rounds at each copy's share of the sessions (a merged
    copy costs what the base costs at the same batch), the copies served one at a time.
    `cuda_graphs`: decode steps from CUDA graphs (captured in the untimed round) or eager (None:
    the Engine's default, as in `e2e_bench`)."""
    import shutil
    import tempfile

    from . import Engine

    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    hf = dict(SMALL_MOE if small else MOE_LITE)
    model = random_model(hf, dev, dtype, seed)
    c = model.config
    if small:  # 8 experts: the store's adapter slots (4 x experts) must hold max(counts) adapters
        experts_per_layer = 1
    weight_bytes = _weight_bytes(model)
    note = (f"{'small MoE' if small else 'DeepSeek-V2-Lite experts (H 2048, I 1408, 64 top-6)'}, "
            f"{c.num_layers} layers, random {str(dtype).split('.')[-1]}; {experts_per_layer} experts/layer "
            f"per adapter; {sessions} sessions")
    say = progress or (lambda m: None)
    eng = Engine(model, "non_shared", 1 << 30 if dev.type == "cuda" else None, max_batched_tokens=4096,
                 cuda_graphs=cuda_graphs, async_steps=async_steps)
    g = torch.Generator().manual_seed(seed)
    rows: list[EsftRow] = []
    loaded: list[str] = []
    with tempfile.TemporaryDirectory(prefix="vmweave-esft-") as tmp:
        # row 0 is the plain MoE model: no expert store, no reroute
        for n in [0, *counts]:
            while len(loaded) < n:
                name = f"esft{len(loaded)}"
                d = _write_random_esft(os.path.join(tmp, name), model, experts_per_layer, seed + len(loaded))
                eng.add_esft_adapter(name, d)
                shutil.rmtree(d)  # loaded into the store; keep the disk footprint at one adapter
                loaded.append(name)
            free = _free_device_bytes(dev)
            names = [loaded[i % n] if n else None for i in range(sessions)]
            prompts = [torch.randint(0, c.vocab_size, (prompt_len,), generator=g).tolist() for _ in names]
            timing = _after_warmup(lambda: _fresh_round(eng, names, prompts, decode_tokens))
            if n == 0:
                # The merged-copies baseline: a merged copy costs what the base model costs at the
                # same batch, so each copy's round is the base model's round at its session count
                # (measured here, before any adapter exists, warm like every row).
                per_size = {k: _after_warmup(lambda k=k: _fresh_round(eng, [None] * k, prompts[:k], decode_tokens))
                            for k in sorted({k for m in counts for k in _merged_copy_sizes(sessions, m)})}
            rep = eng.memory_report().get("experts", {})
            # pages the store mapped beyond the base experts (exact bytes + shared boundary pages)
            adapter_bytes = int(rep.get("mapped_bytes", 0)) - int(rep.get("base_bytes", 0)) if rep else 0
            free0 = rows[0].free_bytes if rows else free
            copies = [per_size[k] for k in _merged_copy_sizes(sessions, n)] if n else []
            merged_tok_s = RoundTiming.merged(copies).decode_tok_s if copies else float("nan")
            rows.append(EsftRow(n, sessions, timing.decode_tok_s, timing.tpot_s * 1e3, free,
                                free0 - n * weight_bytes if dev.type == "cuda" else 0, adapter_bytes,
                                n * weight_bytes, note, 1e3 * timing.median_step_s, 1e3 * timing.max_step_s,
                                merged_tok_s))
            say(f"[{n} ESFT adapters] {rows[-1].decode_tok_s:.1f} tok/s, TPOT {rows[-1].tpot_ms:.2f} ms "
                f"(median {rows[-1].tpot_median_ms:.2f}, max {rows[-1].tpot_max_ms:.2f}), "
                f"free {free / 2**30:.2f} GiB"
                + (f"; merged copies one at a time {merged_tok_s:.1f} tok/s" if n else ""))
    return rows


def _weight_bytes(model) -> int:
    seen: dict[int, int] = {}
    stack = [model.embed, model.norm, model.lm_head, model.layers]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            seen[x.data_ptr()] = x.numel() * x.element_size()
        elif isinstance(x, dict):
            stack += list(x.values())
        elif isinstance(x, (list, tuple)):
            stack += list(x)
    return sum(seen.values())


def format_esft(rows: Sequence[EsftRow]) -> str:
    base = next((r for r in rows if r.adapters == 0), None)
    lines = [f"{'adapters':>8}{'decode tok/s':>14}{'vs base':>9}{'TPOT ms':>9}{'adapter MiB':>12}"
             f"{'free GiB':>10}{'merged GiB':>12}{'merged tok/s':>14}"]
    for r in rows:
        rel = f"{r.decode_tok_s / base.decode_tok_s:.3f}x" if base else "-"
        merged = "-" if math.isnan(r.merged_decode_tok_s) else f"{r.merged_decode_tok_s:.1f}"
        lines.append(f"{r.adapters:>8}{r.decode_tok_s:>14.1f}{rel:>9}{r.tpot_ms:>9.2f}{r.adapter_bytes / 2**20:>12.1f}"
                     f"{r.free_bytes / 2**30:>10.2f}{r.merged_free_bytes / 2**30:>12.2f}{merged:>14}")
    return "\n".join(lines)

"""`vmweave` command line: demo, fidelity, bench.

    vmweave demo        plan / act / reflect agents take turns on one trajectory, once per cache
                        mode; prints tokens/s, TTFT and KV bytes side by side
    vmweave fidelity    each shared cache mode against non_shared: mean KL and greedy agreement
    vmweave bench       the end-to-end benchmark table (bench/bench_engine.py's cases; GPU-sized)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Sequence

from .fidelity import MODES


def _pairs(items: Sequence[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or ():
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"vmweave: {flag} expects NAME=DIR, got {item!r}")
        if name in out:
            raise SystemExit(f"vmweave: {flag} name {name!r} given twice")
        out[name] = path
    return out


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise SystemExit(f"vmweave: --modes takes a comma list of {', '.join(MODES)}; got {text!r}")
    return modes


def _common(p: argparse.ArgumentParser, steps: int, max_tokens: int) -> None:
    p.add_argument("--model", default="tiny",
                   help="built-in model name (tiny, tiny-moe) or a Hugging Face checkpoint directory")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                   help="an agent and its PEFT LoRA directory (repeat); default: random plan/act/reflect "
                        "adapters sharing one v_proj A")
    p.add_argument("--agent", action="append", default=[], metavar="NAME",
                   help="an agent without an adapter (repeat)")
    p.add_argument("--esft", action="append", default=[], metavar="NAME=DIR",
                   help="an ESFT expert adapter directory to load (MoE models; repeat)")
    p.add_argument("--modes", default=",".join(MODES), type=_modes,
                   help=f"comma list of cache modes (default: all of {','.join(MODES)})")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if usable)")
    p.add_argument("--steps", type=int, default=steps, help="agent turns in the trajectory")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens each turn generates")
    p.add_argument("--prompt-len", type=int, default=16, help="tokens given to each turn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-kv-bytes", type=int, default=None, help="KV cache budget in bytes")
    p.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights and caches (default: demo auto = bfloat16 on CUDA, float32 on CPU; "
                        "fidelity float32)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmweave", description="Many LoRA / ESFT agents on one base model.")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="plan / act / reflect agents on one trajectory, per cache mode")
    _common(d, steps=6, max_tokens=16)
    d.add_argument("--quiet", action="store_true", help="no per-turn progress lines")
    graphs = d.add_mutually_exclusive_group()
    graphs.add_argument("--cuda-graphs", action="store_true",
                        help="replay decode steps from CUDA graphs (the default on a GPU)")
    graphs.add_argument("--eager", action="store_true",
                        help="decode eagerly, without CUDA graphs (also VMWEAVE_CUDA_GRAPHS=0)")
    d.add_argument("--sync-steps", action="store_true",
                   help="wait for each step's tokens instead of overlapping the next step's host work "
                        "with it (the default on a GPU; also VMWEAVE_ASYNC_STEPS=0)")
    f = sub.add_parser("fidelity", help="each shared cache mode vs non_shared (KL, greedy agreement)")
    _common(f, steps=6, max_tokens=8)
    f.add_argument("--quiet", action="store_true", help="no per-turn progress lines")
    b = sub.add_parser("bench", help="end-to-end benchmark: cache modes over long trajectories")
    b.add_argument("--device", default=None)
    b.add_argument("--lengths", default="1024,4096,16384", help="comma list of trajectory lengths")
    b.add_argument("--layers", type=int, default=4, help="layers of the Llama-3.1-8B-shaped model")
    b.add_argument("--decode-tokens", type=int, default=16, help="tokens each agent decodes per turn")
    b.add_argument("--sessions", type=int, default=4, help="trajectories decoded together")
    b.add_argument("--repeats", type=int, default=1,
                   help="measured passes per (length, mode), modes interleaved; the median is shown")
    b.add_argument("--modes", default=",".join(MODES), type=_modes, help="comma list of cache modes")
    b.add_argument("--esft-counts", default="1,5,20",
                   help="ESFT adapter counts for the MoE table (empty: skip it)")
    b.add_argument("--only", choices=("modes", "esft"), default=None, help="run one of the two tables")
    b.add_argument("--small", action="store_true", help="tiny models instead (CPU smoke run)")
    b.add_argument("--eager", action="store_true",
                   help="decode eagerly, without CUDA graphs (graphs are the default on a GPU; "
                        "also VMWEAVE_CUDA_GRAPHS=0)")
    b.add_argument("--sync-steps", action="store_true",
                   help="synchronous steps, not overlapped ones (overlapped is the default on a GPU)")
    return p


def _validate(args) -> None:
    for flag in ("steps", "max_tokens", "prompt_len"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"vmweave: --{flag.replace('_', '-')} must be >= 1")


def _agents(args, tmp: str, say) -> dict[str, str | None]:
    from .fidelity import demo_adapters

    agents: dict[str, str | None] = dict(_pairs(args.lora, "--lora"))
    for name in args.agent:
        if name in agents:
            raise SystemExit(f"vmweave: agent {name!r} given twice")
        agents[name] = None
    if not agents:
        agents = dict(demo_adapters(args.model, tmp, seed=args.seed))
        say(f"random PEFT LoRA adapters (r=8 on q_proj/v_proj, one shared v_proj A) for "
            f"{', '.join(agents)} in {tmp}")
    return agents


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_demo(args, say) -> int:
    from .fidelity import make_turns, model_config, open_engine, run_trajectory

    _validate(args)
    esft = _pairs(args.esft, "--esft")
    with tempfile.TemporaryDirectory(prefix="vmweave-demo-") as tmp:
        agents = _agents(args, tmp, say)
        vocab = model_config(args.model).vocab_size
        # an ESFT adapter is an agent too: its turns route tokens to its experts
        turns = make_turns(list(agents) + list(esft), args.steps, args.prompt_len, vocab, args.seed)
        say(f"model {args.model}, agents {', '.join(agents)}"
            + (f", ESFT adapters {', '.join(esft)}" if esft else "")
            + f"; {args.steps} turns x ({args.prompt_len} prompt + {args.max_tokens} generated) tokens")
        # One untimed turn first so one-time costs (kernel compilation, allocator start-up) are
        # not charged to whichever mode happens to run first.
        graphs = True if args.cuda_graphs else False if args.eager else None
        overlap = False if args.sync_steps else None
        warm = open_engine(args.model, "non_shared", args.device, agents, esft, args.max_kv_bytes, args.dtype,
                           cuda_graphs=graphs, async_steps=overlap)
        run_trajectory(warm, turns[:1], min(2, args.max_tokens))
        del warm
        runs = []
        for mode in args.modes:
            try:
                eng = open_engine(args.model, mode, args.device, agents, esft, args.max_kv_bytes, args.dtype,
                                  cuda_graphs=graphs, async_steps=overlap)
            except ValueError as e:  # e.g. base_lr_shared with agents whose v_proj A differ
                say(f"[{mode}] skipped: {e}")
                continue
            say(f"[{mode}] running on {eng.device}, {str(eng.model.dtype).replace('torch.', '')}")
            run = run_trajectory(eng, turns, args.max_tokens, progress=None if args.quiet else say,
                                 label=f"[{mode}] ")
            run.mode = mode
            runs.append(run)
            del eng
    ref = next((r for r in runs if r.mode == "non_shared"), None)
    say("")
    say(f"{'mode':<16}{'tokens/s':>10}{'decode tok/s':>14}{'TTFT ms':>10}{'KV bytes':>12}"
        f"{'KV vs non_shared':>18}{'same tokens':>13}")
    for r in runs:
        rel = f"{r.kv_bytes / ref.kv_bytes:.3f}x" if ref and ref.kv_bytes else "-"
        same = "-"
        if ref is not None:
            a = [t for x in r.turns for t in x.tokens]
            b = [t for x in ref.turns for t in x.tokens]
            same = f"{sum(int(x == y) for x, y in zip(a, b)) / max(1, len(b)):.3f}"
        say(f"{r.mode:<16}{r.tokens_per_s:>10.1f}{r.decode_tokens_per_s:>14.1f}{r.mean_ttft_s * 1e3:>10.2f}"
            f"{_fmt_bytes(r.kv_bytes):>12}{rel:>18}{same:>13}")
    say("tokens/s: generated tokens over the turns' wall time; decode tok/s: after each turn's first "
        "token; TTFT: mean per turn; same tokens: generated tokens equal to non_shared's.")
    for r in runs:
        if r.memory.get("note"):
            say(f"[{r.mode}] {r.memory['note']}")
    return 0


def cmd_fidelity(args, say) -> int:
    from .fidelity import fidelity_report, format_fidelity

    _validate(args)
    esft = _pairs(args.esft, "--esft")
    modes = list(args.modes)
    if "non_shared" not in modes:
        modes = ["non_shared"] + modes  # the reference, and a check that decode == score
    with tempfile.TemporaryDirectory(prefix="vmweave-fidelity-") as tmp:
        agents = _agents(args, tmp, say)
        rows = fidelity_report(args.model, agents, modes, steps=args.steps, prompt_len=args.prompt_len,
                               max_tokens=args.max_tokens, device=args.device, seed=args.seed, esft=esft,
                               dtype=args.dtype or "float32", progress=None if args.quiet else say)
    say("")
    say("KL(non_shared || mode) of next-token distributions on each mode's own trajectory;")
    say("greedy agreement = same argmax as non_shared for the same context.")
    say(format_fidelity(rows))
    return 0


def cmd_bench(args, say) -> int:
    from .engine import resolve_device
    from .fidelity import SetupError, e2e_bench, esft_bench, format_e2e, format_esft

    try:  # the bench builds its engines itself: refuse a device that is not there up front
        resolve_device(args.device)
    except ValueError as e:
        raise SetupError(str(e)) from e

    def ints(text: str, flag: str) -> list[int]:
        try:
            return [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise SystemExit(f"vmweave: {flag} takes a comma list of ints, got {text!r}") from None

    lengths = ints(args.lengths, "--lengths")
    counts = ints(args.esft_counts, "--esft-counts")
    if any(n < 1 for n in counts):
        raise SystemExit("vmweave: --esft-counts must be >= 1")
    if not lengths or min(lengths) < 8 or args.layers < 1 or args.decode_tokens < 2 or args.sessions < 1 \
            or args.repeats < 1:
        raise SystemExit("vmweave: need --lengths >= 8, --layers >= 1, --decode-tokens >= 2, --sessions >= 1, "
                         "--repeats >= 1")
    if args.only != "esft":
        say(f"end-to-end: {'small' if args.small else 'Llama-3.1-8B-shaped'} model, {args.layers} layers, "
            f"random weights; plan/act/reflect r=8 LoRA on q,v with a shared A; {args.sessions} sessions")
        rows = e2e_bench(lengths=lengths, layers=args.layers, decode_tokens=args.decode_tokens,
                         sessions=args.sessions, modes=args.modes, device=args.device, small=args.small,
                         progress=say, cuda_graphs=False if args.eager else None, repeats=args.repeats,
                         async_steps=False if args.sync_steps else None)
        say("")
        say(format_e2e(rows))
    if args.only != "modes" and counts:
        say("")
        say(f"ESFT adapters on an MoE model ({'small' if args.small else 'DeepSeek-V2-Lite expert shape'}), "
            f"{args.sessions * 4} sessions spread over the adapters")
        erows = esft_bench(counts, sessions=args.sessions * 4, device=args.device, small=args.small,
                           decode_tokens=max(args.decode_tokens, 2), prompt_len=16 if args.small else 128,
                           progress=say, cuda_graphs=False if args.eager else None,
                           async_steps=False if args.sync_steps else None)
        say("")
        say(format_esft(erows))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from .config import ConfigError
    from .fidelity import SetupError
    from .loader import LoadError
    from .scheduler import CacheCapacityError

    args = build_parser().parse_args(argv)

    def say(msg: str) -> None:
        print(msg, flush=True)

    try:
        return {"demo": cmd_demo, "fidelity": cmd_fidelity, "bench": cmd_bench}[args.cmd](args, say)
    # what the user asked for, refused: a bad model or adapter directory, a device, adapter or
    # cache mode the engine would not be built with, a KV budget too small for the trajectory
    except (ConfigError, LoadError, FileNotFoundError, SetupError, CacheCapacityError) as e:
        print(f"vmweave {args.cmd}: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

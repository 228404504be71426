"""`vmweave demo / fidelity / bench` run end to end on CPU and print what they promise."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import main
from engine.fidelity import MODES, demo_adapters, fidelity_report

REPO = Path(__file__).resolve().parents[2]
SMALL_ANY_DEVICE = ["--steps", "3", "--max-tokens", "3", "--prompt-len", "5"]
SMALL = [*SMALL_ANY_DEVICE, "--device", "cpu"]


def _table(out: str, first_col: str) -> dict[str, list[str]]:
    """Rows of the final table (after the header line starting with `first_col`), by mode."""
    lines = out.splitlines()
    start = max(i for i, l in enumerate(lines) if l.split() and l.split()[0] == first_col)
    rows = {}
    for line in lines[start + 1:]:
        parts = line.split()
        if parts and parts[0] in MODES:
            rows[parts[0]] = parts[1:]
    return rows


def _num(cell: str) -> float:
    return float(cell.rstrip("x"))


def test_demo_all_modes_side_by_side(capsys):
    assert main(["demo", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "random PEFT LoRA adapters" in out and "plan, act, reflect" in out
    for mode in MODES:  # progress: every turn of every mode
        for i, agent in enumerate(["plan", "act", "reflect"]):
            assert re.search(rf"\[{mode}\] turn {i + 1}/3 +{agent}: 5 in, 3 out, TTFT [0-9.]+ ms", out), (mode, agent)
    header = next(l for l in out.splitlines() if l.split()[:1] == ["mode"])
    for col in ("tokens/s", "TTFT ms", "KV bytes", "KV vs non_shared"):
        assert col in header
    rows = _table(out, "mode")
    assert list(rows) == list(MODES)
    for mode, cells in rows.items():
        assert _num(cells[0]) > 0 and _num(cells[2]) > 0, (mode, cells)  # tokens/s, TTFT
    # KV bytes relative to non_shared (3 agents): shared modes hold less
    kv = {m: _num(rows[m][5]) for m in MODES}
    assert kv["non_shared"] == 1.0
    assert kv["full_shared"] < kv["base_lr_shared"] <= kv["base_shared"] < 1.0
    assert rows["non_shared"][6] == "1.000"  # same tokens as itself


def test_demo_modes_flag_and_own_adapters(tmp_path, capsys):
    # agents whose v_proj A differ: base_lr_shared cannot apply and is skipped with the reason
    from engine.builtin import builtin_config, save_random_lora

    cfg = builtin_config("tiny")
    a = save_random_lora(str(tmp_path / "a"), cfg, r=4, targets=("q_proj", "v_proj", "k_proj"), seed=1)
    b = save_random_lora(str(tmp_path / "b"), cfg, r=4, targets=("v_proj",), seed=2)
    argv = ["demo", *SMALL, "--lora", f"writer={a}", "--lora", f"checker={b}", "--agent", "plain",
            "--modes", "non_shared,base_lr_shared,base_shared"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "random PEFT" not in out
    assert "[base_lr_shared] skipped:" in out and "use 'base_shared'" in out
    assert re.search(r"\[base_shared\] turn 3/3 +plain:", out)
    rows = _table(out, "mode")
    assert list(rows) == ["non_shared", "base_shared"]


@pytest.mark.parametrize("flag", ["--cuda-graphs", "--eager"])
def test_demo_cuda_graphs_flags_are_accepted_on_cpu(capsys, flag):
    # graphs are a GPU feature: on CPU either flag is accepted and the demo runs as without it
    assert main(["demo", *SMALL, "--modes", "non_shared", flag]) == 0
    rows = _table(capsys.readouterr().out, "mode")
    assert list(rows) == ["non_shared"] and _num(rows["non_shared"][0]) > 0


@pytest.mark.parametrize("argv,want", [([], None), (["--sync-steps"], False)])
def test_demo_sync_steps_flag_reaches_every_engine(monkeypatch, capsys, argv, want):
    import engine.fidelity as fid

    seen = []
    real = fid.open_engine

    def spying(*a, **kw):
        seen.append(kw.get("async_steps", "missing"))
        return real(*a, **kw)

    monkeypatch.setattr(fid, "open_engine", spying)  # the demo imports it when it runs
    assert main(["demo", *SMALL, "--modes", "non_shared,base_shared", *argv]) == 0
    assert len(seen) == 3 and all(x is want for x in seen)  # the warm-up engine and one per mode


def test_demo_graph_flags_exclude_each_other():
    with pytest.raises(SystemExit):
        main(["demo", *SMALL, "--cuda-graphs", "--eager"])


@pytest.mark.parametrize("argv, msg", [
    (["demo", "--lora", "nodir"], "NAME=DIR"),
    (["demo", "--modes", "all_shared"], "--modes"),
    (["demo", "--steps", "0"], "--steps"),
])
def test_demo_bad_arguments(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    text = str(e.value.code) + capsys.readouterr().err
    assert msg in text


def test_fidelity_command(capsys):
    assert main(["fidelity", *SMALL, "--quiet", "--modes", "base_lr_shared,full_shared"]) == 0
    out = capsys.readouterr().out
    assert "greedy agreement" in out
    rows = _table(out, "mode")
    assert list(rows) == ["non_shared", "base_lr_shared", "full_shared"]  # reference added first
    kl, agree, n = float(rows["non_shared"][0]), float(rows["non_shared"][2]), int(rows["non_shared"][3])
    assert kl < 1e-5 and agree == 1.0 and n == 9
    for m in ("base_lr_shared", "full_shared"):
        assert float(rows[m][0]) >= 0 and 0.0 <= float(rows[m][2]) <= 1.0


def test_fidelity_report_semantics(tmp_path):
    """non_shared decode equals a fresh forward pass; with one shared A, base_shared and
    base_lr_shared are the same computation; full_shared (other agents' LoRA K/V) is lossy."""
    agents = demo_adapters("tiny", str(tmp_path), seed=3, gain=0.5)
    rows = {r.mode: r for r in fidelity_report("tiny", agents, MODES, steps=3, prompt_len=6,
                                                max_tokens=4, device="cpu", seed=3)}
    assert all(r.positions == 12 for r in rows.values())
    assert rows["non_shared"].max_kl < 1e-5 and rows["non_shared"].greedy_agreement == 1.0
    assert abs(rows["base_shared"].mean_kl - rows["base_lr_shared"].mean_kl) < 1e-5
    assert rows["full_shared"].mean_kl > 1e-4
    assert rows["base_shared"].mean_kl > 1e-4  # deeper layers see other agents' hidden states


def test_bench_command_small(capsys):
    argv = ["bench", "--small", "--lengths", "40", "--layers", "1", "--decode-tokens", "2",
            "--sessions", "1", "--esft-counts", "1,3", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Llama-3.1-8B-shaped" not in out and "small model" in out
    table = [l.split() for l in out.splitlines() if l.split()[:1] == ["40"]]
    assert [r[2] for r in table] == list(MODES)
    kv = {r[2]: float(r[-1].rstrip("x")) for r in table}
    assert kv["non_shared"] == 1.0 and kv["base_lr_shared"] < 1.0
    lines = out.splitlines()
    head = max(i for i, l in enumerate(lines) if l.split()[:1] == ["adapters"])
    esft = [l.split() for l in lines[head + 1:] if l.strip()]
    assert [int(r[0]) for r in esft] == [0, 1, 3]
    mib = [float(r[4]) for r in esft]
    assert mib[0] == 0 and 0 < mib[1] < mib[2]  # the store maps pages per adapter


@pytest.mark.parametrize("argv,want", [([], None), (["--eager"], False)])
def test_bench_graph_flag_leaves_the_default_to_the_engine(monkeypatch, capsys, argv, want):
    # None lets each Engine read VMWEAVE_CUDA_GRAPHS; a hard True would ignore it
    import engine.fidelity as fid

    seen = {}

    def spy(name):
        def run(*a, **kw):
            seen[name] = kw.get("cuda_graphs", "missing")
            return []
        return run

    monkeypatch.setattr(fid, "e2e_bench", spy("e2e"))
    monkeypatch.setattr(fid, "esft_bench", spy("esft"))
    monkeypatch.setattr(fid, "format_e2e", lambda rows: "")
    monkeypatch.setattr(fid, "format_esft", lambda rows: "")
    assert main(["bench", "--small", "--lengths", "40", "--device", "cpu", *argv]) == 0
    assert seen == {"e2e": want, "esft": want}


def test_bench_bad_arguments():
    with pytest.raises(SystemExit, match="--lengths"):
        main(["bench", "--lengths", "1k"])


def test_demo_with_esft_adapter_on_moe(tmp_path, capsys):
    from engine.builtin import save_random_esft

    law = save_random_esft(str(tmp_path / "law"), "tiny-moe", 2, seed=5)
    argv = ["demo", "--model", "tiny-moe", "--esft", f"law={law}", "--agent", "base", "--steps", "4",
            "--max-tokens", "3", "--prompt-len", "5", "--device", "cpu", "--modes", "non_shared,full_shared"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ESFT adapters law" in out
    assert re.search(r"\[non_shared\] turn 2/4 +law: 5 in, 3 out", out)
    assert list(_table(out, "mode")) == ["non_shared", "full_shared"]


def test_python_dash_m_engine_help():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "engine", "demo", "--help"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for flag in ("--model", "--lora", "--esft", "--modes", "--device", "--steps", "--max-tokens"):
        assert flag in r.stdout


def test_demo_on_hf_checkpoint_with_peft_adapters(hf_zoo, capsys):
    """--model DIR with adapters saved by peft itself (shared v_proj A between plan and act)."""
    ck = hf_zoo.checkpoint("qwen3")
    argv = ["demo", "--model", str(ck), "--lora", f"plan={hf_zoo.lora('qwen3', 'plan')}",
            "--lora", f"act={hf_zoo.lora('qwen3', 'act')}", *SMALL]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"model {ck}, agents plan, act" in out
    rows = _table(out, "mode")
    assert list(rows) == list(MODES)  # plan and act share A: base_lr_shared applies
    # these adapters also put LoRA on k_proj, so each agent keeps its own K in the shared modes;
    # only the low-rank V differs between base_shared (one per agent) and base_lr_shared (one)
    kv = {m: _num(rows[m][5]) for m in MODES}
    assert kv["base_lr_shared"] < kv["base_shared"] and kv["full_shared"] < kv["non_shared"] == 1.0


def test_demo_bad_model_and_adapter_directories(tmp_path, capsys):
    assert main(["demo", "--model", str(tmp_path / "nope"), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "vmweave demo: error:" in err and "nope" in err
    (tmp_path / "empty").mkdir()
    assert main(["demo", "--lora", f"plan={tmp_path / 'empty'}", *SMALL]) == 2
    assert "empty" in capsys.readouterr().err


@pytest.mark.parametrize("extra, msg", [
    (["--esft", "law=/nonexistent"], "add_esft_adapter needs an MoE model"),  # the default model is dense
    (["--max-kv-bytes", "4096"], "max_kv_bytes=4096"),
    (["--device", "cuda"], "no CUDA device is usable"),
    (["--device", "nodevice"], "'nodevice'"),
])
def test_demo_input_the_engine_refuses_is_a_clean_error(monkeypatch, capsys, extra, msg):
    """Input refused by the engine as it is set up (or a KV budget too small to run at all): one
    error line and exit code 2, as for a bad model directory, not a traceback."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # no device given: the CPU
    assert main(["demo", *SMALL_ANY_DEVICE, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vmweave demo: error: ") and msg in err and "Traceback" not in err


def test_fidelity_on_a_device_that_is_not_there_is_a_clean_error(monkeypatch, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["fidelity", *SMALL_ANY_DEVICE, "--device", "cuda"]) == 2
    assert "vmweave fidelity: error: device='cuda'" in capsys.readouterr().err


@pytest.mark.parametrize("device, msg", [("cuda", "device='cuda'"), ("nodevice", "'nodevice'")])
def test_bench_on_a_device_that_is_not_there_is_a_clean_error(monkeypatch, capsys, device, msg):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["bench", "--small", "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vmweave bench: error: ") and msg in err and "Traceback" not in err


def test_demo_does_not_hide_a_value_error_of_the_run_itself(monkeypatch):
    """Only setup's ValueErrors are the user's input: one raised while the trajectory runs is a
    bug and comes out as it is."""
    import engine.fidelity as fid

    def broken(*a, **kw):
        raise ValueError("an internal bug")

    monkeypatch.setattr(fid, "run_trajectory", broken)  # the demo imports it when it runs
    with pytest.raises(ValueError, match="an internal bug"):
        main(["demo", *SMALL])


@pytest.mark.gpu
def test_demo_and_small_bench_on_cuda(capsys):
    """The demo on the GPU (bfloat16: the Triton kernel path in every mode) and both benchmark
    tables on small models, so the GPU benchmark's code paths are known to run."""
    for graphs in ([], ["--cuda-graphs"]):
        assert main(["demo", "--steps", "3", "--max-tokens", "6", "--prompt-len", "20", "--device", "cuda",
                     *graphs]) == 0
        out = capsys.readouterr().out
        assert "running on cuda" in out and "bfloat16" in out
        rows = _table(out, "mode")
        assert list(rows) == list(MODES)
        assert all(_num(c[0]) > 0 for c in rows.values())
    assert main(["bench", "--small", "--lengths", "100", "--layers", "2", "--decode-tokens", "3",
                 "--sessions", "2", "--esft-counts", "1,2", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert [l.split()[2] for l in out.splitlines() if l.split()[:1] == ["100"]] == list(MODES)

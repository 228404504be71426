"""Engine API behaviour and error cases, on the built-in tiny models (CPU, seconds)."""
from __future__ import annotations

import json

import pytest
import torch
from engine_test_helpers import one_thread  # noqa: F401  (autouse fixture)
from engine_test_helpers import prompt as _prompt

from engine import (CacheCapacityError, ConfigError, Engine, GenerationOutput, LoadError,
                    ModelConfig, SamplingParams)
from engine.builtin import builtin_config, save_builtin, save_random_lora
from engine.config import config_from_dict

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("api_adapters")
    c = builtin_config("tiny")
    return {
        "plan": save_random_lora(str(root / "plan"), c, r=8, seed=1, a_seed=100),
        "act": save_random_lora(str(root / "act"), c, r=8, seed=2, a_seed=100),
        "own": save_random_lora(str(root / "own"), c, r=8, seed=3, a_seed=101),
    }


def test_generate_returns_list_with_metrics_and_extends_session(adapters):
    eng = Engine.from_pretrained("tiny", cache_mode="base_lr_shared", device="cpu")
    eng.add_lora_agent("plan", adapters["plan"])
    s = eng.new_session()
    prompt = _prompt(11, 0)
    out = eng.generate(s, agent="plan", prompt=prompt, params=GREEDY)
    assert isinstance(out, GenerationOutput) and isinstance(out, list)
    assert len(out) == 8 and all(isinstance(t, int) and 0 <= t < 512 for t in out)
    assert out.finish_reason == "length" and out.finished
    assert out.ttft_s > 0 and out.latency_s >= out.ttft_s and out.tpot_s > 0
    assert len(out.token_logprobs) == 8 and all(lp <= 0 for lp in out.token_logprobs)
    assert s.tokens == prompt + list(out)
    assert s.procs == ["plan"] * len(s.tokens)


def test_score_rows_are_log_softmax_and_agree_with_greedy(adapters):
    eng = Engine.from_pretrained("tiny", cache_mode="non_shared", device="cpu", max_batched_tokens=7)
    eng.add_lora_agent("plan", adapters["plan"])
    prompt = _prompt(9, 1)
    out = eng.generate(eng.new_session(), "plan", prompt, GREEDY)
    lp = eng.score(prompt + out[:-1], agent="plan")
    assert lp.dtype == torch.float32 and lp.shape == (len(prompt) + 7, 512)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(lp.shape[0]), atol=1e-5, rtol=0)
    assert lp[len(prompt) - 1:].argmax(-1).tolist() == list(out)
    torch.testing.assert_close(lp[len(prompt) - 1:].gather(1, torch.tensor(out)[:, None]).squeeze(1),
                               torch.tensor(out.token_logprobs), atol=1e-4, rtol=0)
    # the adapter changes the distribution; the base model is agent None
    assert (eng.score(prompt) - eng.score(prompt, agent="plan")).abs().max() > 1e-2


def test_logprobs_rows_and_stop_tokens():
    eng = Engine.from_pretrained("tiny", device="cpu")
    s = eng.new_session()
    prompt = _prompt(6, 2)
    out = eng.generate(s, None, prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=True))
    assert out.logprobs.shape == (5, 512)
    assert out.logprobs.argmax(-1).tolist() == list(out)
    first = out[0]
    out2 = eng.generate(eng.new_session(), None, prompt,
                        SamplingParams(max_tokens=5, temperature=0, stop_token_ids=[first]))
    assert list(out2) == [first] and out2.finish_reason == "stop"


def test_seeded_sampling_is_reproducible():
    eng = Engine.from_pretrained("tiny", device="cpu")
    p = SamplingParams(max_tokens=12, temperature=0.9, top_k=50, top_p=0.9, seed=7, ignore_eos=True)
    a = eng.generate(eng.new_session(), None, _prompt(5, 3), p)
    b = eng.generate(eng.new_session(), None, _prompt(5, 3), p)
    c = eng.generate(eng.new_session(), None, _prompt(5, 3), SamplingParams(
        max_tokens=12, temperature=0.9, seed=8, ignore_eos=True))
    assert list(a) == list(b)
    assert list(a) != list(c)


def test_streaming_step_outputs_concatenate_to_the_result():
    eng = Engine.from_pretrained("tiny", device="cpu")
    s1, s2 = eng.new_session(), eng.new_session()
    r1 = eng.add_request(s1, None, _prompt(5, 4), GREEDY)
    r2 = eng.add_request(s2, None, _prompt(9, 5), SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    got = {r1: [], r2: []}
    steps = 0
    while eng.has_unfinished():
        for rid, toks in eng.step().items():
            got[rid] += toks
        steps += 1
    assert got[r1] == list(eng.get_output(r1)) and len(got[r1]) == 8
    assert got[r2] == list(eng.get_output(r2)) and len(got[r2]) == 3
    assert steps == 8  # both ran together: one token per step each
    assert list(eng.pop_output(r2)) == got[r2]
    with pytest.raises(KeyError):
        eng.get_output(r2)


def test_requests_of_one_session_run_in_turn(adapters):
    eng = Engine.from_pretrained("tiny", cache_mode="base_lr_shared", device="cpu")
    eng.add_lora_agent("plan", adapters["plan"])
    eng.add_lora_agent("act", adapters["act"])
    s = eng.new_session()
    pa, pb = _prompt(4, 6), _prompt(3, 7)
    ra = eng.add_request(s, "plan", pa, GREEDY)
    rb = eng.add_request(s, "act", pb, GREEDY)
    while eng.has_unfinished():
        eng.step()
    a, b = eng.get_output(ra), eng.get_output(rb)
    assert s.tokens == pa + list(a) + pb + list(b)
    assert s.procs == ["plan"] * (4 + 8) + ["act"] * (3 + 8)


def test_bad_arguments_raise_clear_errors(adapters, tmp_path):
    with pytest.raises(ValueError, match="cache_mode"):
        Engine.from_pretrained("tiny", cache_mode="shared_everything")
    with pytest.raises(LoadError, match="neither a model directory"):
        Engine.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="config.json"):
        Engine.from_pretrained(str(tmp_path))
    eng = Engine.from_pretrained("tiny", device="cpu")
    s = eng.new_session()
    with pytest.raises(KeyError, match="no agent named 'ghost'"):
        eng.generate(s, "ghost", [1, 2], GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.generate(s, None, [1, 512], GREEDY)
    with pytest.raises(TypeError):
        eng.generate(s, None, [1.5, 2], GREEDY)
    with pytest.raises(TypeError):
        eng.generate(s, None, "hello", GREEDY)
    with pytest.raises(ValueError, match="empty"):
        eng.generate(s, None, [], GREEDY)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="not an open session"):
        eng.generate(12345, None, [1], GREEDY)
    with pytest.raises(LoadError, match="does not exist"):
        eng.add_lora_agent("x", str(tmp_path / "missing"))
    with pytest.raises(LoadError, match="lacks adapter_config.json"):
        eng.add_lora_agent("x", str(tmp_path))
    with pytest.raises(ValueError, match="MoE"):
        eng.add_esft_adapter("law", str(tmp_path))
    eng.add_lora_agent("plan", adapters["plan"])
    with pytest.raises(ValueError, match="already registered"):
        eng.add_lora_agent("plan", None)
    with pytest.raises(KeyError):
        eng.remove_adapter("ghost")
    assert eng.list_agents() == ["plan"]
    assert s.tokens == []  # no failed call changed the session


def test_base_lr_shared_needs_one_shared_a(adapters):
    eng = Engine.from_pretrained("tiny", cache_mode="base_lr_shared", device="cpu")
    eng.add_lora_agent("plan", adapters["plan"])
    eng.add_lora_agent("act", adapters["act"])  # same v_proj A: fine
    with pytest.raises(ValueError, match="shared by all agents"):
        eng.add_lora_agent("own", adapters["own"])
    assert eng.list_agents() == ["act", "plan"]
    eng2 = Engine.from_pretrained("tiny", cache_mode="base_shared", device="cpu")
    for n in ("plan", "act", "own"):
        eng2.add_lora_agent(n, adapters[n])


def test_bad_adapter_files(tmp_path):
    c = builtin_config("tiny")
    d = save_random_lora(str(tmp_path / "a"), c, r=4)
    cfg = json.loads(open(f"{d}/adapter_config.json").read())
    cfg["use_dora"] = True
    open(f"{d}/adapter_config.json", "w").write(json.dumps(cfg))
    eng = Engine.from_pretrained("tiny", device="cpu")
    with pytest.raises(LoadError, match="use_dora"):
        eng.add_lora_agent("a", d)
    # an adapter for a bigger model does not fit this one
    big = builtin_config("tiny").with_(hidden_size=96)
    d2 = save_random_lora(str(tmp_path / "b"), big, r=4)
    with pytest.raises(LoadError, match="do not fit"):
        eng.add_lora_agent("b", d2)
    assert eng.list_agents() == []


def test_remove_adapter_frees_and_refuses_busy(adapters):
    eng = Engine.from_pretrained("tiny", cache_mode="base_shared", device="cpu")
    eng.add_lora_agent("plan", adapters["plan"])
    eng.add_lora_agent("own", adapters["own"])
    s = eng.new_session()
    eng.generate(s, "plan", _prompt(20, 8), GREEDY)
    before = eng.memory_report()
    assert before["namespaces"]["lowrank:own"] > 0
    rid = eng.add_request(s, "own", [3], GREEDY)
    with pytest.raises(ValueError, match="unfinished"):
        eng.remove_adapter("own")
    while eng.has_unfinished():
        eng.step()
    eng.remove_adapter("own")
    after = eng.memory_report()
    assert "lowrank:own" not in after["namespaces"]
    assert after["used_bytes"] < eng.kv.budget.capacity
    assert eng.list_agents() == ["plan"]
    # the session goes on with the remaining agent
    assert len(eng.generate(s, "plan", [4], GREEDY)) == 8
    assert rid is not None


def test_cache_capacity_error_when_one_session_cannot_fit():
    eng = Engine.from_pretrained("tiny", device="cpu", max_kv_bytes=8192 * 2, block_size=16)
    # 8192 B per 16-token block of "tiny": two blocks hold 32 tokens
    out = eng.generate(eng.new_session(), None, _prompt(20, 9), GREEDY)
    assert len(out) == 8
    with pytest.raises(CacheCapacityError, match="max_kv_bytes"):
        eng.generate(eng.new_session(), None, _prompt(40, 9), GREEDY)


def test_memory_report_shape(adapters):
    eng = Engine.from_pretrained("tiny", cache_mode="base_lr_shared", device="cpu")
    eng.add_lora_agent("plan", adapters["plan"])
    eng.generate(eng.new_session(), "plan", _prompt(30, 10), GREEDY)
    r = eng.memory_report()
    for k in ("cache_mode", "pools", "namespaces", "used_bytes", "mapped_bytes", "budget_bytes",
              "per_token_bytes_by_mode", "agents", "lora_bytes"):
        assert k in r
    assert r["cache_mode"] == "base_lr_shared"
    assert set(r["namespaces"]) == {"kv:base", "lowrank:shared"}
    assert r["used_bytes"] == sum(p["used_bytes"] for p in r["pools"].values())
    assert r["mapped_bytes"] >= r["used_bytes"] > 0


# ---- config / loader ---------------------------------------------------------------------------

def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unsupported architecture.*gpt2"):
        config_from_dict({"model_type": "gpt2", "hidden_size": 8})
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        config_from_dict({"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2, "vocab_size": 10})
    with pytest.raises(ConfigError, match="rope_type 'yarn'"):
        config_from_dict({"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2, "vocab_size": 10,
                          "num_hidden_layers": 1, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Engine.from_pretrained(str(tmp_path))


def test_rope_llama3_both_spellings_match_transformers():
    pytest.importorskip("transformers")
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    base = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 10,
            "num_hidden_layers": 1, "max_position_embeddings": 8192}
    sc = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    old = config_from_dict({**base, "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **sc}})
    new = config_from_dict({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **sc}})
    assert old.rope_scaling == new.rope_scaling and old.rope_theta == new.rope_theta == 5e5
    hf = AutoConfig.for_model("llama", hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                              vocab_size=10, max_position_embeddings=8192,
                              rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, **sc})
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    torch.testing.assert_close(new.rope_inv_freq(), ref.float(), rtol=1e-6, atol=0)
    plain = config_from_dict({**base, "rope_theta": 5e5})
    assert not torch.allclose(plain.rope_inv_freq(), ref.float())


def test_config_reads_moe_and_s2_keys():
    c = builtin_config("tiny-moe")
    assert isinstance(c, ModelConfig) and c.is_moe and c.num_experts == 8 and c.top_k == 2
    assert c.shared_expert_intermediate_size == 64 and all(c.moe_layers)
    q3 = config_from_dict({"model_type": "qwen3_moe", "hidden_size": 32, "num_attention_heads": 4,
                           "num_hidden_layers": 4, "vocab_size": 10, "num_local_experts": 6,
                           "num_experts_per_tok": 2, "moe_intermediate_size": 8, "decoder_sparse_step": 2,
                           "mlp_only_layers": [3], "norm_topk_prob": True})
    assert q3.num_experts == 6 and q3.moe_layers == (False, True, False, False) and q3.qk_norm == "head"
    s2 = builtin_config("tiny-s2")
    assert s2.s2.sparse_block == 16 and s2.s2.vert_stride == 2 and s2.s2_layers == (True, False)


def _reshard(src, dst, fused=False):
    """Copy a checkpoint into two shards with an index; optionally fuse experts transformers-5 style."""
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    os.makedirs(dst, exist_ok=True)
    shutil.copy(os.path.join(src, "config.json"), dst)
    sd = load_file(os.path.join(src, "model.safetensors"))
    if fused:
        cfg = json.load(open(os.path.join(src, "config.json")))
        for layer in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{layer}.mlp.experts."
            E = cfg["num_experts"]
            g = [sd.pop(f"{p}{e}.gate_proj.weight") for e in range(E)]
            u = [sd.pop(f"{p}{e}.up_proj.weight") for e in range(E)]
            d = [sd.pop(f"{p}{e}.down_proj.weight") for e in range(E)]
            sd[p + "gate_up_proj"] = torch.cat([torch.stack(g), torch.stack(u)], 1).contiguous()
            sd[p + "down_proj"] = torch.stack(d).contiguous()
    keys = sorted(sd)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    wmap = {}
    for fn, ks in halves.items():
        save_file({k: sd[k] for k in ks}, os.path.join(dst, fn))
        wmap.update({k: fn for k in ks})
    json.dump({"metadata": {}, "weight_map": wmap}, open(os.path.join(dst, "model.safetensors.index.json"), "w"))
    return dst


@pytest.mark.parametrize("name,fused", [("tiny", False), ("tiny-moe", True)])
def test_sharded_and_fused_checkpoints_load_to_the_same_model(tmp_path, name, fused):
    d = save_builtin(name, str(tmp_path / "single"))
    d2 = _reshard(d, str(tmp_path / "sharded"), fused=fused)
    toks = _prompt(13, 11)
    a = Engine.from_pretrained(name, device="cpu").score(toks)
    b = Engine.from_pretrained(d, device="cpu").score(toks)
    c = Engine.from_pretrained(d2, device="cpu").score(toks)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # same values; a differently laid-out source may round differently in the last bit
    torch.testing.assert_close(a, c, rtol=0, atol=1e-5)


def test_missing_tensor_is_named(tmp_path):
    import os

    from safetensors.torch import load_file, save_file

    d = save_builtin("tiny", str(tmp_path / "m"))
    sd = load_file(os.path.join(d, "model.safetensors"))
    del sd["model.layers.1.self_attn.v_proj.weight"]
    save_file(sd, os.path.join(d, "model.safetensors"))
    with pytest.raises(LoadError, match="model.layers.1.self_attn.v_proj.weight"):
        Engine.from_pretrained(d, device="cpu")


def test_kv_pages_are_mapped_on_demand_and_unmapped_when_freed():
    eng = Engine.from_pretrained("tiny", cache_mode="non_shared", device="cpu", max_kv_bytes=64 << 20)
    r0 = eng.memory_report()
    assert r0["mapped_bytes"] == 0 and r0["used_bytes"] == 0
    sessions = [eng.new_session() for _ in range(3)]
    for i, s in enumerate(sessions):
        eng.generate(s, None, _prompt(40 + 30 * i, 20 + i), GREEDY)
    r1 = eng.memory_report()
    kv = r1["pools"]["kv"]
    assert kv["blocks_in_use"] == sum(-(-(len(s.tokens) - 1) // 16) for s in sessions)
    assert kv["used_bytes"] <= kv["mapped_bytes"] < kv["used_bytes"] + 2 * 2 * 2 * 4096  # page rounding per arena
    assert r1["reserved_bytes"] >= 64 << 20  # address space for the whole budget, not memory
    for s in sessions:
        eng.close_session(s)
    r2 = eng.memory_report()
    assert r2["used_bytes"] == 0 and r2["mapped_bytes"] == 0 and r2["pages_mapped"] == 0
    with pytest.raises(ValueError, match="not an open session"):
        eng.generate(sessions[0], None, [1], GREEDY)

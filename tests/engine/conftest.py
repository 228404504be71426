"""Session-wide tiny checkpoints and adapters for the engine tests (built once, lazily).

`hf_zoo.checkpoint(arch)` etc. build on first use and return directories; `hf_zoo.hf(...)` returns
the matching transformers(+peft) model. Importable helpers live in hf_fixtures.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hf_fixtures as H  # noqa: E402

# Which experts of which layer the test ESFT adapter fine-tunes (both layers, not all experts).
ESFT_EXPERTS = {0: [1, 2], 1: [0, 3]}


class HFZoo:
    def __init__(self, root: Path):
        self.root = root
        self._dirs: dict[tuple, Path] = {}
        self._models: dict[tuple, object] = {}

    def _once(self, key: tuple, build):
        if key not in self._dirs:
            self._dirs[key] = build(self.root / "_".join(str(k) for k in key))
        return self._dirs[key]

    def checkpoint(self, arch: str) -> Path:
        return self._once(("ckpt", arch), lambda d: H.build_checkpoint(arch, d, seed=11))

    def lora_targets(self, arch: str) -> tuple[str, ...]:
        # Qwen2-MoE's shared expert is an ordinary MLP module: gate/up/down_proj targets land there
        if arch in H.MOE_ARCHS and arch != "qwen2_moe":
            return H.MOE_LORA_TARGETS
        return H.DENSE_LORA_TARGETS

    def lora(self, arch: str, name: str) -> Path:
        """Adapters: "plan" (r=8, alpha 16), "act" (r=8, its own B, v_proj A shared with plan),
        "reflect" (r=4, rsLoRA, its own A)."""
        ck = self.checkpoint(arch)
        t = self.lora_targets(arch)
        if name == "plan":
            return self._once(("lora", arch, name), lambda d: H.build_lora(ck, d, r=8, alpha=16, targets=t, seed=21))
        if name == "act":
            plan = self.lora(arch, "plan")
            return self._once(("lora", arch, name), lambda d: H.build_lora(
                ck, d, r=8, alpha=16, targets=t, seed=22, share_v_a_with=plan))
        if name == "reflect":
            return self._once(("lora", arch, name), lambda d: H.build_lora(
                ck, d, r=4, alpha=8, targets=t, rslora=True, seed=23))
        raise KeyError(name)

    def esft(self, arch: str) -> Path:
        ck = self.checkpoint(arch)
        # Mixtral's adapter uses Mixtral's own expert names (w1/w3/w2), the others DeepSeek's
        naming = "hf" if arch == "mixtral" else "deepseek"
        return self._once(("esft", arch), lambda d: H.build_esft(ck, d, arch, ESFT_EXPERTS, seed=31, naming=naming))

    def merged(self, arch: str) -> Path:
        ck, e = self.checkpoint(arch), self.esft(arch)
        return self._once(("merged", arch), lambda d: H.merge_esft(ck, e, arch, d))

    def hf(self, arch: str, lora: str | None = None, esft_merged: bool = False):
        key = (arch, lora, esft_merged)
        if key not in self._models:
            ck = self.merged(arch) if esft_merged else self.checkpoint(arch)
            self._models[key] = H.load_hf(ck, self.lora(arch, lora) if lora else None)
        return self._models[key]


@pytest.fixture(scope="session")
def hf_zoo(tmp_path_factory) -> HFZoo:
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    return HFZoo(tmp_path_factory.mktemp("hf_zoo"))

"""vmweave's engine: many agents (LoRA / ESFT adapters) over one base model, multi-agent
sessions, LRAgent cache modes and continuous batching.

    from engine import Engine, SamplingParams
    eng = Engine.from_pretrained("tiny", cache_mode="base_lr_shared")
"""
from .config import ConfigError, ModelConfig
from .engine import Engine
from .loader import LoadError
from .sampling import SamplingParams
from .scheduler import CacheCapacityError
from .sequence import GenerationOutput, Session

__all__ = ["Engine", "SamplingParams", "GenerationOutput", "ModelConfig", "Session",
           "ConfigError", "LoadError", "CacheCapacityError"]

"""Samplers: one decoding loop over swappable parts (proposal, confidence, commit, stopping, guidance,
cache), each chosen by name. `generate(...)` is the LLaDA-style entry; `Sampler` is built once from a
config. New parts: decorate a class with the slot's `register_*` and name it in the config."""

from . import cache_approx, cache_exact, commit, confidence, guidance, proposal, stopping  # noqa: F401 - register parts
from .config import SamplerConfig
from .output import SamplerOutput
from .registry import (
    create_part,
    list_parts,
    register_cache,
    register_commit,
    register_confidence,
    register_guidance,
    register_proposal,
    register_stopping,
)
from .sampler import Sampler, generate
from .state import DecodeState

__all__ = [
    "DecodeState", "Sampler", "SamplerConfig", "SamplerOutput", "create_part", "generate", "list_parts",
    "register_cache", "register_commit", "register_confidence", "register_guidance", "register_proposal",
    "register_stopping",
]

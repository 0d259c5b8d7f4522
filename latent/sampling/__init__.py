"""Samplers: one decoding loop over swappable parts (proposal, confidence, commit, revision, stopping,
guidance, cache, verifier), each chosen by name. `generate(...)` is the LLaDA-style entry; `Sampler` is built once
from a config. New parts: decorate a class with the slot's `register_*` and name it in the config.
`autoregressive_generate` is the left-to-right baseline; `plot_trajectory` draws a recorded decoding
trajectory. docs/sampling.md states the semantics."""

from . import (  # noqa: F401 - register parts
    ar_guided,
    cache_approx,
    cache_delayed,
    cache_exact,
    cache_free,
    classifier_guidance,
    commit,
    commit_learned,
    confidence,
    diffuspec,
    dynamic_block,
    edlm,
    guidance,
    proposal,
    revision,
    stopping,
    stopping_eotp,
    verifier,
)
from .autoregressive import AutoregressiveOutput, autoregressive_generate
from .config import SamplerConfig
from .diffuspec import StartTokenVerifier
from .output import SamplerOutput
from .registry import (
    Part,
    create_part,
    list_parts,
    register_cache,
    register_commit,
    register_confidence,
    register_guidance,
    register_proposal,
    register_revision,
    register_stopping,
    register_verifier,
)
from .sampler import Sampler, generate
from .state import DecodeState
from .step import StepResult, decode_step
from .trajectory import Trajectory, TrajectoryRecorder, plot_trajectory

__all__ = [
    "AutoregressiveOutput", "DecodeState", "Part", "Sampler", "SamplerConfig", "SamplerOutput", "StartTokenVerifier",
    "StepResult", "Trajectory", "TrajectoryRecorder", "autoregressive_generate", "create_part", "decode_step", "generate",
    "list_parts", "plot_trajectory", "register_cache", "register_commit", "register_confidence", "register_guidance",
    "register_proposal", "register_revision", "register_stopping", "register_verifier",
]

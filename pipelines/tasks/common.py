"""What several tasks share: the backbone from a recipe's ``model`` section or another run, tokenizers,
the keys a ``model`` / ``adapter`` section accepts, and pre-drawn masked-diffusion noise."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch

from latent.training.config import ConfigError
from latent.training.models import model_section_keys as model_keys

__all__ = ["Decoding", "find_backbone_dir", "load_backbone", "backbone_from_config", "model_keys", "adapter_keys",
           "find_tokenizer_dir", "sft_noise"]

_BACKBONE_SUBDIRS = ("", "model", "backbone", "pipeline/model", "final/backbone")


def find_backbone_dir(path) -> Path:
    """The folder holding a saved DiffusionTransformer (config.json + safetensors): ``path`` itself, or the
    backbone inside a pipeline folder, a run folder or an old ``final/`` export."""
    p = Path(path)
    for sub in _BACKBONE_SUBDIRS:
        d = p / sub if sub else p
        if (d / "config.json").is_file() and any(d.glob("*.safetensors")):
            import json

            if json.loads((d / "config.json").read_text()).get("_class_name") == "DiffusionTransformer":
                return d
    raise FileNotFoundError(f"{str(path)!r} holds no saved DiffusionTransformer (looked in {', '.join(s or '.' for s in _BACKBONE_SUBDIRS)})")


def load_backbone(path, layouts: tuple[str, ...] | None = None, switch_to: str | None = None, what="model.init_from"):
    """A saved backbone; with ``layouts`` its attention layout must be one of them (a bidirectional model is
    switched to ``switch_to``, e.g. "prefix": same weights, the prefix then never sees the canvas)."""
    from latent.backbone import DiffusionTransformer

    folder = find_backbone_dir(path)
    model = DiffusionTransformer.from_pretrained(str(folder))
    layout = model.config.attention_layout
    if layouts is not None and layout not in layouts:
        raise ConfigError(f"{what}={str(path)!r} has attention_layout={layout!r}; this task needs one of {layouts}")
    if switch_to is not None and layout != switch_to:
        model.register_to_config(attention_layout=switch_to)
    return model


def backbone_from_config(model_cfg, tokenizer, layouts=None, switch_to=None):
    """``model.init_from`` (a saved backbone, see :func:`load_backbone`) or a new backbone from the section's
    keys, sized to the tokenizer; the vocabulary must hold the tokenizer's tokens."""
    from latent.training.models import build_model

    cfg = {k: v for k, v in dict(model_cfg).items() if v is not None}
    init = cfg.pop("init_from", None)
    if init:
        model = load_backbone(init, layouts, switch_to)
        if tokenizer is not None and model.config.vocab_size < len(tokenizer):
            raise ConfigError(f"model.init_from={init!r} has vocab_size={model.config.vocab_size} < the tokenizer's "
                              f"{len(tokenizer)} tokens")
        return model
    model = build_model(cfg, tokenizer)
    layout = getattr(model.config, "attention_layout", None)
    if layouts is not None and layout not in layouts:
        raise ConfigError(f"model.attention_layout={layout!r}; this task needs one of {layouts}")
    return model


def adapter_keys(user: dict, extra=("type", "init_from")) -> list[str] | None:
    """The keys of an adapter section: the registered adapter's constructor arguments (None if unknown)."""
    from modalities.base import adapter_class

    try:
        cls = adapter_class(user.get("type", ""))
    except (KeyError, ValueError):
        return None  # the adapter type error is raised, clearly, when it is built
    params = inspect.signature(cls.__init__).parameters
    return [*extra, *(p for p, v in params.items()
                      if p != "self" and v.kind in (v.KEYWORD_ONLY, v.POSITIONAL_OR_KEYWORD))]


def find_tokenizer_dir(path) -> Path | None:
    """A tokenizer saved with a run or pipeline folder (its ``tokenizer/`` subfolder or the folder itself)."""
    if not path:
        return None
    for sub in ("tokenizer", "pipeline/tokenizer", ""):
        d = Path(path) / sub if sub else Path(path)
        if (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file():
            return d
    return None


@dataclass
class Decoding:
    """A ``decoding`` section: the defaults a pipeline's MaskedDiffusionScheduler is saved with."""

    commit: str = "threshold"
    threshold: float = 0.9
    cache: str = "auto"


def sft_noise(generator: torch.Generator, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise levels [B] and mask draws [B, N] of one step (drawn for the global batch, see latent.training.task)."""
    from latent.schedules import sample_times

    return sample_times(batch, generator, True), torch.rand(batch, length, generator=generator)

"""Model registry: ``model.name`` in a config names a builder, the rest of ``model`` are its arguments.

Presets (sizes) are YAML files in ``configs/model/`` selected with ``model.preset`` (see
:mod:`latent.training.config`). Builders receive the tokenizer-derived ``vocab_size`` and
``mask_token_id`` unless the config sets them. Other issues register their own builders::

    @register_model("my_adapter", cls=MyAdapter)
    def build_my_adapter(tokenizer=None, **kwargs): ...
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable

__all__ = ["register_model", "build_model", "model_parameters", "available_models", "check_model_name",
           "SHAPE_KEYS"]

_MODELS: dict[str, tuple[Callable, type | None]] = {}

# config entries that change the shapes of parameters (a checkpoint with other values cannot be loaded)
SHAPE_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
              "latent_dim", "tie_word_embeddings")


def register_model(name: str, cls: type | None = None):
    """Register ``builder(tokenizer=None, **kwargs) -> nn.Module`` under ``name``. ``cls`` (whose
    ``__init__`` arguments are the accepted config keys) defaults to the builder itself."""

    def deco(fn):
        _MODELS[name] = (fn, cls)
        return fn

    return deco


def available_models() -> list[str]:
    return sorted(_MODELS)


def check_model_name(name: str) -> None:
    if name not in _MODELS:
        near = difflib.get_close_matches(str(name), list(_MODELS), n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        from latent.training.config import ConfigError

        raise ConfigError(f"model.name={name!r} is not a registered model ({', '.join(available_models())}){hint}")


def model_parameters(name: str) -> list[str]:
    """The config keys a model builder accepts."""
    check_model_name(name)
    fn, cls = _MODELS[name]
    sig = inspect.signature(cls.__init__ if cls is not None else fn)
    return [p for p in sig.parameters if p not in ("self", "tokenizer") and
            sig.parameters[p].kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]


def build_model(model_cfg: dict, tokenizer=None):
    """Build the model of a ``model`` config section (``name``/``preset``/``init_from`` are not passed)."""
    from latent.training.config import MODEL_RESERVED

    cfg = dict(model_cfg)
    name = cfg.get("name", "diffusion_transformer")
    check_model_name(name)
    kwargs = {k: v for k, v in cfg.items() if k not in MODEL_RESERVED}
    fn, _ = _MODELS[name]
    return fn(tokenizer=tokenizer, **kwargs)


from latent.backbone import DiffusionTransformer  # noqa: E402


@register_model("diffusion_transformer", cls=DiffusionTransformer)
def build_diffusion_transformer(tokenizer=None, **kwargs):
    if tokenizer is not None:
        n = len(tokenizer)
        vocab = kwargs.get("vocab_size")
        if vocab is None:
            kwargs["vocab_size"] = n
        elif vocab < n:
            raise ValueError(f"model.vocab_size={vocab} is smaller than the tokenizer's {n} tokens")
        if kwargs.get("mask_token_id") is None:
            if tokenizer.mask_token_id is None:
                raise ValueError("the tokenizer has no mask token; set model.mask_token_id")
            kwargs["mask_token_id"] = tokenizer.mask_token_id
    for key in ("rope_scaling",):
        if kwargs.get(key) is not None:
            kwargs[key] = dict(kwargs[key])
    return DiffusionTransformer(**kwargs)

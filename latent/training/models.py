"""Model registry: ``model.name`` in a recipe names a builder, the rest of ``model`` are its arguments.

Presets (sizes) are YAML files in ``configs/model/`` selected with ``model.preset`` (see
:mod:`latent.training.config`). Builders receive the tokenizer, from which the backbone takes
``vocab_size`` and ``mask_token_id`` unless the recipe sets them. More builders register the same way::

    @MODELS.register("my_model")
    def build_my_model(tokenizer=None, **kwargs): ...   # its keyword arguments are the accepted keys
"""

from __future__ import annotations

import inspect

from latent.registry import Registry, UnknownNameError

__all__ = ["MODELS", "build_model", "model_parameters", "model_section_keys", "MODEL_RESERVED"]

MODELS = Registry("model")
MODEL_RESERVED = ("name", "preset", "init_from")  # model-section keys that are not builder arguments


def model_parameters(name: str) -> list[str]:
    """The config keys a model builder accepts: its keyword arguments, or those of the class it names
    through a ``config_class`` attribute."""
    fn = MODELS.get(name)
    target = getattr(fn, "config_class", fn)
    sig = inspect.signature(target.__init__ if inspect.isclass(target) else target)
    return [p for p, v in sig.parameters.items() if p not in ("self", "tokenizer")
            and v.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]


def model_section_keys(user: dict) -> list[str]:
    """The keys a recipe's ``model`` section accepts: name/preset/init_from and the builder's arguments."""
    return [*MODEL_RESERVED, *model_parameters(user.get("name", "diffusion_transformer"))]


def build_model(model_cfg: dict, tokenizer=None):
    """Build the model of a ``model`` config section (``name`` / ``preset`` / ``init_from`` are not passed)."""
    from latent.training.errors import ConfigError

    cfg = dict(model_cfg)
    name = cfg.get("name", "diffusion_transformer")
    try:
        fn = MODELS.get(name)
    except UnknownNameError as err:
        raise ConfigError(f"model.name: {err}") from None
    return fn(tokenizer=tokenizer, **{k: v for k, v in cfg.items() if k not in MODEL_RESERVED})


from latent.backbone import DiffusionTransformer  # noqa: E402


@MODELS.register("diffusion_transformer")
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
    if kwargs.get("rope_scaling") is not None:
        kwargs["rope_scaling"] = dict(kwargs["rope_scaling"])
    return DiffusionTransformer(**kwargs)


build_diffusion_transformer.config_class = DiffusionTransformer

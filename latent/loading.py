"""Loading that refuses what it cannot trust: safetensors only, configs checked, weights that fit.

- Pickled weights (.bin, .pt, .pth, .ckpt, .pkl) are never opened: unpickling runs whatever code the
  file names. A folder that holds only pickles is refused with an error naming the files and the one
  line that converts them where the user trusts them.
- `SafeModelMixin` is the `ModelMixin` of the project's modules (backbone, adapters, autoencoders): its
  constructor checks the registered config (`latent.config_checks`) before anything is built, and its
  `from_pretrained` reads a local folder's safetensors only and refuses weights that do not match the
  config (missing, unexpected or wrongly shaped tensors), where diffusers would only log a warning and
  return a half-loaded model.
- `load_hf_model` is the same for transformers models read from a local folder (speech and text encoders).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from diffusers.models.modeling_utils import ModelMixin

from .config_checks import ConfigError, check_config

__all__ = [
    "PICKLED", "UnsafeWeightsError", "WeightsMismatchError", "SafeModelMixin", "require_safetensors",
    "refuse_pickle_file", "load_hf_model",
]

PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


class UnsafeWeightsError(ValueError):
    """Weights stored as a pickle, which is never loaded."""


class WeightsMismatchError(ValueError):
    """Weights that do not fit the module their config describes."""


def _convert_line(src: str, dst: str) -> str:
    return (
        "python -c \"import torch, safetensors.torch as st; "
        f"st.save_file({{k: v.contiguous() for k, v in torch.load({src!r}, weights_only=True).items()}}, {dst!r})\""
    )


def refuse_pickle_file(path: str, safetensors_path: str | None = None) -> UnsafeWeightsError:
    """The error for one pickled weights file (returned, for the caller to raise)."""
    dst = safetensors_path or os.path.splitext(path)[0] + ".safetensors"
    return UnsafeWeightsError(
        f"{path!r} is a pickled weights file; pickles are never loaded here (unpickling can run any code). "
        f"If you trust it, convert it once to safetensors and load that instead: {_convert_line(path, dst)}"
    )


def require_safetensors(folder: str, weights_name: str, what: str = "weights") -> None:
    """Refuse a folder with no safetensors weights, naming its pickles (never opened) and how to convert them."""
    names = sorted(os.listdir(folder))
    if any(n.endswith((".safetensors", ".safetensors.index.json")) for n in names):
        return
    pickled = [n for n in names if n.endswith(PICKLED)]
    if pickled:
        src = os.path.join(folder, pickled[0])
        raise UnsafeWeightsError(
            f"{folder!r} holds its {what} only as pickles {pickled}, which are never loaded here (unpickling can "
            f"run any code). If you trust them, convert them once to safetensors: "
            f"{_convert_line(src, os.path.join(folder, weights_name))}"
        )
    raise ValueError(f"{folder!r} holds no {what} ({weights_name}); give a folder written by save_pretrained().")


def _mismatch(**groups: Iterable) -> str:
    """'7 missing (e.g. [...]), 2 unused (e.g. [...])' for the groups that are not empty."""
    parts = []
    for name, keys in groups.items():
        keys = sorted(map(str, keys))
        if keys:
            parts.append(f"{len(keys)} {name.replace('_', ' ')} (e.g. {keys[:3]})")
    return ", ".join(parts)


class SafeModelMixin(ModelMixin):
    """`ModelMixin` whose config is checked at construction and whose `from_pretrained` is strict.

    `config_rules` (field -> `latent.config_checks.Rule`) adds a class's own value rules to the checks of
    its constructor annotations."""

    config_rules: dict = {}

    def __init__(self):
        super().__init__()
        config = self.__dict__.get("_internal_dict")  # registered by @register_to_config before __init__ runs
        if config is not None:
            check_config(type(self), config, self.config_rules)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load from a local folder written by `save_pretrained`: safetensors only, config checked, every
        tensor of the module present in the weights and every tensor of the weights used."""
        path = os.fspath(pretrained_model_name_or_path)
        folder = os.path.join(path, kwargs["subfolder"]) if kwargs.get("subfolder") else path
        if not os.path.isdir(folder):
            raise ValueError(
                f"{folder!r} is not a local folder; {cls.__name__}.from_pretrained loads only a folder written by "
                "save_pretrained() (nothing is downloaded)."
            )
        require_safetensors(folder, DIFFUSERS_WEIGHTS)
        kwargs["use_safetensors"] = True
        kwargs.setdefault("local_files_only", True)
        wants_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(path, output_loading_info=True, **kwargs)
        except ConfigError as err:
            raise ConfigError(f"{os.path.join(folder, cls.config_name)}: {err}") from err
        missing, unexpected = info.get("missing_keys") or [], info.get("unexpected_keys") or []
        wrong = [k for k, *_ in info.get("mismatched_keys") or []]
        if missing or unexpected or wrong:
            raise WeightsMismatchError(
                f"The weights in {folder!r} do not fit the {cls.__name__} its {cls.config_name} describes: "
                f"{_mismatch(missing=missing, unused=unexpected, of_another_shape=wrong)}. Nothing was loaded; "
                f"make {cls.config_name} (num_layers, hidden_size, ...) describe the saved weights."
            )
        return (model, info) if wants_info else model


def load_hf_model(auto_class, path: str | os.PathLike, what: str = "model", **kwargs):
    """`auto_class.from_pretrained(path)` for a local transformers folder: safetensors only, and no tensor
    of the model left at its random initialisation (weights it does not use, e.g. a dropped head, are fine)."""
    path = os.fspath(path)
    require_safetensors(path, "model.safetensors", what)
    model, info = auto_class.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                             output_loading_info=True, **kwargs)
    missing = info.get("missing_keys") or []
    if missing:
        raise WeightsMismatchError(
            f"The {what} weights in {path!r} do not fit the model its config.json describes: "
            f"{_mismatch(missing=missing)}; they would be random. Give a folder whose weights match its config."
        )
    return model

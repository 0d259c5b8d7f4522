"""A tiny MLP over named decoding features, the shape of every learned decoding decision in the sampler
(Learn2PD's commit filter, CtrlDiff-style sub-block sizes): features [..., F] -> one logit [...].

Subclasses name their features (`feature_names`) and declare their own `__init__` (diffusers'
`register_to_config` records each one's defaults), calling `build(...)`. A saved model is `config.json` +
safetensors; the features it was trained on are in its config, so a model trained on other features is
refused instead of being fed the wrong columns. `load_feature_mlp(cls, path, hint)` loads a folder once per
file time.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin


class FeatureMLP(ModelMixin, ConfigMixin):
    feature_names: tuple = ()

    def build(self, features, num_features: int, hidden_size: int, num_layers: int) -> None:
        names, kind = self.feature_names, type(self).__name__
        if tuple(features) != names:
            raise ValueError(f"this {kind} was trained on features {list(features)}; the sampler computes "
                             f"{list(names)} ({type(self).__module__}); retrain it.")
        if num_features != len(names) or num_layers < 1 or hidden_size < 1:
            raise ValueError(f"{kind} needs num_features={len(names)}, num_layers >= 1 and hidden_size >= 1, "
                             f"got {num_features}, {num_layers}, {hidden_size}.")
        sizes = [num_features] + [hidden_size] * (num_layers - 1) + [1]
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # The weights follow the features' dtype and device: the sampler scores in float64 like its
        # confidences, on the backbone's device, while a loaded head stays where it was loaded.
        x = features
        for i, layer in enumerate(self.layers):
            x = F.linear(x, layer.weight.to(x.device, x.dtype), layer.bias.to(x.device, x.dtype))
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x.squeeze(-1)


@lru_cache(maxsize=8)
def _load(cls, folder: str, stamp: float):
    return cls.from_pretrained(folder).eval()


def load_feature_mlp(cls, path, argument: str, hint: str):
    """A saved `cls` folder (config.json + safetensors), or the model itself; `argument` and `hint` (how to
    train one) name what is missing in the error."""
    if isinstance(path, cls):
        return path
    folder = Path(path)
    weights = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not (folder / "config.json").is_file() or not weights:
        raise FileNotFoundError(f"{argument}={str(path)!r} holds no saved {cls.__name__} (config.json + "
                                f"safetensors); {hint}.")
    return _load(cls, str(folder.resolve()), max(w.stat().st_mtime for w in weights))

"""What every modality adapter shares: the `PrefixEmbeds` it returns and a registry to build it by name.

An adapter turns raw input (images, speech, sensor frames) into embeddings placed before the token
canvas of the backbone. It has two halves:

- `preprocess(raw) -> tensors`: data side, no gradients, cheap enough to run in DataLoader workers
  (adapters keep the state it needs in a small picklable object, see `preprocessor`).
- `forward(tensors) -> PrefixEmbeds`: model side, trainable, a diffusers `ModelMixin` + `ConfigMixin`
  so it saves and loads on its own with `save_pretrained` / `from_pretrained`.

New adapters register with `@register_adapter("name")` and are built from a config with
`create_adapter("name", **config)` or `create_adapter({"type": "name", ...})`.

An adapter saved inside a diffusers pipeline folder is reloaded by diffusers, which looks the class's
loading base (`ModelMixin`) up in the adapter's own module: import `ModelMixin` there (see vision.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin

from latent.loading import SafeModelMixin
from latent.registry import Registry

__all__ = [
    "ADAPTERS",
    "PrefixEmbeds",
    "ModalityAdapter",
    "register_adapter",
    "create_adapter",
    "available_adapters",
    "adapter_class",
]


@dataclass
class PrefixEmbeds:
    """Embeddings an adapter places before the canvas.

    embeds: [B, P, D] float, D = the backbone's hidden size.
    mask:   [B, P] bool, True where a slot holds data (False = padding; a padded slot is never attended).
    """

    embeds: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self):
        if not isinstance(self.embeds, torch.Tensor) or self.embeds.ndim != 3:
            shape = tuple(self.embeds.shape) if isinstance(self.embeds, torch.Tensor) else type(self.embeds).__name__
            raise ValueError(f"PrefixEmbeds.embeds must be a [B, P, D] tensor, got {shape}.")
        if self.mask is None:
            self.mask = torch.ones(self.embeds.shape[:2], dtype=torch.bool, device=self.embeds.device)
        if not isinstance(self.mask, torch.Tensor) or tuple(self.mask.shape) != tuple(self.embeds.shape[:2]):
            shape = tuple(self.mask.shape) if isinstance(self.mask, torch.Tensor) else type(self.mask).__name__
            raise ValueError(f"PrefixEmbeds.mask must be [B, P] = {tuple(self.embeds.shape[:2])}, got {shape}.")
        if self.mask.dtype != torch.bool:
            self.mask = self.mask.bool()

    @property
    def batch_size(self) -> int:
        return self.embeds.shape[0]

    @property
    def length(self) -> int:
        return self.embeds.shape[1]

    def __len__(self) -> int:
        return self.batch_size

    def to(self, *args, **kwargs) -> PrefixEmbeds:
        """Like Tensor.to for the embeddings; the mask only moves device and stays bool."""
        embeds = self.embeds.to(*args, **kwargs)
        return PrefixEmbeds(embeds, self.mask.to(embeds.device))

    def select(self, rows) -> PrefixEmbeds:
        """Keep some batch rows (index tensor, list or boolean mask)."""
        return PrefixEmbeds(self.embeds[rows], self.mask[rows])

    def repeat_interleave(self, n: int) -> PrefixEmbeds:
        """Each row n times in a row, e.g. for several samples per image."""
        return PrefixEmbeds(self.embeds.repeat_interleave(n, 0), self.mask.repeat_interleave(n, 0))

    @staticmethod
    def cat(parts: list[PrefixEmbeds], dim: int = 1) -> PrefixEmbeds:
        """Concatenate along the prefix (dim=1, e.g. image then audio) or the batch (dim=0)."""
        if not parts:
            raise ValueError("PrefixEmbeds.cat needs at least one part.")
        if dim not in (0, 1):
            raise ValueError(f"dim must be 0 (batch) or 1 (prefix), got {dim}.")
        return PrefixEmbeds(torch.cat([p.embeds for p in parts], dim), torch.cat([p.mask for p in parts], dim))

    def attention_mask(self, token_mask: torch.Tensor | None = None, num_tokens: int | None = None) -> torch.Tensor:
        """The backbone's [B, P + N] padding mask (1 = keep) for this prefix followed by N tokens."""
        if token_mask is None:
            if num_tokens is None:
                raise ValueError("give token_mask [B, N] or num_tokens.")
            token_mask = torch.ones(self.batch_size, num_tokens, dtype=torch.bool, device=self.mask.device)
        return torch.cat([self.mask, token_mask.to(self.mask.device).bool()], dim=1)


def left_align(prefix: PrefixEmbeds) -> PrefixEmbeds:
    """Move every row's valid slots to the end, in order (padding on the left, zeros in padded slots).

    With rotary positions the distance from each valid slot to the text after the prefix is then the same
    for an input alone and for the same input in a batch with longer ones."""
    mask = prefix.mask
    p = mask.shape[1]
    n = mask.sum(1, keepdim=True)
    # valid slot j of a row goes to p - n + (its rank among the valid slots)
    rank = torch.cumsum(mask.long(), 1) - 1
    dest = torch.where(mask, p - n + rank, torch.full_like(rank, p))  # padding -> a dropped column
    embeds = prefix.embeds.new_zeros(prefix.embeds.shape[0], p + 1, prefix.embeds.shape[2])
    embeds.scatter_(1, dest[..., None].expand_as(prefix.embeds), prefix.embeds)
    new_mask = torch.arange(p, device=mask.device)[None] >= (p - n)
    return PrefixEmbeds(embeds[:, :p], new_mask)


# ---- registry -------------------------------------------------------------------------------------
def _import_builtin() -> None:
    # Adapters register on import; the built-in ones are imported lazily so `modalities.base` stays light.
    import importlib

    for mod in ("modalities.vision", "modalities.audio", "modalities.driving"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if err.name != mod:  # the module exists but one of its imports is missing: say so
                raise


ADAPTERS = Registry("adapter", on_miss=_import_builtin, name_attr="adapter_type")


def register_adapter(name: str, *aliases: str):
    """Class decorator: make an adapter buildable by `create_adapter(name, ...)`."""
    return ADAPTERS.register(name, *aliases)


def available_adapters() -> list[str]:
    return ADAPTERS.names()


def adapter_class(name: str) -> type[ModalityAdapter]:
    return ADAPTERS.get(name)


def create_adapter(name: str | dict | Any, **kwargs) -> ModalityAdapter:
    """Build an adapter from its registered name and config.

    `create_adapter("vision", backbone="resnet18", hidden_size=256)`, or with one mapping (an OmegaConf
    node is fine): `create_adapter({"type": "vision", "backbone": "resnet18", ...})`.
    """
    if not isinstance(name, str):
        try:  # OmegaConf DictConfig -> plain dict
            from omegaconf import OmegaConf

            if OmegaConf.is_config(name):
                name = OmegaConf.to_container(name, resolve=True)
        except ImportError:  # pragma: no cover
            pass
        if not isinstance(name, dict) or "type" not in name:
            raise ValueError("create_adapter needs a name or a mapping with a 'type' key naming the adapter.")
        cfg = dict(name)
        name = cfg.pop("type")
        kwargs = {**cfg, **kwargs}
    return adapter_class(name)(**kwargs)


class ModalityAdapter(SafeModelMixin, ConfigMixin):
    """Base of every adapter. Subclasses decorate `__init__` with `register_to_config` and implement
    `preprocess` and `forward`; `hidden_size` (the backbone width D) must be one of their config keys.

    Loading is `latent.loading.SafeModelMixin`'s: safetensors only (a folder of pickles is refused by
    name), the config checked against the constructor's annotations and `config_rules` before anything
    is built, and weights that do not match the config refused rather than half-loaded."""

    config_name = "config.json"
    adapter_type: str = ""
    # Sub-modules that `freeze_trunk` / `unfreeze_trunk` act on (e.g. a pretrained encoder).
    trunk_attr: str | None = None

    @torch.no_grad()
    def preprocess(self, raw) -> Any:  # pragma: no cover - every adapter defines its own
        raise TypeError(f"{type(self).__name__} must define preprocess(raw) -> tensors")

    def forward(self, *args, **kwargs) -> PrefixEmbeds:  # pragma: no cover - every adapter defines its own
        raise TypeError(f"{type(self).__name__} must define forward(tensors) -> PrefixEmbeds")

    # ---- trunk freezing -------------------------------------------------------------------------
    @property
    def trunk(self) -> nn.Module | None:
        return getattr(self, self.trunk_attr) if self.trunk_attr else None

    @property
    def trunk_frozen(self) -> bool:
        trunk = self.trunk
        return trunk is not None and not any(p.requires_grad for p in trunk.parameters())

    def freeze_trunk(self) -> ModalityAdapter:
        """Stop gradients into the trunk and keep it in eval mode (BatchNorm statistics stay fixed)."""
        if self.trunk is not None:
            self.trunk.requires_grad_(False)
            self.trunk.eval()
        return self

    def unfreeze_trunk(self) -> ModalityAdapter:
        if self.trunk is not None:
            self.trunk.requires_grad_(True)
            self.trunk.train(self.training)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.trunk_frozen:
            self.trunk.eval()
        return self

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def num_prefix_tokens(self) -> int:  # pragma: no cover - every adapter defines its own
        raise TypeError(f"{type(self).__name__} must define num_prefix_tokens")

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs) -> ModalityAdapter:
        """Load any registered adapter from a `save_pretrained` folder, reading its type from config.json."""
        import json

        folder = os.path.join(os.fspath(path), kwargs.get("subfolder") or "")
        cfg_file = os.path.join(folder, cls.config_name)
        if not os.path.isfile(cfg_file):
            raise ValueError(f"{folder!r} holds no {cls.config_name}; give a folder written by save_pretrained().")
        with open(cfg_file) as f:
            class_name = json.load(f).get("_class_name")
        for _, klass in ADAPTERS.items():
            if klass.__name__ == class_name:
                return klass.from_pretrained(path, **kwargs)
        raise ValueError(f"{cfg_file} names adapter class {class_name!r}, which no registered adapter has.")

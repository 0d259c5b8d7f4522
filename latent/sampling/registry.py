"""Name -> class registries, one per decoding slot (timm-style).

A part is registered with a decorator and built by name from a `SamplerConfig`: each class reads the
fields it needs in its `from_config` classmethod (`Part.from_config`, for parts without settings,
builds `cls()`). An already built object can be passed instead of a name, which is how callers plug in
their own parts.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..registry import Registry

if TYPE_CHECKING:
    from .config import SamplerConfig

SLOTS = ("proposal", "confidence", "commit", "revision", "stopping", "guidance", "cache", "verifier")
REGISTRIES: dict[str, Registry] = {
    slot: Registry(slot, name_attr="name", hint=f"Pick one of these, or add yours with @register_{slot}({{name!r}}).")
    for slot in SLOTS
}


class Part:
    """Base of the built-in parts: a part without settings is built as `cls()`."""

    @classmethod
    def from_config(cls, config: SamplerConfig) -> Part:
        return cls()


def _registrar(slot: str):
    def register(name: str, *aliases: str):
        return REGISTRIES[slot].register(name, *aliases)

    register.__name__ = register.__qualname__ = f"register_{slot}"
    register.__doc__ = f"Class decorator: make a {slot} part buildable by name (the first name; others are aliases)."
    return register


register_proposal = _registrar("proposal")
register_confidence = _registrar("confidence")
register_commit = _registrar("commit")
register_revision = _registrar("revision")
register_stopping = _registrar("stopping")
register_guidance = _registrar("guidance")
register_cache = _registrar("cache")
register_verifier = _registrar("verifier")


def list_parts(slot: str) -> list[str]:
    return REGISTRIES[slot].names()


def part_name(part: Any) -> Any:
    """The registered name of a part given by name or as a built object (the object if unregistered)."""
    return part if isinstance(part, str) else getattr(type(part), "name", part)


def create_part(slot: str, part: Any, config: SamplerConfig | None = None, **overrides):
    """Build the part registered as `part` in `slot` from `config` (SamplerConfig(**overrides) when none is
    given, else the config with `overrides` replaced); a ready-made part object is returned as it is.

    >>> create_part("commit", "threshold", threshold=0.8)
    """
    if not isinstance(part, str):
        return part
    cls = REGISTRIES[slot].get(part)
    if config is None:
        from .config import SamplerConfig  # noqa: PLC0415 - config.py imports this module

        config = SamplerConfig(**overrides)
    elif overrides:
        config = replace(config, **overrides)
    build = getattr(cls, "from_config", None)
    return cls() if build is None else build(config)

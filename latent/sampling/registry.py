"""Name -> class registries, one per decoding slot (timm-style).

A part is registered with a decorator and built by name from a flat set of knobs: each class takes
only the keyword arguments its constructor names, so one config can drive every slot. An already
built object can be passed instead of a name, which is how callers plug in their own parts.
"""

from __future__ import annotations

import inspect
from typing import Any

SLOTS = ("proposal", "confidence", "commit", "stopping", "guidance", "cache")
REGISTRIES: dict[str, dict[str, type]] = {slot: {} for slot in SLOTS}


def _registrar(slot: str):
    def register(*names: str):
        def wrap(cls):
            for name in names:
                if name in REGISTRIES[slot] and REGISTRIES[slot][name] is not cls:
                    raise ValueError(f"{slot} {name!r} is already registered to {REGISTRIES[slot][name].__name__}.")
                REGISTRIES[slot][name] = cls
            cls.name = names[0]
            return cls

        return wrap

    return register


register_proposal = _registrar("proposal")
register_confidence = _registrar("confidence")
register_commit = _registrar("commit")
register_stopping = _registrar("stopping")
register_guidance = _registrar("guidance")
register_cache = _registrar("cache")


def list_parts(slot: str) -> list[str]:
    return sorted(REGISTRIES[slot])


def create_part(slot: str, name: Any, **knobs):
    """Build the part registered as `name` in `slot`, passing only the knobs its constructor accepts."""
    if not isinstance(name, str):
        return name  # a ready-made part object
    registry = REGISTRIES[slot]
    if name not in registry:
        raise ValueError(
            f"Unknown {slot} {name!r}. Known {slot} names: {', '.join(list_parts(slot))}. "
            f"Pick one of these, or add yours with @register_{slot}({name!r})."
        )
    cls = registry[name]
    params = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in knobs.items() if k in params})

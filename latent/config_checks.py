"""Config values checked when a config is read, with errors that name the field.

A model or scheduler config reaches its constructor from a config.json written by hand, by another
tool or by an older version. Each value is checked against its constructor annotation (a string where
an int belongs, a bool where a number belongs, a NaN float) and against the class's own rules (sizes
> 0, rope_theta finite and > 0, ...), before anything is built from it; a bad value would otherwise
fail deep inside (a string-formatting TypeError, a ZeroDivisionError while decoding) or, worse, build
a model that silently decodes nothing.

A rule is `(what, predicate)`: `predicate(value)` is True for a good value, `what` says what a good
value is. Rules skip None (whether None is allowed is the annotation's business).
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "ConfigError", "Rule", "check_config", "POSITIVE", "NON_NEGATIVE", "FINITE_POSITIVE", "FINITE_NON_NEGATIVE",
    "PROBABILITY", "one_of", "BACKBONE_RULES", "SCHEDULER_RULES",
]

Rule = tuple[str, Callable[[Any], bool]]


class ConfigError(ValueError):
    """A config value that cannot be right; the message names the field."""


def _finite(v) -> bool:
    return math.isfinite(float(v))


POSITIVE: Rule = ("> 0", lambda v: v > 0)
NON_NEGATIVE: Rule = (">= 0", lambda v: v >= 0)
FINITE_POSITIVE: Rule = ("finite and > 0", lambda v: _finite(v) and v > 0)
FINITE_NON_NEGATIVE: Rule = ("finite and >= 0", lambda v: _finite(v) and v >= 0)
PROBABILITY: Rule = ("in (0, 1]", lambda v: 0 < v <= 1)


def one_of(*choices) -> Rule:
    return (f"one of {list(choices)}", lambda v: v in choices)


# DiffusionTransformer (latent/backbone.py); the constructor's own checks (divisibility, layouts) follow these.
BACKBONE_RULES: dict[str, Rule] = {
    **{k: POSITIVE for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                             "intermediate_size", "max_position_embeddings", "block_size", "head_dim")},
    "latent_dim": NON_NEGATIVE,
    "mask_token_id": NON_NEGATIVE,
    "rope_theta": FINITE_POSITIVE,
    "norm_eps": FINITE_POSITIVE,
}

# MaskedDiffusionScheduler (latent/scheduler.py): the decoding defaults a pipeline folder saves.
SCHEDULER_RULES: dict[str, Rule] = {
    "block_length": POSITIVE,
    "num_inference_steps": POSITIVE,
    "threshold": PROBABILITY,
    "factor": FINITE_POSITIVE,
    "temperature": FINITE_NON_NEGATIVE,
    "eps": ("in [0, 1)", lambda v: 0 <= v < 1),
}


# ---- types from annotations -----------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and type(v).__name__ != "bool_"


def _is_float(v) -> bool:  # an int is a fine float; NaN never is
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))


_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "int": ("an int", _is_int),
    "float": ("a number (not NaN)", _is_float),
    "bool": ("true or false", lambda v: isinstance(v, bool) or type(v).__name__ == "bool_"),
    "str": ("a string", lambda v: isinstance(v, (str, os.PathLike))),
    "dict": ("a mapping", lambda v: isinstance(v, Mapping)),
    "list": ("a list", lambda v: isinstance(v, Sequence) and not isinstance(v, str)),
    "tuple": ("a list", lambda v: isinstance(v, Sequence) and not isinstance(v, str)),
}


def _annotations(owner: type) -> dict[str, str]:
    """Constructor parameter -> annotation text (the project writes them with `from __future__ import
    annotations`, so they are strings such as "int | None")."""
    try:
        params = inspect.signature(owner.__init__).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return {}
    out = {}
    for name, p in params.items():
        ann = p.annotation
        if ann is inspect.Parameter.empty:
            continue
        out[name] = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
    return out


def _type_problem(annotation: str, value) -> str | None:
    """What the value should be, or None when it fits (or the annotation is not one this checks)."""
    kinds = [part.strip().split("[")[0] for part in annotation.split("|")]
    if value is None:
        return None if "None" in kinds else "given (it may not be null)"
    checks = [_TYPES.get(k) for k in kinds if k != "None"]
    if not checks or any(c is None for c in checks):  # an annotation this does not model: the constructor decides
        return None
    if any(check(value) for _, check in checks):
        return None
    return " or ".join(dict.fromkeys(what for what, _ in checks))


def check_config(owner: type, config: Mapping, rules: Mapping[str, Rule] | None = None) -> None:
    """Check every value of `config` (a class's registered config, or the kwargs it is built from) against
    `owner.__init__`'s annotations and `rules`; raise `ConfigError` naming the first bad field."""
    annotations = _annotations(owner)
    rules = rules or {}
    for name, value in config.items():
        if name.startswith("_"):  # diffusers' bookkeeping (_class_name, _use_default_values, ...)
            continue
        problem = _type_problem(annotations[name], value) if name in annotations else None
        if problem is None and value is not None and name in rules:
            what, ok = rules[name]
            try:
                good = bool(ok(value))
            except (TypeError, ValueError):
                good = False
            problem = None if good else what
        if problem is not None:
            raise ConfigError(f"{owner.__name__} config `{name}` must be {problem}, got {value!r}.")

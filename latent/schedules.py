"""Masking schedules for absorbing-state (masked) diffusion, and time sampling.

A schedule maps diffusion time ``t`` in [0, 1] to ``alpha(t)``, the probability that a token is still
clean at time ``t`` (``alpha(0) = 1``, ``alpha(1) = 0``). A token is masked with probability
``mask_prob(t) = 1 - alpha(t)``. The continuous-time ELBO weights the cross-entropy of a masked token by
``weight(t) = -alpha'(t) / (1 - alpha(t))``; for the linear schedule that is ``1 / t`` (MDLM, LLaDA).

Schedules are looked up by name::

    from latent.schedules import get_schedule
    sched = get_schedule("cosine")
    p = sched.mask_prob(t); w = sched.weight(t)

New schedules register themselves with ``@register_schedule("name")``.
"""

from __future__ import annotations

import abc
import math

import torch

from .registry import Registry

__all__ = [
    "MaskingSchedule",
    "LinearSchedule",
    "CosineSchedule",
    "SCHEDULES",
    "register_schedule",
    "get_schedule",
    "available_schedules",
    "sample_times",
    "stratified_times",
]

SCHEDULES = Registry("masking schedule", name_attr="name")


def register_schedule(name: str, *aliases: str):
    """Class decorator adding a :class:`MaskingSchedule` subclass to the registry under ``name``."""
    return SCHEDULES.register(name, *aliases)


def available_schedules() -> list[str]:
    return SCHEDULES.names()


def get_schedule(name: str | MaskingSchedule, **kwargs) -> MaskingSchedule:
    """Build a schedule by registry name (an instance is returned unchanged)."""
    if isinstance(name, MaskingSchedule):
        return name
    return SCHEDULES.create(name, **kwargs)


class MaskingSchedule(abc.ABC):
    """Base class. Subclasses define :meth:`alpha` and :meth:`alpha_derivative`."""

    name = "base"

    @abc.abstractmethod
    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is still clean at time ``t``."""

    @abc.abstractmethod
    def alpha_derivative(self, t: torch.Tensor) -> torch.Tensor:
        """``d alpha / d t``."""

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is masked at time ``t``."""
        return 1.0 - self.alpha(t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """ELBO weight ``-alpha'(t) / (1 - alpha(t))`` of the cross-entropy of a masked token."""
        return -self.alpha_derivative(t) / self.mask_prob(t)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@register_schedule("linear")
class LinearSchedule(MaskingSchedule):
    """``alpha(t) = 1 - t``: the mask probability equals ``t`` and the weight is ``1 / t``."""

    def alpha(self, t):
        return 1.0 - t

    def alpha_derivative(self, t):
        return -torch.ones_like(t)

    def mask_prob(self, t):
        return t

    def weight(self, t):
        return 1.0 / t


@register_schedule("cosine")
class CosineSchedule(MaskingSchedule):
    """``alpha(t) = cos(pi t / 2)``: few tokens are masked early, most late."""

    def alpha(self, t):
        return torch.cos(0.5 * math.pi * t)

    def alpha_derivative(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)


def stratified_times(n: int, u: torch.Tensor | float) -> torch.Tensor:
    """``n`` low-discrepancy times ``(u + i) / n mod 1`` for one uniform offset ``u`` (MDLM).

    Every interval ``[i / n, (i + 1) / n)`` holds exactly one of them, which lowers the variance of the
    batch-mean loss compared with independent draws.
    """
    u = torch.as_tensor(u, dtype=torch.float64)
    return ((u + torch.arange(n, dtype=torch.float64)) / n).remainder(1.0).float()


def sample_times(
    n: int,
    generator: torch.Generator | None = None,
    low_discrepancy: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw ``n`` diffusion times in [0, 1): stratified across the batch by default, else i.i.d."""
    if low_discrepancy:
        u = torch.rand((), generator=generator, dtype=torch.float64)
        t = stratified_times(n, u)
    else:
        t = torch.rand(n, generator=generator)
    return t.to(device) if device is not None else t

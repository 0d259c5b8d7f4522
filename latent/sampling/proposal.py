"""Proposal: which token each position would take this step, and the one Gumbel-max sampler
(`gumbel_max`) that every sampling decoder of the project uses."""

from __future__ import annotations

import torch

from .registry import Part, register_proposal


def uniform(shape, generator: torch.Generator | None, device, dtype=torch.float64) -> torch.Tensor:
    """U[0, 1) noise of `shape`, drawn where the generator lives (so a seed gives the same numbers
    whatever the model's device), then moved to `device`."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, dtype=dtype, device=where).to(device)


def gumbel_max(logits: torch.Tensor, temperature: float, u: torch.Tensor) -> torch.Tensor:
    """argmax exp(L) / (-log U)^T in float64 (LLaDA's form of the Gumbel-max trick): an exact sample
    from softmax(L / T) per position, U of the logits' shape. T = 0 is argmax and reads no noise."""
    if temperature == 0:
        return logits.argmax(-1)
    return (logits.double().exp() / (-torch.log(u.double())) ** temperature).argmax(-1)


def top_k_filter(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Keep the top_k logits per position (ties at the k-th value are kept), others -> -inf."""
    if not top_k or top_k >= logits.shape[-1]:
        return logits
    kth = logits.topk(top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float | None, temperature: float = 1.0) -> torch.Tensor:
    """Nucleus filter on softmax(logits / T): keep the most probable tokens until their mass reaches
    top_p (the one that crosses it included, the top-1 always), others -> -inf."""
    if top_p is None or top_p >= 1.0:
        return logits
    scaled = logits / temperature if temperature > 0 else logits
    probs, order = scaled.float().softmax(-1).sort(dim=-1, descending=True, stable=True)
    before = probs.cumsum(-1) - probs  # mass of the strictly more probable tokens
    drop_sorted = before > top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@register_proposal("argmax")
class ArgmaxProposal(Part):
    def __call__(self, logits, state):
        return logits.argmax(-1)


@register_proposal("gumbel")
class GumbelProposal(Part):
    """`gumbel_max` on the top-k / top-p filtered logits, U with one draw per step (see DecodeState.draw
    for its shape). T = 0 is argmax and draws nothing."""

    def __init__(self, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None):
        self.temperature, self.top_k, self.top_p = float(temperature), top_k, top_p

    @classmethod
    def from_config(cls, config):
        return cls(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p)

    def __call__(self, logits, state):
        logits = top_p_filter(top_k_filter(logits, self.top_k), self.top_p, self.temperature)
        u = state.draw(logits.shape[-1], dtype=torch.float64) if self.temperature else None
        return gumbel_max(logits, self.temperature, u)

"""Confidence: how sure each proposal is. Higher commits first. Computed on the guided, untempered
logits; positions outside the block or already decoded are set to -inf by the loop."""

from __future__ import annotations

import torch

from .registry import Part, register_confidence

_DTYPES = {None: None, "float64": torch.float64, "float32": torch.float32}


class _LogitConfidence(Part):
    def __init__(self, confidence_dtype: str | None = None):
        self.dtype = _DTYPES[confidence_dtype]

    @classmethod
    def from_config(cls, config):
        return cls(confidence_dtype=config.resolved_confidence_dtype)

    def probs(self, logits):
        return (logits if self.dtype is None else logits.to(self.dtype)).softmax(-1)


@register_confidence("low_confidence", "probability")
class ProbabilityConfidence(_LogitConfidence):
    """softmax(L)[x0], in the logits' dtype (LLaDA) or float64 (Fast-dLLM)."""

    def __call__(self, logits, x0, state):
        return self.probs(logits).gather(-1, x0[..., None]).squeeze(-1)


@register_confidence("margin")
class MarginConfidence(_LogitConfidence):
    """Top-1 minus top-2 probability."""

    def __call__(self, logits, x0, state):
        top = self.probs(logits).topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]


@register_confidence("neg_entropy")
class NegEntropyConfidence(_LogitConfidence):
    """sum p log p (minus the entropy): peaked distributions first."""

    def __call__(self, logits, x0, state):
        return -torch.special.entr(self.probs(logits)).sum(-1)


@register_confidence("random")
class RandomConfidence(Part):
    """LLaDA's `random` remasking: a uniform [B, T] draw per step from the generator."""

    def __call__(self, logits, x0, state):
        return state.draw(dtype=torch.float32)

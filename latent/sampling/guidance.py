"""Guidance: what else shapes the logits. A guidance part decides the model batch (how many copies of
each row run) and how their logits combine into one set per row."""

from __future__ import annotations

import torch

from .registry import Part, register_guidance


@register_guidance("none")
class NoGuidance(Part):
    copies = 1

    def ids(self, ids, lo, prompt_len, mask_token_id):
        return ids

    def repeat(self, t):
        return t

    def combine(self, logits):
        return logits

    def rows(self, index, batch):
        """Model-batch rows to keep when the sampler keeps rows `index` of `batch` rows."""
        return index


@register_guidance("cfg")
class ClassifierFreeGuidance(NoGuidance):
    """LLaDA's CFG: L = L_u + (s + 1)(L_c - L_u); the unconditional copy has every prompt position
    (pads included) set to the mask id. Prefix embeddings (adapters) are kept in both copies.
    Both copies run in one forward: [conditional rows; unconditional rows]."""

    copies = 2

    def __init__(self, cfg_scale: float = 0.0):
        self.scale = float(cfg_scale)

    @classmethod
    def from_config(cls, config):
        return cls(cfg_scale=config.cfg_scale)

    def ids(self, ids, lo, prompt_len, mask_token_id):
        uncond = ids.clone()
        uncond[:, : max(0, prompt_len - lo)] = mask_token_id
        return torch.cat([ids, uncond])

    def repeat(self, t):
        return torch.cat([t, t])

    def combine(self, logits):
        cond, uncond = logits.chunk(2)
        return uncond + (self.scale + 1) * (cond - uncond)

    def rows(self, index, batch):
        return torch.cat([index, index + batch])

"""Stopping: which rows are done before the last block is full. (A block always ends when it is full.)

A stopping part is called after every step and returns a bool [b] of rows that leave the batch now;
it may rewrite those rows' canvas (e.g. fill the tail with EOS). None means no row leaves.
"""

from __future__ import annotations

import torch

from .registry import Part, register_stopping


@register_stopping("block_full")
class BlockFull(Part):
    """Rows run to the end of the last block (LLaDA)."""

    def __call__(self, state):
        return None


def first_eos(gen: torch.Tensor, eos_token_id: int, mask_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: whether the first position that is EOS or still masked is an EOS, and that position."""
    hit = (gen == eos_token_id) | (gen == mask_token_id)
    pos = hit.long().argmax(-1)
    found = hit.any(-1) & (gen.gather(1, pos[:, None]).squeeze(1) == eos_token_id)
    return found, pos


@register_stopping("eos_early_stop")
class EosEarlyStop(Part):
    """A row stops once an EOS is committed and everything before it is decoded; its tail becomes EOS."""

    def __init__(self, eos_token_id: int | None = None):
        self.eos = eos_token_id

    @classmethod
    def from_config(cls, config):
        return cls(eos_token_id=config.eos_token_id)

    def __call__(self, state):
        gen = state.x[:, state.prompt_len :]
        done, pos = first_eos(gen, self.eos, state.mask_token_id)
        if done.any():
            tail = torch.arange(gen.shape[1], device=gen.device) > pos[:, None]
            gen.masked_fill_(tail & done[:, None], self.eos)
        return done

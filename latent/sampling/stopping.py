"""Stopping: which rows are done before the last block is full, and which blocks are done early.

A stopping part is called after every step and returns a bool [b] of rows that leave the batch now;
it may rewrite those rows' canvas (e.g. fill the tail with EOS). None means no row leaves. A part may
also commit a whole block early: `commit_block(logits, candidates, state)` is called inside every
step (after the commit rule) and returns a bool [b] of rows whose remaining masked positions all take
their proposal now (None: none). `ends_full_blocks`: a full block ends at once instead of running the
commit rule's remaining zero-quota steps.
"""

from __future__ import annotations

import math

import torch

from .registry import Part, register_stopping


@register_stopping("block_full")
class BlockFull(Part):
    """Rows run to the end of the last block (LLaDA)."""

    ends_full_blocks = False

    def __call__(self, state):
        return None


def first_eos(gen: torch.Tensor, eos_token_id: int, mask_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: whether the first position that is EOS or still masked is an EOS, and that position."""
    hit = (gen == eos_token_id) | (gen == mask_token_id)
    pos = hit.long().argmax(-1)
    found = hit.any(-1) & (gen.gather(1, pos[:, None]).squeeze(1) == eos_token_id)
    return found, pos


@register_stopping("eos_early_stop")
class EosEarlyStop(BlockFull):
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


def top2_gap(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 logit per position [b, L] (the logit margin of Prophet and SchED)."""
    top = logits.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def decoded_fraction(state) -> torch.Tensor:
    """[b] the share of each row's generated positions that hold a token before this step."""
    return (state.x[:, state.prompt_len :] != state.mask_token_id).float().mean(1)


class _EarlyCommit(BlockFull):
    """Commit the block whole once the mean top-2 logit gap over `region` reaches threshold(progress),
    progress being the decoded share of the answer."""

    ends_full_blocks = True

    def commit_block(self, logits, candidates, state):
        region = self.region(candidates)
        mean_gap = top2_gap(logits).float().masked_fill(~region, 0).sum(1) / region.sum(1).clamp(min=1)
        return candidates.any(1) & (mean_gap >= self.threshold(decoded_fraction(state)))


@register_stopping("prophet")
class Prophet(_EarlyCommit):
    """Prophet's early all-in commit: the gap is averaged over the block's masked positions and compared
    with prophet_thresholds (t_early, t_mid, t_late) while under 0.33, under 0.67, and from 0.67 of the
    answer is decoded."""

    def __init__(self, prophet_thresholds=(7.5, 5.0, 2.5)):
        self.thresholds = tuple(float(t) for t in prophet_thresholds)

    @classmethod
    def from_config(cls, config):
        return cls(prophet_thresholds=config.prophet_thresholds)

    def region(self, candidates):
        return candidates

    def threshold(self, progress):
        early, mid, late = self.thresholds
        return torch.where(progress < 0.33, early, torch.where(progress < 0.67, mid, late))


@register_stopping("sched")
class SchED(_EarlyCommit):
    """SchED's progress-aware exit: the gap is averaged over every position of the block (committed ones
    included) and compared with a threshold that decays smoothly from sched_thresholds[0] to
    sched_thresholds[1] as the answer is decoded: linearly, or along a half cosine."""

    def __init__(self, sched_thresholds=(7.5, 2.5), sched_schedule: str = "linear"):
        self.high, self.low = (float(t) for t in sched_thresholds)
        self.schedule = sched_schedule

    @classmethod
    def from_config(cls, config):
        return cls(sched_thresholds=config.sched_thresholds, sched_schedule=config.sched_schedule)

    def region(self, candidates):
        return torch.ones_like(candidates)

    def threshold(self, progress):
        left = 1 - progress if self.schedule == "linear" else (1 + torch.cos(math.pi * progress)) / 2
        return self.low + (self.high - self.low) * left

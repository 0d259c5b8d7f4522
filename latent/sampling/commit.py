"""Commit rules: which masked positions of the block take their proposal this step.

A rule sees the block's confidence [b, L] (-inf off candidates) and the candidate mask, and returns a
bool [b, L]. Ties in confidence go to the lower position (a stable sort), so results do not depend on
the device's top-k. `steps_per_block` is the fixed number of forwards per block, or None when the
block simply runs until it has no mask.
"""

from __future__ import annotations

import torch

from .registry import Part, register_commit


def confidence_rank(confidence: torch.Tensor) -> torch.Tensor:
    """Rank of each position by confidence, 0 = most confident; ties to the lower position."""
    order = confidence.sort(dim=-1, descending=True, stable=True).indices
    return torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))


def transfer_schedule(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's quota: M masked over S steps -> floor(M/S) per step, the first M mod S steps one more. [b, S]"""
    base, extra = masked[:, None] // steps, masked[:, None] % steps
    return base + (torch.arange(steps, device=masked.device) < extra).long()


@register_commit("schedule")
class ScheduleCommit(Part):
    """LLaDA: commit the top-k by confidence, k from the per-block transfer schedule. Every step is a
    forward, even one whose quota is 0."""

    def __init__(self, steps_per_block: int = 1):
        self.steps_per_block = int(steps_per_block)
        self.quota = None  # [B, S], indexed by the caller's row so it survives rows leaving

    @classmethod
    def from_config(cls, config):
        return cls(steps_per_block=config.steps_per_block)

    def begin_block(self, state, masked: torch.Tensor):
        # Only the given rows start a block (with independent rows, one row at a time): the others keep theirs.
        if self.quota is None or self.quota.shape[0] != state.batch_size or self.quota.device != masked.device:
            self.quota = torch.zeros(state.batch_size, self.steps_per_block, dtype=torch.long, device=masked.device)
        self.quota[state.rows] = transfer_schedule(masked, self.steps_per_block)

    def __call__(self, confidence, candidates, state):
        step = getattr(state, "rule_step", None)  # per row when a drafting verifier runs rows at different steps
        step = state.block_step if step is None else step
        step = torch.as_tensor(step, device=self.quota.device).expand(len(state.rows))
        # A drafting verifier may look past the block's last step: nothing is left to commit there.
        k = torch.where(step < self.steps_per_block, self.quota[state.rows, step.clamp(max=self.steps_per_block - 1)], 0)
        return candidates & (confidence_rank(confidence) < k[:, None])


@register_commit("threshold")
class ThresholdCommit(Part):
    """Fast-dLLM: every candidate with confidence >= threshold, and always the most confident one."""

    steps_per_block = None

    def __init__(self, threshold: float = 0.9):
        self.threshold = float(threshold)

    @classmethod
    def from_config(cls, config):
        return cls(threshold=config.threshold)

    def begin_block(self, state, masked):
        pass

    def __call__(self, confidence, candidates, state):
        top1 = confidence_rank(confidence) == 0
        return candidates & ((confidence >= self.threshold) | top1)


@register_commit("factor")
class FactorCommit(Part):
    """Fast-dLLM: with candidates sorted c_1 >= c_2 >= ..., the longest prefix with
    (r + 1)(1 - c_r) <= factor, and at least one."""

    steps_per_block = None

    def __init__(self, factor: float = 1.0):
        self.factor = float(factor)

    @classmethod
    def from_config(cls, config):
        return cls(factor=config.factor)

    def begin_block(self, state, masked):
        pass

    def __call__(self, confidence, candidates, state):
        c = confidence.sort(dim=-1, descending=True, stable=True).values
        r = torch.arange(1, c.shape[-1] + 1, device=c.device, dtype=c.dtype)
        ok = ((r + 1) * (1 - c) <= self.factor) & torch.isfinite(c)
        ok[:, 0] = True
        count = ok.long().cumprod(-1).sum(-1)  # length of the leading run of passing ranks
        return candidates & (confidence_rank(confidence) < count[:, None])


@register_commit("saber")
class SaberCommit(Part):
    """Saber's adaptive acceleration: every candidate with confidence > tau, tau the mean confidence the
    answer's committed tokens had when they were committed (1 before any), and at least the
    saber_min_commit most confident. As confidence stays high, more tokens pass per step."""

    steps_per_block = None

    def __init__(self, saber_min_commit: int = 2):
        self.n = int(saber_min_commit)
        self.at_commit = None  # [B, G] confidence of each generated position's token when committed, NaN if masked

    @classmethod
    def from_config(cls, config):
        return cls(saber_min_commit=config.saber_min_commit)

    def begin_block(self, state, masked):
        pass

    def __call__(self, confidence, candidates, state):
        if self.at_commit is None:
            self.at_commit = torch.full((state.batch_size, state.canvas_len - state.prompt_len), float("nan"),
                                        dtype=torch.float64, device=confidence.device)
        lo = state.block_start - state.prompt_len
        hi = lo + confidence.shape[1]
        seen = self.at_commit[state.rows, :hi]
        seen[:, lo:] = seen[:, lo:].masked_fill(candidates, float("nan"))  # masked again: no longer committed
        tau = seen.nanmean(1).nan_to_num(1.0)
        pick = candidates & (confidence > tau[:, None])
        top = candidates & (confidence_rank(confidence) < self.n)
        pick = torch.where(pick.sum(1, keepdim=True) >= self.n, pick, top)
        seen[:, lo:] = torch.where(pick, confidence.double(), seen[:, lo:])
        self.at_commit[state.rows, :hi] = seen
        return pick

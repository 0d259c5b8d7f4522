"""Dynamic block length (CtrlDiff's idea; docs/sampling.md, "More decoders of the literature").

CtrlDiff decides the length of each next block on the fly with a trained head. Here the sampler's block
(`block_length`) is the largest block, and inside it the part cuts sub-blocks, by a rule or, with
`block_predictor` set, by a learned predictor (block_predictor.py: the largest size it judges safe).
When a row's sub-block is full (and at the block's start), the next one starts at the row's first masked
position `f` of the block, and its length is the largest of `dynamic_block_sizes` whose mean predictive
entropy over the masked positions in [f, f + size) (softmax of this step's proposal logits, mask id
excluded; clipped to the block's end) is at most `dynamic_block_entropy` nats, else the smallest size.
Only the sub-block's masked positions are candidates of the commit rule, so the model commits far ahead
where it is sure and in small steps where it is not. It needs a commit rule without a fixed step count
(threshold, factor, saber, ar_guided).
"""

from __future__ import annotations

import math

import torch

from .block_predictor import load_block_predictor, window_features
from .registry import part_name, register_stopping
from .stopping import BlockFull


@register_stopping("dynamic_block")
class DynamicBlock(BlockFull):
    """Sub-blocks of the block whose lengths follow the model's entropy or a learned predictor (module
    docstring); `history` holds (caller row, block, first position in the block, length) for every
    sub-block chosen."""

    def __init__(self, dynamic_block_sizes=(4, 8, 16), dynamic_block_entropy: float = 0.5, block_predictor=None,
                 block_predictor_threshold: float = 0.5):
        self.sizes = sorted(int(s) for s in dynamic_block_sizes)
        self.entropy = float(dynamic_block_entropy)
        self.predictor = None if block_predictor is None else load_block_predictor(block_predictor)
        t = float(block_predictor_threshold)
        self.cutoff = math.log(t / (1 - t)) if 0 < t < 1 else None  # sigmoid(s) > t  <=>  s > logit(t)
        self.end = None  # [B] end (block-relative, exclusive) of each caller row's sub-block
        self.block = None
        self.history = []

    @classmethod
    def from_config(cls, config):
        return cls(config.dynamic_block_sizes, config.dynamic_block_entropy, config.block_predictor,
                   config.block_predictor_threshold)

    @classmethod
    def check_config(cls, config) -> None:
        sizes = config.dynamic_block_sizes
        if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
            raise ValueError(f"`dynamic_block_sizes` must be positive ints (sub-block lengths), got {sizes!r}.")
        if not config.dynamic_block_entropy >= 0:
            raise ValueError(f"`dynamic_block_entropy` must be >= 0 nats, got {config.dynamic_block_entropy}.")
        if not 0 < config.block_predictor_threshold < 1:
            raise ValueError(f"`block_predictor_threshold` must be in (0, 1) (a probability), got "
                             f"{config.block_predictor_threshold}.")
        if part_name(config.commit) == "schedule":
            raise ValueError("stopping='dynamic_block' chooses how many positions are candidates, so the schedule's "
                             "fixed quotas do not apply; use commit='threshold', 'factor', 'saber' or 'ar_guided'.")
        if part_name(config.verifier) != "none" or part_name(config.revision) != "none":
            raise ValueError("stopping='dynamic_block' keeps each row's sub-block from step to step; use "
                             "verifier='none' and revision='none'.")

    def limit_candidates(self, logits, candidates, state):
        b, width = candidates.shape
        if self.end is None:
            self.end = torch.zeros(state.batch_size, dtype=torch.long, device=candidates.device)
        if self.block != state.block:
            self.block = state.block
            self.end.zero_()
        position = torch.arange(width, device=candidates.device)
        end = self.end[state.rows]
        new = candidates.any(1) & ~(candidates & (position < end[:, None])).any(1)  # sub-block full: choose again
        if bool(new.any()):
            first = torch.where(candidates, position, width).amin(1)
            chosen = self.choose(logits, candidates, first)
            end = torch.where(new, (first + chosen).clamp(max=width), end)
            self.end[state.rows] = end
            for r in new.nonzero().flatten().tolist():
                self.history.append((int(state.rows[r]), state.block, int(first[r]), int(chosen[r])))
        return position < end[:, None]

    def passes(self, logits, candidates, first) -> torch.BoolTensor:
        """[b, S]: whether each size's window passes, by the learned predictor if there is one, else the rule."""
        if self.predictor is not None:
            with torch.no_grad():
                features, _ = window_features(logits, candidates, first, self.sizes)
                return self.predictor(features) > self.cutoff
        entropy = torch.special.entr(logits.float().softmax(-1)).sum(-1)  # [b, L] nats
        position = torch.arange(candidates.shape[1], device=candidates.device)
        ok = []
        for size in self.sizes:
            inside = candidates & (position >= first[:, None]) & (position < first[:, None] + size)
            ok.append(entropy.masked_fill(~inside, 0).sum(1) / inside.sum(1).clamp(min=1) <= self.entropy)
        return torch.stack(ok, 1)

    def choose(self, logits, candidates, first) -> torch.Tensor:
        """[b] the sub-block length of each row starting one at `first`: the largest size that passes, else
        the smallest."""
        ok = self.passes(logits, candidates, first)
        chosen = torch.full_like(first, self.sizes[0])
        for i, size in enumerate(self.sizes[1:], 1):
            chosen = torch.where(ok[:, i], size, chosen)
        return chosen

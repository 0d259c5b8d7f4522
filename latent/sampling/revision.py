"""Revision: which committed tokens may change again (docs/sampling.md, "Revision").

A revision part sees every step of a block after the commit rule and returns the block it wants: it
may mask committed tokens again (remasking), replace them by other tokens (editing) or commit more.
It acts on the current block only, so finished blocks (and the exact caches that hold them) never
change. Its hooks, all per step of the loop and of `MaskedDiffusionScheduler.step`:

- `begin_block(state, masked)`: a block starts (per-block memory is reset here).
- `rectify(logits, block, state)`: the block's logits before the proposal (CCD replaces them).
- `__call__(block, before, x0, scores, logits, transfer, state)`: the block after the commit rule,
  the block before the step, the proposals, every position's confidence score, the logits, and the
  positions the commit rule picked; returns the new block.
- `wants_step(step, fixed)`: whether a full block gets another forward (editing's post steps).

`ends_full_blocks`: the block ends as soon as it is full, instead of running the commit rule's
remaining zero-quota steps. Per-row memory is indexed by the caller's row (`state.rows`), so it
survives rows leaving the batch.
"""

from __future__ import annotations

import torch

from .commit import confidence_rank
from .registry import Part, register_revision

NEG_INF = float("-inf")


@register_revision("none")
class NoRevision(Part):
    """Committed tokens are final (LLaDA, Fast-dLLM)."""

    ends_full_blocks = False

    def begin_block(self, state, masked):
        pass

    def rectify(self, logits, block, state):
        return logits

    def __call__(self, block, before, x0, scores, logits, transfer, state):
        return block

    def wants_step(self, step: int, fixed: int | None) -> bool:
        return False


class _Revision(NoRevision):
    ends_full_blocks = True


@register_revision("editing_threshold")
class EditingThreshold(_Revision):
    """LLaDA2's token editing, as diffusers' BlockRefinementScheduler and LLaDA2Pipeline do it: at every
    step, a token committed before this step is replaced by the proposal when they differ and the
    proposal's probability softmax(L)[x0] (float32) is > editing_threshold. Once the block is full it
    gets editing-only post steps: the first one unless the block filled on the commit rule's last fixed
    step, each next one only if the previous forward edited something, at most max_post_steps."""

    def __init__(self, editing_threshold: float = 0.5, max_post_steps: int = 16):
        self.threshold, self.max_post_steps = float(editing_threshold), int(max_post_steps)

    @classmethod
    def from_config(cls, config):
        return cls(editing_threshold=config.editing_threshold, max_post_steps=config.max_post_steps)

    def begin_block(self, state, masked):
        self.post_steps, self.edited = 0, False

    def __call__(self, block, before, x0, scores, logits, transfer, state):
        committed = before != state.mask_token_id
        p = logits.float().softmax(-1).gather(-1, x0[..., None]).squeeze(-1)
        edit = committed & (x0 != before) & (p > self.threshold)
        self.post_steps += int(bool(committed.all()))  # a forward on a full block
        self.edited = bool(edit.any())  # batch-wide, as LLaDA2Pipeline decides
        return torch.where(edit, x0, block)

    def wants_step(self, step, fixed):
        if self.post_steps >= self.max_post_steps:
            return False
        if self.post_steps == 0:  # the block just filled: one look at it, unless the step budget is spent
            return fixed is None or step < fixed
        return self.edited


@register_revision("rcr")
class RunningConfidenceRemasking(_Revision):
    """MDPO's running-confidence remasking: the commit rule says how many tokens of the block are
    committed after this step (those before plus its picks); which ones is decided anew among all of
    the block. Every masked position takes its proposal with this step's confidence, committed tokens
    keep the confidence they had when committed, and the most confident `count` stay (ties to the lower
    position); the others are masked again."""

    def begin_block(self, state, masked):
        self.running = None  # [B, L] confidence of each committed token at its commit

    def __call__(self, block, before, x0, scores, logits, transfer, state):
        mask_id = state.mask_token_id
        if self.running is None:
            self.running = scores.new_full((state.batch_size, scores.shape[1]), NEG_INF)
        masked = before == mask_id
        count = (~masked).sum(1) + transfer.sum(1)
        running = torch.where(masked, scores, self.running[state.rows])
        stay = confidence_rank(running) < count[:, None]
        self.running[state.rows] = running.masked_fill(~stay, NEG_INF)
        return torch.where(stay, torch.where(masked, x0, before), mask_id)


@register_revision("saber")
class SaberBacktracking(_Revision):
    """Saber's backtracking (the commit side is commit="saber"): while the block still has masks after
    the commit, the r committed tokens whose confidence dropped most since the previous step are masked
    again, r = min(max(floor(n / 2), ceil(f / 8)), f - 1) with f the tokens committed this step and
    n = saber_min_commit. The drop is c_t - c_{t-1}, c the confidence of the position's proposal; tokens
    without a previous step in this block are kept."""

    def __init__(self, saber_min_commit: int = 2):
        self.n = int(saber_min_commit)

    @classmethod
    def from_config(cls, config):
        return cls(saber_min_commit=config.saber_min_commit)

    def begin_block(self, state, masked):
        self.previous = None  # [B, L] each position's confidence at the previous step of the block

    def __call__(self, block, before, x0, scores, logits, transfer, state):
        mask_id = state.mask_token_id
        if self.previous is None:
            self.previous = scores.new_full((state.batch_size, scores.shape[1]), NEG_INF)
        drop = self.previous[state.rows] - scores  # -inf at the block's first step: nothing to compare with
        self.previous[state.rows] = scores
        committed = (block != mask_id) & torch.isfinite(drop)
        f = transfer.sum(1)
        r = torch.minimum(torch.clamp(-(-f // 8), min=self.n // 2), f - 1).clamp(min=0)
        r = torch.where((block == mask_id).any(1), r, 0)  # a block that is full now keeps every token
        back = committed & (confidence_rank(drop.masked_fill(~committed, NEG_INF)) < r[:, None])
        return block.masked_fill(back, mask_id)


@register_revision("ccd")
class CoherentContextualDecoding(_Revision):
    """CCD's trajectory rectification with its consistency budget. Rectification: the proposal and the
    confidence come from the mean of the block's softmax distributions over the last `ccd_window`
    steps (the step's own logits while the window holds one step). Budget: besides the commit rule's
    picks, every masked position whose averaged distribution has entropy < ccd_entropy (nats) is
    committed. Committed tokens are never changed."""

    def __init__(self, ccd_window: int = 2, ccd_entropy: float = 0.1):
        self.window, self.entropy = int(ccd_window), float(ccd_entropy)

    @classmethod
    def from_config(cls, config):
        return cls(ccd_window=config.ccd_window, ccd_entropy=config.ccd_entropy)

    def begin_block(self, state, masked):
        self.history, self.seen = None, 0  # [d, B, L, V] ring of the last d steps' distributions

    def rectify(self, logits, block, state):
        probs = logits.float().softmax(-1)
        if self.history is None:
            self.history = probs.new_zeros((self.window, state.batch_size, *probs.shape[1:]))
        self.history[self.seen % self.window, state.rows] = probs
        self.seen += 1
        if min(self.seen, self.window) == 1:
            self.marginal_entropy = torch.special.entr(probs).sum(-1)
            return logits
        marginal = self.history[: min(self.seen, self.window), state.rows].mean(0)
        self.marginal_entropy = torch.special.entr(marginal).sum(-1)
        return marginal.log()

    def __call__(self, block, before, x0, scores, logits, transfer, state):
        consistent = (block == state.mask_token_id) & (self.marginal_entropy < self.entropy)
        return torch.where(consistent, x0, block)

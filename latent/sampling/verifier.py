"""Verifier: whether drafted tokens are accepted (docs/sampling.md, "Verifier").

A verifier part runs one forward of the loop and returns what it did to the block (a `StepResult`).
`none` is the plain step: the cache part's logits, then `decode_step`. A drafting verifier spends the
forward on several candidate blocks at once and keeps what a check says is right:

- `freedave` (FreeDave): the candidates are the next steps of the sampler itself, drafted from logits it
  already has; the forward checks them all, and the tokens are exactly those of `none`, in fewer forwards.
- `diffuspec` (DiffuSpec, diffuspec.py): the model drafts a window of tokens, an autoregressive verifier
  keeps the longest prefix it would have written itself; the tokens are the verifier's greedy output.

Hooks: `begin_block(state, masked)`, `step(state, parts, config) -> StepResult`, `steps_per_block(commit)`
(the fixed number of forwards per block, None: until the block is full) and `ends_full_blocks`.
Per-row memory is indexed by the caller's row (`state.rows`), so it survives rows leaving the batch.
"""

from __future__ import annotations

import torch

from .registry import Part, register_verifier
from .step import StepResult, block_logits, decode_step, step_outcome


@register_verifier("none")
class NoVerifier(Part):
    """One forward, one step of the sampler; nothing is drafted."""

    ends_full_blocks = False

    def steps_per_block(self, commit) -> int | None:
        return commit.steps_per_block

    def begin_block(self, state, masked):
        pass

    def step(self, state, parts, config) -> StepResult:
        block = state.x[:, state.block_start : state.block_end]
        return decode_step(block_logits(state, parts), block, parts, state, config)


def forward_copies(state, parts, x: torch.Tensor, copies: int, rule_step=None) -> tuple[torch.Tensor, object]:
    """The current block's logits for `copies` canvases per active row in one forward: x is [copies * b, N],
    copy-major (copy c of row r is row c * b + r). The cache part sees each row's cache repeated, then
    keeps one copy again. Returns the logits and the view the forward ran on (for decode_step)."""
    b = len(state.rows)
    repeat = torch.arange(b, device=x.device).repeat(copies)
    view = state.view(repeat, x, rule_step)
    cache = parts["cache"]
    cache.select(state.guidance.rows(repeat, b))
    logits = block_logits(view, parts)
    cache.select(state.guidance.rows(torch.arange(b, device=x.device), copies * b))
    state.nfe, state.forward_tokens = view.nfe, view.forward_tokens
    return logits, view


@register_verifier("freedave")
class FreeDave(NoVerifier):
    """FreeDave's lossless draft-and-verify. Let v be the latest state whose logits L(v) are known, and
    D_0 = the canvas = step(v, L(v)), an exact state of the sampler. Drafts D_{i+1} = step(D_i, L(v)) reuse
    L(v) for the next freedave_drafts - 1 steps (the commit rule at its later step indices). One forward
    computes L(D_i) for every draft; T_i = step(D_i, L(D_i)) is the sampler's state after D_i. D_{i+1} is
    exact iff D_i is and T_i == D_{i+1}; with m the longest run of such matches, the canvas becomes T_m
    (m + 1 steps of the sampler in one forward) and L(D_m) drafts the next forward. Drafts that are full
    are not forwarded. The block's first forward has nothing to draft from and is a plain step.

    Lossless needs a step that is a function of the block, its logits and the rule's step index: greedy
    proposals, a deterministic confidence, a commit rule without memory and no revision."""

    ends_full_blocks = True  # the sampler's zero-quota steps on a full block change nothing

    def __init__(self, freedave_drafts: int = 4):
        self.drafts = int(freedave_drafts)
        self.done = None  # [B] steps of the sampler each row's block has taken
        self.frozen = self.frozen_rows = None  # L(v) of the active rows, and which caller rows they are

    @classmethod
    def from_config(cls, config):
        return cls(freedave_drafts=config.freedave_drafts)

    def steps_per_block(self, commit):
        return None

    def begin_block(self, state, masked):
        if self.done is None:
            self.done = torch.zeros(state.batch_size, dtype=torch.long, device=state.x.device)
        self.done.zero_()
        self.frozen = None

    def step(self, state, parts, config):
        start, end, mask_id = state.block_start, state.block_end, state.mask_token_id
        block, b = state.x[:, start:end], len(state.rows)
        done = self.done[state.rows]
        if self.frozen is None:  # the block's first forward: a plain step
            logits = block_logits(state, parts)
            result = decode_step(logits, block, parts, state, config)
            self._advance(state, logits, done + 1)
            return result
        frozen = self.frozen[(self.frozen_rows[None] == state.rows[:, None]).int().argmax(1)]
        everyone = torch.arange(b, device=block.device)
        drafts = [block]
        for i in range(self.drafts - 1):
            if not bool((drafts[-1] == mask_id).any()):
                break
            x = state.x.clone()
            x[:, start:end] = drafts[-1]  # the canvas of the draft (stopping parts read the answer's progress)
            drafts.append(decode_step(frozen, drafts[-1], parts, state.view(everyone, x, done + i), config).block)
        n = sum(bool((d == mask_id).any()) for d in drafts)  # drafts with masks: a leading run
        x = state.x.repeat(n, 1)
        x[:, start:end] = torch.cat(drafts[:n])
        steps = (done[None] + torch.arange(n, device=done.device)[:, None]).flatten()
        logits, view = forward_copies(state, parts, x, n, steps)
        target = decode_step(logits, x[:, start:end], parts, view, config)
        targets = target.block.view(n, b, -1)
        later = torch.stack(drafts[1 : n + 1]) if len(drafts) > 1 else targets[:0]
        matched = (targets[: len(later)] == later).all(-1).long().cumprod(0).sum(0)  # [b]
        # T_m; with every forwarded draft verified and the next one full, T_{n-1} equals that full draft
        pick = matched.clamp(max=n - 1)
        self._advance(state, logits.view(n, b, *logits.shape[1:])[pick, everyone], done + matched + 1)
        return step_outcome(block, targets[pick, everyone], target.x0.view(n, b, -1)[pick, everyone],
                            target.confidence.view(n, b, -1)[pick, everyone], mask_id)

    def _advance(self, state, logits, done):
        self.frozen, self.frozen_rows = logits, state.rows
        self.done[state.rows] = done

"""Independent decoding blocks per row (row_blocks="independent"): a row moves on to its next block as soon
as its own block is done, instead of waiting for the batch's slowest row, and leaves the batch after its
last block (as rows that a stopping part retires do).

Each caller row has its own block (`DecodeState.row_blocks`) and step in it (`RowBlocks.step`, the commit
rule's `rule_step`). A forward runs the cache part as the shared loop does, over the span of every row's
block (`block_start` .. `block_end`); each row then takes the logits of its own block, so proposal,
confidence and commit parts see [b, block_length] blocks as usual. A shorter block (a block_alignment="start"
model whose prompt ends off its block grid) is seen through the block_length positions that end where it
ends (`DecodeState.row_window`): the positions outside it are no candidates and keep their tokens. When a row starts a block, the
commit, revision and verifier parts' `begin_block` is called for that row alone. A row's block is done
by the shared loop's rule: when it has no mask, and, for a rule with a fixed step count (the schedule),
after those steps.
"""

from __future__ import annotations

import torch

from .registry import part_name
from .step import block_logits, decode_step


def ends_full_blocks(parts: dict) -> bool:
    """Whether a revision, verifier or stopping part ends a block once it is full, so a fixed-step rule does
    not run its remaining zero-quota steps."""
    return bool(parts["revision"].ends_full_blocks or parts["verifier"].ends_full_blocks
                or getattr(parts["stopping"], "ends_full_blocks", False))


def retire_rows(state, parts: dict, keep: torch.Tensor) -> None:
    """Keep the active rows where `keep` (bool [b]) is True; the cache part keeps their K/V."""
    rows_before = len(state.rows)
    index = state.keep_rows(keep)
    if len(state.rows):
        parts["cache"].select(state.guidance.rows(index, rows_before))


class RowBlocks:
    """Where each row stands: its block (state.row_blocks) and its step in it, by caller row."""

    def __init__(self, state, parts: dict):
        self.parts = parts
        self.fixed = parts["verifier"].steps_per_block(parts["commit"])  # None: until the block is full
        self.step = torch.zeros(state.batch_size, dtype=torch.long, device=state.x.device)
        state.row_blocks = torch.zeros(state.batch_size, dtype=torch.long, device=state.x.device)
        self._begin(state, torch.arange(len(state.rows), device=state.x.device))

    def _masks(self, state) -> torch.Tensor:
        """[b] masked positions in each active row's block."""
        window = state.row_window()
        return ((state.x.gather(1, window) == state.mask_token_id) & state.row_in_block(window)).sum(1)

    def _begin(self, state, index: torch.Tensor) -> None:
        view = state.view(index)
        masked = self._masks(view)
        for slot in ("commit", "revision", "verifier"):
            self.parts[slot].begin_block(view, masked)

    def _continues(self, state) -> torch.Tensor:
        """[b] whether each active row's block gets another forward (the shared loop's rule, row by row)."""
        masked, step = self._masks(state) > 0, self.step[state.rows]
        if self.fixed is None:
            return masked
        if bool((masked & (step >= self.fixed)).any()):
            raise RuntimeError(f"a row's block still has masks after the commit rule's {self.fixed} steps; a step "
                               "callback must keep a fixed-step block on its schedule.")
        return masked if ends_full_blocks(self.parts) else masked | (step < self.fixed)

    def advance(self, state) -> None:
        """Before a forward: rows whose block is done start their next one; rows past the last leave."""
        while len(state.rows):
            moving = ~self._continues(state)
            if not bool(moving.any()):
                break
            rows = state.rows[moving]
            state.row_blocks[rows] += 1
            self.step[rows] = 0
            staying = state.row_blocks[state.rows] < state.num_blocks
            if not bool(staying.all()):
                retire_rows(state, self.parts, staying)
                moving = moving[staying]
            if len(state.rows) and bool(moving.any()):
                self._begin(state, moving.nonzero().squeeze(1))
        if len(state.rows):
            state.rule_step = self.step[state.rows]
            state.block, state.block_step = int(state.row_blocks[state.rows].min()), int(state.rule_step.min())

    def forward_step(self, state, config) -> None:
        """One forward for every active row, each committing in its own block; fills state.info."""
        window = state.row_window()
        inside = state.row_in_block(window)
        logits = block_logits(state, self.parts)  # the span of every row's block
        # a window position outside its row's block reads any logits of the span: it is never a candidate
        column = (window - state.block_start).clamp(0, logits.shape[1] - 1)
        logits = logits.gather(1, column[..., None].expand(-1, -1, logits.shape[-1]))
        before = state.x.gather(1, window)
        masked = (before == state.mask_token_id) & inside
        # positions outside the block hold a token for the parts (a prompt's or a later block's mask is no
        # candidate), and keep their own
        held = before.masked_fill(~inside & (before == state.mask_token_id), int(state.mask_token_id == 0))
        result = decode_step(logits, held, self.parts, state, config)
        state.x.scatter_(1, window, torch.where(inside, result.block, before))
        stuck = masked.any(1) & (result.block == state.mask_token_id).sum(1).ge(masked.sum(1))
        if self.fixed is None and bool(stuck.any()):
            raise RuntimeError(f"commit rule {part_name(self.parts['commit'])!r} decoded nothing in a row's block "
                               "that has masks; a rule without a fixed step count must commit at least one token per step.")
        state.info = {
            "block": state.row_blocks[state.rows].clone(), "block_start": window[:, 0],
            "block_step": self.step[state.rows].clone(), "rows": state.rows, "x0": result.x0,
            "confidence": result.confidence, "transfer": result.transfer, "remasked": result.remasked,
            "edited": result.edited, "nfe": state.nfe,
        }
        self.step[state.rows] += 1


def decode_rows_independently(state, parts: dict, config, end_step) -> None:
    """The loop of row_blocks="independent": until every row has left, move rows on, then one forward;
    `end_step(state, parts)` is what every forward ends with (stopping part, callbacks, rows retiring)."""
    rows = RowBlocks(state, parts)
    while True:
        rows.advance(state)
        if not len(state.rows):
            break
        rows.forward_step(state, config)
        end_step(state, parts)

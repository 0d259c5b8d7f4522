"""One sampler step on one block: the shared core of the decoding loop (`Sampler`) and of the
diffusers-style `MaskedDiffusionScheduler.step`. docs/sampling.md states the rules it follows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

NEG_INF = float("-inf")


@dataclass
class StepResult:
    block: torch.LongTensor  # [b, L] the block after this step
    x0: torch.LongTensor  # [b, L] the proposal at every position
    confidence: torch.Tensor  # [b, L], -inf where nothing could be committed
    transfer: torch.BoolTensor  # [b, L] positions committed this step (masked before, a token now)
    remasked: torch.BoolTensor  # [b, L] tokens masked again by the revision part
    edited: torch.BoolTensor  # [b, L] tokens replaced by another token by the revision part


def decode_step(logits: torch.Tensor, block_tokens: torch.LongTensor, parts: dict[str, Any], state, config) -> StepResult:
    """Commit (and, with a revision part, revise) tokens of one block.

    logits [b, L, V]: the block's (guided) logits; block_tokens [b, L]: its tokens, masked positions
    holding `state.mask_token_id`; parts: the "proposal", "confidence" and "commit" parts, and optionally
    "revision" and "stopping"; config: the `SamplerConfig` whose EOS options apply (logits_eos_inf,
    confidence_eos_eot_inf).
    """
    mask_id = state.mask_token_id
    revision, stopping = parts.get("revision"), parts.get("stopping")
    if config.logits_eos_inf:
        logits = logits.clone()
        logits[..., config.eos_token_id] = NEG_INF
    if revision is not None:
        logits = revision.rectify(logits, block_tokens, state)
    # The mask id is never a proposal: committing it would leave a hole the schedule does not count.
    proposal_logits = logits.clone()
    proposal_logits[..., mask_id] = NEG_INF
    x0 = parts["proposal"](proposal_logits, state)
    confidence_logits = logits
    if config.confidence_eos_eot_inf:
        confidence_logits = logits.clone()
        special = [t for t in (config.eos_token_id, config.eot_token_id) if t is not None]
        confidence_logits[..., special] = NEG_INF
    candidates = block_tokens == mask_id
    limit = getattr(stopping, "limit_candidates", None)
    if limit is not None:  # a stopping part that cuts the block shorter (dynamic block length)
        candidates = candidates & limit(proposal_logits, candidates, state)
    # Every position's score: revision parts also judge committed tokens; only candidates can be committed.
    scores = parts["confidence"](confidence_logits, x0, state)
    confidence = scores.masked_fill(~candidates, NEG_INF)
    transfer = torch.zeros_like(candidates)
    if candidates.any():  # a full block (revision post steps) has nothing to commit
        commit = parts["commit"]
        seen = {"x0": x0} if getattr(commit, "reads_proposal", False) else {}  # e.g. a guide checks the drafts
        if getattr(commit, "reads_logits", False):  # e.g. a learned filter reads the step's distribution
            seen["logits"] = confidence_logits
        transfer = commit(confidence, candidates, state, **seen) & candidates
    commit_block = getattr(stopping, "commit_block", None)
    if commit_block is not None:  # early commit (Prophet, SchED): the whole block at once
        whole = commit_block(proposal_logits, candidates, state)
        if whole is not None:
            transfer |= candidates & whole[:, None]
    block = torch.where(transfer, x0, block_tokens)
    if revision is not None:
        block = revision(block, block_tokens, x0, scores, logits, transfer, state)
    return step_outcome(block_tokens, block, x0, confidence, mask_id)


def step_outcome(before, after, x0, confidence, mask_id: int) -> StepResult:
    """What a forward did to a block, from its tokens before and after (a revision part may change committed
    tokens; a verifier may advance several steps in one forward)."""
    was_masked, is_masked = before == mask_id, after == mask_id
    committed = was_masked & ~is_masked
    remasked = ~was_masked & is_masked
    edited = ~was_masked & ~is_masked & (after != before)
    return StepResult(after, x0, confidence, committed, remasked, edited)


def block_logits(state, parts: dict[str, Any]) -> torch.Tensor:
    """The current block's logits [b, L, V] of one forward: the cache part runs the model, the guidance
    part combines the copies of each row."""
    raw, lo = parts["cache"].logits(state)
    logits = state.guidance.combine(raw)[:, state.block_start - lo : state.block_end - lo]
    steer = getattr(state.guidance, "steer", None)  # guidance that also reads the canvas (classifier guidance)
    return logits if steer is None else steer(logits, state)

"""One sampler step on one block: the shared core of the decoding loop (`Sampler`) and of the
diffusers-style `MaskedDiffusionScheduler.step`. docs/sampling.md states the rules it follows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

NEG_INF = float("-inf")


@dataclass
class StepResult:
    block: torch.LongTensor  # [b, L] the block after this step's commits
    x0: torch.LongTensor  # [b, L] the proposal at every position
    confidence: torch.Tensor  # [b, L], -inf where nothing could be committed
    transfer: torch.BoolTensor  # [b, L] positions committed this step


def decode_step(logits: torch.Tensor, block_tokens: torch.LongTensor, parts: dict[str, Any], state, config) -> StepResult:
    """Commit tokens of one block.

    logits [b, L, V]: the block's (guided) logits; block_tokens [b, L]: its tokens, masked positions
    holding `state.mask_token_id`; parts: the "proposal", "confidence" and "commit" parts; config: the
    `SamplerConfig` whose EOS options apply (logits_eos_inf, confidence_eos_eot_inf).
    """
    mask_id = state.mask_token_id
    if config.logits_eos_inf:
        logits = logits.clone()
        logits[..., config.eos_token_id] = NEG_INF
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
    confidence = parts["confidence"](confidence_logits, x0, state).masked_fill(~candidates, NEG_INF)
    transfer = parts["commit"](confidence, candidates, state) & candidates
    return StepResult(torch.where(transfer, x0, block_tokens), x0, confidence, transfer)

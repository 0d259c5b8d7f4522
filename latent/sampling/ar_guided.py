"""FreeCache's Guided Diffusion: a small autoregressive model decides which drafted tokens are committed
(docs/sampling.md, "More decoders of the literature").

Every masked position of the block holds its proposal (the diffusion model's draft); the guide reads the
canvas with the drafts in place, in one forward. In position order, a draft `v` at position `t` is accepted
when it is among the guide's `ar_guided_top_k` most probable tokens after the tokens before it and
`q(v) >= ar_guided_ratio * max q` (top-1 with ratio 0 is "the guide's greedy token"). The commit is the
run of accepted candidates from the block's first masked position up to the first rejected one; when the
first is rejected, it is committed alone (the diffusion model's draft, as the reference does). Committed
tokens are the diffusion model's; the guide only decides how many go in per step.
"""

from __future__ import annotations

import torch

from .checks import model_config_value
from .registry import Part, part_name, register_commit


def causal_logits(model, state, x: torch.Tensor) -> torch.Tensor:
    """A causal model's logits [b, n, V] on canvas rows x [b, n] (their key padding mask; no prefix
    embeddings), counted in the run's nfe and forward_tokens."""
    keys = None if state.attn is None else state.attn[:, state.prefix_len : state.prefix_len + x.shape[1]]
    out = model(x, attention_mask=keys)
    state.nfe += 1
    state.forward_tokens += x.numel()
    return out.logits


def next_token_logprobs(model, state, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """log q(x_t = v | x_<t) [b, hi - lo, V] of a causal model for canvas positions [lo, hi) of rows x [b, N]:
    its logits one slot earlier. Position 0, with nothing before it, gets log q = 0 (no evidence)."""
    logq = causal_logits(model, state, x[:, : max(hi - 1, 1)]).float().log_softmax(-1)
    wanted = logq[:, max(lo - 1, 0) : hi - 1]
    return torch.cat([torch.zeros_like(logq[:, :1]), wanted], 1) if lo == 0 else wanted


def check_causal(model, name: str) -> None:
    layout = model_config_value(model, "attention_layout")
    if layout not in (None, "causal"):
        raise ValueError(f"`{name}` must be a causal model (its logits at a slot predict the next token); its "
                         f"attention_layout is {layout!r}.")


@register_commit("ar_guided")
class ARGuidedCommit(Part):
    """Guided Diffusion's commit rule: the drafts of the block's masked positions, in order, up to the first
    one the autoregressive `guide_model` rejects (at least one)."""

    steps_per_block = None
    reads_proposal = True  # decode_step passes the drafts x0

    def __init__(self, guide_model, top_k: int = 2, ratio: float = 0.5):
        check_causal(guide_model, "guide_model")
        self.model, self.top_k, self.ratio = guide_model, int(top_k), float(ratio)
        self.guide_forwards = 0

    @classmethod
    def from_config(cls, config):
        return cls(config.guide_model, config.ar_guided_top_k, config.ar_guided_ratio)

    @classmethod
    def check_config(cls, config) -> None:
        if config.guide_model is None:
            raise ValueError("commit='ar_guided' needs `guide_model`, the small autoregressive model that checks drafts.")
        if not isinstance(config.ar_guided_top_k, int) or config.ar_guided_top_k < 1:
            raise ValueError(f"`ar_guided_top_k` must be an int >= 1, got {config.ar_guided_top_k!r}.")
        if not 0 <= config.ar_guided_ratio <= 1:
            raise ValueError(f"`ar_guided_ratio` must be in [0, 1], got {config.ar_guided_ratio}.")
        if part_name(config.verifier) != "none":
            raise ValueError("commit='ar_guided' decides each step with its own guide forward; use verifier='none'.")

    def begin_block(self, state, masked):
        pass

    def accepted(self, state, x0: torch.Tensor) -> torch.Tensor:
        """[b, L] whether the guide accepts each drafted token of the block, drafts filling every mask."""
        start, end = state.block_start, state.block_end
        block = state.x[:, start:end]
        x = state.x[:, :end].clone()
        x[:, start:] = torch.where(block == state.mask_token_id, x0, block)
        logq = next_token_logprobs(self.model, state, x, start, end)
        self.guide_forwards += 1
        mine = logq.gather(-1, x0[..., None]).squeeze(-1)
        better = (logq > mine[..., None]).sum(-1)  # tokens the guide finds strictly more probable
        return (better < self.top_k) & (mine.exp() >= self.ratio * logq.exp().amax(-1))

    def __call__(self, confidence, candidates, state, x0=None):
        if x0 is None:
            raise RuntimeError("commit='ar_guided' needs the drafts; it runs inside decode_step, which passes them.")
        if state.block_start == 0:
            raise ValueError("commit='ar_guided' reads the guide's first prediction at the last prompt token; give a "
                             "prompt of at least one token.")
        position = torch.arange(candidates.shape[1], device=candidates.device).expand_as(candidates)
        rejected = candidates & ~self.accepted(state, x0)
        first_rejected = torch.where(rejected, position, candidates.shape[1]).amin(1, keepdim=True)
        first = torch.where(candidates, position, candidates.shape[1]).amin(1, keepdim=True)
        run = candidates & (position < first_rejected)
        return run | (candidates & (position == first) & ~run.any(1, keepdim=True))

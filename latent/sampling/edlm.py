"""EDLM: energy-based reranking of parallel proposals by an autoregressive model (docs/sampling.md, "More
decoders of the literature").

EDLM's denoiser is the diffusion model's factorised proposal mu(x0 | x_t) times exp(-E(x0)); with an
autoregressive energy model, E(x0) = -log p_AR(x0) + log mu(x0 | x_t), so the product is the AR model's joint
distribution. Each step samples it by importance sampling:

1. `num_candidates` = k candidates, each a draw of the base proposal (argmax at temperature 0, else Gumbel-max
   with its own noise draw; the first is the base proposal's own draw).
2. Energy of candidate j, over the block's masked positions t (the tokens common to every candidate carry
   over and add nothing, as the reference does): E_j = sum_t log mu(c_jt) - log p_AR(c_jt | c_j,<t), with mu
   the untempered softmax of the proposal logits (mask id excluded) and p_AR the energy model's next-token
   probability on the canvas with candidate j in the block (its logits one slot earlier; position 0 of the
   canvas has no AR term).
3. One candidate per row is drawn with probabilities softmax(-E / edlm_temperature), from a uniform draw of
   the caller's batch shape (so rows that leave change no other row's draw).

As in the reference, importance sampling runs only in a window of the denoising time: while the masked share
of the row's answer before the step is in `edlm_window` (default [0.4, 0.6]); elsewhere the first candidate
is kept. k = 1 is the base proposal exactly (no extra draw, no energy forward).
"""

from __future__ import annotations

import torch

from .ar_guided import check_causal, next_token_logprobs
from .registry import Part, create_part, register_proposal


@register_proposal("edlm")
class EnergyRerankedProposal(Part):
    """k draws of the base proposal, one kept per row by importance weights exp(-E), E from the energy model."""

    def __init__(self, base, energy_model, num_candidates: int = 2, window=(0.4, 0.6), temperature: float = 1.0):
        check_causal(energy_model, "energy_model")
        self.base, self.model, self.k = base, energy_model, int(num_candidates)
        self.window, self.temperature = (float(window[0]), float(window[1])), float(temperature)
        self.energy_forwards = 0
        self.last = None  # per step: (rows, candidates [b, k, L], energy [b, k], chosen [b]) of the rows reranked

    @classmethod
    def from_config(cls, config):
        base = create_part("proposal", "argmax" if config.temperature == 0 else "gumbel", config)
        return cls(base, config.energy_model, config.num_candidates, config.edlm_window, config.edlm_temperature)

    @classmethod
    def check_config(cls, config) -> None:
        if config.energy_model is None:
            raise ValueError("proposal='edlm' needs `energy_model`, the autoregressive model whose log-probabilities "
                             "are the energy.")
        if not isinstance(config.num_candidates, int) or isinstance(config.num_candidates, bool) or config.num_candidates < 1:
            raise ValueError(f"`num_candidates` must be an int >= 1 (1 = the base proposal), got {config.num_candidates!r}.")
        low, high = config.edlm_window
        if not 0 <= low <= high <= 1:
            raise ValueError(f"`edlm_window` must be (low, high) with 0 <= low <= high <= 1, got {config.edlm_window!r}.")
        if not config.edlm_temperature > 0:
            raise ValueError(f"`edlm_temperature` must be > 0, got {config.edlm_temperature}.")

    def __call__(self, logits, state):
        first = self.base(logits, state)
        if self.k == 1:
            return first
        candidates = torch.stack([first] + [self.base(logits, state) for _ in range(self.k - 1)], 1)  # [b, k, L]
        u = torch.rand((state.batch_size,), generator=state.generator, dtype=torch.float64,
                       device=state.generator.device if state.generator is not None else logits.device)
        u = u[state.rows.to(u.device)].to(logits.device)
        masked_share = (state.x[:, state.prompt_len :] == state.mask_token_id).double().mean(1)
        inside = (masked_share >= self.window[0]) & (masked_share <= self.window[1])
        if not bool(inside.any()):
            return first
        rows = inside.nonzero().flatten()
        energy = self.energy(logits[rows], candidates[rows], state, rows)
        weights = (-energy / self.temperature).softmax(-1)
        chosen = (weights.cumsum(-1) < u[rows, None]).sum(-1).clamp(max=self.k - 1)  # inverse-CDF draw
        self.last = (state.rows[rows], candidates[rows], energy, chosen)
        out = first.clone()
        out[rows] = candidates[rows, chosen]
        return out

    def energy(self, logits, candidates, state, rows) -> torch.Tensor:
        """E [n, k] of the candidates [n, k, L] of active rows `rows` (their proposal logits [n, L, V])."""
        n, k, width = candidates.shape
        start, end = state.block_start, state.block_end
        block = state.x[rows, start:end]
        masked = block == state.mask_token_id
        x = state.x[rows, :end].repeat(k, 1)  # copy-major: copy j of row i is row j * n + i
        flat = candidates.transpose(0, 1).reshape(k * n, width)
        x[:, start:] = torch.where(masked.repeat(k, 1), flat, x[:, start:])
        view = state.view(rows.repeat(k), x)
        log_ar = next_token_logprobs(self.model, view, x, start, end).gather(-1, flat[..., None]).squeeze(-1)
        state.nfe, state.forward_tokens = view.nfe, view.forward_tokens
        self.energy_forwards += 1
        log_mu = logits.float().log_softmax(-1).repeat(k, 1, 1).gather(-1, flat[..., None]).squeeze(-1)
        per_position = (log_mu - log_ar).masked_fill(~masked.repeat(k, 1), 0)
        return per_position.sum(-1).view(k, n).transpose(0, 1)

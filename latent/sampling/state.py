"""What one decoding run shares between its parts: the canvas, the rows still decoding, the model call.

The sampler owns the canvas (token ids). Masked positions are found by `== mask_token_id` on ids.
Canvas coordinates: [0, prompt_len) is the (left-padded) prompt, then gen_length generated positions.
Prefix embeddings (from adapters) sit before the canvas; they are model slots, not canvas positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

# Layouts whose model needs to be told where the prompt ends (the prompt is their "prefix").
PREFIX_LAYOUTS = ("prefix", "block_causal")


def key_padding_mask(input_ids, attention_mask, n_prefix: int, prefix_mask, gen_length: int) -> torch.Tensor | None:
    """The [B, P + prompt_len + gen_length] key padding mask (1 = real slot) over prefix embeddings, the
    (left-padded) prompt and the generated positions; None when nothing is padded."""
    if attention_mask is None and prefix_mask is None:
        return None
    batch, prompt_len = input_ids.shape
    ones = torch.ones(batch, 1, dtype=torch.long, device=input_ids.device)
    return torch.cat([
        ones.expand(-1, n_prefix) if prefix_mask is None else prefix_mask.to(input_ids.device),
        ones.expand(-1, prompt_len) if attention_mask is None else attention_mask,
        ones.expand(-1, gen_length),
    ], dim=1)


@dataclass
class DecodeState:
    model: Any
    x: torch.Tensor  # [b, N] canvas of the rows still decoding
    rows: torch.Tensor  # [b] their index in the caller's batch
    batch_size: int  # B, the caller's batch
    attn: torch.Tensor | None  # [b, P + N] key padding mask over prefix + canvas; None = nothing padded
    prefix_embeds: torch.Tensor | None  # [b, P, D]
    prompt_len: int
    block_length: int
    mask_token_id: int
    guidance: Any
    layout: str | None = None  # model.config.attention_layout when the model has one
    generator: torch.Generator | None = None
    noise_shape: str = "canvas"
    block: int = 0
    block_step: int = 0
    nfe: int = 0
    forward_tokens: int = 0
    info: dict = field(default_factory=dict)  # per-step values handed to the step callback
    # The commit rule's step per row [b] when rows stand at different steps of the block (a drafting
    # verifier); None: every row is at block_step.
    rule_step: torch.Tensor | None = None

    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix_embeds is None else self.prefix_embeds.shape[1]

    @property
    def canvas_len(self) -> int:
        return self.x.shape[1]

    @property
    def block_start(self) -> int:
        return self.prompt_len + self.block * self.block_length

    @property
    def block_end(self) -> int:
        return self.block_start + self.block_length

    # ---- the model ------------------------------------------------------------------------------
    def forward(self, lo: int, hi: int, past_key_values=None, **kwargs):
        """Run the model on canvas positions [lo, hi) of every row (guidance copies included).

        Without a cache the call starts at slot 0, so it carries the prefix embeddings and lo must be 0.
        """
        if past_key_values is None and lo != 0:
            raise RuntimeError("a forward without a cache must start at canvas position 0")
        ids = self.guidance.ids(self.x[:, lo:hi], lo, self.prompt_len, self.mask_token_id)
        mask = None
        if self.attn is not None:
            p = self.prefix_len
            mask = self.attn[:, : p + hi] if past_key_values is None else self.attn[:, p + lo : p + hi]
            mask = self.guidance.repeat(mask)
        call = {"attention_mask": mask}
        if past_key_values is None and self.prefix_embeds is not None:
            call["prefix_embeds"] = self.guidance.repeat(self.prefix_embeds)
        if past_key_values is not None:
            call["past_key_values"] = past_key_values
        if self.layout in PREFIX_LAYOUTS:
            call["prefix_length"] = self.prefix_len + self.prompt_len
        call.update(kwargs)
        out = self.model(ids, **call)
        self.nfe += 1
        self.forward_tokens += ids.numel()
        return out

    # ---- randomness -----------------------------------------------------------------------------
    def draw(self, *tail: int, dtype=torch.float32) -> torch.Tensor:
        """Uniform [0, 1) noise for the active rows over the current block, shape [b, block_length, *tail].

        The draw always has the caller's full batch shape, and with noise_shape="canvas" the full canvas
        length too (LLaDA draws one [B, T, V] tensor per step), then is sliced. So a row's randomness does
        not depend on which rows already left, and a cached run draws the same numbers as an uncached one.
        """
        length = self.canvas_len if self.noise_shape == "canvas" else self.block_length
        device = self.generator.device if self.generator is not None else self.x.device
        u = torch.rand((self.batch_size, length, *tail), generator=self.generator, dtype=dtype, device=device)
        u = u[self.rows.to(device)]
        if self.noise_shape == "canvas":
            u = u[:, self.block_start : self.block_end]
        return u.to(self.x.device)

    def view(self, index: torch.Tensor, x: torch.Tensor | None = None, rule_step=None) -> DecodeState:
        """The state of rows `index` of the active rows (repeats allowed, e.g. one copy per draft), with
        canvas `x` (default: theirs) and the commit rule at `rule_step`. Forwards run through a view count in
        the view's nfe / forward_tokens, which start from this state's."""
        return replace(
            self, x=self.x[index] if x is None else x, rows=self.rows[index],
            attn=None if self.attn is None else self.attn[index],
            prefix_embeds=None if self.prefix_embeds is None else self.prefix_embeds[index], rule_step=rule_step,
        )

    # ---- rows leaving ---------------------------------------------------------------------------
    def keep_rows(self, keep: torch.Tensor) -> torch.Tensor:
        """Keep the rows where `keep` (bool [b]) is True; returns their index among the old rows."""
        index = keep.nonzero().squeeze(1)
        self.x, self.rows = self.x[index], self.rows[index]
        if self.attn is not None:
            self.attn = self.attn[index]
        if self.prefix_embeds is not None:
            self.prefix_embeds = self.prefix_embeds[index]
        return index

"""What one decoding run shares between its parts: the canvas, the rows still decoding, the model call.

The sampler owns the canvas (token ids). Masked positions are found by `== mask_token_id` on ids.
Canvas coordinates: [0, prompt_len) is the (left-padded) prompt, then gen_length generated positions.
Prefix embeddings (from adapters) sit before the canvas; they are model slots, not canvas positions.

Decoding blocks: the generated positions cut at a grid of `block_length` (the decoding unit; a
sub-block of the model's block with `sub_block_length`). The grid starts after the prompt, or, for a
block_causal model with `block_alignment="start"`, at slot 0 (the prefix embeddings and the prompt are
cut into blocks too), so the first decoding block is then the rest of the prompt's last block
(`decoding_bounds`). The model's (and the exact cache's) blocks are `model_block_length` long on the
same grid.

Rows decode the same block (`block`), or, with row_blocks="independent", each its own (`row_blocks`):
`block_start` / `block_end` then span the rows' blocks, from the earliest one's start to the furthest
one's end (what a forward must cover), and `row_window()` is each row's own block.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .checks import model_config_value

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


def decoding_bounds(prompt_len: int, gen_length: int, unit: int, origin: int) -> tuple[int, ...]:
    """Canvas positions where decoding blocks start, and the answer's end: the generated positions
    [prompt_len, prompt_len + gen_length) cut at every position c with (c - origin) % unit == 0."""
    end = prompt_len + gen_length
    inner = [c for c in range(prompt_len + 1, end) if (c - origin) % unit == 0]
    return (prompt_len, *inner, end)


def grid_origin(model, prompt_len: int, n_prefix: int) -> int:
    """A canvas position where a model block starts: after the prompt, or at slot 0 (canvas position
    -n_prefix) for a block_causal model with block_alignment="start"."""
    start = (model_config_value(model, "attention_layout") == "block_causal"
             and model_config_value(model, "block_alignment") == "start")
    return -n_prefix if start else prompt_len


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
    block: int = 0  # independent rows: the earliest row's block
    block_step: int = 0  # independent rows: the smallest step of a row (0: some row starts its block)
    nfe: int = 0
    forward_tokens: int = 0
    info: dict = field(default_factory=dict)  # per-step values handed to the step callback
    # The commit rule's step per row [b] when rows stand at different steps of the block (a drafting
    # verifier, independent rows); None: every row is at block_step.
    rule_step: torch.Tensor | None = None
    # Decoding block geometry (see the module docstring); None: blocks of block_length after the prompt.
    bounds: tuple | None = None  # canvas positions where decoding blocks start, then the answer's end
    model_block_length: int | None = None  # the model's (and exact cache's) block; None: block_length
    origin: int | None = None  # a canvas position where a model block starts; None: prompt_len
    # Logits only at the block's masked positions (zeros elsewhere): the model computes no others. Set
    # when no part reads the logits of committed positions and the model takes `logits_positions`.
    masked_logits: bool = False
    # [B] the decoding block of each caller row (row_blocks="independent"); None: every row is at `block`. Indexed by the caller's row, so it survives rows leaving.
    row_blocks: torch.Tensor | None = None

    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix_embeds is None else self.prefix_embeds.shape[1]

    @property
    def canvas_len(self) -> int:
        return self.x.shape[1]

    @property
    def num_blocks(self) -> int:
        return len(self.bounds) - 1 if self.bounds is not None else (self.canvas_len - self.prompt_len) // self.block_length

    def block_bounds(self, block: int) -> tuple[int, int]:
        """[start, end) in canvas positions of decoding block `block`."""
        if self.bounds is not None:
            return self.bounds[block], self.bounds[block + 1]
        start = self.prompt_len + block * self.block_length
        return start, start + self.block_length

    @property
    def block_start(self) -> int:
        if self.row_blocks is not None:
            return self.block_bounds(int(self.row_blocks[self.rows].min()))[0]
        return self.block_bounds(self.block)[0]

    @property
    def block_end(self) -> int:
        if self.row_blocks is not None:
            return self.block_bounds(int(self.row_blocks[self.rows].max()))[1]
        return self.block_bounds(self.block)[1]

    def row_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([b], [b]) [start, end) in canvas positions of each active row's own block (independent rows)."""
        block = self.row_blocks[self.rows]
        if self.bounds is None:
            starts = self.prompt_len + block * self.block_length
            return starts, starts + self.block_length
        bounds = torch.tensor(self.bounds, device=block.device)
        return bounds[block], bounds[block + 1]

    def row_window(self) -> torch.Tensor:
        """[b, block_length] canvas positions holding each active row's own block (independent rows): the
        block itself, or, for a shorter one (a block_alignment="start" model with a prompt off its grid), the
        block_length positions that end where it ends (start at the canvas start, if it is that close)."""
        starts, ends = self.row_bounds()
        starts = (ends - self.block_length).clamp(0, self.canvas_len - self.block_length)
        return starts[:, None] + torch.arange(self.block_length, device=starts.device)

    def row_in_block(self, window: torch.Tensor) -> torch.Tensor:
        """[b, block_length] which positions of `row_window()` lie in the row's own block."""
        starts, ends = self.row_bounds()
        return (window >= starts[:, None]) & (window < ends[:, None])

    def model_block(self, position: int) -> tuple[int, int]:
        """[start, end) in canvas positions of the model block holding canvas `position` (start may lie
        before the canvas, in the prefix embeddings; end is capped at the canvas end)."""
        size = self.model_block_length or self.block_length
        origin = self.prompt_len if self.origin is None else self.origin
        start = position - (position - origin) % size
        return start, min(start + size, self.canvas_len)

    def visible_end(self) -> int:
        """The end of what the current block's logits depend on: the model block's end under block_causal,
        the block's end under causal attention, else the canvas end. Later positions need not run."""
        if self.layout == "block_causal":  # a decoding block lies in one model block; independent rows: the last one
            return self.model_block(self.block_end - 1)[1]
        if self.layout == "causal":
            return self.block_end
        return self.canvas_len

    def cacheable_prompt(self) -> int:
        """The canvas position up to which the prompt's K/V never see the generated positions: the prompt's
        end, or, when blocks count from slot 0 (block_alignment="start"), the start of the model block that
        holds the first generated position (negative: it starts inside the prefix embeddings)."""
        if self.layout == "block_causal":
            return min(self.prompt_len, self.model_block(self.prompt_len)[0])
        return self.prompt_len

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
        if self.masked_logits:
            return self._forward_masked_logits(ids, lo, hi, call)
        out = self.model(ids, **call)
        self.nfe += 1
        self.forward_tokens += ids.numel()
        return out

    def _forward_masked_logits(self, ids, lo: int, hi: int, call: dict):
        """The forward with logits computed only at the current block's masked positions, then laid out
        over the call's positions [lo, hi) with zeros elsewhere (nothing reads those)."""
        start, end = max(self.block_start, lo), min(self.block_end, hi)
        masked = self.x[:, start:end] == self.mask_token_id
        if self.row_blocks is not None:  # independent rows: only each row's own block
            starts, ends = self.row_bounds()
            column = torch.arange(start, end, device=masked.device)
            masked &= (column >= starts[:, None]) & (column < ends[:, None])
        n = max(1, int(masked.sum(1).max()))
        # masked positions first (in order), then padding that repeats real positions and is dropped
        order = masked.int().sort(dim=1, descending=True, stable=True).indices[:, :n]
        valid = masked.gather(1, order)
        positions = self.guidance.repeat(order + (start - lo))
        out = self.model(ids, logits_positions=positions, **call)
        self.nfe += 1
        self.forward_tokens += ids.numel()
        if out.logits is None:  # no token slots (a prefix-only prefill)
            return out
        logits = out.logits.new_zeros(ids.shape[0], hi - lo, out.logits.shape[-1])
        keep = self.guidance.repeat(valid)
        rows, cols = keep.nonzero(as_tuple=True)
        logits[rows, positions[rows, cols]] = out.logits[rows, cols]
        out.logits = logits
        return out

    # ---- randomness -----------------------------------------------------------------------------
    def draw(self, *tail: int, dtype=torch.float32) -> torch.Tensor:
        """Uniform [0, 1) noise for the active rows over the current block, shape [b, block_length, *tail].

        The draw always has the caller's full batch shape, and with noise_shape="canvas" the full canvas
        length too (LLaDA draws one [B, T, V] tensor per step), then is sliced. So a row's randomness does
        not depend on which rows already left, and a cached run draws the same numbers as an uncached one.
        """
        independent = self.row_blocks is not None  # each row's own block: a block_length draw, or its window
        block = self.block_length if independent else self.block_end - self.block_start
        length = self.canvas_len if self.noise_shape == "canvas" else block
        device = self.generator.device if self.generator is not None else self.x.device
        u = torch.rand((self.batch_size, length, *tail), generator=self.generator, dtype=dtype, device=device)
        u = u[self.rows.to(device)]
        if self.noise_shape == "canvas" and independent:
            u = u[torch.arange(len(u), device=device)[:, None], self.row_window().to(device)]
        elif self.noise_shape == "canvas":
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

"""The one decoding loop. Every decision is a part built by name (see registry.py):

    for each block:                        cache/stopping/commit parts are told the block started
        repeat until the block is full (or for the schedule's fixed number of steps):
            logits     = cache part (runs the model) -> guidance part combines copies
            x0         = proposal part(block logits)
            confidence = confidence part(block logits, x0), -inf off the block's masked positions
            commit     = commit part(confidence) -> canvas[commit] = x0[commit]
            stopping part may retire rows (they leave the batch; later forwards get smaller)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from typing import Any

import torch

from .checks import check_inputs, check_model, model_config_value
from .config import SamplerConfig
from .output import SamplerOutput
from .registry import create_part
from .state import DecodeState
from .stopping import first_eos


class Sampler:
    """Build once from a config (or kwargs), call on a model and prompts.

    >>> sampler = Sampler(gen_length=64, block_length=32, steps=64, commit="threshold", cache="dual")
    >>> out = sampler(model, input_ids, attention_mask, generator=torch.Generator().manual_seed(0))
    """

    def __init__(self, config: SamplerConfig | Mapping | None = None, **kwargs):
        if isinstance(config, Mapping):
            config = SamplerConfig(**{**config, **kwargs})
        elif config is None:
            config = SamplerConfig(**kwargs)
        elif kwargs:
            config = replace(config, **kwargs)
        self.config = config.validate()

    @classmethod
    def from_config(cls, config: Mapping, **kwargs) -> Sampler:
        """From a dict-like config (e.g. an OmegaConf node); keys that are not sampler knobs are ignored."""
        known = {f.name for f in fields(SamplerConfig)}
        return cls(SamplerConfig(**{k: v for k, v in dict(config).items() if k in known}), **kwargs)

    def build_parts(self) -> dict[str, Any]:
        knobs = self.config.knobs()
        return {slot: create_part(slot, name, **knobs) for slot, name in self.config.part_names().items()}

    @torch.no_grad()
    def __call__(
        self,
        model: Callable,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        *,
        prefix_embeds: torch.Tensor | None = None,
        prefix_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        callback_on_step_end: Callable[[int, torch.Tensor, dict], Any] | None = None,
        progress_bar: bool | Callable | None = None,
    ) -> SamplerOutput:
        """Decode `gen_length` tokens after each (left-padded) prompt.

        callback_on_step_end(step, canvas, info): after every forward; `canvas` is the full [B, N] canvas,
        `info` holds block, block_step, rows (active rows), x0, confidence, transfer (block-shaped, active
        rows) and nfe. progress_bar: True for tqdm, or a factory called as progress_bar(total=...) that
        returns an object with update() and close() (e.g. DiffusionPipeline.progress_bar).
        """
        cfg = self.config
        input_ids, attention_mask, prefix_embeds, prefix_mask = check_inputs(
            input_ids, attention_mask, prefix_embeds, prefix_mask
        )
        mask_id = cfg.mask_token_id if cfg.mask_token_id is not None else model_config_value(model, "mask_token_id")
        if mask_id is None:
            raise ValueError("`mask_token_id` is needed: pass it, or use a model whose config has mask_token_id.")
        parts = self.build_parts()
        batch, prompt_len = input_ids.shape
        n_prefix = 0 if prefix_embeds is None else prefix_embeds.shape[1]
        layout = check_model(model, cfg, mask_id, n_prefix + prompt_len + cfg.gen_length, parts["cache"])
        device = input_ids.device

        canvas = torch.full((batch, prompt_len + cfg.gen_length), mask_id, dtype=torch.long, device=device)
        canvas[:, :prompt_len] = input_ids
        attn = None
        if attention_mask is not None or prefix_mask is not None:
            ones = torch.ones(batch, 1, dtype=torch.long, device=device)
            attn = torch.cat([
                ones.expand(-1, n_prefix) if prefix_mask is None else prefix_mask.to(device),
                ones.expand(-1, prompt_len) if attention_mask is None else attention_mask,
                ones.expand(-1, cfg.gen_length),
            ], dim=1)
        state = DecodeState(
            model=model, x=canvas.clone(), rows=torch.arange(batch, device=device), batch_size=batch, attn=attn,
            prefix_embeds=prefix_embeds, prompt_len=prompt_len, block_length=cfg.block_length,
            mask_token_id=mask_id, guidance=parts["guidance"], layout=layout, generator=generator,
            noise_shape=cfg.noise_shape,
        )
        steps = torch.zeros(batch, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        bar = _progress(progress_bar, parts["commit"], cfg)
        parts["cache"].start(state)
        global_step = 0
        for block in range(cfg.num_blocks):
            if not len(state.rows):
                break  # every row stopped early
            state.block = block
            start, end = state.block_start, state.block_end
            parts["commit"].begin_block(state, (state.x[:, start:end] == mask_id).sum(1))
            fixed = parts["commit"].steps_per_block
            step = 0
            while len(state.rows) and (
                step < fixed if fixed is not None else bool((state.x[:, start:end] == mask_id).any())
            ):
                state.block_step = step
                self._step(state, parts, mask_id)
                if fixed is None and not state.info["transfer"].any():
                    raise RuntimeError(
                        f"commit rule {parts['commit'].name!r} committed nothing while the block has masks; "
                        "a rule without a fixed step count must commit at least one token per step."
                    )
                steps[state.rows] += 1
                done = parts["stopping"](state)
                canvas[state.rows] = state.x
                if callback_on_step_end is not None:
                    callback_on_step_end(global_step, canvas, state.info)
                if bar is not None:
                    bar.update(1)
                if done is not None and bool(done.any()):
                    finished[state.rows[done]] = True
                    rows_before = len(state.rows)
                    keep = state.keep_rows(~done)
                    if len(state.rows):
                        parts["cache"].select(state.guidance.rows(keep, rows_before))
                step, global_step = step + 1, global_step + 1
        if bar is not None:
            bar.close()
        return SamplerOutput(
            sequences=canvas, nfe=state.nfe, forward_tokens=state.forward_tokens, steps=steps,
            num_generated=_num_generated(canvas[:, prompt_len:], cfg.eos_token_id, mask_id), finished=finished,
        )

    def _step(self, state: DecodeState, parts: dict, mask_id: int) -> None:
        cfg, start, end = self.config, state.block_start, state.block_end
        raw, lo = parts["cache"].logits(state)
        logits = state.guidance.combine(raw)[:, start - lo : end - lo]
        if cfg.logits_eos_inf:
            logits = logits.clone()
            logits[..., cfg.eos_token_id] = float("-inf")
        # The mask id is never a proposal: committing it would leave a hole the schedule does not count.
        proposal_logits = logits.clone()
        proposal_logits[..., mask_id] = float("-inf")
        x0 = parts["proposal"](proposal_logits, state)
        confidence_logits = logits
        if cfg.confidence_eos_eot_inf:
            confidence_logits = logits.clone()
            special = [t for t in (cfg.eos_token_id, cfg.eot_token_id) if t is not None]
            confidence_logits[..., special] = float("-inf")
        block = state.x[:, start:end]
        candidates = block == mask_id
        confidence = parts["confidence"](confidence_logits, x0, state)
        confidence = confidence.masked_fill(~candidates, float("-inf"))
        transfer = parts["commit"](confidence, candidates, state) & candidates
        state.x[:, start:end] = torch.where(transfer, x0, block)
        state.info = {
            "block": state.block, "block_step": state.block_step, "rows": state.rows, "x0": x0,
            "confidence": confidence, "transfer": transfer, "nfe": state.nfe,
        }


def _num_generated(gen: torch.Tensor, eos: int | None, mask_id: int) -> torch.Tensor:
    full = torch.full((gen.shape[0],), gen.shape[1], dtype=torch.long, device=gen.device)
    if eos is None:
        return full
    found, pos = first_eos(gen, eos, mask_id)
    return torch.where(found, pos + 1, full)


def _progress(progress_bar, commit, cfg: SamplerConfig):
    if not progress_bar:
        return None
    fixed = commit.steps_per_block
    total = None if fixed is None else fixed * cfg.num_blocks
    if progress_bar is True:
        from tqdm.auto import tqdm  # noqa: PLC0415 - only when asked for

        return tqdm(total=total, desc="decoding")
    return progress_bar(total=total)


def generate(
    model: Callable,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    *,
    gen_length: int = 128,
    block_length: int = 32,
    steps: int | None = None,
    prefix_embeds: torch.Tensor | None = None,
    prefix_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    callback_on_step_end: Callable | None = None,
    progress_bar: bool | Callable | None = None,
    **knobs,
) -> SamplerOutput:
    """LLaDA-style entry point: `generate(model, ids, mask, gen_length=, block_length=, steps=, ...)`.
    Any other SamplerConfig field (temperature, confidence, commit, cache, cfg_scale, ...) is a knob."""
    sampler = Sampler(gen_length=gen_length, block_length=block_length, steps=steps, **knobs)
    return sampler(
        model, input_ids, attention_mask, prefix_embeds=prefix_embeds, prefix_mask=prefix_mask,
        generator=generator, callback_on_step_end=callback_on_step_end, progress_bar=progress_bar,
    )

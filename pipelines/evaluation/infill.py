"""Infilling: the model fills a span of fixed length between a prompt and a fixed suffix.

Canvas ``[prompt | body_length masks | suffix]``. The sampler's loop (latent.sampling.Sampler) only decodes
positions after the prompt and has no fixed tokens after them, so the canvas is decoded here with the model's
forward and the scheduler's one-block step (``MaskedDiffusionScheduler.step``, the loop's own
``decode_step``): the body is split into blocks of ``block_length``; each block gets ``steps / num_blocks``
forwards (LLaDA's schedule rule) or, with ``threshold`` / ``factor``, forwards until it has no mask. Every
forward sees the whole canvas, suffix included; only masked body positions are ever written, so the prompt
and the suffix never change. The model needs an attention layout in which the body sees the suffix
(bidirectional or prefix). No KV cache: each step is one full forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from latent.scheduler import MaskedDiffusionScheduler
from pipelines.base import as_count, resolve_decoding

__all__ = ["INFILL_LAYOUTS", "infill"]

INFILL_LAYOUTS = ("bidirectional", "prefix")


@torch.no_grad()
def infill(model, scheduler: MaskedDiffusionScheduler, prompt_ids: torch.LongTensor, suffix_ids: torch.LongTensor,
           body_length: int, *, mask_token_id: int, attention_mask: torch.Tensor | None = None,
           block_length: int | None = None, steps: int | None = None, threshold: float | None = None,
           factor: float | None = None, temperature: float | None = None, remasking: str | None = None,
           generator: torch.Generator | None = None,
           on_step: Callable[[int, torch.LongTensor], None] | None = None) -> torch.LongTensor:
    """Fill `body_length` positions between `prompt_ids` [B, P] (left padded, `attention_mask` [B, P]) and
    `suffix_ids` [S] or [B, S]. Returns the canvas [B, P + body_length + S]. Decoding settings as in
    TextDiffusionPipeline (`resolve_decoding`); `on_step(step, canvas)` is called after every forward."""
    layout = getattr(getattr(model, "config", None), "attention_layout", "bidirectional")
    if layout not in INFILL_LAYOUTS:
        raise ValueError(
            f"infilling needs the body to see the suffix: attention_layout must be one of {INFILL_LAYOUTS}, this "
            f"model's is {layout!r}; use left-to-right generation instead."
        )
    body_length = as_count("body_length", body_length)
    batch, p = prompt_ids.shape
    suffix_ids = suffix_ids.reshape(1, -1).expand(batch, -1) if suffix_ids.ndim == 1 else suffix_ids
    if suffix_ids.shape[0] != batch:
        raise ValueError(f"suffix_ids has {suffix_ids.shape[0]} rows for {batch} prompts; give [S] or [B, S]")
    if bool((prompt_ids == mask_token_id).any()) or bool((suffix_ids == mask_token_id).any()):
        raise ValueError(f"the prompt or suffix holds the mask token (id {mask_token_id}); remove it")
    settings = resolve_decoding(model, scheduler, body_length, block_length, steps, threshold, factor)
    block_length = settings.pop("block_length")
    if body_length % block_length:
        raise ValueError(f"body_length={body_length} must be a multiple of block_length={block_length}")
    num_blocks = body_length // block_length
    steps = settings.pop("steps") or scheduler.config.num_inference_steps or body_length
    if steps % num_blocks:
        raise ValueError(f"steps={steps} must be a multiple of the number of blocks ({num_blocks} = "
                         f"body_length / block_length)")
    fixed = (settings["commit"] or scheduler.config.commit) == "schedule"
    knobs = {k: v for k, v in dict(**settings, temperature=temperature, confidence=remasking).items() if v is not None}
    stepper = MaskedDiffusionScheduler.from_config(scheduler.config)  # its step state stays out of the pipeline's

    device = prompt_ids.device
    masks = torch.full((batch, body_length), mask_token_id, dtype=torch.long, device=device)
    canvas = torch.cat([prompt_ids, masks, suffix_ids.to(device)], dim=1)
    keep = None
    if attention_mask is not None and not bool(attention_mask.all()):
        keep = torch.cat([attention_mask.to(device), torch.ones_like(canvas[:, p:])], dim=1)
    call = {"attention_mask": keep}
    if layout == "prefix":
        call["prefix_length"] = p
    forwards = 0
    for block in range(num_blocks):
        lo = p + block * block_length
        hi = lo + block_length
        # A data-dependent rule commits at least one token per forward: block_length forwards at most.
        stepper.set_timesteps(steps // num_blocks if fixed else block_length)
        for t in stepper.timesteps:
            if not fixed and not bool((canvas[:, lo:hi] == mask_token_id).any()):
                break
            logits = model(canvas, **call).logits[:, lo:hi]
            out = stepper.step(logits, t, canvas[:, lo:hi], mask_token_id=mask_token_id, generator=generator, **knobs)
            canvas[:, lo:hi] = out.prev_sample
            if on_step is not None:
                on_step(forwards, canvas)
            forwards += 1
    return canvas

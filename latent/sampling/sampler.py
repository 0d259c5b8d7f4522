"""The one decoding loop. Every decision is a part built by name (see registry.py):

    for each block:                        commit/revision parts are told the block started
        repeat until the block is full (or for the schedule's fixed number of steps):
            verifier part runs the forward; "none" is one step:
                logits     = cache part (runs the model) -> guidance part combines copies
                x0         = proposal part(block logits)       (logits first rectified by the revision part)
                confidence = confidence part(block logits, x0), -inf off the block's masked positions
                commit     = commit part(confidence) -> canvas[commit] = x0[commit]
                             (a stopping part may commit the whole block at once: Prophet, SchED)
                revision part may mask committed tokens again, replace them or commit more
            (a drafting verifier checks several drafted steps or tokens in the forward and keeps what passes)
            stopping part may retire rows (they leave the batch; later forwards get smaller)
        a full block may get more forwards that only edit (the revision part's post steps)

With row_blocks="independent" each row runs this per block on its own: a row whose block is done starts
its next one at once, and leaves the batch after its last (row_blocks.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from typing import Any

import torch

from .checks import check_inputs, check_model, model_config_value
from .config import SamplerConfig
from .output import SamplerOutput
from .registry import create_part, part_name
from .row_blocks import decode_rows_independently, ends_full_blocks, retire_rows
from .state import DecodeState, decoding_bounds, grid_origin, key_padding_mask
from .stopping import first_eos
from .trajectory import TrajectoryRecorder


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
        """Fresh parts for one call (some hold per-call state, e.g. the schedule's quota or a cache)."""
        return {slot: create_part(slot, name, self.config) for slot, name in self.config.part_names().items()}

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
        record_trajectory: bool = False,
    ) -> SamplerOutput:
        """Decode `gen_length` tokens after each (left-padded) prompt.

        callback_on_step_end(step, canvas, info): after every forward; `canvas` is the full [B, N] canvas,
        `info` holds block, block_start (its first canvas position), block_step, rows (active rows), x0,
        confidence, transfer (committed this step), remasked and edited (by the revision part) (block-shaped, active rows) and nfe.
        With row_blocks="independent", block, block_start and block_step are [b] tensors, one per active row,
        and the block-shaped values are each row's own block. It may return a dict
        whose "sequences" ([B, N] int64, the canvas' shape) replaces the canvas, active rows included, from
        the next forward on (e.g. to force a token). The stopping part
        has already judged this step, so it sees the new tokens at the next step; with an exact cache, the
        prompt and finished blocks are cached, so change only the current and later blocks.
        progress_bar: True for tqdm, or a factory called as progress_bar(total=...) that returns an object
        with update() and close() (e.g. DiffusionPipeline.progress_bar).
        record_trajectory: also return `trajectory`, what each forward did to each generated position.
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
        attn = key_padding_mask(input_ids, attention_mask, n_prefix, prefix_mask, cfg.gen_length)
        origin = grid_origin(model, prompt_len, n_prefix)
        state = DecodeState(
            model=model, x=canvas.clone(), rows=torch.arange(batch, device=device), batch_size=batch, attn=attn,
            prefix_embeds=prefix_embeds, prompt_len=prompt_len, block_length=cfg.decode_length,
            mask_token_id=mask_id, guidance=parts["guidance"], layout=layout, generator=generator,
            noise_shape=cfg.noise_shape, model_block_length=cfg.block_length, origin=origin,
            bounds=decoding_bounds(prompt_len, cfg.gen_length, cfg.decode_length, origin),
        )
        state.masked_logits = _reads_only_masked_logits(self.config, model)
        recorder = TrajectoryRecorder(batch, cfg.gen_length) if record_trajectory else None
        end_step = _StepEnd(canvas, recorder, callback_on_step_end, _progress(progress_bar, parts, state.num_blocks))
        parts["cache"].start(state)
        if cfg.row_blocks == "independent":
            decode_rows_independently(state, parts, cfg, end_step)
        else:
            self._decode_shared_blocks(state, parts, end_step)
        if end_step.bar is not None:
            end_step.bar.close()
        return SamplerOutput(
            sequences=canvas, nfe=state.nfe, forward_tokens=state.forward_tokens, steps=end_step.steps,
            num_generated=_num_generated(canvas[:, prompt_len:], cfg.eos_token_id, mask_id),
            finished=end_step.finished, trajectory=None if recorder is None else recorder.result(),
        )

    def _decode_shared_blocks(self, state: DecodeState, parts: dict, end_step: _StepEnd) -> None:
        """Every row decodes the same block; the next one starts when the block is done for every row."""
        mask_id = state.mask_token_id
        for block in range(state.num_blocks):
            if not len(state.rows):
                break  # every row stopped early
            state.block = block
            start, end = state.block_start, state.block_end
            masked = (state.x[:, start:end] == mask_id).sum(1)
            for slot in ("commit", "revision", "verifier"):
                parts[slot].begin_block(state, masked)
            fixed = parts["verifier"].steps_per_block(parts["commit"])
            step = 0
            while len(state.rows) and _block_continues(state, parts, step, fixed):
                state.block_step = step
                masks_before = int((state.x[:, start:end] == mask_id).sum())
                self._step(state, parts)
                if fixed is None and masks_before and int((state.x[:, start:end] == mask_id).sum()) >= masks_before:
                    raise RuntimeError(
                        f"commit rule {part_name(parts['commit'])!r} (with revision {part_name(parts['revision'])!r}) "
                        "decoded nothing while the block has masks; a rule without a fixed step count must "
                        "commit at least one token per step."
                    )
                end_step(state, parts)
                step += 1

    def _step(self, state: DecodeState, parts: dict) -> None:
        result = parts["verifier"].step(state, parts, self.config)
        state.x[:, state.block_start : state.block_end] = result.block
        state.info = {
            "block": state.block, "block_start": state.block_start, "block_step": state.block_step,
            "rows": state.rows, "x0": result.x0,
            "confidence": result.confidence, "transfer": result.transfer, "remasked": result.remasked,
            "edited": result.edited, "nfe": state.nfe,
        }


class _StepEnd:
    """What every forward ends with, in either loop: the stopping part judges, the canvas is updated, the
    recorder, the step callback and the progress bar see the step, and stopped rows leave the batch."""

    def __init__(self, canvas: torch.Tensor, recorder, callback, bar):
        self.canvas, self.recorder, self.callback, self.bar = canvas, recorder, callback, bar
        self.steps = torch.zeros(canvas.shape[0], dtype=torch.long, device=canvas.device)  # forwards per row
        self.finished = torch.zeros(canvas.shape[0], dtype=torch.bool, device=canvas.device)
        self.global_step = 0

    def __call__(self, state: DecodeState, parts: dict) -> None:
        canvas = self.canvas
        self.steps[state.rows] += 1
        done = parts["stopping"](state)
        canvas[state.rows] = state.x
        if self.recorder is not None:
            self.recorder(self.global_step, canvas, state.info)
        if self.callback is not None:
            returned = self.callback(self.global_step, canvas, state.info)
            if isinstance(returned, Mapping) and returned.get("sequences") is not None:
                _replace_canvas(canvas, returned["sequences"])
                state.x = canvas[state.rows]
        if self.bar is not None:
            self.bar.update(1)
        if done is not None and bool(done.any()):
            self.finished[state.rows[done]] = True
            retire_rows(state, parts, ~done)
        self.global_step += 1


# Parts that read the logits of a block's masked positions only (the others judge committed tokens too,
# or are not known here); with all of them, the model computes no other logits.
_MASKED_ONLY = {
    "proposal": ("argmax", "gumbel"), "confidence": ("low_confidence", "probability", "margin", "neg_entropy", "random"),
    "commit": ("schedule", "threshold", "factor", "saber"), "revision": ("none",),
    "stopping": ("block_full", "eos_early_stop", "prophet"), "guidance": ("none", "cfg"),
    "cache": ("none", "prefix_exact", "block_exact", "prefix", "dual"), "verifier": ("none", "freedave"),
}


def _reads_only_masked_logits(cfg: SamplerConfig, model) -> bool:
    """`masked_logits_only`, with None resolved: on when every part is one of _MASKED_ONLY and the model's
    forward takes `logits_positions` (DiffusionTransformer)."""
    forward = getattr(model, "forward", None)
    try:
        takes = forward is not None and "logits_positions" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        takes = False
    if cfg.masked_logits_only is not None:
        if cfg.masked_logits_only and not takes:
            raise ValueError("masked_logits_only=True needs a model whose forward takes `logits_positions` "
                             "(DiffusionTransformer); set it to None or False for this model.")
        return bool(cfg.masked_logits_only)
    names = cfg.part_names()
    return takes and all(names[slot] in allowed for slot, allowed in _MASKED_ONLY.items())


def _block_continues(state: DecodeState, parts: dict, step: int, fixed: int | None) -> bool:
    """Whether the current block gets another forward: while it has masks (up to a fixed rule's step
    count); when full, if the revision part wants a post step, or for a fixed rule's remaining
    zero-quota steps (LLaDA runs them) unless a revision or stopping part ends full blocks."""
    if bool((state.x[:, state.block_start : state.block_end] == state.mask_token_id).any()):
        if fixed is None or step < fixed:
            return True
        raise RuntimeError(
            f"revision {part_name(parts['revision'])!r} left masked positions after the commit rule's {fixed} "
            "steps; a revision part must keep a fixed-step block on its schedule."
        )
    if parts["revision"].wants_step(step, fixed):
        return True
    return fixed is not None and step < fixed and not ends_full_blocks(parts)


def _replace_canvas(canvas: torch.Tensor, new) -> None:
    """Write a step callback's returned "sequences" into the canvas, in place (callers keep their reference)."""
    if not isinstance(new, torch.Tensor) or new.shape != canvas.shape or new.dtype != canvas.dtype:
        got = f"{type(new).__name__} {tuple(new.shape)} {new.dtype}" if isinstance(new, torch.Tensor) else type(new).__name__
        raise ValueError(
            f"callback_on_step_end returned sequences {got}; it must be a tensor like the canvas "
            f"{tuple(canvas.shape)} {canvas.dtype}."
        )
    canvas.copy_(new)


def _num_generated(gen: torch.Tensor, eos: int | None, mask_id: int) -> torch.Tensor:
    full = torch.full((gen.shape[0],), gen.shape[1], dtype=torch.long, device=gen.device)
    if eos is None:
        return full
    found, pos = first_eos(gen, eos, mask_id)
    return torch.where(found, pos + 1, full)


def progress_bar_for(progress_bar, total: int | None, desc: str = "decoding"):
    """None, a tqdm bar (progress_bar=True) or progress_bar(total=total) (a factory such as
    DiffusionPipeline.progress_bar); the result has update() and close()."""
    if not progress_bar:
        return None
    if progress_bar is True:
        from tqdm.auto import tqdm  # noqa: PLC0415 - only when asked for

        return tqdm(total=total, desc=desc)
    return progress_bar(total=total)


def _progress(progress_bar, parts: dict, num_blocks: int):
    fixed = parts["verifier"].steps_per_block(parts["commit"])
    return progress_bar_for(progress_bar, None if fixed is None else fixed * num_blocks)


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
    record_trajectory: bool = False,
    **knobs,
) -> SamplerOutput:
    """LLaDA-style entry point: `generate(model, ids, mask, gen_length=, block_length=, steps=, ...)`.
    Any other SamplerConfig field (temperature, confidence, commit, cache, cfg_scale, ...) is a knob."""
    sampler = Sampler(gen_length=gen_length, block_length=block_length, steps=steps, **knobs)
    return sampler(
        model, input_ids, attention_mask, prefix_embeds=prefix_embeds, prefix_mask=prefix_mask,
        generator=generator, callback_on_step_end=callback_on_step_end, progress_bar=progress_bar,
        record_trajectory=record_trajectory,
    )

"""What the task pipelines share: local loading, outputs, step callbacks, decoding settings, and the
glue of prefix-conditioned masked-diffusion generation.

- `LocalPipelineMixin`: `from_pretrained` loads only a local folder written by `save_pretrained`.
- `PipelineOutput`: `return_dict=False` gives `out.to_tuple()`, every field in declaration order (None
  fields included, so positions never shift); each pipeline puts its primary output first (texts,
  captions, answers, actions), then its token ids, then the rest.
- Bad rows: `on_error="raise"` (default) raises naming the row; `on_error="record"` gives the row an empty
  result (None text, padding-only sequence, or the task's documented fallback) and its message in
  `out.errors`, and decodes the other rows.
- Step callbacks behave as in diffusers: `callback_on_step_end(pipe, step, timestep, callback_kwargs)` gets
  the tensors named in `callback_on_step_end_tensor_inputs` (a `PipelineCallback` /
  `MultiPipelineCallbacks` brings its own `tensor_inputs`) and may return a dict; a returned "sequences"
  ([B, N] int64, the full canvas) replaces the canvas from the next forward on. For masked diffusion
  `timestep` is the block index; with `row_blocks="independent"` rows sit in different blocks, so it is a
  [b] int64 tensor, one block index per row still decoding (the rows of "x0", "confidence", "transfer").
- Inputs that cannot give a right answer are errors, never empty results: a NaN or infinite
  temperature, threshold or prefix embedding; a count (`gen_length`, `steps`, ...) that is not an int
  (a bool is refused, a numpy int is taken); `steps` above `gen_length` (the schedule rule commits at
  least one token per step, so more steps than tokens would only repeat forwards: refused, naming the
  largest useful value); a prompt holding the mask token (only generated positions are decoded, so it
  would stay in the output: refused).
- Decoding settings (`resolve_decoding`), one rule for every masked-diffusion pipeline:
  `block_length` defaults to the model's `block_size` for a block_causal model, else to the largest divisor
  of `gen_length` up to the scheduler's `block_length`; `commit=` wins, else `threshold=` selects the
  threshold rule, else `factor=` the factor rule, else `steps=` the LLaDA schedule rule, else the
  scheduler's rule applies.
- `PrefixDiffusionPipeline`: prompt encoding (left padding), adapter prefix, the sampler call, decoding to
  text up to the first EOS, and the per-chunk decode of captioning and spoken QA.
- Decoding trajectories: every masked-diffusion pipeline call takes `trajectory=True` and then also returns
  what each forward did to each generated position (`latent.sampling.Trajectory`, one row per input row), as
  `out.trajectory`, or as the last item of the tuple with `return_dict=False`.

docs/sampling.md describes the sampler loop and its parts; README.md the pipelines.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput

from latent.folders import is_unfinished
from latent.sampling import Trajectory

__all__ = [
    "LocalPipelineMixin", "PipelineOutput", "MaskedDiffusionPipeline", "PrefixDiffusionPipeline", "join_prompt",
    "encode_prompts", "decode_texts", "check_tokenizer", "resolve_decoding", "callback_tensor_inputs", "check_on_error",
    "ON_ERROR", "as_count", "check_finite",
]

ON_ERROR = ("raise", "record")


# ---- text in and out ------------------------------------------------------------------------------
def encode_prompts(tokenizer, texts: Sequence[str]) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Token ids [B, L] and attention mask [B, L] (1 = token), left padded so that every row's next
    position follows its prompt; no special tokens are added. L is 0 when every text is empty.
    Training builds its prompts with this function too, so pipelines see what they were trained on."""
    texts = list(texts)
    if not any(texts):
        empty = torch.zeros(len(texts), 0, dtype=torch.long)
        return empty, empty.clone()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    return enc["input_ids"].long(), enc["attention_mask"].long()


def check_tokenizer(tokenizer, need_eos: bool = True) -> None:
    """Masked diffusion needs a mask token; decoding a row to text needs an EOS, where it ends."""
    if getattr(tokenizer, "mask_token_id", None) is None:
        raise ValueError(
            "The tokenizer has no mask token; masked diffusion needs one. Add it with "
            "tokenizer.add_special_tokens({'mask_token': '<|mask|>'}) and resize the model's vocabulary, "
            "or use a tokenizer trained with one (latent.data.tokenizer.train_tokenizer adds mask, pad, eos)."
        )
    if need_eos and getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError("The tokenizer needs an EOS token, where a decoded row ends (latent.data.tokenizer adds it).")


def decode_texts(tokenizer, ids: torch.Tensor | list[list[int]], strip: bool = True) -> list[str]:
    """Each row decoded up to (without) its first EOS, special tokens skipped, in whole characters.

    A byte-level tokenizer spells a character of several UTF-8 bytes with several tokens; a row cut
    between them (at its EOS or its end) or holding a stray continuation byte decodes to U+FFFD. Those
    bytes are dropped, as `bytes.decode(errors="ignore")` would: a caption never holds a broken character."""
    eos = tokenizer.eos_token_id
    rows = ids.tolist() if isinstance(ids, torch.Tensor) else [list(r) for r in ids]
    rows = [r[: r.index(eos)] if eos is not None and eos in r else r for r in rows]
    texts = [t.replace("\ufffd", "") for t in tokenizer.batch_decode(rows, skip_special_tokens=True)]
    return [t.strip() for t in texts] if strip else texts


def _full_to_none(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A mask without padding is dropped: the model then skips masking."""
    return None if mask is None or bool(mask.all()) else mask


# ---- decoding settings ----------------------------------------------------------------------------
def resolve_decoding(model, scheduler, gen_length: int, block_length: int | None = None, steps: int | None = None,
                     threshold: float | None = None, factor: float | None = None,
                     commit: str | None = None) -> dict[str, Any]:
    """The block length and commit rule of a call (see the module docstring for the rule); the other
    settings pass through. None values leave the scheduler's defaults in place."""
    if steps is not None and steps > gen_length:
        raise ValueError(
            f"`steps`={steps} is more than `gen_length`={gen_length}: a step commits at least one token, so "
            f"steps beyond {gen_length} would only repeat forwards; use steps <= {gen_length} "
            f"(steps={gen_length} is one token per step)."
        )
    config = getattr(model, "config", None)
    if block_length is None:
        if getattr(config, "attention_layout", None) == "block_causal":
            block_length = config.block_size  # exact block cache: decoding blocks are the model's blocks
        else:
            block_length = max(1, min(scheduler.config.block_length, gen_length))
            while gen_length % block_length:
                block_length -= 1
    if commit is None:
        if threshold is not None:
            commit = "threshold"
        elif factor is not None:
            commit = "factor"
        elif steps is not None:
            commit = "schedule"  # a step count only means something for the LLaDA schedule rule
    return dict(block_length=block_length, steps=steps, threshold=threshold, factor=factor, commit=commit)


# ---- outputs and checks ---------------------------------------------------------------------------
class PipelineOutput(BaseOutput):
    """A diffusers `BaseOutput` whose `to_tuple()` (what `return_dict=False` returns) keeps every field in
    declaration order, None included, so a field's position does not depend on `output_type`."""

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))


def as_count(name: str, value, allow_none: bool = False) -> int | None:
    """A positive int argument as a plain int (numpy ints are taken; a bool, float or string is refused)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"`{name}` must be a positive int{' or None' if allow_none else ''}, got {value!r} "
                         f"({type(value).__name__}).")
    return int(value)


def check_finite(name: str, value) -> None:
    """Refuse a NaN or infinite number, or a tensor holding one: it decodes to garbage, never to an error."""
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"`{name}` holds NaN or infinite values.")
    elif isinstance(value, numbers.Real) and not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"`on_error` must be 'raise' or 'record', got {on_error!r}.")


def callback_tensor_inputs(callback, names: list[str] | None, allowed: list[str], default: list[str]) -> list[str]:
    """The tensors a step callback asked for: a `PipelineCallback` / `MultiPipelineCallbacks` names its own
    (`tensor_inputs`), as in diffusers; every name must be one the pipeline offers."""
    if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
        names = callback.tensor_inputs
    if callback is not None and not callable(callback):
        raise ValueError(f"`callback_on_step_end` must be callable, got {type(callback).__name__}.")
    bad = [k for k in names or [] if k not in allowed]
    if bad:
        raise ValueError(f"`callback_on_step_end_tensor_inputs` {bad} not in {allowed}.")
    return list(names) if names else list(default)


# ---- loading --------------------------------------------------------------------------------------
PROJECT_PACKAGES = ("latent", "autoencoders", "modalities", "pipelines")


def import_project_components(model_index: str) -> None:
    """Import this project's modules that ``model_index.json`` names, so a pipeline loads in a fresh
    interpreter: diffusers loads a component only from a library already imported. Only the project's own
    packages are imported; any other library name is left to diffusers (which refuses unknown ones)."""
    with open(model_index) as f:
        index = json.load(f)
    for value in index.values():
        if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
            if value[0].split(".")[0] in PROJECT_PACKAGES:
                importlib.import_module(value[0])


class LocalPipelineMixin:
    """`from_pretrained` from a local folder written by `save_pretrained` only; a hub id or a folder without
    model_index.json is refused with an error saying what to give instead. Put it before
    `DiffusionPipeline` among the bases."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, quantization: str | dict | None = None, **kwargs):
        """`quantization` ("int8", "int4", or a dict of `latent.quantization.quantize_backbone` arguments)
        quantizes the backbone (`model`) after loading; a folder written by `mmdlm quantize` loads quantized
        without it."""
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            raise ValueError(
                f"{path!r} is not a local folder; {cls.__name__}.from_pretrained loads only a pipeline folder "
                "(with model_index.json) written by save_pretrained(); nothing is downloaded."
            )
        if is_unfinished(path):
            raise ValueError(
                f"{path!r} is the temporary folder of an export that did not finish (it was stopped while "
                "writing); load the finished folder beside it, or export again."
            )
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ValueError(
                f"{path!r} is not a pipeline folder (no model_index.json); give a folder written by "
                f"{cls.__name__}.save_pretrained()."
            )
        kwargs.setdefault("local_files_only", True)
        import_project_components(os.path.join(path, "model_index.json"))
        pipe = super().from_pretrained(path, **kwargs)
        if quantization is not None:
            from latent.quantization import quantize_with

            if getattr(pipe, "model", None) is None:
                raise ValueError(f"{cls.__name__} has no backbone `model` to quantize; load it without `quantization`.")
            quantize_with(pipe.model, quantization)
        return pipe


# ---- masked diffusion -----------------------------------------------------------------------------
def _with_trajectory(call: Callable) -> Callable:
    """A pipeline `__call__` that also takes `trajectory=True` (see the module docstring): the sampler runs
    of the call record their trajectories, which are joined row by row and returned with the output."""

    @functools.wraps(call)
    def wrapped(self, *args, trajectory: bool = False, **kwargs):
        if not trajectory:
            return call(self, *args, **kwargs)
        self._trajectory_log = []
        try:
            out = call(self, *args, **kwargs)
            log = self._trajectory_log
        finally:
            self._trajectory_log = None
        if not log:
            raise ValueError(f"{type(self).__name__} did not decode with the masked-diffusion sampler: no trajectory.")
        batch = max(len(traj.events) if rows is None else max(rows, default=-1) + 1 for traj, rows in log)
        joined = Trajectory.gather(log, batch)
        if isinstance(out, tuple):
            return (*out, joined)
        out["trajectory"] = joined
        return out

    return wrapped


class MaskedDiffusionPipeline(LocalPipelineMixin, DiffusionPipeline):
    """A pipeline that decodes a token canvas with `latent.sampling` through its `MaskedDiffusionScheduler`
    (`self.scheduler`) and backbone (`self.model`)."""

    # Tensors a step callback may ask for: the full canvas [B, N], and the current block's proposal,
    # confidence and committed positions for the active rows [b, block_length].
    _callback_tensor_inputs = ["sequences", "x0", "confidence", "transfer"]
    _trajectory_log = None  # during a call with trajectory=True: [(Trajectory, its rows or None)]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__call__" in cls.__dict__:  # every task pipeline's call takes trajectory=True
            cls.__call__ = _with_trajectory(cls.__dict__["__call__"])

    def encode_prefix(self, adapter, inputs, **adapter_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """An adapter's prefix embeddings [B, P, D] (on the model's device, in its dtype) and mask [B, P]."""
        prefix = adapter(inputs, **adapter_kwargs)
        dtype = next(self.model.parameters()).dtype
        device = self._execution_device
        return prefix.embeds.to(device=device, dtype=dtype), prefix.mask.long().to(device)

    def _step_callback(self, callback, names: list[str]) -> Callable | None:
        """The pipeline callback as the sampler calls it; a returned "sequences" goes back to the sampler."""
        if callback is None:
            return None

        def on_step(step, canvas, info):
            tensors = {"sequences": canvas, "x0": info["x0"], "confidence": info["confidence"],
                       "transfer": info["transfer"]}
            returned = callback(self, step, info["block"], {k: tensors[k] for k in names})
            return returned if isinstance(returned, dict) else None

        return on_step

    def _sample(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, *, gen_length: int,
                model=None, prefix_embeds=None, prefix_mask=None, block_length=None, steps=None, threshold=None,
                factor=None, commit=None, temperature=None, remasking=None, cache=None, eos_early_stop=False,
                mask_token_id=None, eos_token_id=None, generator=None, callback_on_step_end=None,
                callback_on_step_end_tensor_inputs=None, step_callback: Callable | None = None, **sampler_kwargs):
        """One run of the sampler loop with this pipeline's scheduler defaults, progress bar and callback.
        `model` defaults to `self.model`; `step_callback(step, canvas, info)` is the raw sampler callback when
        a pipeline needs one (it then calls the user's callback itself)."""
        device = self._execution_device
        gen_length = as_count("gen_length", gen_length)
        block_length, steps = as_count("block_length", block_length, True), as_count("steps", steps, True)
        for name, value in (("temperature", temperature), ("threshold", threshold), ("factor", factor),
                            ("prefix_embeds", prefix_embeds)):
            check_finite(name, value)
        self._check_prompt_ids(input_ids, attention_mask, mask_token_id)
        settings = resolve_decoding(self.model, self.scheduler, gen_length, block_length, steps, threshold, factor,
                                    commit)
        sampler = self.scheduler.sampler(
            self.model, gen_length=gen_length, temperature=temperature, confidence=remasking, cache=cache,
            eos_early_stop=eos_early_stop, mask_token_id=mask_token_id, eos_token_id=eos_token_id,
            **settings, **sampler_kwargs,
        )
        if step_callback is None:
            step_callback = self._step_callback(callback_on_step_end, callback_on_step_end_tensor_inputs or ["sequences"])
        result = sampler(
            self.model if model is None else model, input_ids.to(device),
            None if attention_mask is None else _full_to_none(attention_mask.to(device)),
            prefix_embeds=prefix_embeds, prefix_mask=_full_to_none(prefix_mask), generator=generator,
            callback_on_step_end=step_callback,
            # Data-dependent rules (threshold) have no fixed step count: gen_length forwards is their worst case.
            progress_bar=lambda total: self.progress_bar(total=total or gen_length),
            record_trajectory=self._trajectory_log is not None,
        )
        if self._trajectory_log is not None:
            self._trajectory_log.append((result.trajectory, None))
        return result


    def _check_prompt_ids(self, input_ids, attention_mask, mask_token_id) -> None:
        """A mask token in a prompt would stay there: the sampler decodes only the generated positions."""
        config = getattr(self.model, "config", None)
        mask_id = mask_token_id if mask_token_id is not None else getattr(config, "mask_token_id", None)
        if mask_id is None or input_ids.numel() == 0:
            return
        held = input_ids == mask_id
        if attention_mask is not None:
            held &= attention_mask.to(held.device).bool()
        if bool(held.any()):
            row = int(held.any(1).nonzero()[0])
            raise ValueError(
                f"prompt {row} holds the mask token (id {mask_id}); only the gen_length positions after the prompt "
                "are decoded, so it would stay in the output. Remove it from the prompt."
            )


def join_prompt(embed: torch.nn.Module, prefix_embeds: torch.Tensor, prefix_mask: torch.Tensor | None,
                input_ids: torch.LongTensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One prefix of embeddings from [adapter prefix | left-padded prompt]: each row's prompt tokens (embedded
    by `embed`, the backbone's input embedding) follow its last valid prefix slot, and all padding moves to the
    left. Kept apart, prompts of different lengths would leave padding between a row's prefix and its prompt,
    so the rotary distance from the prefix to the text would depend on the other rows of the batch, and the
    backbone never read text with such gaps. Training and decoding both join this way.
    Returns (embeds [B, P + L, D], mask [B, P + L] long)."""
    from modalities.base import PrefixEmbeds, left_align

    device = prefix_embeds.device
    tokens = embed(input_ids.to(device)).to(prefix_embeds.dtype)
    pm = torch.ones(prefix_embeds.shape[:2], dtype=torch.bool, device=device) if prefix_mask is None else prefix_mask
    am = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask
    joined = left_align(PrefixEmbeds(torch.cat([prefix_embeds, tokens], 1),
                                     torch.cat([pm.to(device).bool(), am.to(device).bool()], 1)))
    return joined.embeds, joined.mask.long()


class PrefixDiffusionPipeline(MaskedDiffusionPipeline):
    """[adapter prefix | text prompt | gen_length masked positions] -> decoded text. The prompt joins the prefix
    (`join_prompt`), so the sampler's canvas, which callbacks see, is the generated part; `sequences` in the
    output are [prompt | generated], left padded.

    A subclass names its adapter module (`adapter_name`, None for text only) and keeps its own `__call__`,
    `check_inputs` and output dataclass; the rest is here."""

    adapter_name: str | None = None
    strip_texts = True  # captions and answers are stripped; a text continuation keeps its leading space

    @property
    def adapter(self):
        return None if self.adapter_name is None else getattr(self, self.adapter_name)

    def _check_adapter_width(self, adapter, model) -> None:
        d_adapter = getattr(adapter.config, "hidden_size", None)
        d_model = getattr(model.config, "hidden_size", None)
        if d_adapter is not None and d_model is not None and d_adapter != d_model:
            raise ValueError(
                f"{self.adapter_name}.config.hidden_size={d_adapter} but model.config.hidden_size={d_model}; the "
                "adapter must project to the backbone's width."
            )

    def _check_call(self, gen_length, batch_size, on_error, output_type, callback, tensor_inputs) -> list[str]:
        """Checks every prefix pipeline makes; returns the callback's tensor names."""
        as_count("gen_length", gen_length)
        as_count("batch_size", batch_size, allow_none=True)
        check_on_error(on_error)
        if output_type not in ("text", "ids"):
            raise ValueError(f"`output_type` must be 'text' or 'ids', got {output_type!r}.")
        if output_type == "text" and self.tokenizer is None:
            raise ValueError("output_type='text' needs a tokenizer; use output_type='ids'.")
        return callback_tensor_inputs(callback, tensor_inputs, self._callback_tensor_inputs, ["sequences"])

    # ---- text in and out ----------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[str]) -> tuple[torch.LongTensor, torch.LongTensor]:
        """Left-padded prompt ids [B, L] and mask [B, L] (`encode_prompts`)."""
        return encode_prompts(self.tokenizer, [prompt] if isinstance(prompt, str) else prompt)

    def decode(self, generated: torch.LongTensor) -> list[str]:
        """Generated ids [B, G] -> one text per row, up to its first EOS."""
        return decode_texts(self.tokenizer, generated, strip=self.strip_texts)

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _token_ids(self) -> dict[str, int | None]:
        tok = self.tokenizer
        return {"mask_token_id": getattr(tok, "mask_token_id", None), "eos_token_id": getattr(tok, "eos_token_id", None)}

    # ---- decoding -----------------------------------------------------------------------------------
    def _prefix(self, batch, **adapter_kwargs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Prefix embeddings and mask of a chunk's adapter input (None, None without an adapter input)."""
        return (None, None) if batch is None else self.encode_prefix(self.adapter, batch, **adapter_kwargs)

    def _decode_chunk(self, batch, prompts: list[str], gen_length: int, output_type: str,
                      adapter_kwargs: dict | None = None, **decode):
        """Decode one chunk: the adapter's prefix for `batch` (None: no adapter input; `adapter_kwargs` go to the
        adapter's call), then the prompts, then `gen_length` masked positions. Returns (sequences on the CPU,
        texts or None, nfe)."""
        prefix_embeds, prefix_mask = self._prefix(batch, **(adapter_kwargs or {}))
        input_ids, attention_mask = self.encode_prompt(prompts)
        canvas, canvas_mask = input_ids, attention_mask
        if prefix_embeds is not None and input_ids.shape[1]:  # the prompt joins the prefix: no gap between them
            self._check_prompt_ids(input_ids, attention_mask, self._token_ids()["mask_token_id"])
            prefix_embeds, prefix_mask = join_prompt(self.model.embed, prefix_embeds, prefix_mask, input_ids,
                                                     attention_mask)
            canvas, canvas_mask = input_ids[:, :0], attention_mask[:, :0]
        result = self._sample(canvas, canvas_mask, gen_length=gen_length, prefix_embeds=prefix_embeds,
                              prefix_mask=prefix_mask, **self._token_ids(), **decode)
        generated = result.sequences[:, canvas.shape[1] :]
        texts = self.decode(generated) if output_type == "text" else None
        return torch.cat([input_ids.cpu(), generated.cpu()], 1), texts, result.nfe

    def _decode_rows(self, n: int, prompts: list[str], gen_length: int, *, prepare: Callable | None = None,
                     collate: Callable, batch_size: int | None = None, on_error: str = "raise",
                     error_types: tuple[type[BaseException], ...] = (ValueError,), output_type: str = "text",
                     **decode):
        """Decode n rows in chunks of `batch_size` (default: all at once).

        `prepare(i)` turns row i's raw input into what `collate(items, rows)` batches for the adapter (None:
        the input is ready, `collate` gets the row indices only). A row whose `prepare` raises one of
        `error_types` raises (on_error="raise") or is recorded: text None, sequence of padding only, message
        in errors. Each chunk is prepared just before it is decoded, so a long list is never held whole.
        Returns (texts or None, sequences [n, W] left padded, errors, nfe)."""
        texts: list[str | None] = [None] * n
        errors: list[str | None] = [None] * n
        rows: dict[int, torch.Tensor] = {}
        nfe = 0
        chunk = batch_size or n
        for lo in range(0, n, chunk):
            idx, items = [], []
            for i in range(lo, min(n, lo + chunk)):
                try:
                    items.append(None if prepare is None else prepare(i))
                except error_types as err:
                    if on_error == "raise":
                        raise
                    errors[i] = str(err) or type(err).__name__
                    continue
                idx.append(i)
            if not idx:
                continue
            seq, decoded, used = self._decode_chunk(collate(items, idx), [prompts[i] for i in idx], gen_length,
                                                    output_type, **decode)
            if self._trajectory_log:  # the chunk's trajectory holds these rows
                self._trajectory_log[-1] = (self._trajectory_log[-1][0], idx)
            nfe += used
            for j, i in enumerate(idx):
                rows[i] = seq[j]
                if decoded is not None:
                    texts[i] = decoded[j]
        if self._trajectory_log is not None:  # one trajectory of all n rows; bad rows have no events
            self._trajectory_log[:] = [(Trajectory.gather(self._trajectory_log, n), None)]
        width = max([r.shape[0] for r in rows.values()], default=gen_length)
        sequences = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        for i, r in rows.items():
            sequences[i, width - r.shape[0] :] = r  # chunks differ in prompt width: left pad them all alike
        return (texts if output_type == "text" else None), sequences, errors, nfe

"""Image captioning with a vision adapter and a masked-diffusion backbone, as a diffusers pipeline.

```python
from pipelines.captioning import CaptioningPipeline

pipe = CaptioningPipeline.from_pretrained("runs/caption_quickstart/pipeline")
out = pipe(images=["cat.png", pil_image], gen_length=24)           # threshold decoding, exact prefix cache
print(out.captions)
out = pipe(images=img, prompt="colour:", steps=24, threshold=None)  # LLaDA schedule, 1 token per step
```

The image becomes prefix embeddings ([B, P, D], `modalities.vision.VisionAdapter`); an optional text
prompt follows; then `gen_length` masked positions are decoded by the sampler loop of `latent.sampling`.
With the backbone's `prefix` attention layout, image and prompt attend only among themselves, so their
K/V are computed once and reused at every step exactly (cache "prefix_exact", the scheduler's "auto").
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from latent.scheduler import MaskedDiffusionScheduler
from modalities.vision import ImageError, as_image_list

__all__ = ["CaptioningPipeline", "CaptioningPipelineOutput"]


@dataclass
class CaptioningPipelineOutput(BaseOutput):
    """
    captions: one caption per image, decoded up to the first EOS.
    sequences: [B, prompt_len + gen_length] token ids (left-padded prompt, then the generated tokens).
    nfe: model forward passes used (summed over chunks when `batch_size` splits the call).
    """

    captions: list[str] | None
    sequences: torch.LongTensor
    nfe: int = 0


class CaptioningPipeline(DiffusionPipeline):
    """images (+ optional prompt) -> captions. Modules: `vision_adapter` (a `ModalityAdapter` returning
    `PrefixEmbeds`), `model` (`latent.DiffusionTransformer`, best with attention_layout="prefix"),
    `tokenizer` (with mask and EOS tokens), `scheduler` (`MaskedDiffusionScheduler`: decoding defaults).
    `gen_length` and `prompt` are the defaults of a call, saved in model_index.json."""

    model_cpu_offload_seq = "vision_adapter->model"
    _callback_tensor_inputs = ["sequences", "x0", "confidence", "transfer"]
    accepts_seed = True  # the batch job passes --seed

    def __init__(self, vision_adapter, model, tokenizer, scheduler: MaskedDiffusionScheduler,
                 gen_length: int = 32, prompt: str = ""):
        super().__init__()
        if getattr(tokenizer, "mask_token_id", None) is None or getattr(tokenizer, "eos_token_id", None) is None:
            raise ValueError("The tokenizer needs a mask token and an EOS token (latent.data.tokenizer adds both).")
        d_adapter = getattr(vision_adapter.config, "hidden_size", None)
        d_model = getattr(model.config, "hidden_size", None)
        if d_adapter is not None and d_model is not None and d_adapter != d_model:
            raise ValueError(
                f"vision_adapter.config.hidden_size={d_adapter} but model.config.hidden_size={d_model}; the adapter "
                "must project to the backbone's width."
            )
        self.register_modules(vision_adapter=vision_adapter, model=model, tokenizer=tokenizer, scheduler=scheduler)
        self.register_to_config(gen_length=gen_length, prompt=prompt)

    # ---- what the batch job uses ----------------------------------------------------------------
    @property
    def preprocessor(self):
        """Picklable image preprocessing (path / PIL / array -> float [3, H, W]) for DataLoader workers."""
        return self.vision_adapter.preprocessor

    def caption(self, pixel_values: torch.Tensor, seed: int | None = None, **kwargs) -> list[str]:
        """Captions of preprocessed images [B, 3, H, W] (the batch job's call)."""
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        return self(pixel_values=pixel_values, generator=gen, **kwargs).captions

    # ---- inputs ---------------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.LongTensor, torch.LongTensor | None]:
        """Left-padded prompt ids [B, L] and mask (None when nothing is padded); L may be 0."""
        if not any(prompts):
            return torch.zeros(len(prompts), 0, dtype=torch.long), None
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            self.tokenizer.padding_side = side
        ids, mask = enc["input_ids"].long(), enc["attention_mask"].long()
        return ids, None if bool(mask.all()) else mask

    def check_inputs(self, images, pixel_values, prompt, gen_length, batch_size, output_type, tensor_inputs):
        if (images is None) == (pixel_values is None):
            raise ValueError("Give exactly one of `images` (PIL, numpy, tensor, path, or a list) or `pixel_values`.")
        if pixel_values is not None and (not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4):
            raise ValueError("`pixel_values` must be a [B, 3, H, W] tensor from vision_adapter.preprocess(images).")
        if pixel_values is not None and pixel_values.shape[0] == 0:
            raise ImageError("`pixel_values` holds no images.")
        if prompt is not None and not isinstance(prompt, str):
            if not isinstance(prompt, (list, tuple)) or not all(isinstance(p, str) for p in prompt):
                raise ValueError(f"`prompt` must be a str or a list of str, got {type(prompt).__name__}.")
        if not isinstance(gen_length, int) or gen_length <= 0:
            raise ValueError(f"`gen_length` must be a positive int, got {gen_length!r}.")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size <= 0):
            raise ValueError(f"`batch_size` must be a positive int or None, got {batch_size!r}.")
        if output_type not in ("text", "ids"):
            raise ValueError(f"`output_type` must be 'text' or 'ids', got {output_type!r}.")
        bad = [k for k in tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` {bad} not in {self._callback_tensor_inputs}.")

    def decode(self, generated: torch.LongTensor) -> list[str]:
        eos = self.tokenizer.eos_token_id
        rows = []
        for row in generated.tolist():
            rows.append(row[: row.index(eos)] if eos in row else row)
        return [t.strip() for t in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]

    # ---- call -----------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        images=None,
        prompt: str | list[str] | None = None,
        *,
        pixel_values: torch.Tensor | None = None,
        gen_length: int | None = None,
        block_length: int | None = None,
        steps: int | None = None,
        threshold: float | None = None,
        temperature: float | None = None,
        remasking: str | None = None,
        cache: str | None = None,
        eos_early_stop: bool = True,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
        callback_on_step_end: Callable[[Any, int, int, dict], Any] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        output_type: str = "text",
        return_dict: bool = True,
        **sampler_kwargs,
    ) -> CaptioningPipelineOutput | tuple:
        """Caption images.

        Args:
            images: one image or a list: PIL images, numpy arrays ([H, W], [H, W, C], [C, H, W]; uint8 or
                float in [0, 1]), tensors, or file paths; a [B, C, H, W] array/tensor is a batch.
                Or `pixel_values` already preprocessed by `vision_adapter.preprocess`.
            prompt: optional text after the image (one for all images, or one per image); default the
                pipeline's `prompt` (saved with it).
            gen_length: caption tokens to decode (default: the pipeline's `gen_length`).
            block_length: decoding block (default: the scheduler's, capped at gen_length).
            steps: forwards of the LLaDA schedule rule (`threshold=None` given explicitly or a scheduler
                whose commit is "schedule"); steps=gen_length is 1 token per step.
            threshold: Fast-dLLM threshold decoding: commit every position with confidence >= threshold,
                at least one per step. Default: the scheduler's rule (threshold 0.9 for saved captioners).
            temperature: 0 = argmax; > 0 = Gumbel-max sampling (reproducible with `generator`).
            remasking: confidence rule ("low_confidence", "margin", "neg_entropy", "random").
            cache: "auto" (exact prefix cache for the prefix layout), "none", or any sampler cache name.
            eos_early_stop: a caption stops once EOS is committed and everything before it is decoded.
            batch_size: split a long list of images into chunks of this size.
            callback_on_step_end: `fn(pipe, step, block, callback_kwargs)` after every forward.
            sampler_kwargs: any other `latent.sampling.SamplerConfig` knob (top_k, top_p, commit, factor...).
        """
        gen_length = self.config.gen_length if gen_length is None else gen_length
        self.check_inputs(images, pixel_values, prompt, gen_length, batch_size, output_type,
                          callback_on_step_end_tensor_inputs)
        if pixel_values is None:
            images = as_image_list(images)  # clear error for an empty list
            n = len(images)
        else:
            n = pixel_values.shape[0]
        prompt = self.config.prompt if prompt is None else prompt
        prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} images; give one prompt, or one per image.")
        chunk = batch_size or n
        captions, sequences, nfe = [], [], 0
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            if pixel_values is None:
                pix = self.vision_adapter.preprocess(images[lo:hi])
            else:
                pix = pixel_values[lo:hi]
            seq, caps, used = self._caption_chunk(
                pix, prompts[lo:hi], gen_length, block_length, steps, threshold, temperature, remasking, cache,
                eos_early_stop, generator, callback_on_step_end, callback_on_step_end_tensor_inputs, output_type,
                sampler_kwargs,
            )
            sequences.append(seq)
            captions += caps or []
            nfe += used
        width = max(s.shape[1] for s in sequences)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        sequences = torch.cat([torch.nn.functional.pad(s, (width - s.shape[1], 0), value=pad) for s in sequences])
        self.maybe_free_model_hooks()
        out_caps = captions if output_type == "text" else None
        if not return_dict:
            return out_caps, sequences
        return CaptioningPipelineOutput(captions=out_caps, sequences=sequences, nfe=nfe)

    def _caption_chunk(self, pixel_values, prompts, gen_length, block_length, steps, threshold, temperature,
                       remasking, cache, eos_early_stop, generator, callback, tensor_inputs, output_type,
                       sampler_kwargs):
        device = self._execution_device
        adapter_param = next(self.vision_adapter.parameters())
        prefix = self.vision_adapter(pixel_values.to(device=adapter_param.device, dtype=adapter_param.dtype))
        model_dtype = next(self.model.parameters()).dtype
        prefix_embeds = prefix.embeds.to(device=device, dtype=model_dtype)
        prefix_mask = None if bool(prefix.mask.all()) else prefix.mask.long().to(device)
        input_ids, attention_mask = self.encode_prompt(prompts)
        input_ids = input_ids.to(device)
        attention_mask = None if attention_mask is None else attention_mask.to(device)

        if block_length is None:
            if getattr(self.model.config, "attention_layout", None) == "block_causal":
                block_length = self.model.config.block_size
            else:
                block_length = min(self.scheduler.config.block_length, gen_length)
                while gen_length % block_length:  # the largest block that divides gen_length
                    block_length -= 1
        commit = sampler_kwargs.pop("commit", None)
        if commit is None and threshold is not None:
            commit = "threshold"
        if commit is None and steps is not None and self.scheduler.config.commit != "schedule":
            commit = "schedule"  # asking for a step count means the LLaDA schedule rule
        tok = self.tokenizer
        sampler = self.scheduler.sampler(
            self.model, gen_length=gen_length, block_length=block_length, steps=steps, threshold=threshold,
            temperature=temperature, confidence=remasking, commit=commit, cache=cache, eos_early_stop=eos_early_stop,
            mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id, **sampler_kwargs,
        )
        names = tensor_inputs or ["sequences"]

        def on_step(step, canvas, info):
            if callback is not None:
                tensors = {"sequences": canvas, **{k: info[k] for k in ("x0", "confidence", "transfer")}}
                callback(self, step, info["block"], {k: tensors[k] for k in names})

        result = sampler(
            self.model, input_ids, attention_mask, prefix_embeds=prefix_embeds, prefix_mask=prefix_mask,
            generator=generator, callback_on_step_end=on_step,
            progress_bar=lambda total: self.progress_bar(total=total or gen_length),
        )
        seq = result.sequences
        caps = self.decode(seq[:, input_ids.shape[1]:]) if output_type == "text" else None
        return seq.cpu(), caps, result.nfe

    # ---- saving ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load from a local folder written by save_pretrained (never from a hub)."""
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ValueError(f"{path!r} is not a pipeline folder (no model_index.json); give a save_pretrained() folder.")
        kwargs.setdefault("local_files_only", True)
        return super().from_pretrained(path, **kwargs)

"""Image captioning with a vision adapter and a masked-diffusion backbone, as a diffusers pipeline.

```python
from pipelines.captioning import CaptioningPipeline

pipe = CaptioningPipeline.from_pretrained("runs/caption_quickstart/pipeline")
out = pipe(images=["cat.png", pil_image], gen_length=24)           # threshold decoding, exact prefix cache
print(out.captions)
out = pipe(images=img, prompt="colour:", steps=24)                  # LLaDA schedule, 1 token per step
out = pipe(images=[img, "missing.png"], on_error="record")         # captions [str, None], out.errors[1] says why
```

The image becomes prefix embeddings ([B, P, D], `modalities.vision.VisionAdapter`); an optional text
prompt follows; then `gen_length` masked positions are decoded by the sampler loop of `latent.sampling`.
With the backbone's `prefix` attention layout, image and prompt attend only among themselves, so their
K/V are computed once and reused at every step exactly (cache "prefix_exact", the scheduler's "auto").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from latent.scheduler import MaskedDiffusionScheduler
from modalities.vision import ImageError, as_image_list

from .base import PipelineOutput, PrefixDiffusionPipeline, check_finite, check_tokenizer

__all__ = ["CaptioningPipeline", "CaptioningPipelineOutput"]


@dataclass
class CaptioningPipelineOutput(PipelineOutput):
    """
    captions: one caption per image, decoded up to the first EOS (None for output_type="ids"; None for an
        image recorded as bad with on_error="record").
    sequences: [B, prompt_len + gen_length] token ids on the CPU (left-padded prompt, then the generated
        tokens); a bad image's row holds only padding.
    errors: per image, None or the message naming what is wrong with it.
    nfe: model forward passes used (summed over chunks when `batch_size` splits the call).

    `return_dict=False` returns these fields in this order: (captions, sequences, errors, nfe).
    """

    captions: list[str | None] | None
    sequences: torch.LongTensor
    errors: list[str | None] = field(default_factory=list)
    nfe: int = 0


class CaptioningPipeline(PrefixDiffusionPipeline):
    """images (+ optional prompt) -> captions. Modules: `vision_adapter` (a `ModalityAdapter` returning
    `PrefixEmbeds`), `model` (`latent.DiffusionTransformer`, best with attention_layout="prefix"),
    `tokenizer` (with mask and EOS tokens), `scheduler` (`MaskedDiffusionScheduler`: decoding defaults).
    `gen_length` and `prompt` are the defaults of a call, saved in model_index.json."""

    model_cpu_offload_seq = "vision_adapter->model"
    adapter_name = "vision_adapter"
    accepts_seed = True  # the batch job passes --seed

    def __init__(self, vision_adapter, model, tokenizer, scheduler: MaskedDiffusionScheduler,
                 gen_length: int = 32, prompt: str = ""):
        super().__init__()
        check_tokenizer(tokenizer)
        self._check_adapter_width(vision_adapter, model)
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
    def check_inputs(self, images, pixel_values, prompt, gen_length, batch_size, on_error, output_type, callback,
                     callback_on_step_end_tensor_inputs, temperature=None, threshold=None) -> list[str]:
        if (images is None) == (pixel_values is None):
            raise ValueError("Give exactly one of `images` (PIL, numpy, tensor, path, or a list) or `pixel_values`.")
        if pixel_values is not None and (not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4):
            raise ValueError("`pixel_values` must be a [B, 3, H, W] tensor from vision_adapter.preprocess(images).")
        if pixel_values is not None and pixel_values.shape[0] == 0:
            raise ImageError("`pixel_values` holds no images.")
        # NaN pixels or settings decode to an empty caption that would pass for a result.
        for name, value in (("pixel_values", pixel_values), ("temperature", temperature), ("threshold", threshold)):
            check_finite(name, value)
        if prompt is not None and not isinstance(prompt, str):
            if not isinstance(prompt, (list, tuple)) or not all(isinstance(p, str) for p in prompt):
                raise ValueError(f"`prompt` must be a str or a list of str, got {type(prompt).__name__}.")
        return self._check_call(gen_length, batch_size, on_error, output_type, callback,
                                callback_on_step_end_tensor_inputs)

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
        on_error: str = "raise",
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
                pipeline's `prompt` (saved with it). A prompt holding the mask token is refused.
            gen_length: caption tokens to decode (default: the pipeline's `gen_length`).
            block_length: decoding block (default: the largest divisor of gen_length up to the scheduler's;
                a block_causal model's block_size).
            steps: forwards of the LLaDA schedule rule; giving it without `threshold` selects that rule.
                steps=gen_length is 1 token per step; more steps than gen_length are refused.
            threshold: Fast-dLLM threshold decoding: commit every position with confidence >= threshold,
                at least one per step. Default: the scheduler's rule (threshold 0.9 for saved captioners).
            temperature: 0 = argmax; > 0 = Gumbel-max sampling (reproducible with `generator`); NaN or
                infinite temperatures, thresholds and pixel values are refused.
            remasking: confidence rule ("low_confidence", "margin", "neg_entropy", "random").
            cache: "auto" (exact prefix cache for the prefix layout), "none", or any sampler cache name.
            eos_early_stop: a caption stops once EOS is committed and everything before it is decoded.
            batch_size: split a long list of images into chunks of this size (each chunk is loaded just
                before it is decoded).
            on_error: "raise" (default): an image that cannot be used raises `ImageError` naming it.
                "record": its caption is None, its message goes to `errors`, and the other images are
                captioned.
            callback_on_step_end: `fn(pipe, step, block, callback_kwargs)` after every forward, or a diffusers
                `PipelineCallback`; a returned dict with "sequences" ([B, N]) replaces the canvas.
            sampler_kwargs: any other `latent.sampling.SamplerConfig` knob (top_k, top_p, commit, factor...).

        Returns `CaptioningPipelineOutput`, or its fields as a tuple with `return_dict=False`.
        """
        gen_length = self.config.gen_length if gen_length is None else gen_length
        names = self.check_inputs(images, pixel_values, prompt, gen_length, batch_size, on_error, output_type,
                                  callback_on_step_end, callback_on_step_end_tensor_inputs, temperature, threshold)
        gen_length = int(gen_length)  # a numpy int is fine; check_inputs refused bools and floats
        if pixel_values is None:
            images = as_image_list(images)  # clear error for an empty list
            n = len(images)
        else:
            n = pixel_values.shape[0]
        prompt = self.config.prompt if prompt is None else prompt
        prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} images; give one prompt, or one per image.")
        if pixel_values is None:
            pre = self.vision_adapter.preprocessor
            prepare, collate = (lambda i: pre.one(images[i], i)), (lambda items, rows: torch.stack(items))
        else:
            prepare, collate = None, (lambda items, rows: pixel_values[rows])
        captions, sequences, errors, nfe = self._decode_rows(
            n, prompts, gen_length, prepare=prepare, collate=collate, batch_size=batch_size, on_error=on_error,
            error_types=(ImageError,), output_type=output_type, block_length=block_length, steps=steps,
            threshold=threshold, temperature=temperature, remasking=remasking, cache=cache,
            eos_early_stop=eos_early_stop, generator=generator, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=names, **sampler_kwargs,
        )
        self.maybe_free_model_hooks()
        out = CaptioningPipelineOutput(captions=captions, sequences=sequences, errors=errors, nfe=nfe)
        return out if return_dict else out.to_tuple()

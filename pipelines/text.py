"""Text generation by masked diffusion, as a diffusers pipeline.

```python
from pipelines import TextDiffusionPipeline

pipe = TextDiffusionPipeline.from_pretrained("runs/text_tiny/pipeline")
out = pipe("The meaning of a word is", gen_length=64, block_length=32, steps=64)
print(out.texts[0])
out = pipe(["a", "b"], gen_length=64, threshold=0.9)      # Fast-dLLM threshold decoding
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from latent.scheduler import MaskedDiffusionScheduler


@dataclass
class TextDiffusionPipelineOutput(BaseOutput):
    """
    sequences: [B, prompt_len + gen_length] the full canvas, prompt included (as LLaDA returns it).
    texts: the generated part of each row, decoded up to its first EOS (None for output_type="ids").
    nfe: model forward passes used.
    """

    sequences: torch.LongTensor
    texts: list[str] | None = None
    nfe: int = 0


def check_tokenizer(tokenizer) -> None:
    if tokenizer is None:
        return
    if getattr(tokenizer, "mask_token_id", None) is None:
        raise ValueError(
            "The tokenizer has no mask token; masked diffusion needs one. Add it with "
            "tokenizer.add_special_tokens({'mask_token': '<|mask|>'}) and resize the model's vocabulary, "
            "or use a tokenizer trained with one (latent.data.tokenizer.train_tokenizer adds mask, pad, eos)."
        )


class TextDiffusionPipeline(DiffusionPipeline):
    """Prompt -> text with a masked-diffusion backbone (`latent.DiffusionTransformer` or any model
    called as `model(x, attention_mask=m).logits`), a tokenizer with a mask token, and a
    `MaskedDiffusionScheduler` holding the decoding defaults."""

    model_cpu_offload_seq = "model"
    _callback_tensor_inputs = ["sequences", "x0", "confidence", "transfer"]

    def __init__(self, model, tokenizer, scheduler: MaskedDiffusionScheduler):
        super().__init__()
        check_tokenizer(tokenizer)
        self.register_modules(model=model, tokenizer=tokenizer, scheduler=scheduler)

    # ---- inputs ---------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[str]) -> tuple[torch.LongTensor, torch.LongTensor]:
        """Tokenise with left padding, so every row's generated positions follow its prompt."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            self.tokenizer.padding_side = side
        return enc["input_ids"].long(), enc["attention_mask"].long()

    def check_inputs(self, prompt, input_ids, attention_mask, output_type, callback_on_step_end_tensor_inputs):
        if (prompt is None) == (input_ids is None):
            raise ValueError("Give exactly one of `prompt` (str or list of str) or `input_ids` ([B, L] int64).")
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts) or not prompts:
                raise ValueError(f"`prompt` must be a non-empty str or list of str, got {type(prompt).__name__}.")
            if any(not p.strip() for p in prompts):
                raise ValueError("`prompt` holds an empty string; every row needs at least one prompt token.")
            if self.tokenizer is None:
                raise ValueError("A `prompt` needs a tokenizer; pass `input_ids` instead or load one.")
        if input_ids is None and attention_mask is not None:
            raise ValueError("`attention_mask` goes with `input_ids`; for `prompt` it is made by the tokenizer.")
        if output_type not in ("text", "ids"):
            raise ValueError(f"`output_type` must be 'text' or 'ids', got {output_type!r}.")
        if output_type == "text" and self.tokenizer is None:
            raise ValueError("output_type='text' needs a tokenizer; use output_type='ids'.")
        bad = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` {bad} not in {self._callback_tensor_inputs}.")

    def decode(self, generated: torch.LongTensor) -> list[str]:
        eos = self.tokenizer.eos_token_id
        rows = []
        for row in generated.tolist():
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            rows.append(row)
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    # ---- call -----------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        gen_length: int = 128,
        block_length: int | None = None,
        steps: int | None = None,
        temperature: float | None = None,
        remasking: str | None = None,
        threshold: float | None = None,
        factor: float | None = None,
        cfg_scale: float = 0.0,
        cache: str | None = None,
        eos_early_stop: bool = False,
        prefix_embeds: torch.Tensor | None = None,
        prefix_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        callback_on_step_end: Callable[[Any, int, int, dict], dict | None] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        output_type: str = "text",
        return_dict: bool = True,
        **sampler_kwargs,
    ) -> TextDiffusionPipelineOutput | tuple:
        """Generate `gen_length` tokens after each prompt.

        Args:
            prompt: one prompt or a list (left-padded together); or `input_ids` (+ `attention_mask`).
            gen_length, block_length, steps: LLaDA's knobs; `steps` is the total number of forwards of the
                schedule rule (steps / (gen_length / block_length) per block). block_length defaults to
                the scheduler's (for a block_causal model: its block_size).
            temperature: 0 = argmax; > 0 = float64 Gumbel-max sampling (LLaDA).
            remasking: confidence used to pick what to commit: "low_confidence" (LLaDA), "random",
                "margin", "neg_entropy".
            threshold: Fast-dLLM parallel decoding: commit every position with confidence >= threshold
                (at least one per step); steps then depend on the data. `factor` is its factor rule.
            cfg_scale: classifier-free guidance (the prompt masked out for the unconditional branch).
            cache: "auto" (the exact cache the model's layout allows), "none", "prefix_exact",
                "block_exact", or Fast-dLLM's approximate "prefix" / "dual" for bidirectional models.
            eos_early_stop: a row stops once EOS is committed with everything before it decoded.
            generator: makes sampling (temperature > 0, random remasking) reproducible.
            callback_on_step_end: diffusers-style `fn(pipe, step, block, callback_kwargs)` after every
                forward, with the tensors named in `callback_on_step_end_tensor_inputs`.
            output_type: "text" (sequences and decoded texts) or "ids" (sequences only).
            sampler_kwargs: any other `latent.sampling.SamplerConfig` knob (top_k, top_p, logits_eos_inf...).
        """
        self.check_inputs(prompt, input_ids, attention_mask, output_type, callback_on_step_end_tensor_inputs)
        device = self._execution_device
        if prompt is not None:
            input_ids, attention_mask = self.encode_prompt(prompt)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
            attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
        input_ids = input_ids.to(device)
        attention_mask = None if attention_mask is None else attention_mask.to(device)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # nothing padded: the model can skip masking

        layout_block = getattr(self.model.config, "block_size", None)
        if block_length is None:
            is_block_causal = getattr(self.model.config, "attention_layout", None) == "block_causal"
            block_length = layout_block if is_block_causal else min(self.scheduler.config.block_length, gen_length)
        commit = "threshold" if threshold is not None else "factor" if factor is not None else None
        tok = self.tokenizer
        sampler = self.scheduler.sampler(
            self.model, gen_length=gen_length, block_length=block_length, steps=steps, temperature=temperature,
            confidence=remasking, commit=commit, threshold=threshold, factor=factor, cfg_scale=cfg_scale,
            cache=cache, eos_early_stop=eos_early_stop,
            mask_token_id=getattr(tok, "mask_token_id", None),
            eos_token_id=getattr(tok, "eos_token_id", None) if tok is not None else None,
            **sampler_kwargs,
        )
        names = callback_on_step_end_tensor_inputs or ["sequences"]

        def on_step(step, canvas, info):
            if callback_on_step_end is not None:
                tensors = {"sequences": canvas, **{k: info[k] for k in ("x0", "confidence", "transfer")}}
                callback_on_step_end(self, step, info["block"], {k: tensors[k] for k in names})

        result = sampler(
            self.model, input_ids, attention_mask, prefix_embeds=prefix_embeds, prefix_mask=prefix_mask,
            generator=generator, callback_on_step_end=on_step,
            # Data-dependent rules (threshold) have no fixed step count: gen_length forwards is their worst case.
            progress_bar=lambda total: self.progress_bar(total=total or gen_length),
        )
        texts = self.decode(result.sequences[:, input_ids.shape[1] :]) if output_type == "text" else None
        self.maybe_free_model_hooks()
        if not return_dict:
            return result.sequences, texts
        return TextDiffusionPipelineOutput(sequences=result.sequences, texts=texts, nfe=result.nfe)

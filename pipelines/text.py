"""Text generation by masked diffusion, as a diffusers pipeline.

```python
from pipelines import TextDiffusionPipeline

pipe = TextDiffusionPipeline.from_pretrained("runs/text_tiny/pipeline")
out = pipe("The meaning of a word is", gen_length=64, block_length=32, steps=64)
print(out.texts[0])
out = pipe(["a", "b"], gen_length=64, threshold=0.9)      # Fast-dLLM threshold decoding
out = pipe(messages=[{"role": "user", "content": "Hi"}])  # a chat model: its tokenizer's chat template
```
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from latent.scheduler import MaskedDiffusionScheduler

from .base import PipelineOutput, PrefixDiffusionPipeline, check_tokenizer


@dataclass
class TextDiffusionPipelineOutput(PipelineOutput):
    """
    texts: the generated part of each row, decoded up to its first EOS (None for output_type="ids"; None for
        a row recorded as bad with on_error="record").
    sequences: [B, prompt_len + gen_length] the full canvas on the CPU, prompt included (as LLaDA returns it);
        a bad row holds only padding.
    errors: per row, None or why it was not decoded (on_error="record").
    nfe: model forward passes used.

    `return_dict=False` returns these fields in this order: (texts, sequences, errors, nfe).
    """

    texts: list[str | None] | None
    sequences: torch.LongTensor
    errors: list[str | None] = field(default_factory=list)
    nfe: int = 0


class TextDiffusionPipeline(PrefixDiffusionPipeline):
    """Prompt -> text with a masked-diffusion backbone (`latent.DiffusionTransformer` or any model
    called as `model(x, attention_mask=m).logits`), a tokenizer with a mask token, and a
    `MaskedDiffusionScheduler` holding the decoding defaults."""

    model_cpu_offload_seq = "model"
    strip_texts = False  # a continuation keeps its leading space, so prompt + text reads as written

    def __init__(self, model, tokenizer, scheduler: MaskedDiffusionScheduler):
        super().__init__()
        if tokenizer is not None:  # ids in, ids out needs none; EOS is optional (rows then run to gen_length)
            check_tokenizer(tokenizer, need_eos=False)
        self.register_modules(model=model, tokenizer=tokenizer, scheduler=scheduler)

    # ---- inputs ---------------------------------------------------------------------------------
    def check_inputs(self, prompt, input_ids, attention_mask, gen_length, on_error, output_type, callback,
                     callback_on_step_end_tensor_inputs) -> list[str]:
        if (prompt is None) == (input_ids is None):
            raise ValueError("Give exactly one of `prompt` (str or list of str) or `input_ids` ([B, L] int64).")
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts) or not prompts:
                raise ValueError(f"`prompt` must be a non-empty str or list of str, got {type(prompt).__name__}.")
            if self.tokenizer is None:
                raise ValueError("A `prompt` needs a tokenizer; pass `input_ids` instead or load one.")
        if input_ids is None and attention_mask is not None:
            raise ValueError("`attention_mask` goes with `input_ids`; for `prompt` it is made by the tokenizer.")
        return self._check_call(gen_length, None, on_error, output_type, callback, callback_on_step_end_tensor_inputs)

    @staticmethod
    def _check_prompt(prompts: list[str], i: int) -> None:
        if not prompts[i].strip():
            raise ValueError(f"`prompt` {i} is an empty string; every row needs at least one prompt token.")

    def _chat_prompts(self, prompt, messages, input_ids) -> list[str]:
        """Prompts rendered by the tokenizer's chat template, ready for the assistant's turn: `messages` (one
        conversation, a list of {"role", "content"} dicts, or a list of them), or each `prompt` as a user turn."""
        if input_ids is not None:
            raise ValueError("`messages` / `apply_chat_template` go with text, not `input_ids`.")
        if messages is not None and prompt is not None:
            raise ValueError("Give `prompt` or `messages`, not both.")
        tok = self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ValueError("This pipeline's tokenizer has no chat template (tokenizer.chat_template is unset); "
                             "pass plain `prompt` text, or load the tokenizer of a chat model.")
        if messages is not None:
            if not isinstance(messages, (list, tuple)) or not messages:
                raise ValueError("`messages` must be a non-empty list of {'role', 'content'} dicts, or a list of them.")
            convs = [messages] if isinstance(messages[0], dict) else list(messages)
        else:
            if prompt is None:
                raise ValueError("`apply_chat_template=True` needs `prompt` text (or pass `messages`).")
            convs = [[{"role": "user", "content": p}] for p in ([prompt] if isinstance(prompt, str) else prompt)]
        return [tok.apply_chat_template(list(c), tokenize=False, add_generation_prompt=True) for c in convs]

    def _prefix(self, batch, **adapter_kwargs):
        return (None, None) if batch is None else batch  # the caller's own prefix rows, already embedded

    # ---- call -----------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,
        messages: list[dict] | list[list[dict]] | None = None,
        apply_chat_template: bool = False,
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
        on_error: str = "raise",
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
            messages, apply_chat_template: chat models. `messages` (one conversation of {"role", "content"}
                dicts, or a list of conversations) or, with `apply_chat_template=True`, each prompt as a user
                turn, rendered by the tokenizer's chat template with the assistant's turn opened; a
                tokenizer without a template is refused.
            gen_length, block_length, steps: LLaDA's knobs. block_length defaults to the model's block_size
                for a block_causal model, else to the largest divisor of gen_length up to the scheduler's.
                `steps` is the total number of forwards of the LLaDA schedule rule (steps / (gen_length /
                block_length) per block); giving it without `threshold` selects that rule.
            temperature: 0 = argmax; > 0 = float64 Gumbel-max sampling (LLaDA).
            remasking: confidence used to pick what to commit: "low_confidence" (LLaDA), "random",
                "margin", "neg_entropy".
            threshold: Fast-dLLM parallel decoding: commit every position with confidence >= threshold
                (at least one per step); steps then depend on the data. `factor` selects its factor rule.
                With neither, nor `steps`, the scheduler's rule applies.
            cfg_scale: classifier-free guidance (the prompt masked out for the unconditional branch).
            cache: "auto" (the exact cache the model's layout allows), "none", "prefix_exact",
                "block_exact", or Fast-dLLM's approximate "prefix" / "dual" for bidirectional models.
            eos_early_stop: a row stops once EOS is committed with everything before it decoded.
            prefix_embeds, prefix_mask: embeddings [B, P, D] placed before the prompt (e.g. from an adapter).
            on_error: bad input raises a ValueError naming it ("raise", the default). With "record", a row
                whose prompt is empty gets text None, a padding-only sequence and its message in `errors`;
                anything else that is wrong with the call (types, shapes, lengths) still raises.
            generator: makes sampling (temperature > 0, random remasking) reproducible.
            callback_on_step_end: `fn(pipe, step, block, callback_kwargs)` after every forward, with the
                tensors named in `callback_on_step_end_tensor_inputs` ("sequences": the full canvas [B, N];
                "x0", "confidence", "transfer": the current block of the active rows), or a diffusers
                `PipelineCallback`. A returned dict with "sequences" replaces the canvas (diffusers style).
            output_type: "text" (sequences and decoded texts) or "ids" (sequences only).
            sampler_kwargs: any other `latent.sampling.SamplerConfig` knob (top_k, top_p, logits_eos_inf...).

        Returns `TextDiffusionPipelineOutput`, or its fields as a tuple with `return_dict=False`.
        """
        if messages is not None or apply_chat_template:
            prompt = self._chat_prompts(prompt, messages, input_ids)
        names = self.check_inputs(prompt, input_ids, attention_mask, gen_length, on_error, output_type,
                                  callback_on_step_end, callback_on_step_end_tensor_inputs)
        decode = dict(
            block_length=block_length, steps=steps, temperature=temperature, remasking=remasking,
            threshold=threshold, factor=factor, cfg_scale=cfg_scale, cache=cache, eos_early_stop=eos_early_stop,
            generator=generator, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=names, **sampler_kwargs,
        )
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)

            def prefix_rows(_items, rows):
                if prefix_embeds is None:
                    return None
                return prefix_embeds[rows], None if prefix_mask is None else prefix_mask[rows]

            texts, sequences, errors, nfe = self._decode_rows(
                len(prompts), prompts, gen_length, prepare=lambda i: self._check_prompt(prompts, i),
                collate=prefix_rows, on_error=on_error, output_type=output_type, **decode,
            )
        else:
            if input_ids.ndim == 1:
                input_ids = input_ids[None]
                attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
            result = self._sample(input_ids, attention_mask, gen_length=gen_length, prefix_embeds=prefix_embeds,
                                  prefix_mask=prefix_mask, **self._token_ids(), **decode)
            sequences, nfe = result.sequences.cpu(), result.nfe
            texts = self.decode(sequences[:, input_ids.shape[1] :]) if output_type == "text" else None
            errors = [None] * sequences.shape[0]
        self.maybe_free_model_hooks()
        out = TextDiffusionPipelineOutput(texts=texts, sequences=sequences, errors=errors, nfe=nfe)
        return out if return_dict else out.to_tuple()

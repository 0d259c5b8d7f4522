"""Spoken question answering and speech recognition with a speech adapter and a masked-diffusion backbone.

```python
from pipelines.spoken_qa import SpokenQAPipeline

pipe = SpokenQAPipeline.from_pretrained("runs/audio_spoken_qa/pipeline")
out = pipe(audio="question.flac")                                   # answers, threshold decoding
out = pipe(audio=[clip_a, (array, 22050)], instruction="table: anna red four.")
out = pipe(audio=clips, task="transcribe")                          # transcripts
out = pipe(audio=clips, on_error="record")                          # bad clips -> out.errors, the rest decode
print(out.texts)
```

Each clip becomes prefix embeddings (`modalities.audio.AudioAdapter`: semantic + acoustic adapters, padding on
the left); the task's text prompt follows (the optional instruction, then "answer:" or "transcribe:"); then
`gen_length` masked positions are decoded by the sampler loop of `latent.sampling`. With the backbone's `prefix`
layout, audio and prompt attend only among themselves, so their K/V are computed once per call (exact cache).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from latent.scheduler import MaskedDiffusionScheduler
from modalities.audio import AudioBatch, AudioError, as_audio_list

__all__ = ["SpokenQAPipeline", "SpokenQAPipelineOutput", "TASKS", "format_prompt"]

TASKS = ("answer", "transcribe")


@dataclass
class SpokenQAPipelineOutput(BaseOutput):
    """
    texts: one answer (task="answer") or transcript (task="transcribe") per clip, decoded up to the first EOS;
        None for a clip that failed with on_error="record".
    sequences: [B, prompt_len + gen_length] token ids (left-padded prompt, then the generated tokens); a failed
        clip's row holds only padding.
    errors: None per clip that decoded, else the error message naming it.
    nfe: model forward passes (summed over chunks).
    """

    texts: list[str | None] | None
    sequences: torch.LongTensor
    errors: list[str | None]
    nfe: int = 0


def format_prompt(task: str, instruction: str | None, answer_prompt: str, transcribe_prompt: str) -> str:
    """The text after the audio: "<instruction> answer:" or "<instruction> transcribe:" (instruction optional).
    Training builds its sequences with the same function."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
    tag = answer_prompt if task == "answer" else transcribe_prompt
    return f"{instruction.strip()} {tag}".strip() if instruction and instruction.strip() else tag


class SpokenQAPipeline(DiffusionPipeline):
    """audio (+ optional text instruction) -> answers, or transcripts with task="transcribe".

    Modules: `audio_adapter` (`modalities.audio.AudioAdapter`), `model` (`latent.DiffusionTransformer`, best with
    attention_layout="prefix"), `tokenizer` (with mask and EOS tokens), `scheduler` (`MaskedDiffusionScheduler`:
    decoding defaults). Saved with them in model_index.json: `gen_length` (answer tokens), `transcribe_length`
    (transcript tokens), and the two task prompts.
    """

    model_cpu_offload_seq = "audio_adapter->model"
    _callback_tensor_inputs = ["sequences", "x0", "confidence", "transfer"]

    def __init__(self, audio_adapter, model, tokenizer, scheduler: MaskedDiffusionScheduler, gen_length: int = 8,
                 transcribe_length: int = 24, answer_prompt: str = "answer:", transcribe_prompt: str = "transcribe:"):
        super().__init__()
        if getattr(tokenizer, "mask_token_id", None) is None or getattr(tokenizer, "eos_token_id", None) is None:
            raise ValueError("The tokenizer needs a mask token and an EOS token (latent.data.tokenizer adds both).")
        d_adapter = getattr(audio_adapter.config, "hidden_size", None)
        d_model = getattr(model.config, "hidden_size", None)
        if d_adapter is not None and d_model is not None and d_adapter != d_model:
            raise ValueError(
                f"audio_adapter.config.hidden_size={d_adapter} but model.config.hidden_size={d_model}; the adapter "
                "must project to the backbone's width."
            )
        self.register_modules(audio_adapter=audio_adapter, model=model, tokenizer=tokenizer, scheduler=scheduler)
        self.register_to_config(gen_length=gen_length, transcribe_length=transcribe_length,
                                answer_prompt=answer_prompt, transcribe_prompt=transcribe_prompt)

    @property
    def preprocessor(self):
        """Picklable audio preprocessing (clip -> features) for DataLoader workers."""
        return self.audio_adapter.preprocessor

    def prompt_text(self, task: str, instruction: str | None = None) -> str:
        return format_prompt(task, instruction, self.config.answer_prompt, self.config.transcribe_prompt)

    # ---- inputs ---------------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.LongTensor, torch.LongTensor | None]:
        """Left-padded prompt ids [B, L] and their mask (None when nothing is padded)."""
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            self.tokenizer.padding_side = side
        ids, mask = enc["input_ids"].long(), enc["attention_mask"].long()
        return ids, None if bool(mask.all()) else mask

    def check_inputs(self, audio, features, instruction, task, gen_length, batch_size, on_error, output_type,
                     tensor_inputs):
        if (audio is None) == (features is None):
            raise ValueError("Give exactly one of `audio` (path, array, tensor, (array, sr), or a list) or `features`.")
        if features is not None and not isinstance(features, AudioBatch):
            raise ValueError("`features` must be an AudioBatch from audio_adapter.preprocess(audio).")
        if features is not None and len(features) == 0:
            raise AudioError("`features` holds no clips.")
        if task not in TASKS:
            raise ValueError(f"`task` must be one of {TASKS}, got {task!r}.")
        if instruction is not None and not isinstance(instruction, str):
            if not isinstance(instruction, (list, tuple)) or not all(isinstance(p, (str, type(None))) for p in instruction):
                raise ValueError(f"`instruction` must be a str or a list of str, got {type(instruction).__name__}.")
        if not isinstance(gen_length, int) or isinstance(gen_length, bool) or gen_length <= 0:
            raise ValueError(f"`gen_length` must be a positive int, got {gen_length!r}.")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size <= 0):
            raise ValueError(f"`batch_size` must be a positive int or None, got {batch_size!r}.")
        if on_error not in ("raise", "record"):
            raise ValueError(f"`on_error` must be 'raise' or 'record', got {on_error!r}.")
        if output_type not in ("text", "ids"):
            raise ValueError(f"`output_type` must be 'text' or 'ids', got {output_type!r}.")
        bad = [k for k in tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` {bad} not in {self._callback_tensor_inputs}.")

    def decode(self, generated: torch.LongTensor) -> list[str]:
        eos = self.tokenizer.eos_token_id
        rows = [row[: row.index(eos)] if eos in row else row for row in generated.tolist()]
        return [t.strip() for t in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]

    # ---- call -----------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        audio=None,
        instruction: str | list[str | None] | None = None,
        *,
        task: str = "answer",
        features: AudioBatch | None = None,
        sampling_rate: int | None = None,
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
    ) -> SpokenQAPipelineOutput | tuple:
        """Answer spoken questions (or transcribe them).

        Args:
            audio: one clip or a list: file paths (WAV/FLAC/OGG), numpy arrays or tensors ([T], [C, T] or [T, C];
                float in [-1, 1] or int16/int32/uint8 PCM; at `sampling_rate`, default 16 kHz), (array, rate)
                pairs or {"array", "sampling_rate"} dicts. Any rate is resampled to 16 kHz, stereo is averaged.
                Or `features`, an `AudioBatch` from `audio_adapter.preprocess`.
            instruction: optional text before the task prompt (one for all clips, or one per clip), e.g. a table
                the question is about.
            task: "answer" (default) or "transcribe".
            gen_length: tokens to decode (default: the pipeline's gen_length, or transcribe_length for transcripts).
            block_length: decoding block (default: the largest divisor of gen_length up to the scheduler's).
            steps: forwards of the LLaDA schedule rule; steps=gen_length is one token per step.
            threshold: Fast-dLLM threshold decoding: commit every position with confidence >= threshold (at least
                one per step). Default: the scheduler's rule.
            temperature, remasking, cache: as in the text pipeline ("auto" cache = exact prefix cache).
            eos_early_stop: a row stops once EOS is committed with everything before it decoded.
            batch_size: decode a long list in chunks of this size.
            on_error: "raise" (default): a bad clip raises `AudioError` naming it. "record": its error message
                goes to `errors`, its text is None, and the other clips are decoded.
            generator: makes sampling (temperature > 0) reproducible.
            callback_on_step_end: `fn(pipe, step, block, callback_kwargs)` after every forward.
            sampler_kwargs: any other `latent.sampling.SamplerConfig` knob (commit, factor, top_k...).
        """
        if gen_length is None:
            gen_length = self.config.gen_length if task == "answer" else self.config.transcribe_length
        self.check_inputs(audio, features, instruction, task, gen_length, batch_size, on_error, output_type,
                          callback_on_step_end_tensor_inputs)
        pre = self.audio_adapter.preprocessor
        errors: list[str | None]
        if features is None:
            clips = as_audio_list(audio)
            n = len(clips)
        else:
            n = len(features)
        instructions = [instruction] * n if instruction is None or isinstance(instruction, str) else list(instruction)
        if len(instructions) != n:
            raise ValueError(f"{len(instructions)} instructions for {n} clips; give one, or one per clip.")

        items: list[tuple[torch.Tensor, int] | None] = [None] * n
        errors = [None] * n
        if features is None:
            for i, clip in enumerate(clips):
                try:
                    items[i] = pre.item(clip, i, sampling_rate)
                except AudioError as err:
                    if on_error == "raise":
                        raise
                    errors[i] = str(err)
        ok = [i for i in range(n) if errors[i] is None]
        prompts = [self.prompt_text(task, ins) for ins in instructions]
        texts: list[str | None] = [None] * n
        rows: dict[int, torch.Tensor] = {}
        nfe = 0
        chunk = batch_size or max(1, len(ok))
        for lo in range(0, len(ok), chunk):
            idx = ok[lo : lo + chunk]
            if features is None:
                batch = pre.collate([items[i][0] for i in idx], [items[i][1] for i in idx])
            else:
                batch = features.select(torch.tensor(idx))
            seq, decoded, used = self._decode_chunk(
                batch, [prompts[i] for i in idx], gen_length, block_length, steps, threshold, temperature, remasking,
                cache, eos_early_stop, generator, callback_on_step_end, callback_on_step_end_tensor_inputs,
                output_type, sampler_kwargs,
            )
            nfe += used
            for j, i in enumerate(idx):
                rows[i] = seq[j]
                if decoded is not None:
                    texts[i] = decoded[j]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        width = max([r.shape[0] for r in rows.values()], default=gen_length)
        sequences = torch.full((n, width), pad, dtype=torch.long)
        for i, r in rows.items():
            sequences[i, width - r.shape[0] :] = r
        self.maybe_free_model_hooks()
        out_texts = texts if output_type == "text" else None
        if not return_dict:
            return out_texts, sequences, errors
        return SpokenQAPipelineOutput(texts=out_texts, sequences=sequences, errors=errors, nfe=nfe)

    def _decode_chunk(self, batch, prompts, gen_length, block_length, steps, threshold, temperature, remasking,
                      cache, eos_early_stop, generator, callback, tensor_inputs, output_type, sampler_kwargs):
        device = self._execution_device
        prefix = self.audio_adapter(batch)
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
        texts = self.decode(seq[:, input_ids.shape[1] :]) if output_type == "text" else None
        return seq.cpu(), texts, result.nfe

    # ---- saving ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load from a local folder written by save_pretrained (never from a hub)."""
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ValueError(f"{path!r} is not a pipeline folder (no model_index.json); give a save_pretrained() folder.")
        kwargs.setdefault("local_files_only", True)
        return super().from_pretrained(path, **kwargs)

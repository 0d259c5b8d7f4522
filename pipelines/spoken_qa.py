"""Spoken question answering and speech recognition with a speech adapter and a masked-diffusion backbone.

```python
from pipelines.spoken_qa import SpokenQAPipeline

pipe = SpokenQAPipeline.from_pretrained("runs/audio_spoken_qa/pipeline")
out = pipe(audio="question.flac")                                   # answers, threshold decoding
out = pipe(audio=[clip_a, (array, 22050)], instruction="table: anna red four.")
out = pipe(audio=clips, task="transcribe")                          # transcripts
out = pipe(audio=clips, on_error="record")                          # bad clips -> out.errors, the rest decode
out = pipe(audio=clips, read="ctc_text")                            # cascade: CTC transcript as text
out = pipe(audio=clips, read="prefix")                              # the adapters' embeddings as a prefix
out = pipe(audio=clips, read="aligned_prefix")                      # the prefix, its slots on the decoder's transcript
print(out.texts, pipe.config.read)                                  # a call without read= uses pipe.config.read
```

The spoken-QA recipe (configs/audio_spoken_qa.yaml) exports pipelines whose default reading is the cascade, with
a beam search and n-gram LM as their `ctc_decoder`; `read="prefix"` is the default of a pipeline built by hand.

Each clip becomes prefix embeddings (`modalities.audio.AudioAdapter`: semantic + acoustic adapters, padding on
the left); the task's text prompt follows (the optional instruction, then "answer:" or "transcribe:"); then
`gen_length` masked positions are decoded by the sampler loop of `latent.sampling`. With the backbone's `prefix`
layout, audio and prompt attend only among themselves, so their K/V are computed once per call (exact cache).

`read="ctc_text"` reads the audio through text instead (a cascade; needs an adapter with semantic_pooling="ctc"):
the semantic adapter's CTC head transcribes each clip (`AudioAdapter.ctc_best_path`: argmax per frame, runs
collapsed, blanks dropped; or a `modalities.ctc_decoding.CTCBeamSearch`, a beam search with an n-gram LM), and
the backbone answers from the text prompt "<transcript> <prompt>" with no audio prefix, under the same decoding
settings. With task="transcribe" the CTC transcript is the output (no backbone). The pipeline's own decoder,
`pipe.ctc_decoder` (None: greedy), is saved with it in `ctc_decoder/` (the speech recipe writes one with
`ctc_decoder.beam_width > 0`) and used unless a call gives `ctc_decoder=` (a decoder, or "greedy").

`read="aligned_prefix"` keeps the audio prefix but lets the same decoder choose what its semantic slots say: the
decoder's transcript is force-aligned to the CTC head's frames (`modalities.ctc_alignment`), and each aligned
token's frames make one slot, carrying that token's embedding (`AudioAdapter(..., ctc_decoder=)`), where
`read="prefix"` pools the runs of the head's greedy labels. With a greedy decoder the two readings are the same.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from latent.scheduler import MaskedDiffusionScheduler
from modalities.audio import AudioBatch, AudioError, as_audio_list

from .base import PipelineOutput, PrefixDiffusionPipeline, check_tokenizer

__all__ = ["SpokenQAPipeline", "SpokenQAPipelineOutput", "TASKS", "format_prompt", "text_after_audio"]

TASKS = ("answer", "transcribe")
# how the backbone reads a clip: prefix embeddings (slots on the greedy CTC labels, or on the decoder's transcript),
# or its CTC transcript as text
READS = ("prefix", "aligned_prefix", "ctc_text")
CTC_READS = ("aligned_prefix", "ctc_text")  # the readings that decode a transcript with the CTC head
DECODER_FOLDER = "ctc_decoder"  # beside model_index.json: the pipeline's CTC transcript decoder, when it has one


@dataclass
class SpokenQAPipelineOutput(PipelineOutput):
    """
    texts: one answer (task="answer") or transcript (task="transcribe") per clip, decoded up to the first EOS;
        None for a clip that failed with on_error="record" (and for every clip with output_type="ids").
    sequences: [B, prompt_len + gen_length] token ids on the CPU (left-padded prompt, then the generated
        tokens; with read="ctc_text" the prompt starts with the transcript, and task="transcribe" gives the
        left-padded CTC transcript ids); a failed clip's row holds only padding.
    errors: None per clip that decoded, else the error message naming it.
    nfe: backbone forward passes (summed over chunks; 0 for task="transcribe" with read="ctc_text").

    `return_dict=False` returns these fields in this order: (texts, sequences, errors, nfe).
    """

    texts: list[str | None] | None
    sequences: torch.LongTensor
    errors: list[str | None] = field(default_factory=list)
    nfe: int = 0


def format_prompt(task: str, instruction: str | None, answer_prompt: str, transcribe_prompt: str) -> str:
    """The text after the audio: "<instruction> answer:" or "<instruction> transcribe:" (instruction optional).
    Training builds its sequences with the same function."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
    tag = answer_prompt if task == "answer" else transcribe_prompt
    return f"{instruction.strip()} {tag}".strip() if instruction and instruction.strip() else tag


def text_after_audio(prompt: str, transcript: str | None = None, spaced: bool = False) -> str:
    """The text the backbone reads after the audio prefix (`transcript` None), or in its place: the transcript,
    then the prompt (the cascade, and the text stages that teach the backbone the task).

    spaced: the text starts with a space, so that with a byte-level BPE every word is the token it is inside a
    sentence ("Ġwhat", "Ġanswer"), which is how the CTC head writes the words it hears (its targets are
    tokenized that way). A backbone trained on one form reads the other form far worse, so a recipe picks one
    for its text stages, its audio stages and its pipelines (`SpokenQAPipeline(spaced_text=...)`)."""
    text = prompt if transcript is None else f"{transcript.strip()} {prompt}".strip()
    return f" {text}" if spaced else text


class SpokenQAPipeline(PrefixDiffusionPipeline):
    """audio (+ optional text instruction) -> answers, or transcripts with task="transcribe".

    Modules: `audio_adapter` (`modalities.audio.AudioAdapter`), `model` (`latent.DiffusionTransformer`, best with
    attention_layout="prefix"), `tokenizer` (with mask and EOS tokens), `scheduler` (`MaskedDiffusionScheduler`:
    decoding defaults). Saved with them in model_index.json: `gen_length` (answer tokens), `transcribe_length`
    (transcript tokens), the two task prompts, `read`, how calls read the audio unless they say, and
    `spaced_text`, the form of the text after the audio (`text_after_audio`; False for pipelines saved before it).
    """

    model_cpu_offload_seq = "audio_adapter->model"
    adapter_name = "audio_adapter"
    # read="ctc_text"'s transcript decoder (e.g. a CTCBeamSearch with an LM); None: greedy. Saved in ctc_decoder/.
    ctc_decoder = None

    def __init__(self, audio_adapter, model, tokenizer, scheduler: MaskedDiffusionScheduler, gen_length: int = 8,
                 transcribe_length: int = 24, answer_prompt: str = "answer:", transcribe_prompt: str = "transcribe:",
                 read: str = "prefix", spaced_text: bool = False):
        super().__init__()
        check_tokenizer(tokenizer)
        self._check_adapter_width(audio_adapter, model)
        if read not in READS:
            raise ValueError(f"`read` (the calls' default) must be one of {READS}, got {read!r}.")
        if read in CTC_READS and audio_adapter.config.semantic_pooling != "ctc":
            raise ValueError(f"read={read!r} as the default needs an audio_adapter with semantic_pooling='ctc' (a "
                             f"CTC head); this one has {audio_adapter.config.semantic_pooling!r}. Use read='prefix'.")
        self.register_modules(audio_adapter=audio_adapter, model=model, tokenizer=tokenizer, scheduler=scheduler)
        self.register_to_config(gen_length=gen_length, transcribe_length=transcribe_length,
                                answer_prompt=answer_prompt, transcribe_prompt=transcribe_prompt, read=read,
                                spaced_text=bool(spaced_text))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        folder = Path(pretrained_model_name_or_path) / DECODER_FOLDER
        if folder.is_dir():
            from modalities.ctc_decoding import CTCBeamSearch

            pipe.ctc_decoder = CTCBeamSearch.from_pretrained(folder)
        return pipe

    def save_pretrained(self, save_directory, **kwargs):
        super().save_pretrained(save_directory, **kwargs)
        folder = Path(save_directory) / DECODER_FOLDER
        if folder.exists():  # a folder saved over keeps no decoder this pipeline does not have
            shutil.rmtree(folder)
        if self.ctc_decoder is not None:
            self.ctc_decoder.save_pretrained(folder)

    @property
    def preprocessor(self):
        """Picklable audio preprocessing (clip -> features) for DataLoader workers."""
        return self.audio_adapter.preprocessor

    def prompt_text(self, task: str, instruction: str | None = None) -> str:
        return format_prompt(task, instruction, self.config.answer_prompt, self.config.transcribe_prompt)

    # ---- inputs ---------------------------------------------------------------------------------
    def check_inputs(self, audio, features, instruction, task, gen_length, batch_size, on_error, output_type,
                     callback, callback_on_step_end_tensor_inputs, read: str = "prefix",
                     ctc_decoder=None) -> list[str]:
        if (audio is None) == (features is None):
            raise ValueError("Give exactly one of `audio` (path, array, tensor, (array, sr), or a list) or `features`.")
        if features is not None and not isinstance(features, AudioBatch):
            raise ValueError("`features` must be an AudioBatch from audio_adapter.preprocess(audio).")
        if features is not None and len(features) == 0:
            raise AudioError("`features` holds no clips.")
        if task not in TASKS:
            raise ValueError(f"`task` must be one of {TASKS}, got {task!r}.")
        if read not in READS:
            raise ValueError(f"`read` must be one of {READS}, got {read!r}.")
        if ctc_decoder is not None and read not in CTC_READS:
            raise ValueError("`ctc_decoder` sets how read='ctc_text' / 'aligned_prefix' transcribe; with read='prefix' "
                             "the slots follow the CTC head's greedy labels and no transcript is decoded. Pass "
                             "read='aligned_prefix' (the prefix on the decoder's transcript) or read='ctc_text'.")
        if ctc_decoder is not None and ctc_decoder != "greedy" and not callable(getattr(ctc_decoder, "decode", None)):
            raise ValueError(f"`ctc_decoder` must have decode(logits, mask, blank) (e.g. "
                             f"modalities.ctc_decoding.CTCBeamSearch) or be 'greedy', got {ctc_decoder!r}.")
        if read in CTC_READS:
            pooling = self.audio_adapter.config.semantic_pooling
            if pooling != "ctc":
                raise ValueError(
                    f"read={read!r} transcribes with the semantic adapter's CTC head, but this audio_adapter has "
                    f"semantic_pooling={pooling!r} (no CTC head). Use read='prefix', or an adapter built with "
                    "semantic_pooling='ctc' and ctc_vocab_size=len(tokenizer).")
        if read == "ctc_text":
            if self.audio_adapter.config.ctc_vocab_size > len(self.tokenizer):
                raise ValueError(
                    f"read='ctc_text': the CTC head labels {self.audio_adapter.config.ctc_vocab_size} tokens but the "
                    f"tokenizer has {len(self.tokenizer)}; its transcript cannot be decoded. Use read='prefix', or "
                    "the tokenizer the adapter was trained with.")
            if task == "transcribe" and self._trajectory_log is not None:
                raise ValueError("trajectory=True records the backbone's decoding, but task='transcribe' with "
                                 "read='ctc_text' runs no backbone; drop trajectory=True or use read='prefix'.")
        if instruction is not None and not isinstance(instruction, str):
            if not isinstance(instruction, (list, tuple)) or not all(isinstance(p, (str, type(None))) for p in instruction):
                raise ValueError(f"`instruction` must be a str or a list of str, got {type(instruction).__name__}.")
        return self._check_call(gen_length, batch_size, on_error, output_type, callback,
                                callback_on_step_end_tensor_inputs)

    # ---- call -----------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        audio=None,
        instruction: str | list[str | None] | None = None,
        *,
        task: str = "answer",
        read: str | None = None,
        ctc_decoder=None,
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
            read: how the backbone reads the audio (default: the pipeline's `read`, saved with it; "prefix" unless
                it was built with another). "prefix": the adapter's prefix embeddings before
                the prompt. "ctc_text": a cascade; the CTC transcript (see `ctc_decoder`) goes in as text,
                "<transcript> <prompt>", with no audio prefix (task="transcribe" returns that transcript without
                the backbone). "aligned_prefix": the prefix, its semantic slots on the transcript of `ctc_decoder`
                force-aligned to the frames (equal to "prefix" with the greedy decoder). The last two need an
                adapter with semantic_pooling="ctc".
            ctc_decoder: with read="ctc_text" or "aligned_prefix", how the transcript is decoded: None (default) uses the pipeline's
                `ctc_decoder` (greedy best path when it has none), "greedy" the greedy best path, or a
                `modalities.ctc_decoding.CTCBeamSearch` (prefix beam search, optionally with an n-gram LM).
            gen_length: tokens to decode (default: the pipeline's gen_length, or transcribe_length for transcripts).
            block_length: decoding block (default: the largest divisor of gen_length up to the scheduler's;
                a block_causal model's block_size).
            steps: forwards of the LLaDA schedule rule; giving it without `threshold` selects that rule.
                steps=gen_length is one token per step.
            threshold: Fast-dLLM threshold decoding: commit every position with confidence >= threshold (at least
                one per step). Default: the scheduler's rule.
            temperature, remasking, cache: as in the text pipeline ("auto" cache = exact prefix cache).
            eos_early_stop: a row stops once EOS is committed with everything before it decoded.
            batch_size: decode a long list in chunks of this size (each chunk is loaded just before it is decoded).
            on_error: "raise" (default): a bad clip raises `AudioError` naming it. "record": its error message
                goes to `errors`, its text is None, and the other clips are decoded.
            generator: makes sampling (temperature > 0) reproducible.
            callback_on_step_end: `fn(pipe, step, block, callback_kwargs)` after every forward, or a diffusers
                `PipelineCallback`; a returned dict with "sequences" ([B, N]) replaces the canvas.
            sampler_kwargs: any other `latent.sampling.SamplerConfig` knob (commit, factor, top_k...).

        Returns `SpokenQAPipelineOutput`, or its fields as a tuple with `return_dict=False`.
        """
        if gen_length is None:
            gen_length = self.config.gen_length if task == "answer" else self.config.transcribe_length
        read = self.config.read if read is None else read
        names = self.check_inputs(audio, features, instruction, task, gen_length, batch_size, on_error, output_type,
                                  callback_on_step_end, callback_on_step_end_tensor_inputs, read, ctc_decoder)
        if features is None:
            clips = as_audio_list(audio)
            n = len(clips)
        else:
            n = len(features)
        instructions = [instruction] * n if instruction is None or isinstance(instruction, str) else list(instruction)
        if len(instructions) != n:
            raise ValueError(f"{len(instructions)} instructions for {n} clips; give one, or one per clip.")
        prompts = [self.prompt_text(task, ins) for ins in instructions]
        if features is None:
            pre = self.audio_adapter.preprocessor

            def prepare(i):
                return pre.item(clips[i], i, sampling_rate)

            def collate(items, rows):
                return pre.collate([f for f, _ in items], [length for _, length in items])
        else:
            prepare = None

            def collate(items, rows):
                return features.select(torch.tensor(rows))

        texts, sequences, errors, nfe = self._decode_rows(
            n, prompts, gen_length, prepare=prepare, collate=collate, batch_size=batch_size, on_error=on_error,
            error_types=(AudioError,), output_type=output_type, block_length=block_length, steps=steps,
            threshold=threshold, temperature=temperature, remasking=remasking, cache=cache,
            eos_early_stop=eos_early_stop, generator=generator, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=names, read=read, backbone=task == "answer",
            ctc_decoder=self._transcript_decoder(ctc_decoder), **sampler_kwargs,
        )
        self.maybe_free_model_hooks()
        out = SpokenQAPipelineOutput(texts=texts, sequences=sequences, errors=errors, nfe=nfe)
        return out if return_dict else out.to_tuple()

    def _transcript_decoder(self, ctc_decoder):
        """The decoder a call transcribes with: the pipeline's own for None, greedy (None) for "greedy"."""
        if ctc_decoder is None:
            return self.ctc_decoder
        return None if ctc_decoder == "greedy" else ctc_decoder

    def _decode_chunk(self, batch, prompts: list[str], gen_length: int, output_type: str, read: str = "prefix",
                      backbone: bool = True, ctc_decoder=None, **decode):
        """read="prefix" / "aligned_prefix": the base class's prefix decode (the adapter given `ctc_decoder` for
        aligned slots). read="ctc_text": the CTC transcript of each clip becomes
        text before its prompt and the backbone decodes from text alone; without `backbone` (transcribe) the
        transcript is the result."""
        spaced = self.config.spaced_text
        if read != "ctc_text":
            aligned = read == "aligned_prefix" and ctc_decoder is not None  # greedy: the head's own labels
            return super()._decode_chunk(batch, [text_after_audio(p, spaced=spaced) for p in prompts], gen_length,
                                         output_type, adapter_kwargs=dict(ctc_decoder=ctc_decoder) if aligned else None,
                                         **decode)
        ids = self.audio_adapter.ctc_decode(batch, ctc_decoder)
        transcripts = [self.tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]
        if not backbone:
            seq = torch.full((len(ids), max(map(len, ids))), self.pad_token_id, dtype=torch.long)
            for row, x in zip(seq, ids, strict=True):
                row[row.shape[0] - len(x) :] = torch.tensor(x, dtype=torch.long)
            return seq, (transcripts if output_type == "text" else None), 0
        texts = [text_after_audio(p, t, spaced) for t, p in zip(transcripts, prompts, strict=True)]
        return super()._decode_chunk(None, texts, gen_length, output_type, **decode)

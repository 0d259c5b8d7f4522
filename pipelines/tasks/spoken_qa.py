"""Spoken question answering (DIFFA style): speech adapters on a frozen masked-diffusion backbone.

    python train.py configs/audio_spoken_qa.yaml                       # all stages, resumable
    python train.py configs/audio_spoken_qa.yaml model.init_from=runs/text_tiny/pipeline stages.0.steps=0 stages.1.steps=0
    python train.py configs/audio_asr.yaml && python train.py configs/audio_sqa.yaml    # the stages as two recipes

Modules: ``model`` (the backbone, ``prefix`` layout), ``adapter`` (``modalities.audio.AudioAdapter``: speech
encoder, semantic and acoustic adapters) and, when a stage uses CTC and the semantic adapter has no CTC head of
its own, ``ctc_head`` (:class:`CTCHead`: trained and checkpointed, never exported). Stages name what they train
with the aliases ``backbone``, ``encoder`` (the speech encoder with its CTC head), ``semantic``, ``acoustic``,
``ctc_head``, or with parameter globs; each stage also gives its ``tasks`` with their sampling weights, the
adapters that form the prefix (``parts``), an auxiliary CTC loss weight (``ctc_weight``, see :class:`CTCHead`)
and an alignment loss weight (``align_weight``, see :func:`alignment_loss`). The tasks:

- ``text_answer``, ``text_transcribe``: the question's transcript stands where the audio will be, as tokens,
  so the backbone learns the task from text (skip these stages with steps: 0 when ``model.init_from`` names
  a backbone this project trained or loaded);
- ``ctc``: the speech encoder alone learns to recognise words with a CTC head (no backbone forward), standing
  in for the pretrained Whisper encoder DIFFA starts from (nothing pretrained is available offline);
- ``transcribe`` (stage 1): speech -> transcript; ``answer`` (stage 2): spoken question (+ text instruction)
  -> answer; the backbone stays frozen.

Sequences are [audio prefix and prompt, joined and left-padded | target + EOS padding to its length]; the
loss is the SFT masked-diffusion loss (``latent.losses.sft_loss``) of the target, the prefix and prompt never
masked, with the ``prefix`` layout so that training matches exact-cache decoding. Features are computed once
when the task is built; each step draws its task, rows, SpecAugment masks and noise for the global batch from
the step's generator. Each stage exports a ``SpokenQAPipeline`` with its prefix parts and the recipe's prompts
and decoding; ``experiments/audio_spoken_qa.py`` measures them with :func:`evaluate_spoken_qa`.
"""

from __future__ import annotations

import fnmatch
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from latent.training.config import ConfigError
from latent.training.task import Stage, StepLoss, Task, register_task, step_generator
from pipelines.base import encode_prompts
from pipelines.tasks.common import (
    Decoding,
    adapter_keys,
    backbone_from_config,
    find_tokenizer_dir,
    sft_noise,
)

__all__ = ["SpokenQATask", "SpokenQAStage", "CTCHead", "ctc_loss", "alignment_loss", "sequence_loss", "load_rows",
           "load_text_rows", "encode_targets", "fit_transcript_lm", "make_examples", "spec_augment", "evaluate_spoken_qa"]

TASK_KINDS = ("text_answer", "text_transcribe", "answer", "transcribe", "ctc")
PARTS = ("semantic", "acoustic")
MODULES = ("model", "adapter", "ctc_head")


# ---- config ---------------------------------------------------------------------------------------
@dataclass
class SpokenQAData:
    kind: str = "espeak"  # espeak: synthesised into dir on first use | jsonl: the index files below
    dir: str = "data/speech"
    n_train: int = 2400
    n_test: int = 200
    workers: int = 2
    voices: str = "six"  # espeak: the training voice set, a name in modalities.data.speech.VOICE_SETS
    # jsonl: index file(s) of {"path", "transcript", "answer", "instruction"?} lines (paths relative to the index)
    train: Any = None
    test_seen: Any = None  # jsonl: evaluation splits (experiments/audio_spoken_qa.py)
    test_heldout: Any = None
    max_train: int | None = None
    # espeak: extra generated questions (text only) for the text tasks, so the backbone sees the task's
    # language and facts beyond the training clips; 0 = the training clips' texts only.
    text_examples: int = 0


@dataclass
class SpokenQATokenizer:
    path: str | None = None  # null: model.init_from's tokenizer, else a BPE trained on the task's texts
    vocab_size: int = 400


@dataclass
class Prompts:
    answer: str = "answer:"
    transcribe: str = "transcribe:"
    answer_length: int = 4  # target tokens (EOS-padded; at least one EOS kept)
    transcribe_length: int = 16
    # the text after the audio, and the transcript in its place, start with a space: every word is then the
    # token the CTC head writes (pipelines.spoken_qa.text_after_audio); saved with the pipelines
    spaced: bool = False


@dataclass
class Augment:  # SpecAugment-style masks on the features (0 = off)
    freq_mask: int = 6
    time_mask: int = 12
    time_masks: int = 2
    # vocal tract length perturbation: each clip's mel axis stretched by a factor drawn in [1 - w, 1 + w],
    # so the encoder hears other "speakers" than the training voices (0 = off)
    freq_warp: float = 0.0


@dataclass
class CTCDecoderSettings:
    """The transcript decoder exported with the pipelines of an adapter with a CTC head (for read="ctc_text" and
    "aligned_prefix"): a prefix beam search with a token n-gram LM fitted on the training transcripts
    (`modalities.ctc_decoding`). beam_width 0 exports none (greedy); lm_order 0 a beam without LM."""

    beam_width: int = 0
    lm_order: int = 3
    lm_weight: float = 1.0
    length_bonus: float = 1.0
    warps: list[float] = field(default_factory=list)  # test-time frequency warps (CTCBeamSearch.warps)
    read: str = "prefix"  # the exported pipelines' default `read`: "ctc_text" makes the cascade their default,
    # "aligned_prefix" the audio prefix with its slots on this decoder's transcript


@dataclass
class SpokenQAStage(Stage):
    tasks: dict[str, float] = field(default_factory=dict)  # task kind -> sampling weight
    parts: list[str] = field(default_factory=list)  # prefix adapters; empty: the adapter's own prefix_parts
    ctc_weight: float = 0.0  # auxiliary CTC loss on the encoder in the audio tasks
    align_weight: float = 0.0  # alignment_loss of the prefix slots (parts: [semantic])


def _uses_ctc(stage) -> bool:
    return float(stage["ctc_weight"]) > 0 or "ctc" in stage["tasks"]


# ---- data -----------------------------------------------------------------------------------------
def _read_index(index, limit: int | None = None) -> list[dict]:
    from modalities.data.speech import read_split

    rows = read_split(index, limit)
    for i, r in enumerate(rows):
        for key in ("path", "transcript", "answer"):
            if key not in r:
                raise ValueError(f"{index} line {i + 1} has no {key!r}.")
        r.setdefault("instruction", "")
    return rows


def load_rows(cfg, split: str = "train", progress: bool = True) -> list[dict]:
    """Rows (path, transcript, answer, instruction, ...) of a split: "train", "test_seen" or "test_heldout"
    (espeak data is synthesised into ``data.dir`` on first use)."""
    d = cfg.data
    limit = d.max_train if split == "train" else None
    if d.kind == "espeak":
        from modalities.data.speech import build_dataset

        try:
            paths = build_dataset(d.dir, int(d.n_train), int(d.n_test), int(cfg.run.seed), int(d.workers), progress,
                                  voices=d.voices)
        except FileExistsError as err:  # e.g. another run.seed over the same folder: it seeds the data too
            raise ConfigError(f"data.dir={str(d.dir)!r} was built for other settings (the data follow run.seed, "
                              f"data.n_train, data.n_test and data.voices): {err}") from err
        return _read_index(paths[split], limit)
    files = d.get(split)
    if not files:
        raise ConfigError(f"data.{split} names no index file (data.kind=jsonl).")
    files = [files] if isinstance(files, str) else list(files)
    return sum((_read_index(f, limit) for f in files), [])


def load_text_rows(cfg, rows: list[dict]) -> list[dict]:
    """Rows for the text tasks: the training rows plus ``data.text_examples`` generated questions (espeak)."""
    n = int(cfg.data.text_examples or 0)
    if n <= 0 or cfg.data.kind != "espeak":
        return rows
    from modalities.data.speech import make_split

    return rows + [asdict(e) for e in make_split("text", n, int(cfg.run.seed))]


def encode_targets(tok, texts: list[str], length: int) -> tuple[torch.LongTensor, int]:
    """Target ids followed by EOS up to ``length`` (at least one EOS kept); returns (ids, number truncated)."""
    eos = tok.eos_token_id
    rows, cut = [], 0
    for ids in _token_ids(tok, texts):
        if len(ids) > length - 1:
            ids, cut = ids[: length - 1], cut + 1
        rows.append(ids + [eos] * (length - len(ids)))
    return torch.tensor(rows, dtype=torch.long), cut


def _token_ids(tok, texts: list[str]) -> list[list[int]]:
    # a leading space: the text follows a prompt or the audio, and words after a space are single tokens
    return tok([" " + t.strip() for t in texts], add_special_tokens=False)["input_ids"]


def fit_transcript_lm(tok, transcripts: list[str], vocab_size: int, order: int = 3):
    """A token n-gram (`modalities.ctc_decoding.TokenNGram`) of transcripts, tokenized as the CTC targets are."""
    from modalities.ctc_decoding import TokenNGram

    return TokenNGram.fit(_token_ids(tok, transcripts), vocab_size=vocab_size, order=order)


def make_examples(task: str, rows: list[dict], prompts) -> tuple[list[str], list[str], int]:
    """(prompts, targets, target length) of rows for one of the sequence tasks (all but ``ctc``), in the text
    form the pipelines read (``text_after_audio``)."""
    from pipelines.spoken_qa import format_prompt, text_after_audio

    answer = task.endswith("answer")
    texts = [format_prompt("answer" if answer else "transcribe", r.get("instruction"), prompts.answer,
                           prompts.transcribe) for r in rows]
    spaced = bool(prompts.spaced)
    if task.startswith("text_"):  # the transcript stands where the audio will be
        texts = [text_after_audio(q, r["transcript"], spaced) for r, q in zip(rows, texts, strict=True)]
    else:
        texts = [text_after_audio(q, spaced=spaced) for q in texts]
    targets = [r["answer"] if answer else r["transcript"] for r in rows]
    return texts, targets, int(prompts.answer_length if answer else prompts.transcribe_length)


def spec_augment(batch, augment, g: torch.Generator):
    """Frequency and time masks (zeros, i.e. the normalised mean) on a copy of the features, after the
    frequency warp (`modalities.audio.warp_frequencies`) of ``augment.freq_warp``."""
    from modalities.audio import AudioBatch, warp_frequencies

    a = augment
    warp = float(a.freq_warp)
    if batch.values.ndim != 3 or (not a.freq_mask and not a.time_mask and not warp):
        return batch
    x = batch.values.clone()
    _, _, f = x.shape
    if warp:
        factors = 1 + warp * (2 * torch.rand(x.shape[0], generator=g) - 1)
        x = warp_frequencies(x, factors.to(x.dtype))
    for i in range(x.shape[0]):
        if a.freq_mask:
            w = int(torch.randint(0, int(a.freq_mask) + 1, (1,), generator=g))
            s = int(torch.randint(0, max(1, f - w + 1), (1,), generator=g))
            x[i, :, s : s + w] = 0
        for _ in range(int(a.time_masks) if a.time_mask else 0):
            n = int(batch.lengths[i])
            w = int(torch.randint(0, min(int(a.time_mask), max(1, n // 10)) + 1, (1,), generator=g))
            s = int(torch.randint(0, max(1, n - w + 1), (1,), generator=g))
            x[i, s : s + w] = 0
    return AudioBatch(x, batch.lengths)


def _texts_for_tokenizer(rows: list[dict], prompts) -> list[str]:
    from modalities.data.speech import NUMBERS

    a, t = prompts.answer, prompts.transcribe
    lines = [" ".join(NUMBERS)]
    for r in rows:  # the texts in the contexts they take in sequences (so words and prompts become tokens)
        ins = r.get("instruction") or ""
        lines += [f"{r['transcript']} {ins} {a} {r['answer']}", f"{r['transcript']} {t} {r['transcript']}",
                  f"{ins} {a} {r['answer']}".strip(), f"{t} {r['transcript']}"]
    return lines


# ---- losses ---------------------------------------------------------------------------------------
def ctc_loss(proj: torch.nn.Module, hidden: torch.Tensor, mask: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
    """CTC loss of the token sequences ``targets`` from encoder states [B, T, C] (valid frames ``mask``);
    ``proj`` maps a state to the vocabulary + blank (the last class)."""
    logp = torch.log_softmax(proj(hidden).float(), -1).transpose(0, 1)  # [T, B, V + 1]
    dev = logp.device
    flat = torch.tensor([t for row in targets for t in row], dtype=torch.long, device=dev)
    lengths = torch.tensor([len(row) for row in targets], dtype=torch.long, device=dev)
    return torch.nn.functional.ctc_loss(logp, flat, mask.sum(1).to(dev), lengths, blank=logp.shape[-1] - 1,
                                        zero_infinity=True)


class CTCHead(torch.nn.Module):
    """Training-only CTC head on the speech encoder's last layer (the transcript's tokens, blank = vocab size).

    DIFFA starts from a pretrained Whisper encoder; nothing pretrained is available offline here, so a CTC loss
    (the ``ctc`` task, or ``ctc_weight`` of a stage) teaches the in-project encoder to recognise words directly,
    instead of only through gradients that pass the frozen backbone. With ``semantic_pooling: ctc`` the semantic
    adapter's own head (it labels the frames it pools) takes this role and no CTCHead is built."""

    def __init__(self, dim: int, vocab: int):
        super().__init__()
        self.proj = torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, vocab + 1))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
        return ctc_loss(self.proj, hidden, mask, targets)


def alignment_loss(model, prefix, token_ids: list[list[int]]) -> torch.Tensor:
    """Scale-free MSE between the prefix slots and the backbone's input embeddings of the transcript tokens, for
    rows whose prefix has exactly one slot per token (CTC pooling that recognised the right number of tokens).
    It teaches the adapter to write what the frozen backbone reads when it is given text."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else model.embed
    terms = []
    for b, ids in enumerate(token_ids):
        slots = prefix.embeds[b][prefix.mask[b]]
        if len(ids) and slots.shape[0] == len(ids):
            target = emb.weight[torch.tensor(ids, device=slots.device)].detach()
            terms.append(((slots - target) ** 2).mean() / target.pow(2).mean().clamp(min=1e-8))
    return torch.stack(terms).mean() if terms else prefix.embeds.sum() * 0


@dataclass
class SequenceLoss:
    sft: Any  # latent.losses.LossOutput of the target tokens
    ctc: torch.Tensor | None = None  # the encoder's CTC loss (with ctc_proj)
    prefix: Any = None  # the PrefixEmbeds the backbone read (audio tasks)


def sequence_loss(model, adapter, audio, prompt_ids, prompt_mask, targets, mask_token_id: int, t=None, noise=None,
                  parts=None, ctc_proj=None, ctc_targets=None, generator=None) -> SequenceLoss:
    """SFT masked-diffusion loss of ``targets`` [B, G] after [audio prefix | prompts [B, L]] (no prefix when
    ``audio`` is None: a text task), laid out as the pipeline decodes: the left-padded prompts join the prefix
    (``pipelines.base.join_prompt``). ``t`` [B] and ``noise`` [B, L + G] are the pre-drawn noise levels and
    mask draws; ``parts`` the adapters forming the prefix. With ``ctc_proj``, also the encoder's CTC loss on
    ``ctc_targets``."""
    from latent.losses import sft_loss
    from pipelines.base import join_prompt

    b, plen = prompt_ids.shape
    seq = torch.cat([prompt_ids, targets], dim=1)
    ones = torch.ones_like(targets)
    embeds, n_prefix, ctc, prefix = None, 0, None, None
    if audio is not None:
        states, frames = adapter.encode(audio)
        if ctc_proj is not None:
            ctc = ctc_loss(ctc_proj, states[-1], frames, ctc_targets)
        prefix = adapter.prefix(states, frames, parts)
        embeds, joined = join_prompt(getattr(model, "module", model).embed, prefix.embeds, prefix.mask, prompt_ids,
                                     prompt_mask)
        n_prefix, seq, plen = embeds.shape[1], targets, 0
        noise = None if noise is None else noise[:, prompt_ids.shape[1] :]  # the targets' draws, as before
        full = torch.cat([joined, ones], dim=1)
    else:
        full = torch.cat([prompt_mask, ones], dim=1)
    full = None if bool(full.all()) else full

    def call(noisy, attention_mask=None, **kw):
        return model(noisy, attention_mask=full, prefix_embeds=embeds, prefix_length=n_prefix + plen)

    out = sft_loss(call, seq, mask_token_id, prompt_lengths=torch.full((b,), plen, device=seq.device), t=t,
                   noise=noise, generator=generator)
    return SequenceLoss(out, ctc, prefix)


# ---- the task -------------------------------------------------------------------------------------
def _matches(aliases: dict, patterns, name: str) -> bool:
    """Whether parameter ``name`` is named by ``patterns`` (aliases expanded, "!glob" subtracts)."""
    for pat in patterns:
        globs = aliases.get(pat, [pat])
        if any(fnmatch.fnmatchcase(name, g) for g in globs if not g.startswith("!")) and \
                not any(fnmatch.fnmatchcase(name, g[1:]) for g in globs if g.startswith("!")):
            return True
    return False


@register_task("spoken_qa")
class SpokenQATask(Task):
    sections = {"data": SpokenQAData, "tokenizer": SpokenQATokenizer, "prompts": Prompts, "augment": Augment,
                "decoding": Decoding, "ctc_decoder": CTCDecoderSettings}
    free_sections = ("model", "adapter")
    stage_class = SpokenQAStage
    # The CTC head belongs to the encoder: it trains with it (a stage without CTC gives it no gradient).
    aliases = {
        "backbone": ["model.*"],
        "encoder": ["adapter.speech_encoder.*", "adapter.semantic.ctc.*", "ctc_head.*"],
        "semantic": ["adapter.semantic.*"],
        "acoustic": ["adapter.acoustic.*"],
        "ctc_head": ["ctc_head.*", "adapter.semantic.ctc.*"],
    }
    defaults = {
        "model": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "max_position_embeddings": 128,
                  "attention_layout": "prefix"},
        "adapter": {"type": "audio", "encoder": "transformer", "encoder_dim": 128, "encoder_layers": 3,
                    "encoder_heads": 4, "encoder_dropout": 0.1, "n_mels": 40, "max_seconds": 8.0,
                    "semantic_downsample": 2, "acoustic_queries": 8, "acoustic_heads": 4},
        "optim": {"weight_decay": 0.01, "beta2": 0.98},
        "trainer": {"batch_size": 32, "log_every": 25, "save_every": 200},
    }
    metric_fields = ("ctc_loss", "align_loss")
    may_skip_parameters = True  # a text step leaves the adapter unused, a ctc step the backbone
    pipeline_components = {"model": "model", "adapter": "audio_adapter"}
    init_partial = True  # a run without the CTC head leaves this one as it is
    _transcript_lm = None  # the ctc_decoder section's LM, fitted at the first export that needs it

    @classmethod
    def section_keys(cls, section, user):
        if section == "model":
            return super().section_keys(section, user)
        return adapter_keys({"type": "audio", **user})

    @classmethod
    def check_config(cls, cfg):
        d = cfg.data
        if d.kind not in ("espeak", "jsonl"):
            raise ConfigError(f"data.kind={d.kind!r} is not one of espeak, jsonl")
        from modalities.data.speech import VOICE_SETS

        if d.voices not in VOICE_SETS:
            raise ConfigError(f"data.voices={d.voices!r} is not one of {', '.join(sorted(VOICE_SETS))}")
        if d.kind == "jsonl" and not d.train:
            raise ConfigError('data.kind=jsonl needs data.train (index files of {"path", "transcript", "answer"} lines)')
        if cfg.adapter.get("type", "audio") != "audio":
            raise ConfigError(f"adapter.type={cfg.adapter.type!r}: spoken QA takes the 'audio' adapter")
        for key in ("answer_length", "transcribe_length"):
            if cfg.prompts[key] < 2:
                raise ConfigError(f"prompts.{key} must be >= 2 (a target and its EOS), got {cfg.prompts[key]}")
        if not 0 <= float(cfg.augment.freq_warp) < 1:
            raise ConfigError(f"augment.freq_warp must be in [0, 1) (a relative stretch of the mel axis, e.g. 0.1), "
                              f"got {cfg.augment.freq_warp}")
        from pipelines.spoken_qa import READS

        dec = cfg.ctc_decoder
        for key in ("beam_width", "lm_order", "lm_weight"):
            if dec[key] < 0:
                raise ConfigError(f"ctc_decoder.{key} must be >= 0, got {dec[key]}")
        if dec.read not in READS:
            raise ConfigError(f"ctc_decoder.read must be {', '.join(map(repr, READS[:-1]))} or {READS[-1]!r}, "
                              f"got {dec.read!r}")
        if any(not 0 < float(w) < 2 for w in dec.warps):
            raise ConfigError(f"ctc_decoder.warps are frequency stretch factors in (0, 2), e.g. [0.9, 1.1]; got "
                              f"{list(dec.warps)}")
        frozen = list(cfg.optim.freeze)
        for i, st in enumerate(cfg.stages):
            where = f"stages.{i}"
            name = st["name"]
            for key in ("train", "freeze"):
                for pat in st[key]:
                    if pat not in cls.aliases and not any(fnmatch.fnmatchcase(m, pat.split(".")[0]) for m in MODULES):
                        raise ConfigError(
                            f"{where}.{key} ({name}): {pat!r} is neither an alias ({', '.join(cls.aliases)}) nor a "
                            f"parameter glob over {', '.join(m + '.*' for m in MODULES)}")
            tasks = dict(st["tasks"])
            if not tasks or any(k not in TASK_KINDS for k in tasks) or any(w < 0 for w in tasks.values()) \
                    or sum(tasks.values()) <= 0:
                raise ConfigError(f"{where}.tasks ({name}) must map some of {', '.join(TASK_KINDS)} to weights >= 0 "
                                  f"(not all 0), got {tasks}")
            parts = list(st["parts"])
            if any(p not in PARTS for p in parts) or len(set(parts)) != len(parts):
                raise ConfigError(f"{where}.parts ({name}) must list 'semantic' and/or 'acoustic' once each, got {parts}")
            for key in ("ctc_weight", "align_weight"):
                if st[key] < 0:
                    raise ConfigError(f"{where}.{key} ({name}) must be >= 0, got {st[key]}")
            encoder = "adapter.speech_encoder.weight"
            if _uses_ctc(st) and (not _matches(cls.aliases, st["train"], encoder)
                                  or _matches(cls.aliases, [*st["freeze"], *frozen], encoder)):
                raise ConfigError(f"{where}.train ({name}): CTC (ctc_weight or the ctc task) trains the encoder; add "
                                  "'encoder' to the stage's train list")
            if st["align_weight"] > 0 and parts != ["semantic"]:
                raise ConfigError(f"{where}.align_weight ({name}) needs {where}.parts: [semantic] (one prefix slot "
                                  f"per token), got parts {parts or 'the adapter default'}")

    # ---- build ----------------------------------------------------------------------------------
    def build(self):
        from tqdm.auto import tqdm

        from latent.scheduler import MaskedDiffusionScheduler

        cfg, ctx = self.cfg, self.ctx
        show = ctx.progress and ctx.is_main
        self.rows = load_rows(cfg, "train", progress=show)
        self.text_rows = load_text_rows(cfg, self.rows)
        self.tokenizer = tok = self._tokenizer()
        model = backbone_from_config(cfg.model, tok, layouts=("prefix", "bidirectional"), switch_to="prefix")
        adapter = self._adapter(model)
        modules = {"model": model, "adapter": adapter}
        if any(_uses_ctc(st) for st in cfg.stages) and adapter.config.semantic_pooling != "ctc":
            modules["ctc_head"] = CTCHead(adapter.speech_encoder.hidden_dim, len(tok))
        from pipelines.spoken_qa import CTC_READS

        if cfg.ctc_decoder.read in CTC_READS and adapter.config.semantic_pooling != "ctc":
            raise ConfigError(f"ctc_decoder.read={cfg.ctc_decoder.read} exports pipelines that read the CTC transcript, but "
                              f"adapter.semantic_pooling is {adapter.config.semantic_pooling!r}; set it to ctc, or "
                              "ctc_decoder.read=prefix")
        self.default_parts = list(adapter.config.prefix_parts)
        self.mask_id = int(model.config.mask_token_id)
        dec, p = cfg.decoding, cfg.prompts
        self.scheduler = MaskedDiffusionScheduler(block_length=int(p.transcribe_length), commit=dec.commit,
                                                  threshold=float(dec.threshold), cache=dec.cache)
        self.pre = adapter.preprocessor
        self.feats, self.lengths = [], []
        if any(k not in ("text_answer", "text_transcribe") for st in cfg.stages if st["steps"] > 0 for k in st["tasks"]):
            for i, r in enumerate(tqdm(self.rows, desc="features", unit="clip", disable=not show)):
                f, n = self.pre.item(r["path"], i)
                self.feats.append(f.half() if f.is_floating_point() else f)  # half the memory; exact enough
                self.lengths.append(n)
        n_model, n_adapter = (sum(q.numel() for q in m.parameters()) for m in (model, adapter))
        ctx.log(f"[spoken_qa] {len(self.rows)} training clips, {len(self.text_rows)} text examples, vocabulary "
                f"{len(tok)}, backbone {n_model / 1e6:.2f} M, adapter {n_adapter / 1e6:.2f} M parameters")
        return modules

    def _tokenizer(self):
        """The run's own tokenizer (a resumed run keeps it), ``tokenizer.path``, ``model.init_from``'s, or a BPE
        trained on the task's texts by the main process (which builds first; the others read it)."""
        from latent.data.tokenizer import load_tokenizer, train_tokenizer

        cfg, ctx = self.cfg, self.ctx
        saved = ctx.run_dir / "tokenizer"
        if (saved / "tokenizer.json").is_file() or not ctx.is_main:
            return load_tokenizer(saved)
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        given = cfg.tokenizer.path or find_tokenizer_dir(cfg.model.get("init_from"))
        if given:
            tok = load_tokenizer(given)
        else:
            corpus = ctx.run_dir / "texts.txt"
            corpus.write_text("\n".join(_texts_for_tokenizer(self.text_rows, cfg.prompts)) + "\n", encoding="utf-8")
            tok = train_tokenizer(str(corpus), ctx.run_dir / "tokenizer-train",
                                  vocab_size=int(cfg.tokenizer.vocab_size), min_frequency=1)
        tok.save_pretrained(str(saved))
        return tok

    def _adapter(self, model):
        """Built from the ``adapter`` section, or loaded from ``adapter.init_from`` (an adapter folder or a
        pipeline folder holding one, e.g. the stage-1 pipeline that stage 2 starts from); either way with
        token-embedding slots when ``adapter.semantic_token_embeddings`` asks for them."""
        acfg = OmegaConf.to_container(self.cfg.adapter)
        init = acfg.pop("init_from", None)
        token_slots = bool(acfg.pop("semantic_token_embeddings", False))
        adapter = self._load_adapter(init, model) if init else self._new_adapter(acfg, model)
        if token_slots and not adapter.config.semantic_token_embeddings:
            if adapter.config.semantic_pooling != "ctc":
                raise ConfigError("adapter.semantic_token_embeddings needs adapter.semantic_pooling=ctc (the slots' "
                                  "tokens come from the CTC head); set adapter.semantic_token_embeddings=false")
            adapter.set_token_embeddings(model.embed.weight)  # the slots start from the backbone's text
        return adapter

    @staticmethod
    def _load_adapter(init: str, model):
        from modalities.audio import AudioAdapter

        folder = Path(init) / "audio_adapter" if (Path(init) / "audio_adapter").is_dir() else Path(init)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"adapter.init_from={init!r} holds no audio adapter (config.json)")
        adapter = AudioAdapter.from_pretrained(str(folder))
        if adapter.config.hidden_size != model.config.hidden_size:
            raise ConfigError(f"adapter.init_from={init!r} projects to {adapter.config.hidden_size}; the backbone "
                              f"is {model.config.hidden_size} wide")
        return adapter

    def _new_adapter(self, acfg: dict, model):
        from modalities.base import create_adapter

        width = model.config.hidden_size
        if acfg.get("hidden_size", width) != width:
            raise ConfigError(f"adapter.hidden_size={acfg['hidden_size']} must be the backbone's width ({width}); "
                              "leave it out")
        acfg["hidden_size"] = width
        if acfg.get("semantic_pooling") == "ctc" and not acfg.get("ctc_vocab_size"):
            acfg["ctc_vocab_size"] = len(self.tokenizer)
        return create_adapter(acfg)

    def _parts(self, stage) -> list[str]:
        return list(stage.parts) or self.default_parts

    # ---- steps ----------------------------------------------------------------------------------
    def batch(self, step, stage):
        tok, p = self.tokenizer, self.cfg.prompts
        B = stage.batch_size or self.cfg.trainer.batch_size
        g = step_generator(self.ctx.seed, step)
        names = [k for k, w in stage.tasks.items() if w > 0]
        task = names[int(torch.multinomial(torch.tensor([float(stage.tasks[k]) for k in names]), 1, generator=g))]
        audio = not task.startswith("text_")
        pool = self.rows if audio else self.text_rows
        idx = torch.randint(0, len(pool), (B,), generator=g).tolist()
        rows = [pool[i] for i in idx]
        out: dict = {"task": task}
        if task != "ctc":
            prompts, texts, length = make_examples(task, rows, p)
            out["targets"], _ = encode_targets(tok, texts, length)
            out["prompt_ids"], out["prompt_mask"] = encode_prompts(tok, prompts)
            out["t"], out["noise"] = sft_noise(g, B, out["prompt_ids"].shape[1] + length)
        if audio:
            feats = self.pre.collate([self.feats[i] for i in idx], [self.lengths[i] for i in idx])
            out["audio"] = spec_augment(feats.to(dtype=torch.float32), self.cfg.augment, g)
            out["transcripts"] = _token_ids(tok, [r["transcript"] for r in rows])
        return out

    def count(self, batch):
        return len(batch["audio"]) if "targets" not in batch else int(batch["targets"].shape[0])

    def _ctc_proj(self, modules):
        return modules.ctc_head.proj if hasattr(modules, "ctc_head") else modules.adapter.semantic.ctc

    def loss(self, modules, batch, stage):
        dev = self.ctx.device
        adapter, model = modules.adapter, modules.model
        audio = batch.get("audio")
        if batch["task"] == "ctc":  # the encoder alone: no backbone forward
            states, frames = adapter.encode(audio)
            loss = ctc_loss(self._ctc_proj(modules), states[-1], frames, batch["transcripts"])
            return StepLoss(loss, {"ctc_loss": float(loss.detach())})
        ctc_weight = float(stage.ctc_weight) if audio is not None else 0.0
        if audio is not None:
            self._sync_token_embeddings(modules)
        b = {k: batch[k].to(dev) for k in ("prompt_ids", "prompt_mask", "targets", "t", "noise")}
        res = sequence_loss(model, adapter, audio, b["prompt_ids"], b["prompt_mask"], b["targets"], self.mask_id,
                            t=b["t"], noise=b["noise"], parts=self._parts(stage),
                            ctc_proj=self._ctc_proj(modules) if ctc_weight > 0 else None,
                            ctc_targets=batch.get("transcripts"))
        loss, metrics = res.sft.loss, {}
        if res.ctc is not None:
            loss = loss + ctc_weight * res.ctc
            metrics["ctc_loss"] = float(res.ctc.detach())
        if audio is not None and stage.align_weight > 0:
            align = alignment_loss(model, res.prefix, batch["transcripts"])
            loss = loss + float(stage.align_weight) * align
            metrics["align_loss"] = float(align.detach())
        return StepLoss(loss, metrics)

    @staticmethod
    def _sync_token_embeddings(modules):
        """Semantic slots with token embeddings read the backbone's current input embeddings (stages that train
        the backbone change them; the copy is what the exported adapter keeps)."""
        semantic = modules.adapter.semantic
        if semantic.config.token_embeddings:
            with torch.no_grad():
                semantic.set_token_embeddings(modules.model.embed.weight)

    def ctc_decoder(self, adapter):
        """The ``ctc_decoder`` section's beam search for an adapter with a CTC head (None: greedy). Its LM is
        fitted on the training transcripts, tokenized as the CTC targets are."""
        from modalities.ctc_decoding import CTCBeamSearch

        c = self.cfg.ctc_decoder
        if c.beam_width == 0 or adapter.config.semantic_pooling != "ctc":
            return None
        if c.lm_order > 0 and self._transcript_lm is None:  # the same for every stage's export
            self._transcript_lm = fit_transcript_lm(self.tokenizer, [r["transcript"] for r in self.rows],
                                                    int(adapter.config.ctc_vocab_size), int(c.lm_order))
        return CTCBeamSearch(beam_width=int(c.beam_width), lm=self._transcript_lm if c.lm_order > 0 else None,
                             lm_weight=float(c.lm_weight), length_bonus=float(c.length_bonus), warps=tuple(c.warps))

    def export(self, modules, folder, stage):
        """A SpokenQAPipeline with the stage's prefix parts and the ``ctc_decoder`` section's transcript decoder;
        the CTC head is training-only and stays out."""
        from pipelines.spoken_qa import SpokenQAPipeline

        p, adapter = self.cfg.prompts, modules.adapter
        self._sync_token_embeddings(modules)
        before = list(adapter.config.prefix_parts)
        adapter.set_prefix_parts(self._parts(stage))
        try:
            pipe = SpokenQAPipeline(adapter, modules.model, self.tokenizer, self.scheduler,
                                    gen_length=int(p.answer_length), transcribe_length=int(p.transcribe_length),
                                    answer_prompt=p.answer, transcribe_prompt=p.transcribe,
                                    read=self.cfg.ctc_decoder.read, spaced_text=bool(p.spaced))
            pipe.ctc_decoder = self.ctc_decoder(adapter)
            pipe.save_pretrained(str(folder))
        finally:
            adapter.set_prefix_parts(before)
        (folder / "training.json").write_text(json.dumps({"stage": stage.name, "config": OmegaConf.to_container(
            self.cfg)}, indent=2))


# ---- evaluation -----------------------------------------------------------------------------------
def evaluate_spoken_qa(pipe, rows: list[dict], task: str = "answer", batch_size: int = 50, progress: bool = True,
                       latency_clips: int = 0, **gen) -> dict:
    """WER (task="transcribe") or answer accuracy (task="answer", also per question kind) of a pipeline on rows,
    with decoding cost: forwards and seconds per clip in batches, and optionally the median latency of
    ``latency_clips`` single-clip calls."""
    import statistics

    from tqdm.auto import tqdm

    from modalities.data.metrics import answer_accuracy, normalize_text, word_error_rate

    pipe.set_progress_bar_config(disable=True)
    preds, nfe, seconds = [], 0, 0.0
    for lo in tqdm(range(0, len(rows), batch_size), desc=f"evaluating {task}", unit="batch", disable=not progress):
        chunk = rows[lo : lo + batch_size]
        t = time.perf_counter()
        out = pipe(audio=[r["path"] for r in chunk], instruction=[r.get("instruction") or None for r in chunk],
                   task=task, **gen)
        seconds += time.perf_counter() - t
        preds += out.texts
        nfe += out.nfe
    res = {"clips": len(rows), "seconds_per_clip_batched": seconds / len(rows), "forwards_per_batch":
           nfe / math.ceil(len(rows) / batch_size)}
    if task == "transcribe":
        refs = [r["transcript"] for r in rows]
        res["wer"] = word_error_rate(refs, preds)
        res["sentence_accuracy"] = answer_accuracy(refs, preds)
    else:
        refs = [r["answer"] for r in rows]
        res["accuracy"] = answer_accuracy(refs, preds)
        kinds = sorted({r.get("kind", "all") for r in rows})
        res["accuracy_by_kind"] = {
            k: answer_accuracy([r["answer"] for r in rows if r.get("kind", "all") == k],
                               [p for r, p in zip(rows, preds, strict=True) if r.get("kind", "all") == k]) for k in kinds
        }
    if latency_clips:
        times, steps = [], []
        for r in rows[:latency_clips]:
            t = time.perf_counter()
            out = pipe(audio=r["path"], instruction=r.get("instruction") or None, task=task, **gen)
            times.append(time.perf_counter() - t)
            steps.append(out.nfe)
        res["latency_median_s"] = statistics.median(times)
        res["forwards_per_clip_single"] = sum(steps) / len(steps)
    res["examples"] = [{"ref": normalize_text(a), "pred": b} for a, b in zip(refs[:5], preds[:5], strict=True)]
    return res

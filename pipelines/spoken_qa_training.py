"""Training a spoken-question answerer (DIFFA style): speech adapters on a frozen masked-diffusion backbone.

    python train.py configs/audio_spoken_qa.yaml                       # all stages, resumable
    python train.py configs/audio_spoken_qa.yaml model.init_from=runs/text_tiny/final/backbone stages.0.steps=0 stages.1.steps=0
    python train.py configs/audio_asr.yaml && python train.py configs/audio_sqa.yaml    # the stages as two recipes

The recipe's `stages` run in order; each names what it trains (`train`: backbone, encoder, semantic, acoustic),
which adapters form the prefix (`parts`), its tasks with their sampling weights (`tasks`), and optionally its own
`batch_size`, `ctc_weight` (an auxiliary CTC loss on the speech encoder, see `CTCHead`) and `align_weight` (see
`alignment_loss`):

- `text` tasks (`text_answer`, `text_transcribe`): the question's transcript stands where the audio will be,
  as tokens, so the backbone learns the task from text ("backbone" stage; skip it with steps: 0 when
  `model.init_from` names a backbone that this project trained or loaded);
- `ctc` (optional): the speech encoder alone learns to recognise words with a CTC head, standing in for the
  pretrained Whisper encoder that DIFFA starts from (nothing pretrained is available offline);
- stage 1, `transcribe`: speech -> transcript, backbone frozen, encoder + semantic adapter trained;
- stage 2, `answer`: spoken question (+ text instruction) -> answer, backbone frozen, both adapters trained.

Sequences are [audio prefix (left-padded) | prompt (left-padded) | target + EOS padding to its length]; the loss
is the SFT masked-diffusion loss of `latent.losses.sft_loss` on the target (prefix and prompt never masked), with
the backbone's `prefix` layout so that training matches exact-cache decoding. Checkpoints (safetensors + JSON,
atomic, `latent.training.checkpoint`) are written every `trainer.save_every` steps and at the end of every
stage; a rerun of the same command resumes from the newest one, with the same data order and noise. Each
stage exports a `SpokenQAPipeline` to <output_dir>/pipelines/<stage>; the last one also to <output_dir>/pipeline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

__all__ = ["DEFAULTS", "load_spoken_qa_config", "load_rows", "train_spoken_qa", "evaluate_spoken_qa", "main"]

PARTS = ("backbone", "encoder", "semantic", "acoustic")
TASK_KINDS = ("text_answer", "text_transcribe", "answer", "transcribe", "ctc")

DEFAULTS = OmegaConf.create(
    {
        "task": "spoken_qa",
        "run": {"name": "audio_spoken_qa", "output_dir": "runs/${run.name}", "seed": 0},
        "data": {
            "kind": "espeak",  # espeak: synthesised into data.dir on first use | jsonl: data.train index file(s)
            "dir": "data/speech", "n_train": 2400, "n_test": 200, "workers": 2,
            "train": None,  # jsonl: {"path", "transcript", "answer", "instruction"?} per line (paths relative)
            "max_train": None,
            # espeak: extra generated questions (text only, split "text") for the text tasks; the backbone sees
            # the task's language and facts beyond the 'train' clips. 0 = the training clips' texts only.
            "text_examples": 0,
        },
        "tokenizer": {"path": None, "vocab_size": 400},
        "model": {
            "init_from": None,  # a pipeline or backbone folder whose DiffusionTransformer is loaded
            "hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": None,
            "max_position_embeddings": 128, "attention_layout": "prefix",
        },
        "adapter": {"type": "audio", "encoder": "transformer", "encoder_dim": 128, "encoder_layers": 3,
                    "encoder_heads": 4, "encoder_dropout": 0.1, "n_mels": 40, "max_seconds": 8.0,
                    "semantic_downsample": 2, "acoustic_queries": 8, "acoustic_heads": 4},
        "prompts": {"answer": "answer:", "transcribe": "transcribe:", "answer_length": 4, "transcribe_length": 16},
        "augment": {"freq_mask": 6, "time_mask": 12, "time_masks": 2},  # SpecAugment-style masks (0 = off)
        "stages": [
            {"name": "text", "steps": 600, "lr": 2.0e-3, "train": ["backbone"],
             "tasks": {"text_answer": 0.5, "text_transcribe": 0.5}},
            {"name": "asr", "steps": 1500, "lr": 1.0e-3, "train": ["encoder", "semantic"], "parts": ["semantic"],
             "tasks": {"transcribe": 1.0}},
            {"name": "sqa", "steps": 800, "lr": 5.0e-4, "train": ["semantic", "acoustic"],
             "parts": ["semantic", "acoustic"], "tasks": {"answer": 1.0}},
        ],
        "optim": {"weight_decay": 0.01, "warmup_steps": 50, "min_lr_ratio": 0.1, "grad_clip": 1.0},
        "trainer": {"batch_size": 32, "log_every": 25, "save_every": 200, "keep_checkpoints": 2, "resume": "auto",
                    "stop_at_step": None, "time_limit_minutes": None, "threads": None, "progress": True},
        "decoding": {"commit": "threshold", "threshold": 0.9, "cache": "auto"},
    }
)
_FREE = ("adapter", "model", "stages")  # sections whose keys are not fixed


class SpokenQAConfigError(ValueError):
    pass


def _check_key(section: str, sub: list, label: str) -> None:
    if section not in DEFAULTS:
        raise SpokenQAConfigError(f"{label}: unknown section {section!r}; known: {sorted(DEFAULTS)}.")
    if section in _FREE or not isinstance(DEFAULTS[section], DictConfig):
        return
    extra = sorted(set(sub) - set(DEFAULTS[section]))
    if extra:
        raise SpokenQAConfigError(f"{label}: unknown keys {extra} in {section!r}; known: {sorted(DEFAULTS[section])}.")


def load_spoken_qa_config(path: str | os.PathLike | None = None, overrides=()) -> DictConfig:
    """Defaults <- recipe YAML <- dot-list overrides (stages.1.steps=... works); unknown keys are refused."""
    user = OmegaConf.load(path) if path else OmegaConf.create({})
    for section, value in user.items():
        _check_key(section, list(value) if isinstance(value, DictConfig) else [], f"recipe {path}")
    cfg = OmegaConf.merge(DEFAULTS, user)
    for item in overrides:
        key, sep, raw = str(item).partition("=")
        if not sep:
            raise SpokenQAConfigError(f"override {item!r} must look like key=value, e.g. trainer.batch_size=16.")
        parts = key.split(".")
        _check_key(parts[0], parts[1:2], "overrides")
        value = OmegaConf.from_dotlist([f"v={raw}"]).v
        OmegaConf.update(cfg, key, value, force_add=parts[0] in _FREE)
    if cfg.get("task") != "spoken_qa":
        raise SpokenQAConfigError(f"task must be 'spoken_qa', got {cfg.get('task')!r}.")
    for st in cfg.stages:
        name = st.get("name")
        bad = [p for p in st.get("train", []) if p not in PARTS]
        if bad or not st.get("train"):
            raise SpokenQAConfigError(f"stage {name!r}: train must list some of {PARTS}, got {list(st.get('train', []))}.")
        tasks = dict(st.get("tasks") or {})
        if not tasks or any(t not in TASK_KINDS for t in tasks) or any(float(w) < 0 for w in tasks.values()) \
                or sum(float(w) for w in tasks.values()) <= 0:
            raise SpokenQAConfigError(f"stage {name!r}: tasks must map some of {TASK_KINDS} to weights >= 0, got {tasks}.")
        for p in st.get("parts") or []:
            if p not in ("semantic", "acoustic"):
                raise SpokenQAConfigError(f"stage {name!r}: parts must list 'semantic' / 'acoustic', got {p!r}.")
        if int(st.get("steps", 0)) < 0:
            raise SpokenQAConfigError(f"stage {name!r}: steps must be >= 0.")
        if (float(st.get("ctc_weight") or 0) > 0 or "ctc" in tasks) and "encoder" not in st.train:
            raise SpokenQAConfigError(f"stage {name!r}: CTC (ctc_weight or the ctc task) trains the encoder; "
                                      "add 'encoder' to its `train` list.")
    if len({st.name for st in cfg.stages}) != len(cfg.stages):
        raise SpokenQAConfigError("stage names must be unique (they name the exported pipelines).")
    return cfg


# ---- data -----------------------------------------------------------------------------------------------
def _read_index(index: str | os.PathLike, limit: int | None = None) -> list[dict]:
    from modalities.data.speech import read_split

    rows = read_split(index, limit)
    for i, r in enumerate(rows):
        for key in ("path", "transcript", "answer"):
            if key not in r:
                raise ValueError(f"{index} line {i + 1} has no {key!r}.")
        r.setdefault("instruction", "")
    return rows


def load_rows(cfg: DictConfig, split: str = "train") -> list[dict]:
    """Rows (path, transcript, answer, instruction, ...) of a split: "train", "test_seen", "test_heldout"."""
    d = cfg.data
    if d.kind == "espeak":
        from modalities.data.speech import build_dataset

        paths = build_dataset(d.dir, int(d.n_train), int(d.n_test), int(cfg.run.seed), int(d.workers))
        return _read_index(paths[split], d.max_train if split == "train" else None)
    if d.kind == "jsonl":
        files = d.train if split == "train" else d.get(split)
        if not files:
            raise SpokenQAConfigError(f"data.{split} names no index file.")
        files = [files] if isinstance(files, str) else list(files)
        return sum((_read_index(f, d.max_train if split == "train" else None) for f in files), [])
    raise SpokenQAConfigError(f"data.kind must be espeak or jsonl, got {d.kind!r}.")


def load_text_rows(cfg: DictConfig, rows: list[dict]) -> list[dict]:
    """Rows for the text tasks: the training rows plus `data.text_examples` generated questions (espeak data)."""
    n = int(cfg.data.get("text_examples") or 0)
    if n <= 0 or cfg.data.kind != "espeak":
        return rows
    from dataclasses import asdict

    from modalities.data.speech import make_split

    return rows + [asdict(e) for e in make_split("text", n, int(cfg.run.seed))]


def encode_targets(tok, texts: list[str], length: int) -> tuple[torch.LongTensor, int]:
    """Target ids followed by EOS up to `length` (at least one EOS kept); returns (ids, number truncated)."""
    eos = tok.eos_token_id
    rows, cut = [], 0
    # a leading space: the target follows the prompt, and words after a space are single tokens
    for ids in tok([" " + t.strip() for t in texts], add_special_tokens=False)["input_ids"]:
        if len(ids) > length - 1:
            ids, cut = ids[: length - 1], cut + 1
        rows.append(ids + [eos] * (length - len(ids)))
    return torch.tensor(rows, dtype=torch.long), cut


def left_pad(tok, texts: list[str]) -> tuple[torch.LongTensor, torch.LongTensor]:
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tok.padding_side = side
    return enc["input_ids"].long(), enc["attention_mask"].long()


def spec_augment(batch, cfg, g: torch.Generator):
    """Frequency and time masks (zeros, i.e. the normalised mean) on a copy of the features."""
    from modalities.audio import AudioBatch

    a = cfg.augment
    x = batch.values.clone()
    if x.ndim != 3 or (not a.freq_mask and not a.time_mask):
        return batch
    b, t, f = x.shape
    for i in range(b):
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


# ---- model pieces ---------------------------------------------------------------------------------------
def _texts_for_tokenizer(rows: list[dict], cfg) -> list[str]:
    from modalities.data.speech import NUMBERS

    a, t = cfg.prompts.answer, cfg.prompts.transcribe
    lines = [" ".join(NUMBERS)]
    for r in rows:  # the texts in the contexts they take in sequences (so words and prompts become tokens)
        ins = r.get("instruction") or ""
        lines += [f"{r['transcript']} {ins} {a} {r['answer']}", f"{r['transcript']} {t} {r['transcript']}",
                  f"{ins} {a} {r['answer']}".strip(), f"{t} {r['transcript']}"]
    return lines


def _tokenizer(cfg, rows, out: Path):
    from latent.data.tokenizer import load_tokenizer, train_tokenizer

    saved = out / "tokenizer"
    if (saved / "tokenizer.json").exists():  # a resumed run keeps its tokenizer
        return load_tokenizer(saved)
    if cfg.tokenizer.path:
        tok = load_tokenizer(cfg.tokenizer.path)
    elif cfg.model.init_from and any((Path(cfg.model.init_from) / s / "tokenizer.json").exists() or
                                     (Path(cfg.model.init_from) / s / "tokenizer_config.json").exists()
                                     for s in ("tokenizer", "")):
        sub = "tokenizer" if (Path(cfg.model.init_from) / "tokenizer").is_dir() else ""
        tok = load_tokenizer(Path(cfg.model.init_from) / sub)
    else:
        corpus = out / "texts.txt"
        corpus.write_text("\n".join(_texts_for_tokenizer(rows, cfg)) + "\n", encoding="utf-8")
        tok = train_tokenizer(str(corpus), out / "tokenizer-train", vocab_size=int(cfg.tokenizer.vocab_size),
                              min_frequency=1)
    tok.save_pretrained(str(saved))
    return tok


def _backbone(cfg, tok):
    from latent.backbone import DiffusionTransformer

    m = OmegaConf.to_container(cfg.model, resolve=True)
    init = m.pop("init_from", None)
    if init:
        folder = Path(init)
        for sub in ("model", "backbone"):
            if (folder / sub / "config.json").exists():
                folder = folder / sub
        model = DiffusionTransformer.from_pretrained(str(folder))
        if model.config.attention_layout not in ("prefix", "bidirectional"):
            raise SpokenQAConfigError(
                f"{folder} has attention_layout={model.config.attention_layout!r}; spoken QA needs 'prefix' "
                "(or a bidirectional model, which is switched to 'prefix': same weights)."
            )
        if model.config.attention_layout != "prefix":
            model.register_to_config(attention_layout="prefix")
        if model.config.vocab_size < len(tok):
            raise SpokenQAConfigError(f"{folder} has vocab_size={model.config.vocab_size} < {len(tok)} tokens.")
        return model
    m = {k: v for k, v in m.items() if v is not None}
    return DiffusionTransformer(vocab_size=len(tok), mask_token_id=tok.mask_token_id, **m)


def _adapter(cfg, model, tok):
    """The audio adapter: built from the `adapter` section, or loaded from `adapter.init_from` (an adapter folder
    or a pipeline folder holding one, e.g. the stage-1 pipeline to start stage 2 from)."""
    from modalities.audio import AudioAdapter
    from modalities.base import create_adapter

    acfg = OmegaConf.to_container(cfg.adapter, resolve=True)
    init = acfg.pop("init_from", None)
    if init:
        folder = Path(init) / "audio_adapter" if (Path(init) / "audio_adapter" / "config.json").exists() else Path(init)
        if not (folder / "config.json").exists():
            raise SpokenQAConfigError(f"adapter.init_from={init!r} holds no audio adapter (config.json).")
        adapter = AudioAdapter.from_pretrained(str(folder))
        if adapter.config.hidden_size != model.config.hidden_size:
            raise SpokenQAConfigError(
                f"the adapter in {folder} projects to {adapter.config.hidden_size}, the backbone is "
                f"{model.config.hidden_size} wide."
            )
        return adapter
    acfg["hidden_size"] = model.config.hidden_size
    if acfg.get("semantic_pooling") == "ctc" and not acfg.get("ctc_vocab_size"):
        acfg["ctc_vocab_size"] = len(tok)
    return create_adapter(acfg)


def _set_trainable(adapter, model, parts) -> list[torch.nn.Parameter]:
    groups = {"backbone": model, "encoder": adapter.speech_encoder, "semantic": adapter.semantic,
              "acoustic": adapter.acoustic}
    for name, module in groups.items():
        module.requires_grad_(name in parts)
    model.train("backbone" in parts)
    adapter.train(True)  # a frozen encoder stays in eval mode (ModalityAdapter.train)
    return [p for name in PARTS if name in parts for p in groups[name].parameters()]


class CTCHead(torch.nn.Module):
    """Training-only CTC head on the speech encoder's last layer (tokens of the transcript, blank = vocab size).

    DIFFA starts from a pretrained Whisper encoder; nothing pretrained is available offline here, so an auxiliary
    CTC loss (`ctc_weight` of a stage) teaches the in-project encoder to recognise words directly, instead of only
    through gradients that pass the frozen backbone. It is not part of the exported pipeline."""

    def __init__(self, dim: int, vocab: int, proj: torch.nn.Module | None = None):
        super().__init__()
        # with CTC pooling the semantic adapter owns the head (it labels the frames it pools): train that one
        self.proj = proj if proj is not None else torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, vocab + 1))
        self.blank = vocab

    def loss(self, hidden: torch.Tensor, mask: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
        logp = torch.log_softmax(self.proj(hidden).float(), -1).transpose(0, 1)  # [T, B, V + 1]
        flat = torch.tensor([t for row in targets for t in row], dtype=torch.long)
        lengths = torch.tensor([len(row) for row in targets], dtype=torch.long)
        return torch.nn.functional.ctc_loss(logp, flat, mask.sum(1).cpu(), lengths, blank=self.blank,
                                            zero_infinity=True)


@dataclass
class StepLoss:
    sft: object  # latent.losses.LossOutput of the target tokens
    ctc: torch.Tensor | None = None  # the encoder's CTC loss (with a ctc_head)
    prefix: object = None  # the PrefixEmbeds the backbone read (audio tasks)


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


def sequence_loss(model, adapter, batch, prompts: list[str], targets: torch.LongTensor, tok, generator=None,
                  ctc_head: CTCHead | None = None, ctc_targets: list[list[int]] | None = None) -> StepLoss:
    """SFT masked-diffusion loss of `targets` [B, G] after [audio prefix | left-padded prompts] (no prefix when
    `batch` is None: a text task). With `ctc_head`, also the encoder's CTC loss on `ctc_targets`."""
    from latent.losses import sft_loss

    prompt_ids, prompt_mask = left_pad(tok, prompts)
    b, plen = prompt_ids.shape
    seq = torch.cat([prompt_ids, targets], dim=1)
    ones = torch.ones_like(targets)
    embeds, n_prefix, ctc, prefix = None, 0, None, None
    if batch is not None:
        states, frames = adapter.encode(batch)
        if ctc_head is not None:
            ctc = ctc_head.loss(states[-1], frames, ctc_targets)
        prefix = adapter.prefix(states, frames)
        embeds, n_prefix = prefix.embeds, prefix.length
        full = torch.cat([prefix.mask.long(), prompt_mask, ones], dim=1)
    else:
        full = torch.cat([prompt_mask, ones], dim=1)
    full = None if bool(full.all()) else full

    def call(noisy, attention_mask=None, **kw):
        return model(noisy, attention_mask=full, prefix_embeds=embeds, prefix_length=n_prefix + plen)

    out = sft_loss(call, seq, tok.mask_token_id, prompt_lengths=torch.full((b,), plen), generator=generator)
    return StepLoss(out, ctc, prefix)


def make_examples(task: str, rows: list[dict], cfg) -> tuple[list[str], list[str], bool, int]:
    """(prompts, targets, uses audio, target length) of rows for one task."""
    from pipelines.spoken_qa import format_prompt

    p = cfg.prompts
    if task == "ctc":  # encoder-only CTC on the transcript (see CTCHead); no prompt or target sequence
        return [""] * len(rows), [r["transcript"] for r in rows], True, int(p.transcribe_length)
    answer = task.endswith("answer")
    prompts = [format_prompt("answer" if answer else "transcribe", r.get("instruction"), p.answer, p.transcribe)
               for r in rows]
    if task.startswith("text_"):  # the transcript stands where the audio will be
        prompts = [f"{r['transcript']} {q}" for r, q in zip(rows, prompts)]
    targets = [r["answer"] if answer else r["transcript"] for r in rows]
    return prompts, targets, not task.startswith("text_"), int(p.answer_length if answer else p.transcribe_length)


@dataclass
class TrainResult:
    pipeline_dir: str
    stage_pipelines: dict
    steps: int
    seconds: float
    losses: list[float]
    completed: bool
    resumed_from: str | None = None
    log: list[dict] = field(default_factory=list)


def _lr_lambda(cfg, steps: int):
    warm = int(cfg.optim.warmup_steps)
    floor = float(cfg.optim.min_lr_ratio)

    def f(step):
        if step < warm:
            return (step + 1) / warm
        prog = min(1.0, (step - warm) / max(1, steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * prog))

    return f


def _export(adapter, model, tok, cfg, folder: Path, parts) -> None:
    from latent.scheduler import MaskedDiffusionScheduler
    from pipelines.spoken_qa import SpokenQAPipeline

    dec = cfg.decoding
    if parts:
        adapter.set_prefix_parts(list(parts))
    scheduler = MaskedDiffusionScheduler(block_length=int(cfg.prompts.transcribe_length), commit=dec.commit,
                                         threshold=float(dec.threshold), cache=dec.cache)
    pipe = SpokenQAPipeline(adapter, model, tok, scheduler, gen_length=int(cfg.prompts.answer_length),
                            transcribe_length=int(cfg.prompts.transcribe_length), answer_prompt=cfg.prompts.answer,
                            transcribe_prompt=cfg.prompts.transcribe)
    was = adapter.training, model.training
    adapter.eval()
    model.eval()
    pipe.save_pretrained(str(folder))
    adapter.train(was[0])
    model.train(was[1])


def train_spoken_qa(cfg: DictConfig, log=None) -> TrainResult:
    """Run the recipe's stages (resuming from the newest checkpoint in the run folder); see the module doc."""
    from tqdm.auto import tqdm

    from latent.training.checkpoint import CheckpointWriter, latest_checkpoint, read_state, set_rng_state, write_state

    log = log or (lambda s: print(s, flush=True))
    if cfg.trainer.threads:
        torch.set_num_threads(int(cfg.trainer.threads))
    torch.manual_seed(int(cfg.run.seed))
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml")
    t_start = time.perf_counter()
    limit = cfg.trainer.time_limit_minutes
    deadline = t_start + 60 * float(limit) if limit else math.inf

    rows = load_rows(cfg, "train")
    text_rows = load_text_rows(cfg, rows)
    tok = _tokenizer(cfg, text_rows, out)
    model = _backbone(cfg, tok)
    adapter = _adapter(cfg, model, tok)
    ctc_head = None
    if any(float(st.get("ctc_weight") or 0) > 0 or "ctc" in st.tasks for st in cfg.stages):
        own = adapter.semantic.ctc if adapter.semantic.config.pooling == "ctc" else None
        ctc_head = CTCHead(adapter.speech_encoder.hidden_dim, len(tok), own)
    pre = adapter.preprocessor
    needs_audio = any(not t.startswith("text_") for st in cfg.stages if int(st.steps) > 0 for t in st.tasks)
    feats, lengths = [], []
    if needs_audio:
        for i, r in enumerate(tqdm(rows, desc="features", unit="clip", disable=not cfg.trainer.progress)):
            f, n = pre.item(r["path"], i)
            feats.append(f.half() if f.is_floating_point() else f)  # half the memory; exact enough for training
            lengths.append(n)
    n_params = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in adapter.parameters())
    log(f"{len(rows)} training clips, {len(text_rows)} text examples, vocabulary {len(tok)}, backbone {n_params[0] / 1e6:.2f} M, "
        f"adapter {n_params[1] / 1e6:.2f} M parameters.")

    # ---- resume ---------------------------------------------------------------------------------------
    ckpt_root = out / "checkpoints"
    writer = CheckpointWriter(ckpt_root, keep=int(cfg.trainer.keep_checkpoints))
    writer.cleanup_partial()
    resume = str(cfg.trainer.resume)
    ckpt = None if resume == "never" else latest_checkpoint(ckpt_root) if resume == "auto" else Path(resume)
    g = torch.Generator().manual_seed(int(cfg.run.seed))
    start_stage, start_step, global_step, losses, state = 0, 0, 0, [], None
    if ckpt is not None:
        state = read_state(ckpt, "state")
        adapter.load_state_dict(state["adapter"])
        if ctc_head is not None and state.get("ctc_head"):
            ctc_head.load_state_dict(state["ctc_head"])
        model.load_state_dict(state["model"])
        g.set_state(state["generator"])
        set_rng_state(read_state(ckpt, "rng_rank0"))
        start_stage, start_step, global_step = int(state["stage"]), int(state["step"]), int(state["global_step"])
        losses = list(state["losses"])
        log(f"resumed from {ckpt} (stage {start_stage}, step {start_step})")

    def save(stage_i, step, opt, sched):
        def write(folder):
            write_state(folder, "state", {
                "stage": stage_i, "step": step, "global_step": global_step, "losses": losses,
                "generator": g.get_state(), "adapter": adapter.state_dict(), "model": model.state_dict(),
                "ctc_head": ctc_head.state_dict() if ctc_head is not None else {},
                "optimizer": opt.state_dict() if opt is not None else {},
                "scheduler": sched.state_dict() if sched is not None else {},
            })
        writer.save(global_step, write)

    stage_dirs, completed, stopped = {}, True, False
    for si, st in enumerate(cfg.stages):
        steps = int(st.steps)
        bs = int(st.get("batch_size") or cfg.trainer.batch_size)
        parts = list(st.get("parts") or adapter.config.prefix_parts)
        folder = out / "pipelines" / st.name
        if si < start_stage or (si == start_stage and start_step >= steps and steps > 0) or steps == 0:
            if si == start_stage and steps > 0 and not (folder / "model_index.json").exists():
                _export(adapter, model, tok, cfg, folder, parts)  # killed between checkpoint and export
            if (folder / "model_index.json").exists():
                stage_dirs[st.name] = str(folder)
            continue
        adapter.set_prefix_parts(parts)
        params = _set_trainable(adapter, model, list(st.train))
        ctc_weight = float(st.get("ctc_weight") or 0)
        align_weight = float(st.get("align_weight") or 0)
        if align_weight > 0 and list(parts) != ["semantic"]:
            raise SpokenQAConfigError(f"stage {st.name!r}: align_weight needs parts: [semantic] (slots = tokens).")
        if ctc_weight > 0 or "ctc" in st.tasks:
            ctc_head.requires_grad_(True)
            params = params + [p for p in ctc_head.parameters() if all(p is not q for q in params)]
        opt = torch.optim.AdamW(params, lr=float(st.lr), weight_decay=float(cfg.optim.weight_decay), betas=(0.9, 0.98))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, steps))
        first = 0
        if state is not None and si == start_stage:
            if state["optimizer"]:
                opt.load_state_dict(state["optimizer"])
                sched.load_state_dict(state["scheduler"])
            first = start_step
        tasks = {k: float(v) for k, v in st.tasks.items() if float(v) > 0}
        names, weights = list(tasks), torch.tensor(list(tasks.values()))
        bar = tqdm(range(first, steps), desc=f"stage {st.name} ({'+'.join(st.train)})", unit="step",
                   disable=not cfg.trainer.progress, initial=first, total=steps)
        step = first
        for step in bar:
            task = names[int(torch.multinomial(weights, 1, generator=g))]
            pool = text_rows if task.startswith("text_") else rows
            idx = torch.randint(0, len(pool), (bs,), generator=g).tolist()
            prompts, texts, audio, length = make_examples(task, [pool[i] for i in idx], cfg)
            targets, _ = encode_targets(tok, texts, length)
            batch = None
            if audio:
                batch = pre.collate([feats[i] for i in idx], [lengths[i] for i in idx])
                batch = spec_augment(batch.to(dtype=torch.float32), cfg, g)
            if task == "ctc":  # the encoder alone: no backbone forward
                states, frames = adapter.encode(batch)
                loss = ctc_head.loss(states[-1], frames, tok([" " + pool[i]["transcript"].strip() for i in idx],
                                                             add_special_tokens=False)["input_ids"])
            else:
                transcript_ids = tok([" " + pool[i]["transcript"].strip() for i in idx],
                                     add_special_tokens=False)["input_ids"] if audio else None
                res = sequence_loss(model, adapter, batch, prompts, targets, tok, g,
                                    ctc_head if audio and ctc_weight > 0 else None, transcript_ids)
                loss = res.sft.loss
                if res.ctc is not None:
                    loss = loss + ctc_weight * res.ctc
                if audio and align_weight > 0:
                    loss = loss + align_weight * alignment_loss(model, res.prefix, transcript_ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if float(cfg.optim.grad_clip) > 0:
                torch.nn.utils.clip_grad_norm_(params, float(cfg.optim.grad_clip))
            opt.step()
            sched.step()
            losses.append(round(float(loss.detach()), 5))
            global_step += 1
            if step % int(cfg.trainer.log_every) == 0:
                bar.set_postfix(loss=f"{sum(losses[-25:]) / len(losses[-25:]):.3f}", task=task)
            done = step + 1
            every = int(cfg.trainer.save_every)
            stop_at = cfg.trainer.stop_at_step
            if stop_at is not None and global_step >= int(stop_at):
                save(si, done, opt, sched)
                stopped = True
            elif time.perf_counter() > deadline:
                save(si, done, opt, sched)
                stopped = True
                log(f"time limit of {limit} minutes reached; exporting what was trained.")
            elif every and done % every == 0 and done < steps:
                save(si, done, opt, sched)
            if stopped:
                break
        bar.close()
        if stopped:
            completed = False
            if cfg.trainer.stop_at_step is not None:
                log(f"stopped at global step {global_step} (trainer.stop_at_step); rerun to resume.")
                break
        log(f"stage {st.name}: {step + 1} steps, loss {sum(losses[-25:]) / max(1, len(losses[-25:])):.3f}")
        if not stopped:
            save(si, steps, opt, sched)  # the next stage starts from here on resume
        _export(adapter, model, tok, cfg, folder, parts)
        stage_dirs[st.name] = str(folder)
        if stopped:
            break
    final = out / "pipeline"
    if stage_dirs and not (stopped and cfg.trainer.stop_at_step is not None):
        last = list(stage_dirs.values())[-1]
        import shutil

        tmp = out / ".pipeline.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(last, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    with open(out / "train_log.json", "w") as f:
        json.dump({"losses": losses, "steps": global_step, "seconds": time.perf_counter() - t_start,
                   "stages": stage_dirs, "completed": completed}, f)
    log(f"pipelines: {stage_dirs}")
    return TrainResult(str(final), stage_dirs, global_step, time.perf_counter() - t_start, losses, completed,
                       str(ckpt) if ckpt is not None else None)


# ---- evaluation -----------------------------------------------------------------------------------------
def evaluate_spoken_qa(pipe, rows: list[dict], task: str = "answer", batch_size: int = 50, progress: bool = True,
                       latency_clips: int = 0, **gen) -> dict:
    """WER (task="transcribe") or answer accuracy (task="answer", also per question kind) of a pipeline on rows,
    with decoding cost: forwards and seconds per clip in batches, and optionally the median latency of
    `latency_clips` single-clip calls."""
    import statistics

    from tqdm.auto import tqdm

    from modalities.data.speech import answer_accuracy, normalize_text, word_error_rate

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
                               [p for r, p in zip(rows, preds) if r.get("kind", "all") == k]) for k in kinds
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
    res["examples"] = [{"ref": normalize_text(a), "pred": b} for a, b in zip(refs[:5], preds[:5])]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="spoken_qa_training", description="Train a spoken-QA pipeline from a recipe.")
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--print-config", action="store_true")
    a = ap.parse_args(argv)
    try:
        cfg = load_spoken_qa_config(a.config, a.overrides)
    except SpokenQAConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if a.print_config:
        print(OmegaConf.to_yaml(cfg))
        return 0
    train_spoken_qa(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())

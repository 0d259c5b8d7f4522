"""Captioning: a vision adapter (and optionally the backbone) trained on image-caption pairs.

    python train.py configs/caption_quickstart.yaml trainer.time_limit_minutes=3
    python train.py configs/caption_adapter.yaml model.init_from=runs/text_tiny/pipeline

Modules: ``adapter`` (``modalities.vision.VisionAdapter``: a timm trunk and a projector) and ``model`` (the
backbone, built from the ``model`` section or loaded from ``model.init_from`` and switched to the ``prefix``
layout). Stages name what they train with the parts ``projector`` (the adapter without its trunk),
``trunk`` (the adapter's timm trunk) and ``backbone`` (the model), or with parameter globs; the stages, not
``adapter.freeze_trunk`` (the adapter's initial state), decide what trains. A frozen trunk stays in eval
mode, so its BatchNorm statistics never move.

Sequences are [image prefix | prompt | caption + EOS up to gen_length]; the loss is the SFT masked-diffusion
loss (``latent.losses.sft_loss``) of the caption, the prefix and prompt never masked, with the ``prefix``
layout so that training matches exact-cache decoding. The images are preprocessed once when the task is
built; each step draws its rows, noise and (with an ``augment`` section) zoom/shift/flip/colour changes of
its images for the global batch from the step's generator. Stages may add ``align_weight`` times a
contrastive loss between the image prefix and the frozen sentence embeddings of the captions
(:mod:`pipelines.tasks.caption_align`, through the training-only ``align_head`` part), and a stage with
``caption_weight: 0`` pre-trains the adapter on that loss alone (no backbone forward). The export is a
``CaptioningPipeline`` folder with the recipe's decoding defaults; ``experiments/captioning.py`` measures it
on the evaluation splits with :func:`evaluate_captioner`.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import os
import time
from dataclasses import dataclass, field

import torch
from omegaconf import OmegaConf

from latent.training.config import ConfigError
from latent.training.task import Stage, StepLoss, Task, register_task, step_generator
from modalities.image_augment import ImageAugment, augment_images
from pipelines.tasks.common import (
    Decoding,
    adapter_keys,
    backbone_from_config,
    find_tokenizer_dir,
    sft_noise,
)

__all__ = ["CaptionTask", "Pairs", "load_pairs", "eval_splits", "encode_captions", "caption_loss",
           "evaluate_captioner"]

KINDS = ("scenes", "real", "jsonl")


@dataclass
class CaptionData:
    kind: str = "scenes"  # scenes (generated) | real (Tux Paint + emoji, built into data_dir) | jsonl
    num_train: int = 4000  # scenes; the evaluation splits hold a tenth as many
    image_size: int = 64  # scenes: rendered side
    data_dir: str = "data/real"  # real: where the splits are built on first use
    train: list[str] | None = None  # jsonl: index files of {"path", "caption"} (paths relative to the index)
    max_train: int | None = None
    # Evaluation splits (experiments/captioning.py): null = test and heldout for scenes, test for real; for
    # jsonl each entry is an index file.
    eval_splits: list[str] | None = None


@dataclass
class CaptionTokenizer:
    path: str | None = None  # a tokenizer file/folder; null = model.init_from's, else a BPE on the captions
    vocab_size: int = 512
    min_frequency: int = 1


@dataclass
class CaptionSpec:
    gen_length: int = 16  # caption tokens (EOS-padded; at least one EOS kept)
    prompt: str = ""  # text after the image, never masked


@dataclass
class CaptionAlign:  # the frozen sentence encoder of the align_weight stages
    encoder_path: str | None = None  # a local sentence-transformers folder; null = the installed all-MiniLM-L6-v2
    temperature: float = 0.07


@dataclass
class CaptionStage(Stage):
    caption_weight: float = 1.0  # the captioning loss; 0 = an adapter pre-training stage (no backbone forward)
    align_weight: float = 0.0  # contrastive alignment of the prefix with the captions' sentence embeddings


# ---- data -----------------------------------------------------------------------------------------
@dataclass
class Pairs:
    images: list  # PIL images or paths
    captions: list[str]
    attributes: list[dict] | None = None  # scenes: what each caption states
    paths: list[str] = field(default_factory=list)


def _read_index(index: str, limit: int | None = None) -> Pairs:
    base = os.path.dirname(os.path.abspath(index))
    images, caps, attrs = [], [], []
    with open(index, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            images.append(r["path"] if os.path.isabs(r["path"]) else os.path.join(base, r["path"]))
            caps.append(r["caption"])
            attrs.append(r.get("attributes"))
            if limit and len(images) >= limit:
                break
    if not images:
        raise ValueError(f"{index} lists no image-caption pairs.")
    return Pairs(images, caps, attrs if all(a is not None for a in attrs) else None, list(images))


def eval_splits(cfg) -> list[str]:
    """The evaluation splits of a recipe (``data.eval_splits``, or the kind's own)."""
    d = cfg.data
    if d.eval_splits is not None:
        return list(d.eval_splits)
    return {"scenes": ["test", "heldout"], "real": ["test"]}.get(d.kind, [])


def load_pairs(cfg, split: str, progress: bool = True) -> Pairs:
    """Image-caption pairs of a split: "train", or an evaluation split (see :func:`eval_splits`)."""
    d = cfg.data
    if d.kind == "scenes":
        from modalities.data.scenes import make_split, render_scene

        n = int(d.num_train) if split == "train" else max(1, int(d.num_train) // 10)
        if split == "train" and d.max_train:
            n = min(n, int(d.max_train))
        scenes = make_split(split, n, int(cfg.run.seed))
        return Pairs([render_scene(s, int(d.image_size)) for s in scenes], [s.caption for s in scenes],
                     [s.attributes() for s in scenes])
    if d.kind == "real":
        from modalities.data.real import build_real_splits

        index = os.path.join(d.data_dir, f"{split}.jsonl")
        if not os.path.exists(index):
            build_real_splits(d.data_dir, progress=progress)
        return _read_index(index, d.max_train if split == "train" else None)
    if d.kind == "jsonl":
        if split != "train":
            return _read_index(split)
        if not d.train:
            raise ConfigError("data.kind=jsonl needs data.train (index files of {\"path\", \"caption\"} lines)")
        parts = [_read_index(f, d.max_train) for f in d.train]
        return Pairs(sum((p.images for p in parts), []), sum((p.captions for p in parts), []), None,
                     sum((p.paths for p in parts), []))
    raise ConfigError(f"data.kind={d.kind!r} is not one of {', '.join(KINDS)}")


def encode_captions(tok, captions: list[str], gen_length: int) -> tuple[torch.LongTensor, int]:
    """Caption ids followed by EOS up to gen_length (at least one EOS kept); returns (ids, truncated)."""
    eos = tok.eos_token_id
    rows, cut = [], 0
    for ids in tok(list(captions), add_special_tokens=False)["input_ids"]:
        if len(ids) > gen_length - 1:
            ids, cut = ids[: gen_length - 1], cut + 1
        rows.append(ids + [eos] * (gen_length - len(ids)))
    return torch.tensor(rows, dtype=torch.long), cut


# ---- loss -----------------------------------------------------------------------------------------
def caption_loss(adapter, model, pixels, captions, prompt_ids, mask_token_id, t=None, noise=None, generator=None,
                 prefix=None):
    """SFT masked-diffusion loss of the captions [B, G] given the images (prefix) and the prompt ids [B, P];
    ``t`` [B] and ``noise`` [B, P + G] are the pre-drawn noise levels and mask draws (see sft_loss);
    ``prefix``: the adapter's output for ``pixels`` when the caller already has it."""
    from latent.losses import sft_loss

    prefix = adapter(pixels) if prefix is None else prefix
    seq = torch.cat([prompt_ids, captions], dim=1)
    b, plen = seq.shape[0], prompt_ids.shape[1]
    full_mask = None if bool(prefix.mask.all()) else prefix.attention_mask(num_tokens=seq.shape[1])

    def call(noisy, attention_mask=None, **kw):
        return model(noisy, attention_mask=full_mask, prefix_embeds=prefix.embeds,
                     prefix_length=prefix.length + plen)

    return sft_loss(call, seq, mask_token_id, prompt_lengths=torch.full((b,), plen, device=seq.device), t=t,
                    noise=noise, generator=generator)


# ---- the task -------------------------------------------------------------------------------------
def _part_aliases(trunk: str) -> dict[str, list[str]]:
    return {"projector": ["adapter.*", f"!adapter.{trunk}.*"], "trunk": [f"adapter.{trunk}.*"],
            "backbone": ["model.*"], "adapter": ["adapter.*"], "align_head": ["align_head.*"]}


@register_task("caption")
class CaptionTask(Task):
    sections = {"data": CaptionData, "tokenizer": CaptionTokenizer, "caption": CaptionSpec, "decoding": Decoding,
                "augment": ImageAugment, "align": CaptionAlign}
    free_sections = ("model", "adapter")
    stage_class = CaptionStage
    metric_fields = ("caption_loss", "align_loss")
    aliases = _part_aliases("trunk_model")  # VisionAdapter's trunk; build() reads the adapter's own
    pipeline_components = {"model": "model", "adapter": "vision_adapter"}
    defaults = {
        "model": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "max_position_embeddings": 64,
                  "attention_layout": "prefix"},
        "adapter": {"type": "vision", "backbone": "mobilenetv3_small_100", "image_size": 64, "projector": "mlp",
                    "freeze_trunk": True},
        "optim": {"weight_decay": 0.01, "beta2": 0.98, "warmup_steps": 20},
        "trainer": {"batch_size": 32, "log_every": 25},
    }

    @classmethod
    def section_keys(cls, section, user):
        if section == "model":
            return super().section_keys(section, user)
        return adapter_keys({"type": "vision", **user}, extra=("type",))

    @classmethod
    def check_config(cls, cfg):
        if cfg.data.kind not in KINDS:
            raise ConfigError(f"data.kind={cfg.data.kind!r} is not one of {', '.join(KINDS)}")
        if cfg.caption.gen_length < 2:
            raise ConfigError(f"caption.gen_length must be >= 2 (a caption and its EOS), got {cfg.caption.gen_length}")
        try:
            ImageAugment(**OmegaConf.to_container(cfg.augment)).check()
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if cfg.align.temperature <= 0:
            raise ConfigError(f"align.temperature must be > 0, got {cfg.align.temperature}")
        for i, st in enumerate(cfg.stages):
            cw, aw = float(st["caption_weight"]), float(st["align_weight"])
            if cw < 0 or aw < 0 or cw + aw == 0:
                raise ConfigError(f"stages.{i} ({st['name']}): caption_weight={cw} and align_weight={aw} must be >= 0 "
                                  "and not both 0")
        # Stage parts are checked here, before the data is built: a part name or a glob over the modules.
        parts = sorted(cls.aliases)
        for i, st in enumerate(cfg.stages):
            for key in ("train", "freeze"):
                for pat in st[key]:
                    head = pat.split(".")[0]
                    if pat in cls.aliases or any(fnmatch.fnmatchcase(m, head) for m in ("adapter", "model")):
                        continue
                    near = difflib.get_close_matches(pat, parts, n=1)
                    hint = f"; did you mean {near[0]!r}?" if near else ""
                    raise ConfigError(f"stages.{i}.{key} ({st['name']}): {pat!r} is neither a part ({', '.join(parts)}) "
                                      f"nor a parameter glob (adapter.*, model.*){hint}")

    def build(self):
        from tqdm.auto import tqdm

        from latent.data.tokenizer import load_tokenizer, train_tokenizer
        from latent.scheduler import MaskedDiffusionScheduler
        from modalities.base import create_adapter

        cfg, ctx = self.cfg, self.ctx
        if OmegaConf.is_missing(cfg.model, "init_from"):
            raise ConfigError("model.init_from is required by this recipe: a pipeline or backbone folder, e.g. "
                              "model.init_from=runs/text_tiny/pipeline")
        pairs = load_pairs(cfg, "train", progress=ctx.progress and ctx.is_main)
        # The tokenizer: given, the one of the backbone started from, or a BPE trained on the captions (by
        # the main process, which builds first; the others read it).
        tok_dir = cfg.tokenizer.path or find_tokenizer_dir(cfg.model.get("init_from"))
        if tok_dir:
            tok = load_tokenizer(tok_dir)
        else:
            tok_dir = ctx.run_dir / "tokenizer"
            if ctx.is_main:
                ctx.run_dir.mkdir(parents=True, exist_ok=True)
                corpus = ctx.run_dir / "captions.txt"
                corpus.write_text("\n".join(pairs.captions) + "\n", encoding="utf-8")
                tok = train_tokenizer(str(corpus), tok_dir, vocab_size=int(cfg.tokenizer.vocab_size),
                                      min_frequency=int(cfg.tokenizer.min_frequency))
            else:
                tok = load_tokenizer(tok_dir)
        self.tokenizer = tok
        model = backbone_from_config(cfg.model, tok, layouts=("prefix", "bidirectional"), switch_to="prefix")

        acfg = OmegaConf.to_container(cfg.adapter)
        width = model.config.hidden_size
        if acfg.get("hidden_size", width) != width:
            raise ConfigError(f"adapter.hidden_size={acfg['hidden_size']} must be the backbone's width ({width}); "
                              "leave it out")
        adapter = create_adapter({**acfg, "hidden_size": width})
        if adapter.trunk_attr:
            self.aliases = _part_aliases(adapter.trunk_attr)

        G = int(cfg.caption.gen_length)
        self.captions, cut = encode_captions(tok, pairs.captions, G)
        if cut:
            ctx.log(f"warning: {cut} of {len(pairs.captions)} captions are longer than caption.gen_length-1={G - 1} "
                    "tokens and were cut")
        prompt = cfg.caption.prompt or ""
        self.prompt_ids = torch.tensor(tok(prompt, add_special_tokens=False)["input_ids"] if prompt else [],
                                       dtype=torch.long)
        longest = adapter.num_prefix_tokens + len(self.prompt_ids) + G
        if longest > model.config.max_position_embeddings:
            raise ConfigError(f"{adapter.num_prefix_tokens} prefix tokens + the prompt ({len(self.prompt_ids)}) + "
                              f"caption.gen_length ({G}) exceed model.max_position_embeddings="
                              f"{model.config.max_position_embeddings}")
        self.preprocessor = pre = adapter.preprocessor
        images = tqdm(pairs.images, desc="preprocessing", unit="img", disable=not (ctx.progress and ctx.is_main))
        self.pixels = torch.stack([pre.one(im, i) for i, im in enumerate(images)])
        self.mask_id = int(model.config.mask_token_id)
        self.augment = ImageAugment(**OmegaConf.to_container(cfg.augment))
        modules = {"adapter": adapter, "model": model}
        if any(float(st["align_weight"]) > 0 for st in cfg.stages):
            from pipelines.tasks.caption_align import AlignHead, sentence_embeddings

            distinct = sorted(set(pairs.captions))
            group = {c: k for k, c in enumerate(distinct)}
            self.caption_groups = torch.tensor([group[c] for c in pairs.captions], dtype=torch.long)
            self.text_embeddings = sentence_embeddings(distinct, cfg.align.encoder_path)
            modules["align_head"] = AlignHead(width, self.text_embeddings.shape[1])
        dec = cfg.decoding
        self.scheduler = MaskedDiffusionScheduler(block_length=G, commit=dec.commit, threshold=float(dec.threshold),
                                                  cache=dec.cache)  # checks the decoding section now
        ctx.log(f"[caption] {len(self.captions)} training pairs, vocabulary {len(tok)}, "
                f"{adapter.num_prefix_tokens} prefix tokens per image")
        return modules

    def batch(self, step, stage):
        B = stage.batch_size or self.cfg.trainer.batch_size
        g = step_generator(self.ctx.seed, step)
        rows = torch.randint(0, len(self.captions), (B,), generator=g)
        t, noise = sft_noise(g, B, len(self.prompt_ids) + self.captions.shape[1])
        pre = self.preprocessor
        pixels = augment_images(self.pixels[rows], self.augment, g, pre.mean, pre.std)  # after the noise draws
        out = {"pixels": pixels, "captions": self.captions[rows], "prompt": self.prompt_ids.expand(B, -1), "t": t,
               "noise": noise}
        if float(stage.align_weight) > 0:
            groups = self.caption_groups[rows]
            out.update(groups=groups, text_embeddings=self.text_embeddings[groups])
        return out

    def loss(self, modules, batch, stage):
        b = {k: v.to(self.ctx.device) for k, v in batch.items()}
        cw, aw = float(stage.caption_weight), float(stage.align_weight)
        prefix = modules.adapter(b["pixels"])
        total, metrics = 0.0, {}
        if cw > 0:
            cap = caption_loss(modules.adapter, modules.model, b["pixels"], b["captions"], b["prompt"], self.mask_id,
                               t=b["t"], noise=b["noise"], prefix=prefix).loss
            total, metrics["caption_loss"] = total + cw * cap, float(cap.detach())
        if aw > 0:
            from pipelines.tasks.caption_align import contrastive_alignment_loss

            al = contrastive_alignment_loss(modules.align_head(prefix.embeds), b["text_embeddings"], b["groups"],
                                            float(self.cfg.align.temperature))
            total, metrics["align_loss"] = total + aw * al, float(al.detach())
        return StepLoss(total, metrics if aw > 0 else {})

    def export(self, modules, folder, stage):
        from pipelines.captioning import CaptioningPipeline

        pipe = CaptioningPipeline(modules.adapter, modules.model, self.tokenizer, self.scheduler,
                                  gen_length=int(self.cfg.caption.gen_length), prompt=self.cfg.caption.prompt or "")
        pipe.save_pretrained(str(folder))
        (folder / "training.json").write_text(json.dumps({"config": OmegaConf.to_container(self.cfg)}, indent=2))


# ---- evaluation -----------------------------------------------------------------------------------
def evaluate_captioner(pipe, pairs: Pairs, batch_size: int = 64, progress: bool = True, **gen) -> dict:
    """BLEU-4 / CIDEr (and attribute accuracy for scenes) of a pipeline on pairs, with decode speed."""
    from tqdm.auto import tqdm

    from modalities.data.metrics import caption_scores

    pipe.set_progress_bar_config(disable=True)
    preds, nfe, seconds = [], 0, 0.0
    for lo in tqdm(range(0, len(pairs.images), batch_size), desc="evaluating", unit="batch", disable=not progress):
        pix = pipe.vision_adapter.preprocess(pairs.images[lo : lo + batch_size])
        t = time.perf_counter()
        out = pipe(pixel_values=pix, **gen)
        seconds += time.perf_counter() - t
        preds += out.captions
        nfe += out.nfe
    res = caption_scores(preds, pairs.captions)
    if pairs.attributes is not None:
        from modalities.data.metrics import attribute_accuracy

        res["attributes"] = attribute_accuracy(preds, pairs.attributes)
    res.update(images=len(preds), images_per_second=len(preds) / seconds, forwards=nfe, predictions=preds)
    return res

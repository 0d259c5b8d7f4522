"""Training a captioner: a vision adapter (and optionally the backbone) on image-caption pairs.

    python train.py configs/caption_quickstart.yaml trainer.time_limit_minutes=3
    python -m pipelines.caption_training configs/caption_adapter.yaml model.init_from=runs/text_tiny/pipeline

The recipe's `stages` run in order; each names what it trains:
- stage 1 (`train: [projector]`): the adapter's projector only, timm trunk and backbone frozen;
- stage 2 (`train: [projector, trunk, backbone]`): everything, usually at a lower learning rate.
Sequences are [image prefix | prompt | caption + EOS padding to gen_length]; the loss is the SFT
masked-diffusion loss of `latent.losses.sft_loss` on the caption (the prefix and prompt are never
masked), with the backbone's `prefix` layout so that training matches exact-cache decoding.
The result is a `CaptioningPipeline` folder at <output_dir>/pipeline.
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

__all__ = ["DEFAULTS", "load_caption_config", "load_pairs", "train_captioner", "evaluate_captioner", "main"]

PARTS = ("projector", "trunk", "backbone")

DEFAULTS = OmegaConf.create(
    {
        "task": "caption",
        "run": {"name": "caption", "output_dir": "runs/${run.name}", "seed": 0},
        "data": {
            "kind": "scenes",  # scenes | real | jsonl
            "num_train": 4000,  # scenes
            "image_size": 64,  # scenes: rendered side
            "data_dir": "data/real",  # real: where the Tux Paint / emoji splits are built
            "train": None,  # jsonl: index file(s) with {"path", "caption"} (paths relative to the index)
            "max_train": None,
        },
        "tokenizer": {"path": None, "vocab_size": 512, "min_frequency": 1},
        "model": {
            "init_from": None,  # a pipeline or backbone folder whose DiffusionTransformer is loaded
            "hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": None,
            "max_position_embeddings": 64, "attention_layout": "prefix",
        },
        "adapter": {"type": "vision", "backbone": "mobilenetv3_small_100", "image_size": 64, "projector": "mlp",
                    "freeze_trunk": True},
        "caption": {"gen_length": 16, "prompt": ""},
        "stages": [{"name": "adapter", "steps": 200, "lr": 1.0e-3, "train": ["projector"]}],
        "optim": {"weight_decay": 0.01, "warmup_steps": 20, "min_lr_ratio": 0.1, "grad_clip": 1.0},
        "trainer": {"batch_size": 32, "log_every": 25, "time_limit_minutes": None, "threads": None},
        "decoding": {"commit": "threshold", "threshold": 0.9, "cache": "auto"},
    }
)


class CaptionConfigError(ValueError):
    pass


def _check_key(section: str, keys: list, label: str) -> None:
    if section not in DEFAULTS:
        raise CaptionConfigError(f"{label}: unknown section {section!r}; known: {sorted(DEFAULTS)}.")
    if section in ("adapter", "model", "stages") or not isinstance(DEFAULTS[section], DictConfig):
        return  # adapter/model keys are checked by the classes they build; stages is a list
    extra = sorted(set(map(str, keys)) - set(DEFAULTS[section]))
    if extra:
        raise CaptionConfigError(f"{label}: unknown keys {extra} in {section!r}; known: {sorted(DEFAULTS[section])}.")


def load_caption_config(path: str | os.PathLike | None = None, overrides=()) -> DictConfig:
    """Defaults <- recipe YAML <- dot-list overrides; unknown keys are refused with the known ones named."""
    user = OmegaConf.load(path) if path else OmegaConf.create({})
    for section, value in user.items():
        _check_key(section, list(value) if isinstance(value, DictConfig) else [], f"recipe {path}")
    cfg = OmegaConf.merge(DEFAULTS, user)
    for item in overrides:
        key, sep, raw = str(item).partition("=")
        if not sep:
            raise CaptionConfigError(f"override {item!r} must look like key=value, e.g. trainer.batch_size=16.")
        parts = key.split(".")
        _check_key(parts[0], parts[1:2], "overrides")
        value = OmegaConf.from_dotlist([f"v={raw}"]).v  # parsed like any dot-list value
        OmegaConf.update(cfg, key, value, force_add=parts[0] in ("adapter", "model", "stages"))
    if cfg.get("task") != "caption":
        raise CaptionConfigError(f"task must be 'caption', got {cfg.get('task')!r}.")
    for st in cfg.stages:
        bad = [p for p in st.get("train", []) if p not in PARTS]
        if bad or not st.get("train"):
            raise CaptionConfigError(f"stage {st.get('name')!r}: train must list some of {PARTS}, got {list(st.get('train', []))}.")
        if int(st.get("steps", 0)) < 0:
            raise CaptionConfigError(f"stage {st.get('name')!r}: steps must be >= 0.")
    return cfg


# ---- data -----------------------------------------------------------------------------------------
@dataclass
class Pairs:
    images: list  # PIL images or paths
    captions: list[str]
    attributes: list[dict] | None = None
    paths: list[str] = field(default_factory=list)


def _read_index(index: str, limit: int | None = None) -> Pairs:
    base = os.path.dirname(os.path.abspath(index))
    images, caps, attrs = [], [], []
    with open(index, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            p = r["path"] if os.path.isabs(r["path"]) else os.path.join(base, r["path"])
            images.append(p)
            caps.append(r["caption"])
            attrs.append(r.get("attributes"))
            if limit and len(images) >= limit:
                break
    if not images:
        raise ValueError(f"{index} lists no image-caption pairs.")
    return Pairs(images, caps, attrs if all(a is not None for a in attrs) else None, list(images))


def load_pairs(cfg: DictConfig, split: str) -> Pairs:
    """Image-caption pairs of a split: "train", or for evaluation "test" / "heldout" (scenes)."""
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
            build_real_splits(d.data_dir, progress=True)
        return _read_index(index, d.max_train if split == "train" else None)
    if d.kind == "jsonl":
        files = d.train if split == "train" else d.get(split)
        if not files:
            raise ValueError(f"data.{split} names no index file.")
        files = [files] if isinstance(files, str) else list(files)
        parts = [_read_index(f) for f in files]
        return Pairs(sum((p.images for p in parts), []), sum((p.captions for p in parts), []), None)
    raise CaptionConfigError(f"data.kind must be scenes, real or jsonl, got {d.kind!r}.")


def encode_captions(tok, captions: list[str], gen_length: int) -> tuple[torch.LongTensor, int]:
    """Caption ids followed by EOS up to gen_length (at least one EOS kept); returns (ids, truncated)."""
    eos = tok.eos_token_id
    rows, cut = [], 0
    for ids in tok(list(captions), add_special_tokens=False)["input_ids"]:
        if len(ids) > gen_length - 1:
            ids, cut = ids[: gen_length - 1], cut + 1
        rows.append(ids + [eos] * (gen_length - len(ids)))
    return torch.tensor(rows, dtype=torch.long), cut


# ---- model pieces ---------------------------------------------------------------------------------
def _tokenizer(cfg, captions, out_dir: Path):
    from latent.data.tokenizer import load_tokenizer, train_tokenizer

    if cfg.tokenizer.path:
        return load_tokenizer(cfg.tokenizer.path)
    if cfg.model.init_from:
        for sub in ("tokenizer", ""):
            p = Path(cfg.model.init_from) / sub
            if (p / "tokenizer.json").exists() or (p / "tokenizer_config.json").exists():
                return load_tokenizer(p)
    corpus = out_dir / "captions.txt"
    corpus.write_text("\n".join(captions) + "\n", encoding="utf-8")
    return train_tokenizer(str(corpus), out_dir / "tokenizer", vocab_size=int(cfg.tokenizer.vocab_size),
                           min_frequency=int(cfg.tokenizer.min_frequency))


def _backbone(cfg, tok):
    from latent.backbone import DiffusionTransformer

    m = OmegaConf.to_container(cfg.model, resolve=True)
    init = m.pop("init_from", None)
    if init:
        folder = Path(init) / "model" if (Path(init) / "model" / "config.json").exists() else Path(init)
        model = DiffusionTransformer.from_pretrained(folder)
        if model.config.attention_layout not in ("prefix", "bidirectional"):
            raise CaptionConfigError(
                f"{folder} has attention_layout={model.config.attention_layout!r}; captioning needs 'prefix'."
            )
        if model.config.attention_layout != "prefix":
            model.register_to_config(attention_layout="prefix")  # same weights; image + prompt become a prefix
        if model.config.vocab_size < len(tok):
            raise CaptionConfigError(f"{folder} has vocab_size={model.config.vocab_size} < {len(tok)} tokens.")
        return model
    m = {k: v for k, v in m.items() if v is not None}
    return DiffusionTransformer(vocab_size=len(tok), mask_token_id=tok.mask_token_id, **m)


def _set_trainable(adapter, model, parts) -> list[torch.nn.Parameter]:
    for p in adapter.parameters():
        p.requires_grad_(False)
    if "projector" in parts:
        for name, p in adapter.named_parameters():
            if not name.startswith(adapter.trunk_attr + "."):
                p.requires_grad_(True)
    if "trunk" in parts:
        adapter.unfreeze_trunk()
    else:
        adapter.freeze_trunk()
    model.requires_grad_("backbone" in parts)
    return [p for p in (*adapter.parameters(), *model.parameters()) if p.requires_grad]


def caption_loss(adapter, model, pixels, ids, prompt_ids, mask_token_id, generator=None):
    """SFT masked-diffusion loss of the captions given the images (prefix) and a shared prompt."""
    from latent.losses import sft_loss

    prefix = adapter(pixels)
    b = ids.shape[0]
    seq = torch.cat([prompt_ids.expand(b, -1), ids], dim=1) if prompt_ids.numel() else ids
    plen = prompt_ids.shape[1]
    full_mask = None if bool(prefix.mask.all()) else prefix.attention_mask(num_tokens=seq.shape[1])

    def call(noisy, attention_mask=None, **kw):
        return model(noisy, attention_mask=full_mask, prefix_embeds=prefix.embeds,
                     prefix_length=prefix.length + plen)

    return sft_loss(call, seq, mask_token_id, prompt_lengths=torch.full((b,), plen), generator=generator)


@dataclass
class TrainResult:
    pipeline_dir: str
    steps: int
    seconds: float
    losses: list[float]
    stopped_early: bool


def train_captioner(cfg: DictConfig, log=None) -> TrainResult:
    from tqdm.auto import tqdm

    from latent.scheduler import MaskedDiffusionScheduler
    from modalities.base import create_adapter
    from pipelines.captioning import CaptioningPipeline

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

    pairs = load_pairs(cfg, "train")
    tok = _tokenizer(cfg, pairs.captions, out)
    model = _backbone(cfg, tok)
    adapter_cfg = OmegaConf.to_container(cfg.adapter, resolve=True)
    adapter_cfg["hidden_size"] = model.config.hidden_size
    adapter = create_adapter(adapter_cfg)
    gen_length = int(cfg.caption.gen_length)
    ids, cut = encode_captions(tok, pairs.captions, gen_length)
    if cut:
        log(f"warning: {cut} of {len(ids)} captions are longer than gen_length-1={gen_length - 1} tokens and were cut.")
    prompt = cfg.caption.prompt or ""
    prompt_ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]], dtype=torch.long) if prompt else \
        torch.zeros(1, 0, dtype=torch.long)
    pre = adapter.preprocessor
    pixels = torch.stack([pre.one(im, i) for i, im in enumerate(tqdm(pairs.images, desc="preprocessing", unit="img",
                                                                        disable=None))])
    n_params = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in adapter.parameters())
    log(f"{len(ids)} training pairs, vocabulary {len(tok)}, {n_params / 1e6:.2f} M parameters "
        f"({adapter.num_prefix_tokens} prefix tokens per image).")

    g = torch.Generator().manual_seed(int(cfg.run.seed))
    bs = int(cfg.trainer.batch_size)
    losses, total_steps, stopped = [], 0, False
    active = [st for st in cfg.stages if int(st.steps) > 0 and st.get("enabled", True) is not False]
    for k, st in enumerate(active):
        horizon = {"steps": int(st.steps)}  # shrunk below when a time limit cannot fit every step
        later_steps = sum(int(s.steps) for s in active[k + 1 :])
        params = _set_trainable(adapter, model, list(st.train))
        adapter.train()
        model.train(True)
        opt = torch.optim.AdamW(params, lr=float(st.lr), weight_decay=float(cfg.optim.weight_decay), betas=(0.9, 0.98))
        warm = int(cfg.optim.warmup_steps)

        def lr_at(step, horizon=horizon, warm=warm):
            if step < warm:
                return (step + 1) / warm
            prog = min(1.0, (step - warm) / max(1, horizon["steps"] - warm))
            return cfg.optim.min_lr_ratio + (1 - cfg.optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        bar = tqdm(total=horizon["steps"], desc=f"stage {st.name} ({'+'.join(st.train)})", unit="step", disable=None)
        step, t_stage = 0, time.perf_counter()
        while step < horizon["steps"]:
            idx = torch.randint(0, len(ids), (bs,), generator=g)
            loss = caption_loss(adapter, model, pixels[idx], ids[idx], prompt_ids, tok.mask_token_id, g).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, float(cfg.optim.grad_clip))
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            total_steps += 1
            step += 1
            bar.update(1)
            if step % int(cfg.trainer.log_every) == 0:
                bar.set_postfix(loss=f"{sum(losses[-25:]) / len(losses[-25:]):.3f}")
            if step == 10 and deadline < math.inf:
                # Fit the schedule to the time limit, so the learning rate still decays to its end:
                # this stage gets its share (by planned steps) of the time that is left.
                per_step = (time.perf_counter() - t_stage) / step
                left = horizon["steps"] - step
                share = (deadline - time.perf_counter()) * left / max(1, left + later_steps)
                fit = step + max(0, int(share / per_step))
                if fit < horizon["steps"]:
                    log(f"stage {st.name}: {horizon['steps']} steps do not fit the time limit at {per_step:.2f} s/step; "
                        f"running {fit}.")
                    horizon["steps"] = fit
                    bar.total = fit
                    bar.refresh()
            if time.perf_counter() > deadline:
                stopped = True
                break
        bar.close()
        log(f"stage {st.name}: {step} steps, loss {sum(losses[-25:]) / max(1, len(losses[-25:])):.3f}")
        if stopped:
            log(f"time limit of {limit} minutes reached; exporting what was trained.")
            break

    adapter.eval()
    model.eval()
    adapter.freeze_trunk()
    model.requires_grad_(False)
    dec = cfg.decoding
    scheduler = MaskedDiffusionScheduler(block_length=gen_length, commit=dec.commit, threshold=float(dec.threshold),
                                         cache=dec.cache)
    pipe = CaptioningPipeline(adapter, model, tok, scheduler, gen_length=gen_length, prompt=prompt)
    pipe_dir = out / "pipeline"
    pipe.save_pretrained(str(pipe_dir))
    with open(out / "train_log.json", "w") as f:
        json.dump({"losses": losses, "steps": total_steps, "seconds": time.perf_counter() - t_start}, f)
    log(f"pipeline saved to {pipe_dir}")
    return TrainResult(str(pipe_dir), total_steps, time.perf_counter() - t_start, losses, stopped)


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
        from modalities.data.scenes import attribute_accuracy

        res["attributes"] = attribute_accuracy(preds, pairs.attributes)
    res.update(images=len(preds), images_per_second=len(preds) / seconds, forwards=nfe, predictions=preds)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="caption_training", description="Train a captioner from a recipe.")
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--print-config", action="store_true")
    a = ap.parse_args(argv)
    try:
        cfg = load_caption_config(a.config, a.overrides)
    except CaptionConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if a.print_config:
        print(OmegaConf.to_yaml(cfg))
        return 0
    train_captioner(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())

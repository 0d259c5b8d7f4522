"""Text: masked-diffusion pre-training, SFT, block diffusion (BD3-LM) and the autoregressive baseline.

    python train.py configs/text_tiny.yaml trainer.max_steps=200 model.hidden_size=256

Data: the built-in English corpus (built into ``data.corpus_dir`` on first use, with a BPE tokenizer) or any
txt/jsonl files and any local HF tokenizer; ``data.format: sft`` reads prompt/answer pairs, for ``sft``,
``block_diffusion`` and ``causal`` alike (the prompt conditions, only the answer is a target). Objectives (``objective.name``): ``mdm`` (LLaDA / MDLM),
``sft`` (prompt never masked), ``block_diffusion`` ([noisy | clean] in one pass, block_causal layout),
``causal`` (next-token loss, causal layout). Evaluation: the validation bound in bits per token (an upper
bound on the NLL for the diffusion objectives, the exact NLL for AR: comparable across objectives). Adaptation of an
autoregressive backbone (``model.init_from`` a causal run or a converted model, the section's layout keys
switching it to ``bidirectional`` / ``block_causal`` with ``logit_shift``): ``objective.anneal_steps``
anneals the mdm attention from causal to bidirectional (:func:`latent.losses.annealed_attention_mask`);
``complementary``, ``ar_weight``, ``block_curriculum`` and ``certainty_weight`` (dParallel's certainty term on
the data's tokens) extend block diffusion. Export:
``<run>/pipeline`` holds the backbone (``model/``), the tokenizer and ``training.json``; for the diffusion
objectives it is a ``TextDiffusionPipeline`` folder, and samples of it are written to ``samples.txt``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from latent.losses import (
    annealed_attention_mask,
    block_diffusion_loss,
    causal_lm_loss,
    masked_diffusion_loss,
    sft_loss,
)
from latent.schedules import sample_times
from latent.training.config import ConfigError
from latent.training.evaluate import validation_bound
from latent.training.task import StepLoss, Task, register_task, step_generator

__all__ = ["TextTask", "sample_texts"]


def _prompt_mask(batch: dict, ids: torch.Tensor) -> torch.Tensor | None:
    """[B, N] True on each SFT row's prompt (its first ``plens`` tokens); None for packed text."""
    if "plens" not in batch:
        return None
    return torch.arange(ids.shape[1], device=ids.device)[None] < batch["plens"].to(ids.device)[:, None]

# model-section keys that may change a backbone loaded from model.init_from (the weights stay valid)
_LAYOUT_KEYS = ("attention_layout", "block_size", "block_alignment", "logit_shift", "attention_backend")
_LAYOUT_FOR = {"causal": ("causal",), "block_diffusion": ("block_causal",), "mdm": ("bidirectional", "prefix"),
               "sft": ("bidirectional", "prefix")}


@dataclass
class TextData:
    format: str = "text"  # text: packed documents | sft: prompt/answer pairs
    corpus: str | None = "english"  # built-in corpus built into corpus_dir when the files are not given
    corpus_dir: str = "data/english"
    corpus_max_docs: int | None = None  # cap per source (quick builds)
    train_files: list[str] | None = None  # txt/jsonl; null = the built-in corpus's split
    valid_files: list[str] | None = None
    text_key: str = "text"
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    seq_len: int = 128


@dataclass
class TextTokenizer:
    path: str | None = None  # tokenizer.json or a local HF tokenizer folder; null = train one
    train_dir: str = "${data.corpus_dir}/tokenizer-bpe${tokenizer.vocab_size}"
    vocab_size: int = 4096
    train_max_chars: int = 5_000_000


@dataclass
class Objective:
    name: str = "mdm"  # mdm | sft | block_diffusion | causal
    schedule: str = "linear"
    eps: float = 1e-3
    low_discrepancy: bool = True
    per_block_t: bool = True  # block_diffusion: one time per block
    # AR-to-diffusion adaptation (model.init_from a causal backbone):
    anneal_steps: int = 0  # mdm: causal -> bidirectional attention over these steps (0 = the layout's mask)
    complementary: bool = False  # block_diffusion: also train each row on the complement of its mask
    ar_weight: float = 0.0  # block_diffusion: weight of an auxiliary next-token loss on the clean sequence
    block_curriculum: list[int] | None = None  # block_diffusion: smaller training block sizes first, ...
    curriculum_steps: int = 0  # ... each for this many steps, then model.block_size
    certainty_weight: float = 0.0  # block_diffusion: dParallel's certainty term (entropy where already right)
    certainty_temperature: float = 0.5  # ... of the softmax whose entropy it lowers


@dataclass
class TextEval:
    valid_sequences: int = 64
    batch_size: int = 16
    elbo_samples: int = 8
    final: bool = True
    num_samples: int = 4  # text samples printed and saved at the end (0 disables)
    sample_length: int = 64
    sample_steps: int = 64
    sample_block_length: int = 32
    temperature: float = 0.0
    prompts: list[str] = field(default_factory=lambda: ["The", "A man", "What does \"love\" mean?", "To be"])


def prepare_data(cfg, is_main: bool = True):
    """Resolve the data files (building the built-in corpus if needed) and the tokenizer."""
    from latent.data.stream import check_files
    from latent.data.tokenizer import load_tokenizer, train_tokenizer

    d = cfg.data
    corpus_names = ("sft_train.jsonl", "sft_valid.jsonl") if d.format == "sft" else ("train.jsonl", "valid.jsonl")
    if d.train_files is None or d.valid_files is None:
        if d.corpus is None:
            raise ConfigError("set data.train_files and data.valid_files (or data.corpus: english)")
        if d.corpus != "english":
            raise ConfigError(f"data.corpus={d.corpus!r} is unknown; the built-in corpus is 'english'")
        if is_main:
            from latent.data.corpus import build_corpus

            build_corpus(d.corpus_dir, max_docs=d.corpus_max_docs, progress=cfg.trainer.progress)
    train_files = list(d.train_files) if d.train_files is not None else [str(Path(d.corpus_dir) / corpus_names[0])]
    valid_files = list(d.valid_files) if d.valid_files is not None else [str(Path(d.corpus_dir) / corpus_names[1])]
    train_files = [str(p) for p in check_files(train_files, "training")]
    valid_files = [str(p) for p in check_files(valid_files, "validation")]

    t = cfg.tokenizer
    if t.path:
        return train_files, valid_files, load_tokenizer(t.path)
    # The tokenizer is trained on documents: the built-in corpus's train.jsonl (for the SFT recipe too, so
    # pre-training and fine-tuning share it), or the text training files.
    if d.train_files is None:
        tok_files, key = [str(check_files([Path(d.corpus_dir) / "train.jsonl"], "tokenizer training")[0])], "text"
    elif d.format == "text":
        tok_files, key = train_files, d.text_key
    else:
        raise ConfigError("SFT on your own files needs tokenizer.path (the tokenizer of the model it tunes)")
    folder = Path(t.train_dir)
    args_file = folder / "training_args.json"
    want = {"files": tok_files, "vocab_size": t.vocab_size, "max_chars": t.train_max_chars, "text_key": key}
    have = json.loads(args_file.read_text()) if args_file.is_file() else None
    if have is not None and any(have.get(k) != v for k, v in want.items()):
        raise ConfigError(
            f"tokenizer.train_dir={str(folder)!r} holds a tokenizer trained with other settings "
            f"({ {k: have.get(k) for k in want} }); use it with tokenizer.path={str(folder)!r}, "
            "or give another tokenizer.train_dir"
        )
    if have is None and is_main:
        train_tokenizer(tok_files, folder, vocab_size=t.vocab_size, text_key=key, max_chars=t.train_max_chars)
    return train_files, valid_files, load_tokenizer(folder)


@register_task("text")
class TextTask(Task):
    sections = {"data": TextData, "tokenizer": TextTokenizer, "objective": Objective, "eval": TextEval}
    free_sections = ("model",)
    aliases = {"backbone": ["model.*"]}
    eval_fields = ("val_bits_per_token", "val_nll_per_token", "val_tokens")

    @classmethod
    def check_config(cls, cfg):
        for key, choices in {"data.format": ("text", "sft"),
                             "objective.name": ("mdm", "sft", "block_diffusion", "causal")}.items():
            if OmegaConf.select(cfg, key) not in choices:
                raise ConfigError(f"{key}={OmegaConf.select(cfg, key)!r} is not one of {', '.join(choices)}")
        for key in ("data.seq_len", "eval.elbo_samples", "eval.batch_size"):
            if OmegaConf.select(cfg, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {OmegaConf.select(cfg, key)}")
        oc = cfg.objective
        if oc.anneal_steps < 0 or oc.curriculum_steps < 0 or oc.ar_weight < 0 or oc.certainty_weight < 0:
            raise ConfigError("objective.anneal_steps, curriculum_steps, ar_weight and certainty_weight must be >= 0")
        if oc.certainty_temperature <= 0:
            raise ConfigError(f"objective.certainty_temperature must be > 0, got {oc.certainty_temperature}")
        if oc.anneal_steps and oc.name != "mdm":
            raise ConfigError(f"objective.anneal_steps is for objective.name='mdm', not {oc.name!r}")
        if (oc.complementary or oc.ar_weight or oc.block_curriculum or oc.certainty_weight) and oc.name != "block_diffusion":
            raise ConfigError("objective.complementary / ar_weight / block_curriculum / certainty_weight are for "
                              "block_diffusion")
        if oc.block_curriculum and not oc.curriculum_steps:
            raise ConfigError("objective.block_curriculum needs objective.curriculum_steps > 0")
        for size in oc.block_curriculum or ():
            if size < 1 or cfg.data.seq_len % size:
                raise ConfigError(f"objective.block_curriculum size {size} must divide data.seq_len={cfg.data.seq_len}")
        if cfg.objective.name == "sft" and cfg.data.format != "sft":
            raise ConfigError(f"objective.name='sft' needs data.format='sft' (got {cfg.data.format!r})")
        if cfg.data.format == "sft" and cfg.objective.name == "mdm":
            raise ConfigError("data.format='sft' trains with objective.name 'sft' (bidirectional), "
                              "'block_diffusion' or 'causal' (the prompt is never a target); got 'mdm'")

    # ---- build ----------------------------------------------------------------------------------
    def build(self):
        from latent.data.stream import LineReader, PackedTextStream, SFTStream, load_sequences
        from latent.training.models import build_model

        cfg, ctx = self.cfg, self.ctx
        self.train_files, self.valid_files, self.tokenizer = prepare_data(cfg, ctx.is_main)
        d = cfg.data
        reader = LineReader(self.train_files, loop=False, what="training")
        try:
            if reader.next_line() is None:
                raise ValueError(f"the training corpus is empty: {', '.join(self.train_files)}")
        finally:
            reader.close()
        self.objective = cfg.objective.name
        self.eos = self.tokenizer.eos_token_id
        if d.format == "sft":
            self.stream = SFTStream(self.train_files, self.tokenizer, d.seq_len, d.prompt_key, d.answer_key)
            vstream = SFTStream(self.valid_files, self.tokenizer, d.seq_len, d.prompt_key, d.answer_key,
                                loop=False, what="validation")
            self.val_ids, self.val_plens = vstream.next_batch(cfg.eval.valid_sequences)
            vstream.close()
            if len(self.val_ids) == 0:
                raise ValueError(f"no usable validation pair in {self.valid_files}")
        else:
            self.stream = PackedTextStream(self.train_files, self.tokenizer, d.seq_len, text_key=d.text_key)
            self.val_ids = load_sequences(self.valid_files, self.tokenizer, d.seq_len, cfg.eval.valid_sequences,
                                          text_key=d.text_key)
            self.val_plens = None
        model = self._init_model() if cfg.model.get("init_from") else build_model(cfg.model, self.tokenizer)
        self._check_model(model)
        self.mask_id = int(model.config.mask_token_id)
        self.block_size = getattr(model.config, "block_size", None)
        if ctx.is_main:
            ctx.run_dir.mkdir(parents=True, exist_ok=True)
            self.tokenizer.save_pretrained(str(ctx.run_dir / "tokenizer"))
        return {"model": model}

    def _init_model(self):
        """The backbone saved at ``model.init_from`` (a run, a pipeline or a converted model folder): its
        architecture, with the section's layout keys applied (same weights: a causal AR backbone becomes a
        bidirectional or block_causal one, ``logit_shift`` keeping its head's next-token meaning). Any
        other key the section sets must agree with the saved model."""
        from pipelines.tasks.common import load_backbone

        section = {k: v for k, v in OmegaConf.to_container(self.cfg.model).items() if v is not None}
        model = load_backbone(section["init_from"])
        saved = dict(model.config)
        layout = {k: section[k] for k in _LAYOUT_KEYS if k in section}
        clash = {k: (v, saved[k]) for k, v in section.items()
                 if k not in (*_LAYOUT_KEYS, "name", "preset", "init_from") and k in saved and saved[k] != v}
        if clash:
            raise ConfigError(
                "model.init_from fixes the architecture; these model keys disagree with it (given, saved): "
                f"{clash}. Drop them (and model.preset), or train from scratch without init_from"
            )
        if layout:
            model.register_to_config(**layout)
        if len(self.tokenizer) > model.config.vocab_size:
            raise ConfigError(f"model.init_from has vocab_size={model.config.vocab_size} < the tokenizer's "
                              f"{len(self.tokenizer)} tokens")
        return model

    def _check_model(self, model) -> None:
        mc, n = model.config, self.cfg.data.seq_len
        layout = mc.attention_layout
        allowed = _LAYOUT_FOR[self.objective]
        if layout not in allowed:
            raise ConfigError(f"objective.name={self.objective!r} needs model.attention_layout in {allowed}, got {layout!r}")
        if n > mc.max_position_embeddings:
            raise ConfigError(f"data.seq_len={n} exceeds model.max_position_embeddings={mc.max_position_embeddings}; "
                              "lower data.seq_len or raise model.max_position_embeddings")
        if self.objective == "block_diffusion" and n % mc.block_size:
            raise ConfigError(f"data.seq_len={n} must be a multiple of model.block_size={mc.block_size}")
        if len(self.tokenizer) > mc.vocab_size:
            raise ConfigError(f"the tokenizer has {len(self.tokenizer)} tokens, model.vocab_size={mc.vocab_size}")

    # ---- steps ----------------------------------------------------------------------------------
    def batch(self, step, stage):
        B = stage.batch_size or self.cfg.trainer.batch_size
        if self.cfg.data.format == "sft":
            ids, plens = self.stream.next_batch(B)
        else:
            ids, plens = self.stream.next_sequences(B), None
        if len(ids) < B:
            raise RuntimeError("the training stream ran dry")  # cannot happen while looping
        g = step_generator(self.ctx.seed, step)
        N = ids.shape[1]
        oc = self.cfg.objective
        if self.objective == "block_diffusion" and oc.per_block_t:
            nb = -(-N // self._train_block_size(step))
            t = sample_times(B * nb, g, oc.low_discrepancy).view(B, nb)
        else:
            t = sample_times(B, g, oc.low_discrepancy)
        out = {"ids": ids, "t": t, "noise": torch.rand(B, N, generator=g), "step": step}
        if plens is not None:
            out["plens"] = plens
        return out

    def _train_block_size(self, step: int) -> int:
        """Block size of the training step: objective.block_curriculum[k] during the k-th span of
        curriculum_steps steps, then the model's."""
        sizes, span = self.cfg.objective.block_curriculum or [], self.cfg.objective.curriculum_steps
        k = step // span if span else len(sizes)
        return int(sizes[k]) if k < len(sizes) else self.block_size

    def count(self, batch):
        return int(batch["ids"].numel())

    def loss(self, modules, batch, stage):
        model, oc, dev = modules.model, self.cfg.objective, self.ctx.device
        ids, t, noise = batch["ids"].to(dev), batch["t"].to(dev), batch["noise"].to(dev)
        common = dict(schedule=oc.schedule, eps=oc.eps, t=t, noise=noise)
        if self.objective == "mdm":
            mask = None
            if oc.anneal_steps:
                mask = annealed_attention_mask(ids.shape[1], batch["step"] / oc.anneal_steps, device=dev)
            out = masked_diffusion_loss(model, ids, self.mask_id, model_mask=mask, **common)
        elif self.objective == "sft":
            out = sft_loss(model, ids, self.mask_id, prompt_lengths=batch["plens"].to(dev), **common)
        elif self.objective == "block_diffusion":
            out = block_diffusion_loss(model, ids, self.mask_id, self._train_block_size(batch["step"]),
                                       per_block_t=oc.per_block_t, complementary=oc.complementary,
                                       ar_weight=oc.ar_weight, prompt_mask=_prompt_mask(batch, ids),
                                       certainty_weight=oc.certainty_weight,
                                       certainty_temperature=oc.certainty_temperature, **common)
        else:
            out = causal_lm_loss(model, ids, bos_token_id=self.eos, prompt_mask=_prompt_mask(batch, ids))
        return StepLoss(out.loss)

    def evaluate(self, modules, step):
        ec, ctx = self.cfg.eval, self.ctx
        if step == self.cfg.trainer.max_steps and not ec.final:
            return {}
        res = validation_bound(
            modules.model, self.val_ids, self.objective, self.mask_id, self.eos, num_samples=ec.elbo_samples,
            batch_size=ec.batch_size, schedule=self.cfg.objective.schedule, prompt_lengths=self.val_plens,
            seed=ctx.seed, rank=ctx.rank, world_size=ctx.world_size, device=ctx.device, autocast=ctx.autocast,
            reduce=ctx.reduce, block_size=self.block_size,
        )
        return {"val_bits_per_token": res["bits_per_token"], "val_nll_per_token": res["nll_per_token"],
                "val_tokens": res["tokens"]}

    def state_dict(self):
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state):
        if state.get("stream") is not None:
            self.stream.load_state_dict(state["stream"])

    def close(self):
        self.stream.close()

    # ---- export ---------------------------------------------------------------------------------
    def export(self, modules, folder, stage):
        model = modules.model
        training = {"objective": self.objective, "config": OmegaConf.to_container(self.cfg)}
        if self.objective == "causal":  # no diffusion pipeline: the backbone and its tokenizer
            model.save_pretrained(str(folder / "model"))
            self.tokenizer.save_pretrained(str(folder / "tokenizer"))
        else:
            from latent.scheduler import MaskedDiffusionScheduler
            from pipelines.text import TextDiffusionPipeline

            block = self.block_size if self.objective == "block_diffusion" else self.cfg.eval.sample_block_length
            pipe = TextDiffusionPipeline(model=model, tokenizer=self.tokenizer,
                                         scheduler=MaskedDiffusionScheduler(block_length=block))
            pipe.save_pretrained(str(folder))
        (folder / "training.json").write_text(json.dumps(training, indent=2))

    def after_export(self, folder):
        """Samples of the exported model loaded back from disk (so the export itself is exercised)."""
        ec = self.cfg.eval
        if ec.num_samples <= 0:
            return {}
        prompts = list(ec.prompts)[: ec.num_samples]
        prompts += [""] * (ec.num_samples - len(prompts))
        out = sample_texts(folder, prompts, gen_length=ec.sample_length, steps=ec.sample_steps,
                           block_length=ec.sample_block_length, temperature=ec.temperature, seed=self.ctx.seed,
                           device=self.ctx.device)
        with open(self.ctx.run_dir / "samples.txt", "w") as f:
            for s in out:
                f.write(f"[{s['prompt']}] {s['text']}\n")
        return {"samples": out}


@torch.no_grad()
def sample_texts(folder, prompts, gen_length: int = 64, steps: int = 64, block_length: int = 32,
                 temperature: float = 0.0, seed: int = 0, device=None) -> list[dict]:
    """One continuation per prompt from an exported text folder: the text pipeline for the diffusion
    objectives, the autoregressive decoder for a causal backbone. Each prompt follows an EOS (documents
    follow an EOS in training), so an empty prompt is allowed."""
    from latent.backbone import DiffusionTransformer
    from latent.data.tokenizer import load_tokenizer
    from latent.sampling import autoregressive_generate

    folder = Path(folder)
    pipe = None
    if (folder / "model_index.json").is_file():
        from pipelines.text import TextDiffusionPipeline

        pipe = TextDiffusionPipeline.from_pretrained(str(folder)).to(device or "cpu")
        pipe.set_progress_bar_config(disable=True)
        model, tokenizer = pipe.model, pipe.tokenizer
    else:
        model = DiffusionTransformer.from_pretrained(str(folder / "model")).to(device or "cpu")
        tokenizer = load_tokenizer(folder / "tokenizer")
    model.eval()
    eos = tokenizer.eos_token_id
    causal = model.config.attention_layout == "causal"
    if model.config.attention_layout == "block_causal":
        block_length = model.config.block_size
    bl = min(block_length, gen_length)
    gl = max(bl, (gen_length // bl) * bl)
    nb = gl // bl
    st = max(nb, (steps // nb) * nb)
    out = []
    for k, prompt in enumerate(prompts):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        ids = ([eos] + ids) if eos is not None else ids
        g = torch.Generator().manual_seed(int(seed) + k)
        x = torch.tensor([ids], dtype=torch.long, device=model.device)
        if causal:
            room = model.config.max_position_embeddings - x.shape[1]
            seq = autoregressive_generate(model, x, min(gen_length, room), temperature=temperature, top_k=50,
                                          eos_token_id=eos, generator=g).new_tokens[0].tolist()
            if eos is not None and eos in seq:
                seq = seq[: seq.index(eos)]
            text = tokenizer.decode(seq, skip_special_tokens=True)
        else:
            text = pipe(input_ids=x, gen_length=gl, block_length=bl, steps=st, temperature=temperature,
                        generator=g).texts[0]
        out.append({"prompt": prompt, "text": text})
    return out

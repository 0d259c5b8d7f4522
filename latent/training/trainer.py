"""The training loop behind ``train.py``: one loop for every objective, single process or distributed.

``Trainer(cfg).fit()`` (or :func:`train`) runs a resolved config from :mod:`latent.training.config`:

1. Data and tokenizer: the built-in English corpus is built (and a BPE tokenizer trained) on first use;
   any txt/jsonl files and any local HF tokenizer work instead. Bad input (missing files, an empty
   corpus, a sequence longer than the model's context, a checkpoint of another shape) raises before
   the first step.
2. Model from the registry (``model.name`` / ``model.preset``), frozen parameters outside the
   optimizer, AdamW + warmup/cosine, gradient clipping and accumulation, bf16 autocast on CUDA.
3. Data parallel through accelerate (``accelerate launch`` or ``torchrun``: DDP; accelerate's FSDP
   config for models that do not fit one GPU). ``trainer.batch_size`` is the global batch: every rank
   reads the same stream and takes its rows, and the noise (times and mask draws) is drawn for the
   global batch from a generator seeded by the step, so N processes compute the same losses as one.
4. Checkpoints every ``save_every`` steps (atomic; see :mod:`latent.training.checkpoint`), resume
   from the newest complete one with the exact data position and RNG state.
5. Logs (CSV, TensorBoard, tqdm with loss and tokens/s, a PNG plot), the validation bound at the
   start and end, and samples from the final model.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from latent.losses import block_diffusion_loss, causal_lm_loss, masked_diffusion_loss, sft_loss
from latent.schedules import sample_times
from latent.training.checkpoint import (
    MODEL_WEIGHTS,
    CheckpointWriter,
    check_model_compatible,
    latest_checkpoint,
    load_model_weights,
    read_state,
    set_rng_state,
    write_state,
)
from latent.training.config import ConfigError, save_config
from latent.training.evaluate import sample_texts, validation_bound
from latent.training.metrics import MetricsLogger, plot_run
from latent.training.models import build_model
from latent.training.optim import apply_freeze, build_optimizer, build_scheduler

__all__ = ["Trainer", "TrainResult", "train", "prepare_data"]

_LAYOUT_FOR = {"causal": ("causal",), "block_diffusion": ("block_causal",), "mdm": ("bidirectional", "prefix"),
               "sft": ("bidirectional", "prefix")}


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    completed: bool
    initial_bits_per_token: float | None = None
    final_bits_per_token: float | None = None
    losses: list[float] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None


# ------------------------------------------------------------------------------------------ data
def prepare_data(cfg: DictConfig, is_main: bool = True):
    """Resolve the data files (building the built-in corpus if needed) and the tokenizer."""
    from latent.data.stream import check_files

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

    from latent.data.tokenizer import load_tokenizer, train_tokenizer

    t = cfg.tokenizer
    if t.path:
        tok = load_tokenizer(t.path)
    else:
        # The tokenizer is trained on documents: the built-in corpus's train.jsonl (for the SFT recipe
        # too, so pre-training and fine-tuning share it), or the text training files.
        if d.train_files is None:
            tok_files = [str(check_files([Path(d.corpus_dir) / "train.jsonl"], "tokenizer training")[0])]
            key = "text"
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
        tok = load_tokenizer(folder)
    return train_files, valid_files, tok


def _first_document_exists(files, key) -> None:
    from latent.data.stream import LineReader

    reader = LineReader(files, loop=False, what="training")
    try:
        item = reader.next_line()  # raises on a corpus with no line at all
    finally:
        reader.close()
    if item is None:
        raise ValueError(f"the training corpus is empty: {', '.join(map(str, files))}")


# ------------------------------------------------------------------------------------------ trainer
class Trainer:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        tc = cfg.trainer
        self._threads_before = torch.get_num_threads()
        if tc.threads > 0:
            torch.set_num_threads(tc.threads)
        self.acc = self._accelerator()
        acc = self.acc
        self.rank, self.world = acc.process_index, acc.num_processes
        self.is_main = acc.is_main_process
        self.device = acc.device
        per_step = self.world * tc.grad_accum
        if tc.batch_size % per_step:
            raise ConfigError(
                f"trainer.batch_size={tc.batch_size} must be divisible by processes x grad_accum = "
                f"{self.world} x {tc.grad_accum}"
            )
        self.micro = tc.batch_size // per_step
        self.seed = int(cfg.run.seed)
        _seed_everything(self.seed)
        self.run_dir = Path(cfg.run.output_dir)
        self.ckpt_root = self.run_dir / "checkpoints"

        # ---- data and tokenizer (the main process builds, the others wait and load)
        with acc.main_process_first():
            self.train_files, self.valid_files, self.tokenizer = prepare_data(cfg, self.is_main)
        d = cfg.data
        _first_document_exists(self.train_files, d.text_key)
        self.objective = cfg.objective.name
        self.eos = self.tokenizer.eos_token_id
        if d.format == "sft":
            from latent.data.stream import SFTStream

            self.stream = SFTStream(self.train_files, self.tokenizer, d.seq_len, d.prompt_key, d.answer_key)
            vstream = SFTStream(self.valid_files, self.tokenizer, d.seq_len, d.prompt_key, d.answer_key,
                                loop=False, what="validation")
            self.val_ids, self.val_plens = vstream.next_batch(cfg.eval.valid_sequences)
            vstream.close()
            if len(self.val_ids) == 0:
                raise ValueError(f"no usable validation pair in {self.valid_files}")
        else:
            from latent.data.stream import PackedTextStream, load_sequences

            self.stream = PackedTextStream(self.train_files, self.tokenizer, d.seq_len, text_key=d.text_key)
            self.val_ids = load_sequences(self.valid_files, self.tokenizer, d.seq_len, cfg.eval.valid_sequences,
                                          text_key=d.text_key)
            self.val_plens = None

        # ---- model
        model = build_model(cfg.model, self.tokenizer)
        self._check_model(model)
        init_from = cfg.model.get("init_from")
        if init_from:
            load_model_weights(_model_dir(init_from), model)
        self.frozen = apply_freeze(model, cfg.optim.freeze)
        self.mask_id = int(model.config.mask_token_id) if hasattr(model, "config") else None
        self.block_size = getattr(getattr(model, "config", None), "block_size", None)

        # ---- resume point (weights go into the raw model before wrapping)
        self.resume_dir = self._find_resume()
        self.start_step = 0
        if self.resume_dir is not None:
            check_model_compatible(self.resume_dir / "model", model)
            load_model_weights(self.resume_dir / "model", model)

        self.model = acc.prepare(model)
        self.optimizer = acc.prepare(build_optimizer(self.model, cfg.optim))
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        self.inner_opt = inner
        self.scheduler = build_scheduler(inner, cfg.optim.warmup_steps, tc.max_steps, cfg.optim.min_lr_ratio)
        self.writer = CheckpointWriter(self.ckpt_root, keep=tc.keep_checkpoints, is_main=self.is_main,
                                       barrier=acc.wait_for_everyone)
        if self.resume_dir is not None:
            self._load_state(self.resume_dir)
        self.writer.cleanup_partial()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            self.tokenizer.save_pretrained(str(self.run_dir / "tokenizer"))
        self.log = MetricsLogger(self.run_dir, tc.tensorboard, self.start_step, fresh=self.start_step == 0) \
            if self.is_main else None
        if self.is_main and tc.progress:
            dist = "single process" if self.world == 1 else str(acc.distributed_type).split(".")[-1]
            wrapped = type(self.model).__name__
            resumed = f", resumed from {self.resume_dir} (step {self.start_step})" if self.resume_dir else ""
            print(f"[train] {dist} x{self.world} ({wrapped}) on {self.device}, micro-batch {self.micro}, "
                  f"mixed precision {acc.mixed_precision}{resumed}", flush=True)
        acc.wait_for_everyone()

    # ------------------------------------------------------------------ setup helpers
    def _accelerator(self):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        tc = self.cfg.trainer
        if int(os.environ.get("WORLD_SIZE", "1")) == 1 and "LOCAL_RANK" not in os.environ:
            AcceleratorState._reset_state(True)  # several runs in one process (tests, experiments)
        cpu = tc.device == "cpu" or not torch.cuda.is_available()
        mp = tc.mixed_precision
        if mp == "auto":
            mp = "bf16" if (not cpu and torch.cuda.is_bf16_supported()) else "no"
        if cpu and mp != "no":
            mp = "no"  # autocast on CPU is slower than fp32 for these sizes
        return Accelerator(cpu=cpu, mixed_precision=mp)

    def _check_model(self, model) -> None:
        cfg = self.cfg
        mc = getattr(model, "config", None)
        if mc is None:
            return
        layout = mc.attention_layout
        allowed = _LAYOUT_FOR[self.objective]
        if layout not in allowed:
            raise ConfigError(
                f"objective.name={self.objective!r} needs model.attention_layout in {allowed}, got {layout!r}"
            )
        n = cfg.data.seq_len
        slots = 2 * n if self.objective == "block_diffusion" else n
        if slots > mc.max_position_embeddings:
            extra = " (block diffusion feeds [noisy | clean], 2 x seq_len slots)" if slots != n else ""
            raise ConfigError(
                f"data.seq_len={n} needs {slots} positions{extra} but model.max_position_embeddings="
                f"{mc.max_position_embeddings}; lower data.seq_len or raise model.max_position_embeddings"
            )
        if self.objective == "block_diffusion" and n % mc.block_size:
            raise ConfigError(f"data.seq_len={n} must be a multiple of model.block_size={mc.block_size}")
        if len(self.tokenizer) > mc.vocab_size:
            raise ConfigError(f"the tokenizer has {len(self.tokenizer)} tokens, model.vocab_size={mc.vocab_size}")

    def _find_resume(self) -> Path | None:
        r = self.cfg.trainer.resume
        if r == "never":
            return None
        if r == "auto":
            return latest_checkpoint(self.ckpt_root)
        p = Path(r)
        if not (p / "COMPLETE").is_file():
            raise FileNotFoundError(f"trainer.resume={r!r} is not a complete checkpoint folder")
        return p

    def _load_state(self, folder: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = read_state(folder, "state")
        self.start_step = int(state["step"])
        set_optimizer_state_dict(self.model, self.inner_opt, optim_state_dict=state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["data"])
        if state.get("scaler") is not None and self.acc.scaler is not None:
            self.acc.scaler.load_state_dict(state["scaler"])
        rng_name = f"rng_rank{self.rank}"
        if not (folder / f"{rng_name}.json").is_file():
            rng_name = "rng_rank0"  # resumed on more processes than saved: ranks share rank 0's state
        set_rng_state(read_state(folder, rng_name))

    # ------------------------------------------------------------------ training
    def _global_batch(self):
        B = self.cfg.trainer.batch_size
        if self.cfg.data.format == "sft":
            ids, plens = self.stream.next_batch(B)
        else:
            ids, plens = self.stream.next_sequences(B), None
        if len(ids) < B:
            raise RuntimeError("the training stream ran dry")  # cannot happen while looping
        return ids, plens

    def _noise(self, step: int, B: int, N: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        oc = self.cfg.objective
        if self.objective == "block_diffusion" and oc.per_block_t:
            nb = -(-N // self.block_size)
            t = sample_times(B * nb, g, oc.low_discrepancy).view(B, nb)
        else:
            t = sample_times(B, g, oc.low_discrepancy)
        return t, torch.rand(B, N, generator=g)

    def _loss(self, ids, plens, t, noise):
        oc = self.cfg.objective
        dev = self.device
        ids, t, noise = ids.to(dev), t.to(dev), noise.to(dev)
        common = dict(schedule=oc.schedule, eps=oc.eps, t=t, noise=noise)
        if self.objective == "mdm":
            return masked_diffusion_loss(self.model, ids, self.mask_id, **common)
        if self.objective == "sft":
            return sft_loss(self.model, ids, self.mask_id, prompt_lengths=plens.to(dev), **common)
        if self.objective == "block_diffusion":
            return block_diffusion_loss(self.model, ids, self.mask_id, self.block_size,
                                        per_block_t=oc.per_block_t, **common)
        return causal_lm_loss(self.model, ids, bos_token_id=self.eos)

    def train_step(self, step: int) -> tuple[float, float, int]:
        tc = self.cfg.trainer
        ids, plens = self._global_batch()
        t, noise = self._noise(step, *ids.shape)
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        for m in range(tc.grad_accum):
            lo = (m * self.world + self.rank) * self.micro
            rows = slice(lo, lo + self.micro)
            last = m == tc.grad_accum - 1
            ctx = nullcontext() if last else self.acc.no_sync(self.model)
            with ctx:
                with self.acc.autocast():
                    out = self._loss(ids[rows], None if plens is None else plens[rows], t[rows], noise[rows])
                self.acc.backward(out.loss / tc.grad_accum)
            loss_sum += out.loss.detach().float() / tc.grad_accum
        clip = self.cfg.optim.grad_clip
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = self.acc.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = float(self.acc.reduce(loss_sum, "mean")) if self.world > 1 else float(loss_sum)
        return loss, float(grad_norm), int(ids.numel())

    def evaluate(self, step: int) -> dict:
        ec = self.cfg.eval

        def reduce(x):
            return self.acc.reduce(x, "sum") if self.world > 1 else x

        res = validation_bound(
            self.model, self.val_ids, self.objective, self.mask_id, self.eos, num_samples=ec.elbo_samples,
            batch_size=ec.batch_size, schedule=self.cfg.objective.schedule, prompt_lengths=self.val_plens,
            seed=self.seed, rank=self.rank, world_size=self.world, device=self.device,
            autocast=self.acc.autocast, reduce=reduce, block_size=self.block_size,
        )
        if self.is_main:
            self.log.log_eval({"step": step, "val_bits_per_token": res["bits_per_token"],
                               "val_nll_per_token": res["nll_per_token"], "val_tokens": res["tokens"]})
        return res

    def save(self, step: int) -> Path:
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.model, options=opts)
        optim_sd = get_optimizer_state_dict(self.model, self.inner_opt, options=opts)
        raw = self.acc.unwrap_model(self.model)

        def write_main(folder: Path) -> None:
            (folder / "model").mkdir()
            raw.save_config(str(folder / "model"))
            sd = {k: v.detach().cpu().contiguous() for k, v in model_sd.items()}
            save_file(sd, str(folder / "model" / MODEL_WEIGHTS), metadata={"format": "pt"})
            write_state(folder, "state", {
                "step": step,
                "optimizer": optim_sd,
                "scheduler": self.scheduler.state_dict(),
                "data": self.stream.state_dict(),
                "scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else None,
                "world_size": self.world,
            })

        return self.writer.save(step, write_main, self.rank)

    def export(self, ckpt: Path) -> Path:
        """``<run>/final``: the backbone (diffusers format), the tokenizer and the training record; and,
        for the diffusion objectives, ``<run>/pipeline``: a ``TextDiffusionPipeline`` folder
        (``TextDiffusionPipeline.from_pretrained(run/"pipeline")``)."""
        final = self.run_dir / "final"
        if self.is_main:
            import shutil

            tmp = self.run_dir / ".tmp-final"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(ckpt / "model", tmp / "backbone")
            self.tokenizer.save_pretrained(str(tmp / "tokenizer"))
            (tmp / "training.json").write_text(json.dumps(
                {"objective": self.objective, "step": int(ckpt.name.split("_")[-1]),
                 "config": OmegaConf.to_container(self.cfg)}, indent=2))
            _replace_dir(tmp, final)
            if self.objective != "causal":
                from latent.backbone import DiffusionTransformer
                from latent.training.evaluate import build_text_pipeline

                block = self.block_size if self.objective == "block_diffusion" else self.cfg.eval.sample_block_length
                pipe = build_text_pipeline(DiffusionTransformer.from_pretrained(str(final / "backbone")),
                                           self.tokenizer, block)
                if pipe is not None:
                    tmp = self.run_dir / ".tmp-pipeline"
                    shutil.rmtree(tmp, ignore_errors=True)
                    pipe.save_pretrained(str(tmp))
                    _replace_dir(tmp, self.run_dir / "pipeline")
        self.acc.wait_for_everyone()
        return final

    def fit(self) -> TrainResult:
        try:
            return self._fit()
        finally:
            torch.set_num_threads(self._threads_before)

    def _fit(self) -> TrainResult:
        cfg, tc = self.cfg, self.cfg.trainer
        result = TrainResult(self.run_dir, self.start_step, False)
        end = tc.max_steps if tc.stop_at_step is None else min(tc.max_steps, tc.stop_at_step)
        if self.start_step == 0 and tc.eval_at_start:
            result.initial_bits_per_token = self.evaluate(0)["bits_per_token"]
        step = self.start_step
        bar = None
        if self.is_main and tc.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=tc.max_steps, initial=step, desc=f"train {cfg.run.name}", dynamic_ncols=True)
        t_start, tok_rate = time.perf_counter(), None
        last_saved = self.start_step if self.resume_dir is not None else None
        while step < end:
            t0 = time.perf_counter()
            loss, gnorm, ntok = self.train_step(step)
            step += 1
            dt = time.perf_counter() - t0
            rate = ntok / max(dt, 1e-9)
            tok_rate = rate if tok_rate is None else 0.9 * tok_rate + 0.1 * rate
            result.losses.append(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(f"the loss became {loss} at step {step}; lower optim.lr")
            if self.is_main and (step % tc.log_every == 0 or step == end):
                self.log.log_train({"step": step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                                    "grad_norm": gnorm, "tokens": step * ntok, "tokens_per_s": round(tok_rate, 1),
                                    "elapsed_s": round(time.perf_counter() - t_start, 3)})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_rate:,.0f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps:
                res = self.evaluate(step)
                if bar is not None:
                    bar.write(f"step {step}: validation bound {res['bits_per_token']:.4f} bits/token")
            if tc.save_every and step % tc.save_every == 0:
                result.checkpoint = self.save(step)
                last_saved = step
        if bar is not None:
            bar.close()
        result.step = step
        if last_saved != step:
            result.checkpoint = self.save(step)
        elif result.checkpoint is None and self.resume_dir is not None:
            result.checkpoint = self.resume_dir
        if step >= tc.max_steps:
            result.completed = True
            if cfg.eval.final:
                res = self.evaluate(step)
                result.final_bits_per_token = res["bits_per_token"]
            final = self.export(latest_checkpoint(self.ckpt_root))
            if self.is_main:
                if tc.plot:
                    plot_run(self.run_dir, title=f"{cfg.run.name} ({self.objective})")
                if cfg.eval.num_samples > 0:
                    result.samples = self.samples(final)
        if self.is_main:
            self.log.close()
            with open(self.run_dir / "result.json", "w") as f:
                json.dump({"step": result.step, "completed": result.completed,
                           "initial_bits_per_token": result.initial_bits_per_token,
                           "final_bits_per_token": result.final_bits_per_token,
                           "samples": result.samples}, f, indent=2)
        self.stream.close()
        self.acc.wait_for_everyone()
        return result

    def samples(self, final: Path) -> list[dict]:
        """Samples of the exported model, loaded back from disk (the pipeline folder for the diffusion
        objectives), so any wrapping or sharding is gone and the export is exercised."""
        ec = self.cfg.eval
        prompts = list(ec.prompts)[: ec.num_samples]
        while len(prompts) < ec.num_samples:
            prompts.append("")
        pipe, model = None, None
        if (self.run_dir / "pipeline" / "model_index.json").is_file():
            from pipelines.text import TextDiffusionPipeline

            pipe = TextDiffusionPipeline.from_pretrained(str(self.run_dir / "pipeline")).to(self.device)
            pipe.set_progress_bar_config(disable=True)
        else:
            from latent.backbone import DiffusionTransformer

            model = DiffusionTransformer.from_pretrained(str(final / "backbone")).to(self.device)
        out = sample_texts(model, self.tokenizer, self.objective, prompts, gen_length=ec.sample_length,
                           steps=ec.sample_steps, block_length=ec.sample_block_length,
                           temperature=ec.temperature, seed=self.seed, device=self.device, pipeline=pipe)
        with open(self.run_dir / "samples.txt", "w") as f:
            for s in out:
                f.write(f"[{s['prompt']}] {s['text']}\n")
        self.log.log_text("samples", "\n\n".join(f"**{s['prompt']}** {s['text']}" for s in out), self.start_step)
        return out


def _replace_dir(src: Path, dst: Path) -> None:
    import shutil

    if dst.exists():
        old = dst.with_name(f".old-{dst.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)


def _model_dir(path) -> Path:
    p = Path(path)
    for cand in (p, p / "model", p / "backbone"):
        if (cand / MODEL_WEIGHTS).is_file():
            return cand
    raise FileNotFoundError(f"model.init_from={str(path)!r}: no {MODEL_WEIGHTS} there (or in model/, backbone/)")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def train(cfg: DictConfig) -> TrainResult:
    """Run one training config to completion (or to ``trainer.stop_at_step``)."""
    return Trainer(cfg).fit()

"""The one training loop behind ``train.py``, for every task: single process or distributed, in stages.

``Trainer(cfg).fit()`` (or :func:`train`) runs a resolved config from :mod:`latent.training.config`. The
task (:mod:`latent.training.task`, chosen by ``cfg.task``) builds the modules and the batches and computes
the loss; everything else is here:

1. Stages, in order: each sets which parameters train (frozen ones never enter the optimizer), its steps,
   learning rate and warmup, and may load weights from another run first (``init_from``). Every stage has
   its own AdamW (decay on matrices only) and warmup + cosine schedule; gradient clipping and accumulation.
2. Data parallel through accelerate (``torchrun`` or ``accelerate launch``: DDP; accelerate's FSDP config
   for models that do not fit one GPU), bf16 autocast on CUDA. The batch size is the global one: every
   process gets the same global batch from the task and takes its rows, so N processes compute the losses
   of one process with the whole batch.
3. Checkpoints every ``trainer.save_every`` steps and at every stage end: atomic safetensors + JSON
   (:mod:`latent.training.checkpoint`); a rerun resumes from the newest complete one with the stage, the
   optimizer, the data position and the RNG, so N + N steps log the losses of 2N.
4. Logs: ``train.csv`` / ``eval.csv`` (the record resume is checked against), TensorBoard, tqdm, a loss
   plot; evaluation every ``trainer.eval_every`` steps, at the start and the end.
5. Exports (the task writes them, the trainer renames them into place): ``<run>/pipelines/<stage>`` at the
   end of each stage of a multi-stage recipe and ``<run>/pipeline`` at the end (or when the time limit
   stops the run).
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

from latent.folders import atomic_folder, replace_dir  # noqa: F401 - replace_dir: re-exported
from latent.training.checkpoint import (
    CheckpointWriter,
    latest_checkpoint,
    load_module_weights,
    read_state,
    save_module_weights,
    set_rng_state,
    write_state,
)
from latent.training.config import ConfigError, save_config
from latent.training.logs import MetricsLogger, plot_run
from latent.training.optim import build_optimizer, build_scheduler
from latent.training.task import TASKS, TaskContext

__all__ = ["Trainer", "TrainResult", "train", "replace_dir"]


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    completed: bool
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None
    pipeline_dir: Path | None = None
    stage_dirs: dict[str, Path] = field(default_factory=dict)
    resumed_from: Path | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)  # what the task's after_export returned (e.g. samples)


class TaskModules(torch.nn.Module):
    """The task's modules under one root, so that one DDP/FSDP wrapper, one state dict and one optimizer
    cover them; its forward is the task's loss (DDP synchronises gradients of what runs through forward)."""

    def __init__(self, modules: dict[str, torch.nn.Module], task):
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        self._task = [task]  # a list: not a submodule

    def forward(self, batch, stage):
        return self._task[0].loss(self, batch, stage)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


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
        self.seed = int(cfg.run.seed)
        _seed_everything(self.seed)
        self.run_dir = Path(cfg.run.output_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        task_cls = TASKS.get(cfg.task)
        self.stages = [OmegaConf.create(s) for s in cfg.stages]
        self.stage_ends = []
        total = 0
        for st in self.stages:
            total += st.steps
            self.stage_ends.append(total)
            self._micro(st)  # divisibility checked before any work

        def reduce(x, op="sum"):
            return acc.reduce(x, op) if self.world > 1 else x

        self.ctx = TaskContext(cfg=cfg, run_dir=self.run_dir, device=self.device, seed=self.seed, rank=self.rank,
                               world_size=self.world, is_main=self.is_main, progress=bool(tc.progress),
                               autocast=acc.autocast, reduce=reduce,
                               log=(lambda s: print(s, flush=True)) if self.is_main else (lambda s: None))
        self.task = task_cls(self.ctx)
        with acc.main_process_first():  # the main process builds data files, the others then read them
            modules = self.task.build()
        self.modules = TaskModules(modules, self.task)
        self.resume_dir = self._find_resume()
        self.start_step = 0
        self._resume_state = None
        if self.resume_dir is not None:
            self._check_configs(self.resume_dir)
            load_module_weights(self.resume_dir, self.modules, what="trainer.resume")
            self._resume_state = read_state(self.resume_dir, "state")
            self.start_step = int(self._resume_state["step"])
            self.task.load_state_dict(self._resume_state.get("task") or {})
        self.modules.to(self.device)
        self.writer = CheckpointWriter(self.ckpt_root, keep=tc.keep_checkpoints, is_main=self.is_main,
                                       barrier=acc.wait_for_everyone)
        self.writer.cleanup_partial()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.log = MetricsLogger(self.run_dir, tc.tensorboard, self.start_step, fresh=self.start_step == 0,
                                 train_fields=task_cls.metric_fields, eval_fields=task_cls.eval_fields) \
            if self.is_main else None
        if self.is_main and self.resume_dir is not None:
            print(f"[train] resumed from {self.resume_dir} (step {self.start_step})", flush=True)
        if self.is_main and tc.progress:
            dist = "single process" if self.world == 1 else str(acc.distributed_type).split(".")[-1]
            n = sum(p.numel() for p in self.modules.parameters())
            print(f"[train] task {cfg.task}: {', '.join(modules)} ({n / 1e6:.2f} M parameters); {dist} x{self.world} "
                  f"on {self.device}, mixed precision {acc.mixed_precision}", flush=True)
        acc.wait_for_everyone()

    # ------------------------------------------------------------------ setup helpers
    def _accelerator(self):
        from accelerate import Accelerator, DistributedDataParallelKwargs
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
        unused = TASKS.get(self.cfg.task).may_skip_parameters
        return Accelerator(cpu=cpu, mixed_precision=mp,
                           kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)])

    def _micro(self, stage) -> int:
        tc = self.cfg.trainer
        batch = stage.batch_size or tc.batch_size
        per_step = self.world * tc.grad_accum
        if batch % per_step:
            raise ConfigError(
                f"the batch size of stage {stage.name!r} ({batch}) must be divisible by processes x "
                f"trainer.grad_accum = {self.world} x {tc.grad_accum}"
            )
        return batch // per_step

    def _module_configs(self) -> dict:
        return {name: {k: v for k, v in dict(m.config).items() if not k.startswith("_") and _jsonable(v)}
                for name, m in self.modules.named_children() if hasattr(m, "config")}

    def _check_configs(self, folder: Path) -> None:
        """A checkpoint of modules configured otherwise is refused naming the keys (before any weight)."""
        path = folder / "module_configs.json"
        if not path.is_file():
            return
        # through JSON as the saved side went (a tuple in a config reads back as a list)
        saved, now = json.loads(path.read_text()), json.loads(json.dumps(self._module_configs()))
        diff = [f"{name}.{k}: checkpoint {v!r} vs now {now[name].get(k)!r}" for name, cfg in saved.items()
                if name in now for k, v in cfg.items() if k in now[name] and now[name][k] != v]
        if diff:
            raise ValueError(f"the checkpoint {folder} was saved from a different model shape:\n  " + "\n  ".join(diff)
                             + "\n(resume with the recipe it was trained with, or set trainer.resume=never)")

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

    def stage_at(self, step: int) -> int:
        """Index of the stage that global step ``step`` (0-based, the step about to run) belongs to."""
        for i, end in enumerate(self.stage_ends):
            if step < end:
                return i
        return len(self.stages) - 1

    # ------------------------------------------------------------------ one stage
    def _begin_stage(self, i: int, step: int) -> None:
        st, oc = self.stages[i], self.cfg.optim
        raw = self.modules
        if st.init_from and (self._resume_state is None or step == self.stage_ends[i] - st.steps):
            self.task.init_from(raw, st.init_from, st)  # before its first step only, never on a mid-stage resume
        self.trained = self.task.trainable(raw, st, oc.freeze)
        self.model = self.acc.prepare_model(raw) if self.world > 1 else raw
        opt = build_optimizer(raw, OmegaConf.merge(oc, {"lr": st.lr if st.lr is not None else oc.lr}))
        self.inner_opt = opt
        self.optimizer = self.acc.prepare_optimizer(opt)
        warm = st.warmup_steps if st.warmup_steps is not None else oc.warmup_steps
        self.scheduler = build_scheduler(opt, min(warm, max(0, st.steps - 1)), st.steps, oc.min_lr_ratio)
        self.micro = self._micro(st)
        self.stage_index = i
        state = self._resume_state
        if state is not None and int(state["stage"]) == i and step == self.start_step and step < self.stage_ends[i]:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, opt, optim_state_dict=state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler") is not None and self.acc.scaler is not None:
                self.acc.scaler.load_state_dict(state["scaler"])

    def train_step(self, step: int) -> tuple[float, float, int, dict]:
        tc, st = self.cfg.trainer, self.stages[self.stage_index]
        batch = self.task.batch(step, st)
        self.task.train_mode(self.modules)
        loss_sum = torch.zeros((), device=self.device)
        metrics: dict[str, float] = {}
        for m in range(tc.grad_accum):
            lo = (m * self.world + self.rank) * self.micro
            part = self.task.split(batch, slice(lo, lo + self.micro))
            last = m == tc.grad_accum - 1
            ctx = nullcontext() if last or self.world == 1 else self.acc.no_sync(self.model)
            with ctx:
                with self.acc.autocast():
                    out = self.model(part, st)
                self.acc.backward(out.loss / tc.grad_accum)
            loss_sum += out.loss.detach().float() / tc.grad_accum
            for k, v in out.metrics.items():
                metrics[k] = metrics.get(k, 0.0) + float(v) / tc.grad_accum
        clip = self.cfg.optim.grad_clip
        params = [p for p in self.modules.parameters() if p.requires_grad]
        grad_norm = self.acc.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = float(self.acc.reduce(loss_sum, "mean")) if self.world > 1 else float(loss_sum)
        if self.world > 1 and metrics:
            vals = self.acc.reduce(torch.tensor(list(metrics.values()), device=self.device), "mean")
            metrics = dict(zip(metrics, vals.tolist(), strict=True))
        return loss, float(grad_norm), self.task.count(batch), metrics

    # ------------------------------------------------------------------ evaluation, checkpoints, exports
    def evaluate(self, step: int) -> dict:
        was = self.modules.training
        self.modules.eval()
        with torch.no_grad():
            res = self.task.evaluate(self.modules, step)
        self.modules.train(was)
        if res and self.is_main:
            self.log.log_eval({"step": step, **res})
        return res

    def save(self, step: int) -> Path:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.model, options=opts)
        optim_sd = get_optimizer_state_dict(self.model, self.inner_opt, options=opts)
        task_state = self.task.state_dict()

        configs = self._module_configs()

        def write_main(folder: Path) -> None:
            save_module_weights({k.removeprefix("module."): v for k, v in model_sd.items()}, folder)
            (folder / "module_configs.json").write_text(json.dumps(configs, indent=1))
            write_state(folder, "state", {
                "step": step,
                "stage": self.stage_index,
                "optimizer": optim_sd,
                "scheduler": self.scheduler.state_dict(),
                "task": task_state,
                "scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else None,
                "world_size": self.world,
            })

        return self.writer.save(step, write_main, self.rank)

    def export(self, folder: Path, stage) -> Path:
        """The task writes ``folder`` through a temporary sibling that is renamed into place (main only)."""
        if self.is_main:
            with atomic_folder(folder) as tmp:
                was = self.modules.training
                self.modules.eval()
                self.task.export(self.modules, tmp, stage)
                self.modules.train(was)
        self.acc.wait_for_everyone()
        return folder

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        try:
            return self._fit()
        finally:
            torch.set_num_threads(self._threads_before)
            self.task.close()

    def _fit(self) -> TrainResult:
        cfg, tc = self.cfg, self.cfg.trainer
        result = TrainResult(self.run_dir, self.start_step, False, resumed_from=self.resume_dir)
        t_start = time.perf_counter()
        deadline = t_start + 60 * tc.time_limit_minutes if tc.time_limit_minutes else math.inf
        end = tc.max_steps if tc.stop_at_step is None else min(tc.max_steps, tc.stop_at_step)
        if self.start_step == 0 and tc.eval_at_start:
            result.evals.append(self._report(0, self.evaluate(0)))
        if self.resume_dir is not None:
            rng_name = f"rng_rank{self.rank}"
            if not (self.resume_dir / f"{rng_name}.json").is_file():
                rng_name = "rng_rank0"  # resumed on more processes than saved: ranks share rank 0's state
            set_rng_state(read_state(self.resume_dir, rng_name))
        step = self.start_step
        bar = None
        if self.is_main and tc.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=tc.max_steps, initial=step, desc=f"train {cfg.run.name}", dynamic_ncols=True)
        rate = None
        last_saved = self.start_step if self.resume_dir is not None else None
        multi = len(self.stages) > 1
        stage_i = -1
        stopped = None
        while step < end:
            if self.stage_at(step) != stage_i:
                stage_i = self.stage_at(step)
                self._begin_stage(stage_i, step)
            t0 = time.perf_counter()
            loss, gnorm, count, metrics = self.train_step(step)
            step += 1
            dt = time.perf_counter() - t0
            rate = count / max(dt, 1e-9) if rate is None else 0.9 * rate + 0.1 * count / max(dt, 1e-9)
            result.losses.append(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(f"the loss became {loss} at step {step}; lower optim.lr (or the stage's lr)")
            st = self.stages[stage_i]
            stage_done = step == self.stage_ends[stage_i]
            if self.is_main and (step % tc.log_every == 0 or step == end or stage_done):
                self.log.log_train({"step": step, "stage": st.name, "loss": loss,
                                    "lr": self.scheduler.get_last_lr()[0], "grad_norm": gnorm, "samples": count,
                                    "samples_per_s": round(rate, 1),
                                    "elapsed_s": round(time.perf_counter() - t_start, 3), **metrics})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(stage=st.name, loss=f"{loss:.3f}", per_s=f"{rate:,.0f}",
                                lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps:
                result.evals.append(self._report(step, self.evaluate(step), bar))
            if stage_done or (tc.save_every and step % tc.save_every == 0):
                result.checkpoint = self.save(step)
                last_saved = step
            if stage_done and multi and step < tc.max_steps:
                result.stage_dirs[st.name] = self.export(self.run_dir / "pipelines" / st.name, st)
            if time.perf_counter() > deadline and step < end:
                stopped = "time"
                break
        if bar is not None:
            bar.close()
        # stages that ended in an earlier run whose export was cut short by a kill are exported now
        self._export_missing_stages(result, step)
        result.step = step
        if last_saved != step:
            result.checkpoint = self.save(step)
        elif result.checkpoint is None and self.resume_dir is not None:
            result.checkpoint = self.resume_dir
        st = self.stages[self.stage_at(max(step - 1, 0))]
        if step >= tc.max_steps or stopped == "time":
            result.completed = step >= tc.max_steps
            if stopped == "time":
                self.ctx.log(f"trainer.time_limit_minutes={tc.time_limit_minutes} reached at step {step}; "
                             "exporting what was trained (rerun the command to go on)")
            if result.completed:
                result.evals.append(self._report(step, self.evaluate(step)))
            if multi and result.completed:
                result.stage_dirs[st.name] = self.export(self.run_dir / "pipelines" / st.name, st)
            result.pipeline_dir = self.export(self.run_dir / "pipeline", st)
            if self.is_main:
                result.extra = self.task.after_export(result.pipeline_dir) or {}
                if tc.plot:
                    plot_run(self.run_dir, title=f"{cfg.run.name} ({cfg.task})")
        result.seconds = time.perf_counter() - t_start
        if self.is_main:
            self.log.close()
            with open(self.run_dir / "result.json", "w") as f:
                json.dump({"step": result.step, "completed": result.completed, "evals": result.evals,
                           "pipeline": str(result.pipeline_dir) if result.pipeline_dir else None,
                           "stages": {k: str(v) for k, v in result.stage_dirs.items()},
                           **{k: v for k, v in result.extra.items() if _jsonable(v)}}, f, indent=2)
        self.acc.wait_for_everyone()
        return result

    def _export_missing_stages(self, result: TrainResult, step: int) -> None:
        if len(self.stages) < 2:
            return
        for i, st in enumerate(self.stages[:-1]):
            folder = self.run_dir / "pipelines" / st.name
            if self.stage_ends[i] <= step and st.steps > 0:
                if not (folder / "model_index.json").is_file() and self.stage_ends[i] == step:
                    result.stage_dirs[st.name] = self.export(folder, st)
                elif folder.is_dir():
                    result.stage_dirs.setdefault(st.name, folder)

    def _report(self, step: int, res: dict, bar=None) -> dict:
        if res and self.is_main and self.cfg.trainer.progress:
            text = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items())
            (bar.write if bar is not None else print)(f"step {step}: {text}")
        return {"step": step, **res}


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def train(cfg: DictConfig) -> TrainResult:
    """Run one training config to completion (or to ``trainer.stop_at_step``)."""
    return Trainer(cfg).fit()

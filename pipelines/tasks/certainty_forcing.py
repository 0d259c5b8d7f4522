"""dParallel's certainty-forcing distillation of a copy pipeline into itself (``task: certainty_forcing``).

    python train.py configs/certainty_forcing_copy.yaml model.init_from=runs/copy_bidirectional/pipeline

The student starts from the pipeline at ``model.init_from``, which is also the teacher. Data (built once,
before any update): the teacher decodes ``distill.rows`` prompts with the schedule rule, block by block
(``distill.steps`` forwards over the answer; default one token per forward), and every forward of those runs
is a training state (pipelines/tasks/trajectories.py): the prompt, the teacher's tokens committed before that
forward, masks elsewhere. A step draws rows and one forward of each (the step's generator). The loss region of
a state is its block's masked positions (earlier blocks are decoded, later ones fully masked, as in dParallel's
semi-autoregressive masking). With z the student's logits there and y the teacher's final tokens:

    consistency = mean over the region of CE(z, y)
    certainty   = mean over the region's positions with argmax z == y of H(softmax(z / distill.temperature))
    loss        = consistency + distill.entropy_weight * certainty

(dParallel: temperature 0.5, weight 2). The certainty term makes the student sure early of what it already
gets right, so a threshold rule commits more per forward. Evaluation: held-out prompts decoded with the
threshold rule (``eval.threshold``, default 0.9): accuracy and forwards per sequence; and the student's mean
entropy over a fixed set of training states. The export is a copy pipeline (``<run>/pipeline/model`` and
``task.json``), so every tool that reads the base reads the student.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from latent.losses import certainty_entropy
from latent.training.config import ConfigError
from latent.training.task import StepLoss, Task, register_task, step_generator

from .copy import task_rows
from .trajectories import Trajectories, decode_scores, decode_trajectories, load_copy_pipeline, model_device

__all__ = ["CertaintyForcingTask", "certainty_forcing_loss", "mean_entropy"]


@dataclass
class DistillSection:
    rows: int = 128  # prompts the teacher decodes (the training trajectories)
    steps: int | None = None  # the teacher's schedule: forwards over the answer (None: one token per forward)
    batch_size: int = 32  # rows per decoding batch
    temperature: float = 0.5  # of the softmax whose entropy the certainty term lowers
    entropy_weight: float = 2.0


@dataclass
class CertaintyEval:
    rows: int = 16  # held-out prompts
    threshold: float = 0.9  # the threshold rule the forwards are counted with
    entropy_states: int = 256  # training states the mean entropy is measured on


def certainty_forcing_loss(logits: torch.Tensor, targets: torch.Tensor, region: torch.BoolTensor,
                           temperature: float = 0.5, entropy_weight: float = 2.0) -> StepLoss:
    """logits [b, N, V], targets [b, N] (the teacher's tokens), region [b, N] (positions scored)."""
    z, y = logits[region].float(), targets[region]
    if not len(y):
        zero = logits.sum() * 0
        return StepLoss(zero, {"consistency": 0.0, "certainty": 0.0, "correct_share": 0.0})
    consistency = F.cross_entropy(z, y)
    certainty = certainty_entropy(z, y, temperature)
    return StepLoss(consistency + entropy_weight * certainty,
                    {"consistency": consistency.item(), "certainty": certainty.item(),
                     "correct_share": float((z.argmax(-1) == y).float().mean())})


@torch.no_grad()
def mean_entropy(model, traj: Trajectories, rows: torch.Tensor, t: torch.Tensor) -> float:
    """The model's mean entropy (nats, temperature 1) over the loss regions of trajectory states (rows, t)."""
    canvas, region = traj.states(rows, t)
    plen = traj.prompts.shape[1]
    logits = model(canvas.to(model_device(model))).logits[:, plen:].float().cpu()
    return float(torch.special.entr(logits.softmax(-1)).sum(-1)[region].mean())


@register_task("certainty_forcing")
class CertaintyForcingTask(Task):
    sections = {"distill": DistillSection, "eval": CertaintyEval}
    free_sections = ("model",)
    aliases = {"backbone": ["model.*"]}
    metric_fields = ("consistency", "certainty", "correct_share")
    eval_fields = ("val_accuracy", "val_forwards_per_sequence", "val_entropy")

    @classmethod
    def section_keys(cls, section, user):
        return ["init_from"] if section == "model" else None

    @classmethod
    def check_config(cls, cfg):
        if not cfg.model.get("init_from"):
            raise ConfigError("model.init_from is required: the copy pipeline (or run) the student starts from "
                              "and the teacher is, e.g. model.init_from=runs/copy_bidirectional/pipeline")
        d, e = cfg.distill, cfg.eval
        for key, value in (("distill.rows", d.rows), ("distill.batch_size", d.batch_size), ("eval.rows", e.rows),
                           ("eval.entropy_states", e.entropy_states)):
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        if d.steps is not None and d.steps < 1:
            raise ConfigError(f"distill.steps must be None (one token per forward) or >= 1, got {d.steps}")
        if not d.temperature > 0 or d.entropy_weight < 0:
            raise ConfigError(f"distill.temperature must be > 0 and distill.entropy_weight >= 0, got "
                              f"{d.temperature} and {d.entropy_weight}")
        if not 0 < e.threshold <= 1:
            raise ConfigError(f"eval.threshold must be in (0, 1], got {e.threshold}")

    def build(self):
        cfg = self.cfg
        # build() runs before any checkpoint is loaded, so the model decoding here is the teacher: the
        # pipeline at init_from (a resumed run rebuilds the same trajectories).
        teacher = load_copy_pipeline(cfg.model.init_from, what="model.init_from")
        self.base, d = teacher, teacher.data  # base.model becomes the student
        rows = task_rows(d, cfg.distill.rows, torch.Generator().manual_seed(30_013 + self.ctx.seed))
        self.traj = decode_trajectories(teacher.model, rows, d.prompt_length, teacher.block_length, teacher.mask_id,
                                        cfg.distill.steps, cfg.distill.batch_size)
        self.eval_rows = task_rows(d, cfg.eval.rows, torch.Generator().manual_seed(10_007 + self.ctx.seed))
        g = torch.Generator().manual_seed(40_009 + self.ctx.seed)
        k = cfg.eval.entropy_states
        self.entropy_at = (torch.randint(0, len(rows), (k,), generator=g),
                           torch.randint(0, self.traj.num_forwards, (k,), generator=g))
        return {"model": teacher.model}

    def batch(self, step, stage):
        b = stage.batch_size or self.cfg.trainer.batch_size
        g = step_generator(self.ctx.seed, step)
        rows = torch.randint(0, len(self.traj.final), (b,), generator=g)
        t = torch.randint(0, self.traj.num_forwards, (b,), generator=g)
        canvas, region = self.traj.states(rows, t)
        plen = self.traj.prompts.shape[1]
        pad = torch.zeros(b, plen, dtype=torch.bool)
        targets = torch.cat([self.traj.prompts[rows], self.traj.final[rows]], 1)
        return {"ids": canvas, "targets": targets, "region": torch.cat([pad, region], 1)}

    def loss(self, modules, batch, stage):
        logits = modules.model(batch["ids"]).logits
        d = self.cfg.distill
        return certainty_forcing_loss(logits, batch["targets"], batch["region"], d.temperature, d.entropy_weight)

    def evaluate(self, modules, step):
        model, base, d = modules.model, self.base, self.base.data
        was_training = model.training
        model.eval()
        scores = decode_scores(model, self.eval_rows.to(self.ctx.device), d.prompt_length, base.block_length,
                               self.cfg.distill.batch_size, commit="threshold", threshold=self.cfg.eval.threshold,
                               mask_token_id=base.mask_id)
        entropy = mean_entropy(model, self.traj, *self.entropy_at)
        model.train(was_training)
        return {"val_accuracy": scores["accuracy"], "val_forwards_per_sequence": scores["forwards_per_sequence"],
                "val_entropy": entropy}

    def export(self, modules, folder, stage):
        modules.model.save_pretrained(str(folder / "model"))
        d = self.cfg.distill
        (folder / "task.json").write_text(json.dumps({
            **self.base.task, "certainty_forcing": {"teacher": str(self.cfg.model.init_from), "rows": d.rows,
                                                       "steps": d.steps, "temperature": d.temperature,
                                                       "entropy_weight": d.entropy_weight}}, indent=2))

"""Learn2PD's commit filter, trained on a copy pipeline's own decoding trajectories (``task: commit_filter``).

    python train.py configs/commit_filter_copy.yaml base.pipeline=runs/copy_bidirectional/pipeline

Data (built once, before the first step): the base model decodes ``trajectories.rows`` prompts with the
schedule rule (``trajectories.steps`` forwards over the answer; default one token per forward: the reference
decode). Every forward's canvas is rebuilt (pipelines/tasks/trajectories.py) and run through the model again;
each position of that forward's block that was still masked gives one example: its features
(latent/sampling/commit_filter.py: top-1 probability, top-2 margin, normalised entropy, position in the block,
the block's decoded share) and the label "its argmax is the token the reference decode ended with". Loss:
binary cross-entropy of the filter's logit, averaged over ``trainer.batch_size`` examples per step (drawn with
replacement from the step's generator).

Evaluation: held-out prompts decoded with ``commit="learned"`` at ``filter.threshold``: exact-match accuracy,
forwards per sequence, and agreement with the reference decode. The export (``<run>/pipeline``) is the filter
folder itself: ``generate(..., commit="learned", commit_filter="<run>/pipeline")``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from latent.sampling.commit_filter import FEATURES, CommitFilter, filter_features
from latent.training.config import ConfigError
from latent.training.task import StepLoss, Task, register_task, step_generator

from .copy import task_rows
from .trajectories import Trajectories, decode_scores, decode_trajectories, load_copy_pipeline, model_device

__all__ = ["CommitFilterTask", "commit_filter_loss", "trajectory_examples"]


@dataclass
class BaseSection:
    pipeline: str = "runs/copy_bidirectional/pipeline"  # a copy run or its pipeline folder


@dataclass
class TrajectorySection:
    rows: int = 64  # prompts decoded for training data
    steps: int | None = None  # the reference schedule's forwards over the answer (None: one token per forward)
    eval_rows: int = 16  # held-out prompts decoded by evaluate()
    batch_size: int = 32  # rows per decoding batch


@dataclass
class FilterSection:
    hidden_size: int = 32
    num_layers: int = 2
    threshold: float = 0.5  # filter_threshold used by evaluate()


def commit_filter_loss(model: CommitFilter, features: torch.Tensor, labels: torch.Tensor) -> StepLoss:
    """Mean binary cross-entropy of the filter's logits against labels (1: the argmax is final)."""
    logits = model(features)
    loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    accuracy = float(((logits > 0) == labels.bool()).float().mean())
    return StepLoss(loss, {"filter_accuracy": accuracy})


@torch.no_grad()
def trajectory_examples(model, traj: Trajectories, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [M, len(FEATURES)] (float32) and labels [M] of every masked position of every forward's block."""
    n, forwards = traj.final.shape[0], traj.num_forwards
    rows = torch.arange(n).repeat_interleave(forwards)
    ts = torch.arange(forwards).repeat(n)
    plen, bl = traj.prompts.shape[1], traj.block_length
    feats, labels = [], []
    for lo in range(0, len(rows), batch_size):
        r, t = rows[lo : lo + batch_size], ts[lo : lo + batch_size]
        canvas, region = traj.states(r, t)
        logits = model(canvas.to(model_device(model))).logits[:, plen:].float().cpu()
        start = (traj.block_of(t) * bl)[:, None] + torch.arange(bl)  # [k, bl] answer positions of each block
        block_logits = logits.gather(1, start[..., None].expand(-1, -1, logits.shape[-1]))
        candidates = region.gather(1, start)
        proposal = block_logits.clone()
        proposal[..., traj.mask_id] = float("-inf")
        right = proposal.argmax(-1) == traj.final[r].gather(1, start)
        f = filter_features(block_logits, candidates, traj.mask_id)
        feats.append(f[candidates].float())
        labels.append(right[candidates])
    return torch.cat(feats), torch.cat(labels)


@register_task("commit_filter")
class CommitFilterTask(Task):
    sections = {"base": BaseSection, "trajectories": TrajectorySection, "filter": FilterSection}
    defaults = {"trainer": {"batch_size": 512}, "optim": {"weight_decay": 0.0}}
    metric_fields = ("filter_accuracy",)
    eval_fields = ("val_accuracy", "val_forwards_per_sequence", "val_agreement", "val_positive_share")

    @classmethod
    def check_config(cls, cfg):
        t, f = cfg.trajectories, cfg.filter
        for key, value in (("trajectories.rows", t.rows), ("trajectories.eval_rows", t.eval_rows),
                           ("trajectories.batch_size", t.batch_size), ("filter.hidden_size", f.hidden_size),
                           ("filter.num_layers", f.num_layers)):
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        if t.steps is not None and t.steps < 1:
            raise ConfigError(f"trajectories.steps must be None (one token per forward) or >= 1, got {t.steps}")
        if not 0 < f.threshold < 1:
            raise ConfigError(f"filter.threshold must be in (0, 1), got {f.threshold}")

    def build(self):
        cfg = self.cfg
        self.base = load_copy_pipeline(cfg.base.pipeline)
        base, d = self.base, self.base.data
        bl = base.block_length
        rows = task_rows(d, cfg.trajectories.rows, torch.Generator().manual_seed(20_011 + self.ctx.seed))
        traj = decode_trajectories(base.model, rows, d.prompt_length, bl, base.mask_id, cfg.trajectories.steps,
                                   cfg.trajectories.batch_size)
        self.features, self.labels = trajectory_examples(base.model, traj)
        self.ctx.log(f"commit_filter: {len(self.labels)} examples from {len(rows)} decodes, "
                     f"{float(self.labels.float().mean()):.3f} of them final")
        self.eval_rows = task_rows(d, cfg.trajectories.eval_rows, torch.Generator().manual_seed(10_007 + self.ctx.seed))
        ref = decode_trajectories(base.model, self.eval_rows, d.prompt_length, bl, base.mask_id, cfg.trajectories.steps,
                                  cfg.trajectories.batch_size)
        self.reference = ref.final
        return {"filter": CommitFilter(hidden_size=cfg.filter.hidden_size, num_layers=cfg.filter.num_layers)}

    def batch(self, step, stage):
        b = stage.batch_size or self.cfg.trainer.batch_size
        index = torch.randint(0, len(self.labels), (b,), generator=step_generator(self.ctx.seed, step))
        return {"features": self.features[index], "labels": self.labels[index]}

    def loss(self, modules, batch, stage):
        return commit_filter_loss(modules.filter, batch["features"], batch["labels"])

    def evaluate(self, modules, step):
        base, d = self.base, self.base.data
        filt = modules.filter
        was_training = filt.training
        filt.eval()
        rows = self.eval_rows
        plen = d.prompt_length
        knobs = dict(commit="learned", commit_filter=filt, filter_threshold=self.cfg.filter.threshold,
                     mask_token_id=base.mask_id)
        scores = decode_scores(base.model, rows, plen, base.block_length, self.cfg.trajectories.batch_size, **knobs)
        filt.train(was_training)
        with torch.no_grad():
            positive = float((filt(self.features[:4096]) > 0).float().mean())
        return {"val_accuracy": scores["accuracy"], "val_forwards_per_sequence": scores["forwards_per_sequence"],
                "val_agreement": float((scores["answers"] == self.reference).float().mean()),
                "val_positive_share": positive}

    def export(self, modules, folder, stage):
        modules.filter.save_pretrained(str(folder))
        (folder / "task.json").write_text(json.dumps({
            "task": "commit_filter", "base_pipeline": str(self.cfg.base.pipeline), "features": list(FEATURES),
            "filter_threshold": self.cfg.filter.threshold}, indent=2))

"""The shared trainer of a learned decoding decision: a tiny head (latent/sampling/feature_mlp.py) fitted by
binary cross-entropy to labels read off a copy pipeline's own decoding trajectories.

Data (built once, before the first step): the base model decodes ``trajectories.rows`` prompts with the
schedule rule (``trajectories.steps`` forwards over the answer; default one token per forward: the reference
decode, pipelines/tasks/trajectories.py). Every forward's canvas is rebuilt and run through the model again
(`block_states`); a specialisation turns each forward's block logits into examples (`examples`). A step
draws ``trainer.batch_size`` examples with replacement from the step's generator.

Evaluation: held-out prompts decoded with the head in the sampler (`decode_knobs`): exact-match accuracy,
forwards per sequence, agreement with the reference decode, and the share of examples the head calls
positive. The export (``<run>/pipeline``) is the head's folder itself plus ``task.json``.

Specialisations set ``head`` (the module's name, also the config section of its size), ``make_head``,
``examples`` and ``decode_knobs``; ``commit_filter`` and ``block_predictor`` are the two.
"""

from __future__ import annotations

import abc
import json
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from latent.training.config import ConfigError
from latent.training.task import StepLoss, Task, step_generator

from .copy import task_rows
from .trajectories import Trajectories, decode_scores, decode_trajectories, load_copy_pipeline, model_device

__all__ = ["BaseSection", "TrajectorySection", "TrajectoryLearnerTask", "binary_head_loss", "block_states"]


@dataclass
class BaseSection:
    pipeline: str = "runs/copy_bidirectional/pipeline"  # a copy run or its pipeline folder


@dataclass
class TrajectorySection:
    rows: int = 64  # prompts decoded for training data
    steps: int | None = None  # the reference schedule's forwards over the answer (None: one token per forward)
    eval_rows: int = 16  # held-out prompts decoded by evaluate()
    batch_size: int = 32  # rows per decoding batch


def binary_head_loss(model, features: torch.Tensor, labels: torch.Tensor, metric: str) -> StepLoss:
    """Mean binary cross-entropy of the head's logits against labels (1: the decision is safe), and the
    share it gets right as ``metric``."""
    logits = model(features)
    loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    accuracy = float(((logits > 0) == labels.bool()).float().mean())
    return StepLoss(loss, {metric: accuracy})


@torch.no_grad()
def block_states(model, traj: Trajectories, batch_size: int = 256):
    """For every (row, forward) of the trajectories, in chunks: the block's logits [k, L, V] (float32, as
    the model saw that forward's canvas), the positions still masked then [k, L], whether each position's
    argmax (mask id excluded) is the final token [k, L], and the proposal logits (mask id at -inf)."""
    n, forwards = traj.final.shape[0], traj.num_forwards
    rows = torch.arange(n).repeat_interleave(forwards)
    ts = torch.arange(forwards).repeat(n)
    plen, bl = traj.prompts.shape[1], traj.block_length
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
        yield block_logits, candidates, right, proposal


class TrajectoryLearnerTask(Task):
    sections = {"base": BaseSection, "trajectories": TrajectorySection}
    defaults = {"trainer": {"batch_size": 512}, "optim": {"weight_decay": 0.0}}
    head: ClassVar[str] = ""  # the module's name and the config section of its size and threshold
    accuracy_metric: ClassVar[str] = ""  # the StepLoss metric of the head's accuracy on its batch
    eval_fields = ("val_accuracy", "val_forwards_per_sequence", "val_agreement", "val_positive_share")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.metric_fields = (cls.accuracy_metric,)  # train.csv logs the head's batch accuracy

    @abc.abstractmethod
    def make_head(self) -> torch.nn.Module:
        """The untrained head (a latent.sampling.feature_mlp.FeatureMLP)."""

    @abc.abstractmethod
    def examples(self, model, traj: Trajectories) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [M, F] (float32) and labels [M] (bool) of the trajectories."""

    @abc.abstractmethod
    def decode_knobs(self, head) -> dict:
        """The sampler knobs that decode with the head (besides mask_token_id)."""

    def export_info(self) -> dict:
        """What task.json records beyond the task name and the base pipeline."""
        return {}

    @classmethod
    def check_config(cls, cfg):
        t, h = cfg.trajectories, getattr(cfg, cls.head)
        for key, value in (("trajectories.rows", t.rows), ("trajectories.eval_rows", t.eval_rows),
                           ("trajectories.batch_size", t.batch_size), (f"{cls.head}.hidden_size", h.hidden_size),
                           (f"{cls.head}.num_layers", h.num_layers)):
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        if t.steps is not None and t.steps < 1:
            raise ConfigError(f"trajectories.steps must be None (one token per forward) or >= 1, got {t.steps}")
        if not 0 < h.threshold < 1:
            raise ConfigError(f"{cls.head}.threshold must be in (0, 1), got {h.threshold}")

    def _decode(self, rows):
        base, t = self.base, self.cfg.trajectories
        return decode_trajectories(base.model, rows, base.data.prompt_length, base.block_length, base.mask_id,
                                   t.steps, t.batch_size)

    def build(self):
        cfg = self.cfg
        self.base = load_copy_pipeline(cfg.base.pipeline)
        rows = task_rows(self.base.data, cfg.trajectories.rows, torch.Generator().manual_seed(20_011 + self.ctx.seed))
        self.features, self.labels = self.examples(self.base.model, self._decode(rows))
        self.ctx.log(f"{self.registered_name}: {len(self.labels)} examples from {len(rows)} decodes, "
                     f"{float(self.labels.float().mean()):.3f} of them positive")
        self.eval_rows = task_rows(self.base.data, cfg.trajectories.eval_rows,
                                   torch.Generator().manual_seed(10_007 + self.ctx.seed))
        self.reference = self._decode(self.eval_rows).final
        return {self.head: self.make_head()}

    def batch(self, step, stage):
        b = stage.batch_size or self.cfg.trainer.batch_size
        index = torch.randint(0, len(self.labels), (b,), generator=step_generator(self.ctx.seed, step))
        return {"features": self.features[index], "labels": self.labels[index]}

    def loss(self, modules, batch, stage):
        return binary_head_loss(getattr(modules, self.head), batch["features"], batch["labels"], self.accuracy_metric)

    def evaluate(self, modules, step):
        base = self.base
        head = getattr(modules, self.head)
        was_training = head.training
        head.eval()
        scores = decode_scores(base.model, self.eval_rows, base.data.prompt_length, base.block_length,
                               self.cfg.trajectories.batch_size, mask_token_id=base.mask_id, **self.decode_knobs(head))
        head.train(was_training)
        with torch.no_grad():
            positive = float((head(self.features[:4096]) > 0).float().mean())
        return {"val_accuracy": scores["accuracy"], "val_forwards_per_sequence": scores["forwards_per_sequence"],
                "val_agreement": float((scores["answers"] == self.reference).float().mean()),
                "val_positive_share": positive}

    def export(self, modules, folder, stage):
        getattr(modules, self.head).save_pretrained(str(folder))
        (folder / "task.json").write_text(json.dumps({
            "task": self.registered_name, "base_pipeline": str(self.cfg.base.pipeline), **self.export_info()},
            indent=2))

"""A learned sub-block size for ``stopping="dynamic_block"`` (CtrlDiff's trained block-length head, with a
supervised label), trained on a copy pipeline's own decoding trajectories (``task: block_predictor``).

    python train.py configs/block_predictor_copy.yaml base.pipeline=runs/copy_bidirectional/pipeline

The shared trainer is pipelines/tasks/trajectory_learner.py. Examples: at every forward of the reference
decode, the block's first still-masked position `f` starts one candidate sub-block per size of
``predictor.sizes``; each gives one example, its window's features (latent/sampling/block_predictor.py:
mean and least top-1 probability, mean normalised entropy, the size's share of the block, the block's
decoded share) and the label "every argmax in the window is the token the reference decode ended with", the
size at which committing the whole window at once would change nothing. Evaluation decodes with
``commit="threshold"`` at ``predictor.commit_threshold`` and ``stopping="dynamic_block"`` with the predictor
at ``predictor.threshold``. The export is the predictor folder: ``generate(..., stopping="dynamic_block",
dynamic_block_sizes=<sizes>, block_predictor="<run>/pipeline")``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from latent.sampling.block_predictor import WINDOW_FEATURES, BlockSizePredictor, window_features
from latent.training.config import ConfigError
from latent.training.task import register_task

from .trajectories import Trajectories
from .trajectory_learner import TrajectoryLearnerTask, block_states

__all__ = ["BlockPredictorTask", "window_examples"]


@dataclass
class PredictorSection:
    hidden_size: int = 32
    num_layers: int = 2
    sizes: list[int] = field(default_factory=lambda: [4, 8, 16])  # dynamic_block_sizes it chooses from
    threshold: float = 0.5  # block_predictor_threshold used by evaluate()
    commit_threshold: float = 0.9  # the threshold commit rule inside the sub-blocks, in evaluate()


def window_examples(model, traj: Trajectories, sizes, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [M, len(WINDOW_FEATURES)] (float32) and labels [M]: one per (row, forward, size) whose
    forward's block still had a masked position."""
    feats, labels = [], []
    for _, candidates, right, proposal in block_states(model, traj, batch_size):
        width = candidates.shape[1]
        live = candidates.any(1)
        first = torch.where(candidates, torch.arange(width), width).amin(1)
        f, window = window_features(proposal, candidates, first, sizes)
        safe = (right[:, None] | ~window).all(-1)  # [k, S] every argmax in the window is final
        feats.append(f[live].reshape(-1, f.shape[-1]).float())
        labels.append(safe[live].reshape(-1))
    return torch.cat(feats), torch.cat(labels)


@register_task("block_predictor")
class BlockPredictorTask(TrajectoryLearnerTask):
    sections = {**TrajectoryLearnerTask.sections, "predictor": PredictorSection}
    head = "predictor"
    accuracy_metric = "predictor_accuracy"

    @classmethod
    def check_config(cls, cfg):
        super().check_config(cfg)
        p = cfg.predictor
        if not p.sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in p.sizes):
            raise ConfigError(f"predictor.sizes must be positive ints (sub-block lengths), got {list(p.sizes)!r}")
        if not 0 < p.commit_threshold <= 1:
            raise ConfigError(f"predictor.commit_threshold must be in (0, 1], got {p.commit_threshold}")

    def make_head(self):
        return BlockSizePredictor(hidden_size=self.cfg.predictor.hidden_size, num_layers=self.cfg.predictor.num_layers)

    def examples(self, model, traj):
        return window_examples(model, traj, sorted(self.cfg.predictor.sizes))

    def decode_knobs(self, head):
        p = self.cfg.predictor
        return dict(commit="threshold", threshold=p.commit_threshold, stopping="dynamic_block",
                    dynamic_block_sizes=tuple(p.sizes), block_predictor=head, block_predictor_threshold=p.threshold)

    def export_info(self):
        p = self.cfg.predictor
        return {"features": list(WINDOW_FEATURES), "dynamic_block_sizes": list(p.sizes),
                "block_predictor_threshold": p.threshold}

"""Learn2PD's commit filter, trained on a copy pipeline's own decoding trajectories (``task: commit_filter``).

    python train.py configs/commit_filter_copy.yaml base.pipeline=runs/copy_bidirectional/pipeline

The shared trainer is pipelines/tasks/trajectory_learner.py. Examples: each position of a forward's block
that was still masked gives one, its features (latent/sampling/commit_filter.py: top-1 probability, top-2
margin, normalised entropy, position in the block, the block's decoded share) and the label "its argmax is
the token the reference decode ended with". Evaluation decodes with ``commit="learned"`` at
``filter.threshold``. The export is the filter folder: ``generate(..., commit="learned",
commit_filter="<run>/pipeline")``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latent.sampling.commit_filter import FEATURES, CommitFilter, filter_features
from latent.training.task import register_task

from .trajectories import Trajectories
from .trajectory_learner import TrajectoryLearnerTask, binary_head_loss, block_states

__all__ = ["CommitFilterTask", "commit_filter_loss", "trajectory_examples"]


@dataclass
class FilterSection:
    hidden_size: int = 32
    num_layers: int = 2
    threshold: float = 0.5  # filter_threshold used by evaluate()


def commit_filter_loss(model: CommitFilter, features: torch.Tensor, labels: torch.Tensor):
    """Mean binary cross-entropy of the filter's logits against labels (1: the argmax is final)."""
    return binary_head_loss(model, features, labels, "filter_accuracy")


def trajectory_examples(model, traj: Trajectories, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [M, len(FEATURES)] (float32) and labels [M] of every masked position of every forward's block."""
    feats, labels = [], []
    for block_logits, candidates, right, _ in block_states(model, traj, batch_size):
        f = filter_features(block_logits, candidates, traj.mask_id)
        feats.append(f[candidates].float())
        labels.append(right[candidates])
    return torch.cat(feats), torch.cat(labels)


@register_task("commit_filter")
class CommitFilterTask(TrajectoryLearnerTask):
    sections = {**TrajectoryLearnerTask.sections, "filter": FilterSection}
    head = "filter"
    accuracy_metric = "filter_accuracy"

    def make_head(self):
        return CommitFilter(hidden_size=self.cfg.filter.hidden_size, num_layers=self.cfg.filter.num_layers)

    def examples(self, model, traj):
        return trajectory_examples(model, traj)

    def decode_knobs(self, head):
        return dict(commit="learned", commit_filter=head, filter_threshold=self.cfg.filter.threshold)

    def export_info(self):
        return {"features": list(FEATURES), "filter_threshold": self.cfg.filter.threshold}

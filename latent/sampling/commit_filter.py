"""The learned commit filter of Learn2PD: a tiny MLP that reads cheap per-position features of one decoding
step and predicts whether a masked position's current argmax already is the token the answer will end with.

Features, one vector per position of the block (float64, every one in [0, 1]):

| index | name | value |
|---|---|---|
| 0 | `top1_probability` | `softmax(L)[x0]`, x0 the argmax with the mask id excluded (the `probability` confidence at temperature 0) |
| 1 | `top2_margin` | top-1 minus top-2 probability (mask id excluded) |
| 2 | `normalized_entropy` | `-sum p log p / log V` |
| 3 | `block_position` | the position's index in the block / (block length - 1) |
| 4 | `block_progress` | the share of the block's positions that held a token before this step |

Probabilities are those of the (guided) logits the confidence part sees. `CommitFilter` is a diffusers
`ModelMixin` (feature_mlp.py), saved as `config.json` + safetensors; `load_commit_filter(path)` loads (and remembers) one.
The commit part that uses it is `commit_learned.LearnedCommit` (`commit="learned"`); the task that trains it is
`commit_filter` (pipelines/tasks/commit_filter.py).
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import register_to_config

from .feature_mlp import FeatureMLP, load_feature_mlp

FEATURES = ("top1_probability", "top2_margin", "normalized_entropy", "block_position", "block_progress")


def filter_features(logits: torch.Tensor, candidates: torch.BoolTensor, mask_token_id: int) -> torch.Tensor:
    """[b, L, len(FEATURES)] float64 features of one step: logits [b, L, V] of the block, candidates [b, L]
    the positions still masked before the step (they set `block_progress`)."""
    probs = logits.double().softmax(-1)
    top = probs.clone()
    top[..., mask_token_id] = 0  # the mask id is never proposed (step.decode_step)
    top = top.topk(2, dim=-1).values
    entropy = torch.special.entr(probs).sum(-1) / math.log(logits.shape[-1])
    length = logits.shape[1]
    position = torch.arange(length, dtype=torch.float64, device=logits.device) / max(length - 1, 1)
    progress = 1 - candidates.double().mean(1, keepdim=True)
    return torch.stack([top[..., 0], top[..., 0] - top[..., 1], entropy,
                        position.expand_as(entropy), progress.expand_as(entropy)], dim=-1)


class CommitFilter(FeatureMLP):
    """features [..., F] -> logit [...] that the position's argmax is final (sigmoid for the probability):
    `num_layers` linear layers with ReLU between them."""

    feature_names = FEATURES

    @register_to_config
    def __init__(self, num_features: int = len(FEATURES), hidden_size: int = 32, num_layers: int = 2,
                 features: tuple = FEATURES):
        super().__init__()
        self.build(features, num_features, hidden_size, num_layers)


def load_commit_filter(path) -> CommitFilter:
    """A saved `CommitFilter` folder (config.json + safetensors), or the filter itself. Loaded once per
    folder and file time, so every sampler call does not read it again."""
    return load_feature_mlp(CommitFilter, path, "commit_filter",
                            "train one with `python train.py configs/commit_filter_copy.yaml`")

"""A learned sub-block size for `stopping="dynamic_block"` (CtrlDiff decides each block's length with a
trained head): a tiny MLP that reads cheap features of one candidate sub-block and predicts whether every
argmax inside it already is the token the answer will end with ("this size is safe").

When a row starts a sub-block at its first masked position `f` of the block, each size `s` of
`dynamic_block_sizes` gives a window: the still-masked positions in [f, f + s), clipped to the block's end.
Its features (float64, every one in [0, 1]):

| index | name | value |
|---|---|---|
| 0 | `mean_top1_probability` | mean over the window of `softmax(L)[x0]` (the mask id excluded from L) |
| 1 | `min_top1_probability` | the least sure position of the window |
| 2 | `mean_normalized_entropy` | mean over the window of `-sum p log p / log V` |
| 3 | `size_share` | `s` / the block's length |
| 4 | `block_progress` | the share of the block's positions that held a token before this step |

The part takes the largest size whose probability of being safe is > `block_predictor_threshold`, else the
smallest. The entropy rule of `dynamic_block` is the special case of one linear layer whose logit is
`(dynamic_block_entropy - mean entropy in nats) / log V` (tests/test_learned_decoding.py). The task that
trains it is `block_predictor` (pipelines/tasks/block_predictor.py), on a model's own decoding trajectories;
CtrlDiff trains its head with reinforcement learning, which this supervised label stands in for.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import register_to_config

from .feature_mlp import FeatureMLP, load_feature_mlp

WINDOW_FEATURES = ("mean_top1_probability", "min_top1_probability", "mean_normalized_entropy", "size_share",
                   "block_progress")


def window_features(logits: torch.Tensor, candidates: torch.BoolTensor, first: torch.Tensor,
                    sizes) -> tuple[torch.Tensor, torch.BoolTensor]:
    """Features [b, len(sizes), len(WINDOW_FEATURES)] (float64) of the windows [first, first + size) of one
    step, and the windows [b, len(sizes), L] themselves (candidates inside them). `logits` [b, L, V] are the
    block's proposal logits (mask id at -inf), `candidates` [b, L] its still-masked positions, `first` [b]
    where each row's sub-block starts."""
    b, width = candidates.shape
    probs = logits.double().softmax(-1)
    top1 = probs.amax(-1)  # [b, L]
    entropy = torch.special.entr(probs).sum(-1) / math.log(logits.shape[-1])
    position = torch.arange(width, device=candidates.device)
    sizes_t = torch.tensor([int(s) for s in sizes], device=candidates.device)
    window = (candidates[:, None] & (position >= first[:, None, None])
              & (position < (first[:, None] + sizes_t)[..., None]))  # [b, S, L]
    count = window.sum(-1).clamp(min=1).double()
    mean_top1 = top1[:, None].masked_fill(~window, 0).sum(-1) / count
    min_top1 = top1[:, None].masked_fill(~window, 1.0).amin(-1)
    mean_entropy = entropy[:, None].masked_fill(~window, 0).sum(-1) / count
    share = (sizes_t.double() / width).expand(b, -1)
    progress = (1 - candidates.double().mean(1, keepdim=True)).expand(-1, len(sizes_t))
    return torch.stack([mean_top1, min_top1, mean_entropy, share, progress], dim=-1), window


class BlockSizePredictor(FeatureMLP):
    """features [..., F] -> logit [...] that every argmax of the window is final: `num_layers` linear layers
    with ReLU between them."""

    feature_names = WINDOW_FEATURES

    @register_to_config
    def __init__(self, num_features: int = len(WINDOW_FEATURES), hidden_size: int = 32, num_layers: int = 2,
                 features: tuple = WINDOW_FEATURES):
        super().__init__()
        self.build(features, num_features, hidden_size, num_layers)


def load_block_predictor(path) -> BlockSizePredictor:
    """A saved `BlockSizePredictor` folder, or the predictor itself (loaded once per folder and file time)."""
    return load_feature_mlp(BlockSizePredictor, path, "block_predictor",
                            "train one with `python train.py configs/block_predictor_copy.yaml`")

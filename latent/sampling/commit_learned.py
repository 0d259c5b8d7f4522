"""Learn2PD's learned commit rule: commit the masked positions that a trained filter believes are already
final, instead of a fixed threshold on confidence.

`commit="learned"` with `commit_filter=<folder of a CommitFilter>` (or the filter object) and
`filter_threshold` (default 0.5): every candidate whose filter probability is > filter_threshold, and always
the candidate with the highest filter score (the block must advance). The filter sees the features of
commit_filter.py, computed from the step's logits, which `step.decode_step` hands to commit parts that set
`reads_logits`. The rule keeps no memory between steps and runs each block until it has no mask.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from .commit import confidence_rank
from .commit_filter import filter_features, load_commit_filter
from .registry import Part, register_commit


@register_commit("learned")
class LearnedCommit(Part):
    steps_per_block = None
    reads_logits = True  # decode_step passes logits=

    def __init__(self, commit_filter, filter_threshold: float = 0.5):
        self.check_config(SimpleNamespace(commit_filter=commit_filter, filter_threshold=filter_threshold))
        self.filter = load_commit_filter(commit_filter)
        self.cutoff = math.log(filter_threshold / (1 - filter_threshold))  # sigmoid(s) > t  <=>  s > logit(t)

    @classmethod
    def from_config(cls, config):
        return cls(commit_filter=config.commit_filter, filter_threshold=config.filter_threshold)

    @classmethod
    def check_config(cls, config) -> None:
        if config.commit_filter is None:
            raise ValueError("commit='learned' needs `commit_filter`, the folder of a trained CommitFilter "
                             "(python train.py configs/commit_filter_copy.yaml exports one to <run>/pipeline).")
        if not 0 < config.filter_threshold < 1:
            raise ValueError(f"`filter_threshold` must be in (0, 1) (a probability), got {config.filter_threshold}.")

    def begin_block(self, state, masked):
        pass

    def scores(self, logits, candidates, state) -> torch.Tensor:
        """[b, L] float64 filter logits, -inf off the candidates."""
        with torch.no_grad():
            score = self.filter(filter_features(logits, candidates, state.mask_token_id))
        return score.masked_fill(~candidates, float("-inf"))

    def __call__(self, confidence, candidates, state, logits=None):
        if logits is None:
            raise RuntimeError("commit='learned' reads the step's logits; call it through step.decode_step.")
        score = self.scores(logits, candidates, state)
        return candidates & ((score > self.cutoff) | (confidence_rank(score) == 0))

"""Key/value cache of the backbone.

Keys are stored after rotary embedding (Fast-dLLM stores them before): the attention result is the
same to float tolerance, and the cached keys are not rotated again at every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    keys: list[torch.Tensor]  # per layer [B, Hkv, L, d]
    values: list[torch.Tensor]  # per layer [B, Hkv, L, d]
    key_mask: torch.Tensor  # [B, L] bool, False at padding slots
    hidden: torch.Tensor | None = None  # [B, L, D] final hidden states, kept by logit-shifted models only

    @property
    def length(self) -> int:
        return self.key_mask.shape[1]

    def __len__(self) -> int:
        return self.length

    @property
    def batch_size(self) -> int:
        return self.key_mask.shape[0]

    def crop(self, length: int) -> KVCache:
        """The cache of the first `length` slots (views, no copy)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"crop length must be in [0, {self.length}], got {length}.")
        return KVCache(
            [k[:, :, :length] for k in self.keys],
            [v[:, :, :length] for v in self.values],
            self.key_mask[:, :length],
            None if self.hidden is None else self.hidden[:, :length],
        )

    def select(self, rows: torch.Tensor) -> KVCache:
        """Keep only some batch rows (index tensor or boolean mask), e.g. when finished rows leave."""
        return KVCache([k[rows] for k in self.keys], [v[rows] for v in self.values], self.key_mask[rows],
                       None if self.hidden is None else self.hidden[rows])

    def clone(self) -> KVCache:
        return KVCache(
            [k.clone() for k in self.keys], [v.clone() for v in self.values], self.key_mask.clone(),
            None if self.hidden is None else self.hidden.clone(),
        )

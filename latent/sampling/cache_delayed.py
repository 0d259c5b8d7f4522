"""dKV-Cache's decode variant: delayed caching of the K/V of decoded tokens (docs/sampling.md, "Caches").

A token's keys and values change the step it is decoded (its input goes from the mask to the token),
then settle; so they are cached one step late. At forward i of a block (i = 0, 1, ...):

- i = 0, i = 1 and every i that is a multiple of `dkv_refresh`: a full forward; from i = 1 on its K/V
  (every slot) become the cache.
- otherwise only the positions that were masked at the previous forward's input run (the tokens that
  step decoded, and every position still masked); they attend to their own fresh K/V and to the cached
  K/V of every other slot (prefix embeddings, prompt, tokens decoded at least two forwards ago), and
  their fresh K/V replace the cached ones.

This is approximate: a cached K/V was computed before later tokens were decoded. Bidirectional layout
only (the forward runs a gathered set of positions, which the layout masks of the other layouts do not
describe). Positions that do not run get no logits this step (zeros): they hold tokens already, so no
commit rule reads them, but revision parts and SchED would (the config refuses them).
"""

from __future__ import annotations

import torch

from ..cache import KVCache
from .cache_exact import NoCache
from .checks import model_config_value
from .registry import register_cache


@register_cache("dkv")
class DelayedKVCache(NoCache):
    """dKV-Cache-Decode: the K/V of decoded tokens are cached one forward after they are decoded and reused
    until the next refresh (every `dkv_refresh` forwards of a block, and its first two)."""

    layouts = ("bidirectional",)

    def __init__(self, dkv_refresh: int = 4):
        self.refresh = int(dkv_refresh)

    @classmethod
    def from_config(cls, config):
        return cls(dkv_refresh=config.dkv_refresh)

    def start(self, state):
        if model_config_value(state.model, "logit_shift"):
            raise ValueError("cache='dkv' runs a gathered set of positions, which a logit-shifted model cannot "
                             "predict from; use cache='none' or 'dual'.")
        self.kv = self.masked_before = None

    def logits(self, state):
        step = state.block_step
        masked = state.guidance.repeat(state.x == state.mask_token_id)  # [model rows, N], at this forward's input
        if step < 2 or step % self.refresh == 0 or self.kv is None:
            out = state.forward(0, state.canvas_len, use_cache=step >= 1)
            self.kv = out.past_key_values  # None at a block's first forward: its K/V hold the masks just decoded
            result = out.logits, 0
        else:
            result = self._fresh_logits(state, self.masked_before), state.block_start
        self.masked_before = masked
        return result

    def _fresh_logits(self, state, fresh: torch.Tensor) -> torch.Tensor:
        """Run the positions `fresh` [model rows, N] against the cache; write their K/V into it; return the
        current block's logits (zeros where nothing ran)."""
        p, start, end = state.prefix_len, state.block_start, state.block_end
        n = int(fresh.sum(1).max())
        if n == 0:  # nothing was masked at the last forward: no position needs a new forward
            return torch.zeros(fresh.shape[0], end - start, state.model.config.vocab_size, device=fresh.device)
        positions = fresh.int().sort(dim=1, descending=True, stable=True).indices[:, :n]  # fresh first, in order
        valid = fresh.gather(1, positions)  # False: padding of rows with fewer fresh positions
        ids = state.guidance.ids(state.x, 0, state.prompt_len, state.mask_token_id).gather(1, positions)
        keep = self.kv.key_mask.clone()
        keep[:, p:] &= ~fresh  # a fresh position's old K/V are replaced by this forward's, not attended
        out = state.model(ids, attention_mask=valid.long(), position_ids=p + positions, use_cache=True,
                          past_key_values=KVCache(self.kv.keys, self.kv.values, keep))
        state.nfe += 1
        state.forward_tokens += ids.numel()
        slots = self.kv.length
        for cached, new in ((self.kv.keys, out.past_key_values.keys), (self.kv.values, out.past_key_values.values)):
            for old, fresh_kv in zip(cached, new, strict=True):
                index = (p + positions)[:, None, :, None].expand(-1, old.shape[1], -1, old.shape[3])
                kept = old.gather(2, index)  # padding slots write their old K/V back
                old.scatter_(2, index, torch.where(valid[:, None, :, None], fresh_kv[:, :, slots:], kept))
        logits = out.logits.new_zeros(ids.shape[0], end - start, out.logits.shape[-1])
        inside = valid & (positions >= start) & (positions < end)
        rows, cols = inside.nonzero(as_tuple=True)
        logits[rows, positions[rows, cols] - start] = out.logits[rows, cols]
        return logits

    def select(self, index):
        if self.kv is not None:
            self.kv = self.kv.select(index)
        if self.masked_before is not None:
            self.masked_before = self.masked_before[index]

"""Fast-dLLM's approximate caches for bidirectional models (docs/sampling.md, "Caches").

At every block start one full forward refreshes the cache; its logits serve the block's step 0.
Later steps of the block reuse K/V that were computed before this block's commits, so they are
stale: tokens can differ from the uncached run. That is the documented trade of speed for accuracy.
"""

from __future__ import annotations

from .cache_exact import NoCache
from .registry import register_cache


@register_cache("prefix")
class ApproxPrefixCache(NoCache):
    """Keep the K/V of everything before the block; later steps run the block and all after it."""

    layouts = ("bidirectional",)

    def logits(self, state):
        # With independent rows (row_blocks) the refresh runs when any row starts a block, and the cache ends
        # at the earliest row's block; later steps run from there even after that row leaves the batch.
        if state.block_step == 0:
            out = state.forward(0, state.canvas_len, use_cache=True)
            self.cached_to = state.block_start
            self.kv = out.past_key_values.crop(state.prefix_len + self.cached_to)
            return out.logits, 0
        return state.forward(self.cached_to, state.canvas_len, past_key_values=self.kv).logits, self.cached_to

    def select(self, index):
        self.kv = self.kv.select(index)


@register_cache("dual")
class ApproxDualCache(ApproxPrefixCache):
    """Keep the K/V of every position; later steps run only the block, write its fresh K/V in place
    (cache_position) and attend to the stale prefix and suffix. With dual_refresh_every = k > 1 only every
    k-th block start refreshes everything; the other block starts run [previous block | block] in place,
    the previous block being what changed since its last forward (its last commits)."""

    def __init__(self, dual_refresh_every: int = 1):
        self.every = int(dual_refresh_every)
        self.kv = None
        self.rows_left, self.refreshed_at = False, None

    @classmethod
    def from_config(cls, config):
        return cls(dual_refresh_every=config.dual_refresh_every)

    def start(self, state):
        self.kv, self.rows_left, self.refreshed_at = None, False, None

    def logits(self, state):
        if state.row_blocks is not None:
            # The block is the span of the rows' blocks, from the earliest row's. A full refresh runs when the
            # earliest row's block has changed since the last one, or a row has left; every other forward
            # rewrites the span in place. So the K/V before the span are the refresh's, taken when the span
            # last started there (nothing before it has changed since), and a row that starts a later block
            # needs no refresh: its finished block is inside the span and is rewritten with its last commits.
            if self.kv is None or self.rows_left or state.block != self.refreshed_at:
                self.rows_left, self.refreshed_at = False, state.block
                return self._refresh(state)
            return self._rewrite(state, state.block_start)
        if state.block_step == 0 and (self.kv is None or state.block % self.every == 0):
            return self._refresh(state)
        return self._rewrite(state, state.block_bounds(state.block - 1)[0] if state.block_step == 0 else state.block_start)

    def _refresh(self, state):
        """A full forward whose K/V become the cache."""
        out = state.forward(0, state.canvas_len, use_cache=True)
        self.kv = out.past_key_values
        return out.logits, 0

    def _rewrite(self, state, lo: int):
        """Run canvas [lo, block end) against the cache, writing its fresh K/V in place."""
        out = state.forward(lo, state.block_end, past_key_values=self.kv, cache_position=state.prefix_len + lo,
                            use_cache=True)
        self.kv = out.past_key_values
        return out.logits, lo

    def select(self, index):
        super().select(index)
        self.rows_left = True

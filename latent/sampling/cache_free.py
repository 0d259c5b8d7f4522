"""FreeCache's approximate K/V reuse for bidirectional models (docs/sampling.md, "More decoders of the
literature").

The K/V of positions that no longer change settle, so they are computed once and then frozen:

- The run's first forward is a full forward; the K/V of the prefix embeddings and the prompt (everything
  before the first block) are frozen from it.
- Every later forward runs only the current block and the positions after it (at most `freecache_window`
  of them after the block's end; None: all) against the frozen K/V, with use_cache=True.
- When a block starts, the K/V of the block just finished are frozen as the forward that ran it last (its
  last step, before that step's commits) computed them; they are never recomputed.
- With `freecache_refresh` = n > 0, every n-th forward of the run is a full forward whose K/V (up to the
  current block) replace the frozen ones; n = 1 is no cache.

Frozen K/V were computed before later tokens were decoded, so tokens can differ from the uncached run:
the trade of speed for accuracy. Unlike Fast-dLLM's prefix cache, nothing is recomputed at block starts.
"""

from __future__ import annotations

from .cache_exact import NoCache
from .registry import part_name, register_cache


@register_cache("freecache")
class FreeCache(NoCache):
    """FreeCache: the prompt's and the finished blocks' K/V are frozen the last time a forward ran them;
    later forwards run the block and what follows it. `freecache_refresh` = n recomputes everything every
    n-th forward (0: never)."""

    layouts = ("bidirectional",)

    def __init__(self, freecache_refresh: int = 0, freecache_window: int | None = None):
        self.refresh, self.window = int(freecache_refresh), freecache_window

    @classmethod
    def from_config(cls, config):
        return cls(freecache_refresh=config.freecache_refresh, freecache_window=config.freecache_window)

    @classmethod
    def check_config(cls, config) -> None:
        refresh, window = config.freecache_refresh, config.freecache_window
        if not isinstance(refresh, int) or isinstance(refresh, bool) or refresh < 0:
            raise ValueError(f"`freecache_refresh` must be an int >= 0 (0 = never, 1 = no cache), got {refresh!r}.")
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 0):
            raise ValueError(f"`freecache_window` must be None (every later position) or an int >= 0, got {window!r}.")
        if part_name(config.verifier) == "freedave":
            raise ValueError("cache='freecache' freezes K/V from the forward that ran them, which verifier='freedave' "
                             "runs on drafts; use verifier='none' or another cache.")

    def start(self, state):
        self.frozen = self.latest = None  # frozen K/V up to `frozen_to`; the last forward's returned cache
        self.frozen_to, self.forwards = 0, 0

    def logits(self, state):
        start, n = state.block_start, self.forwards
        self.forwards += 1
        if self.frozen is None or (self.refresh and n % self.refresh == 0):
            out = state.forward(0, state.canvas_len, use_cache=True)
            self.latest, self.frozen_to = out.past_key_values, start
            self.frozen = self.latest.crop(state.prefix_len + start)
            return out.logits, 0
        if start > self.frozen_to:  # a new block: freeze the finished one as its last forward left it
            self.frozen, self.frozen_to = self.latest.crop(state.prefix_len + start), start
        hi = state.canvas_len if self.window is None else min(state.canvas_len, state.block_end + self.window)
        out = state.forward(start, hi, past_key_values=self.frozen, use_cache=True)
        self.latest = out.past_key_values
        return out.logits, start

    def select(self, index):
        if self.frozen is not None:
            self.frozen, self.latest = self.frozen.select(index), self.latest.select(index)

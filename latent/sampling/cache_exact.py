"""Caches that change no token: no cache, and K/V reuse where the layout makes it exact.

A cache part returns, for the current step, the model-batch logits of canvas positions [lo, lo + n)
(the current block included) and lo. `layouts` names the attention layouts it is valid for (None: any);
the check applies when the model has `config.attention_layout`.
"""

from __future__ import annotations

from .registry import Part, register_cache


@register_cache("none")
class NoCache(Part):
    """A full-canvas forward every step: model(x, attention_mask=m). Under block_causal and causal
    attention the positions after the current (model) block are left out: the block never sees them."""

    layouts = None

    def start(self, state):
        pass

    def logits(self, state):
        return state.forward(0, state.visible_end()).logits, 0

    def select(self, index):
        pass


@register_cache("prefix_exact")
class ExactPrefixCache(NoCache):
    """The prompt (and prefix embeddings) run once with use_cache=True; every step runs the generated
    canvas against that cache. Exact when prompt K/V never see the canvas. When blocks count from slot 0
    (block_alignment="start") only the prompt's whole blocks are cached; the rest of its last block runs
    with the canvas (nothing is cached when that block starts inside the prefix embeddings)."""

    layouts = ("prefix", "block_causal", "causal")

    def start(self, state):
        self.kv, self.cached_to = None, None  # canvas positions [0, cached_to) are in the cache; None: nothing
        end = state.cacheable_prompt()
        if end >= 0 and state.prefix_len + end > 0:
            self.kv, self.cached_to = state.forward(0, end, use_cache=True).past_key_values, end

    def logits(self, state):
        if self.kv is None:
            return super().logits(state)
        lo = self.cached_to
        return state.forward(lo, state.visible_end(), past_key_values=self.kv).logits, lo

    def select(self, index):
        if self.kv is not None:
            self.kv = self.kv.select(index)


@register_cache("block_exact")
class ExactBlockCache(ExactPrefixCache):
    """Block-causal: steps run only the current model block (from the end of the cache) against the cache.
    A finished block's K/V are appended once, by running [finished block | next block] at the next block's
    first step with use_cache=True and cropping the returned cache to end at the finished block. With
    sub-blocks (`sub_block_length`) every sub-block's step runs its whole model block, and the block's K/V
    are cached when the whole block is done."""

    layouts = ("block_causal",)

    def logits(self, state):
        # With independent rows (row_blocks) the cache ends at the earliest row's model block and the forward
        # runs to the furthest row's; the finished blocks in between run again, exactly (block-causal).
        block_start, end = state.model_block(state.block_start)[0], state.visible_end()
        lo = 0 if self.kv is None else self.cached_to
        grow = block_start > (-1 if self.kv is None else lo) and state.prefix_len + block_start > 0
        out = state.forward(lo, end, past_key_values=self.kv, use_cache=grow)
        if grow:  # the blocks before this one are finished: their K/V are exact now
            self.kv, self.cached_to = out.past_key_values.crop(state.prefix_len + block_start), block_start
        return out.logits, lo

"""Caches that change no token: no cache, and K/V reuse where the layout makes it exact.

A cache part returns, for the current step, the model-batch logits of canvas positions [lo, lo + n)
(the current block included) and lo. `layouts` names the attention layouts it is valid for (None: any);
the check applies when the model has `config.attention_layout`.
"""

from __future__ import annotations

from .registry import Part, register_cache


@register_cache("none")
class NoCache(Part):
    """A full-canvas forward every step: model(x, attention_mask=m)."""

    layouts = None

    def start(self, state):
        pass

    def logits(self, state):
        return state.forward(0, state.canvas_len).logits, 0

    def select(self, index):
        pass


@register_cache("prefix_exact")
class ExactPrefixCache(NoCache):
    """The prompt (and prefix embeddings) run once with use_cache=True; every step runs the whole
    generated canvas against that cache. Exact when prompt K/V never see the canvas."""

    layouts = ("prefix", "block_causal", "causal")

    def start(self, state):
        self.kv = state.forward(0, state.prompt_len, use_cache=True).past_key_values

    def logits(self, state):
        lo = state.prompt_len
        return state.forward(lo, state.canvas_len, past_key_values=self.kv).logits, lo

    def select(self, index):
        self.kv = self.kv.select(index)


@register_cache("block_exact")
class ExactBlockCache(ExactPrefixCache):
    """Block-causal: steps run only the current block against the cache. A finished block's K/V are
    appended once, by running [finished block | next block] at the next block's first step with
    use_cache=True and cropping the returned cache to end at the finished block."""

    layouts = ("block_causal",)

    def start(self, state):
        super().start(state)
        self.cached_to = state.prompt_len  # canvas positions [0, cached_to) are in the cache

    def logits(self, state):
        lo, start, end = self.cached_to, state.block_start, state.block_end
        if lo == start:
            return state.forward(start, end, past_key_values=self.kv).logits, start
        out = state.forward(lo, end, past_key_values=self.kv, use_cache=True)
        self.kv, self.cached_to = out.past_key_values.crop(state.prefix_len + start), start
        return out.logits, lo

"""End-of-Text Prediction (EoTP, Learn2PD): once a row has committed an EOS, nothing after it is decoded.

`stopping="eotp"` (needs `eos_token_id`): after every step, in each row that holds an EOS among its
generated tokens, every position after the first EOS becomes EOS at once (masked positions, and the rare
token committed after it); the row leaves the batch as soon as no masked position remains, i.e. once the
positions before the EOS are decoded. So the commit rule works only on the text before the EOS, the model
sees EOS padding after it, and no forward is spent on the padding.

`eos_early_stop` differs: it fills the tail only once everything before the first EOS is decoded, so until
then the positions after the EOS stay masked candidates (they take commits and, in a bidirectional model,
shape the context). A row that never commits an EOS decodes as with `block_full`.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from .registry import Part, register_stopping


@register_stopping("eotp")
class EndOfTextPrediction(Part):
    ends_full_blocks = False

    def __init__(self, eos_token_id: int | None = None):
        self.check_config(SimpleNamespace(eos_token_id=eos_token_id))
        self.eos = int(eos_token_id)

    @classmethod
    def from_config(cls, config):
        return cls(eos_token_id=config.eos_token_id)

    @classmethod
    def check_config(cls, config) -> None:
        if config.eos_token_id is None:
            raise ValueError("stopping='eotp' needs `eos_token_id`; pass the tokenizer's eos_token_id.")

    def __call__(self, state):
        gen = state.x[:, state.prompt_len :]
        is_eos = gen == self.eos
        has_eos = is_eos.any(1)
        first = is_eos.long().argmax(1)
        tail = (torch.arange(gen.shape[1], device=gen.device) > first[:, None]) & has_eos[:, None]
        gen.masked_fill_(tail, self.eos)
        return has_eos & ~(gen == state.mask_token_id).any(1)

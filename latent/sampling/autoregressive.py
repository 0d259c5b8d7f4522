"""Autoregressive decoding: one token per forward, left to right, batched, with the model's KV cache.

The baseline every diffusion decoder is compared with. It drives any callable that maps tokens to
`.logits` [B, N, V] (a causal `DiffusionTransformer`, for the cache): the first forward runs
[prefix embeddings | prompt] with use_cache=True, every later one only the last token against the
cache (or, with use_cache=False, the whole sequence again: the reference the cache is tested against).
Sampling is greedy at temperature 0, else `gumbel_max`, the Gumbel-max draw of the diffusion sampler.
docs/sampling.md states the rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils import BaseOutput

from .checks import check_inputs, model_config_value
from .proposal import gumbel_max, top_k_filter, top_p_filter, uniform
from .sampler import progress_bar_for
from .state import key_padding_mask

__all__ = ["AutoregressiveOutput", "autoregressive_generate"]


@dataclass
class AutoregressiveOutput(BaseOutput):
    """
    sequences: [B, prompt_len + n] the prompt, then the n <= max_new_tokens new tokens (fewer when every
        row emitted EOS early).
    new_tokens: [B, n] the new tokens alone; after a row's first EOS, EOS again (padding).
    confidence: [B, n] the probability of each chosen token under softmax of the (vocabulary-restricted,
        untempered) logits; 1 at the EOS padding of finished rows.
    nfe: model forwards.
    """

    sequences: torch.LongTensor
    new_tokens: torch.LongTensor
    confidence: torch.Tensor
    nfe: int = 0


@torch.no_grad()
def autoregressive_generate(
    model: Callable,
    input_ids: torch.LongTensor,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    prefix_embeds: torch.Tensor | None = None,
    prefix_mask: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    allowed_tokens: torch.BoolTensor | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    callback: Callable[[int, torch.Tensor, dict], Any] | None = None,
    progress_bar: bool | Callable | None = None,
) -> AutoregressiveOutput:
    """Append up to `max_new_tokens` tokens to each (left-padded) prompt.

    input_ids [B, L] (L >= 1: e.g. a BOS after prefix embeddings) with attention_mask [B, L] (1 = real,
    left padding); prefix_embeds [B, P, D] with prefix_mask [B, P] from modality adapters.
    temperature: 0 = greedy, else a Gumbel-max sample of softmax(L / T), after the top_k / top_p filters
    (which act only when sampling). allowed_tokens [max_new_tokens, V] bool: the vocabulary of each new
    position. eos_token_id: a row that emitted it emits it again, and the loop stops once every row has.
    callback(step, sequences, info) after every token, info = {"tokens", "confidence", "done", "nfe"};
    progress_bar: True for tqdm, or a factory called as progress_bar(total=...).
    """
    input_ids, attention_mask, prefix_embeds, prefix_mask = check_inputs(
        input_ids, attention_mask, prefix_embeds, prefix_mask
    )
    batch, prompt_len = input_ids.shape
    if prompt_len == 0:
        raise ValueError("`input_ids` is empty; the next token is read at the last prompt token, so give at least "
                         "one (e.g. a BOS after the prefix embeddings).")
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"`max_new_tokens` must be a positive int, got {max_new_tokens!r}.")
    if temperature < 0:
        raise ValueError(f"`temperature` must be >= 0 (0 = greedy), got {temperature}.")
    layout = model_config_value(model, "attention_layout")
    if use_cache and layout not in (None, "causal"):
        raise ValueError(f"The KV cache is exact only for a causal model; this one's attention_layout is {layout!r}. "
                         "Use use_cache=False or a causal model.")
    device = input_ids.device
    if allowed_tokens is not None:
        if allowed_tokens.dtype != torch.bool or allowed_tokens.ndim != 2 or allowed_tokens.shape[0] < max_new_tokens:
            raise ValueError(f"`allowed_tokens` must be a bool [max_new_tokens={max_new_tokens}, vocab] tensor, got "
                             f"{allowed_tokens.dtype} {tuple(allowed_tokens.shape)}.")
        allowed_tokens = allowed_tokens.to(device)
    n_prefix = 0 if prefix_embeds is None else prefix_embeds.shape[1]
    keys = key_padding_mask(input_ids, attention_mask, n_prefix, prefix_mask, max_new_tokens)

    seq, past, nfe = input_ids, None, 0
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    confidences = []
    bar = progress_bar_for(progress_bar, max_new_tokens)
    for i in range(max_new_tokens):
        if past is None:  # the whole sequence: the first step, or every step without a cache
            call = {"attention_mask": None if keys is None else keys[:, : n_prefix + seq.shape[1]]}
            if prefix_embeds is not None:
                call["prefix_embeds"] = prefix_embeds
            out = model(seq, **call, **({"use_cache": True} if use_cache else {}))
        else:  # the new token is a real slot: the cache's key mask covers the rest
            out = model(seq[:, -1:], past_key_values=past, use_cache=True)
        nfe += 1
        past = getattr(out, "past_key_values", None) if use_cache else None
        logits = out.logits[:, -1].float()
        if allowed_tokens is not None:
            logits = logits.masked_fill(~allowed_tokens[i], float("-inf"))
        if temperature > 0:
            filtered = top_p_filter(top_k_filter(logits, top_k), top_p, temperature)
            token = gumbel_max(filtered, temperature, uniform(filtered.shape, generator, device))
        else:
            token = logits.argmax(-1)
        confidence = logits.softmax(-1).gather(-1, token[:, None]).squeeze(1)
        if eos_token_id is not None:
            token = token.masked_fill(done, eos_token_id)
            confidence = confidence.masked_fill(done, 1.0)
            done = done | (token == eos_token_id)
        seq = torch.cat([seq, token[:, None]], dim=1)
        confidences.append(confidence)
        if callback is not None:
            callback(i, seq, {"tokens": token, "confidence": confidence, "done": done, "nfe": nfe})
        if bar is not None:
            bar.update(1)
        if eos_token_id is not None and bool(done.all()):
            break
    if bar is not None:
        bar.close()
    return AutoregressiveOutput(
        sequences=seq, new_tokens=seq[:, prompt_len:], confidence=torch.stack(confidences, 1), nfe=nfe
    )

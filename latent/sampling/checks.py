"""Checks of the call's tensors and of the model against the config, with errors that say the fix."""

from __future__ import annotations

import torch


def model_config_value(model, name: str):
    return getattr(getattr(model, "config", None), name, None)


def check_inputs(input_ids, attention_mask, prefix_embeds, prefix_mask):
    """Validate and normalise the prompt tensors; returns them (masks as long, or None)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.long or input_ids.ndim != 2:
        got = (input_ids.dtype, tuple(input_ids.shape)) if isinstance(input_ids, torch.Tensor) else type(input_ids)
        raise ValueError(
            f"`input_ids` must be a [batch, prompt_len] int64 tensor, got {got}; use .long() and add a batch dim."
        )
    batch, prompt_len = input_ids.shape
    if batch == 0:
        raise ValueError("`input_ids` has batch size 0; give at least one prompt.")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(f"`attention_mask` must have the shape of `input_ids` {tuple(input_ids.shape)}, got {shape}.")
        if attention_mask.is_floating_point():
            raise ValueError("`attention_mask` must hold 0/1 ints or bools (1 = real token), got a float tensor.")
        attention_mask = attention_mask.long()
        if prompt_len and (attention_mask[:, 1:] < attention_mask[:, :-1]).any():
            raise ValueError(
                "`attention_mask` has padding after real tokens; the sampler needs left padding "
                "(tokenizer.padding_side = 'left') so the generated positions follow every prompt."
            )
    if prefix_embeds is not None:
        if not isinstance(prefix_embeds, torch.Tensor) or prefix_embeds.ndim != 3 or not prefix_embeds.is_floating_point():
            raise ValueError("`prefix_embeds` must be a float tensor [batch, P, hidden_size] from a modality adapter.")
        if prefix_embeds.shape[0] != batch:
            raise ValueError(f"`prefix_embeds` has batch {prefix_embeds.shape[0]} but `input_ids` has {batch}.")
        if prefix_mask is not None:
            if prefix_mask.shape != prefix_embeds.shape[:2] or prefix_mask.is_floating_point():
                raise ValueError(
                    f"`prefix_mask` must be a 0/1 [batch, P] = {tuple(prefix_embeds.shape[:2])} tensor, "
                    f"got {prefix_mask.dtype} {tuple(prefix_mask.shape)}."
                )
            prefix_mask = prefix_mask.long()
    elif prefix_mask is not None:
        raise ValueError("`prefix_mask` was given without `prefix_embeds`.")
    has_prefix = prefix_embeds is not None and prefix_embeds.shape[1] > 0
    if not has_prefix:
        real = prompt_len if attention_mask is None else attention_mask.sum(1).min().item()
        if real == 0:
            raise ValueError(
                "The prompt is empty (no input_ids, or a row whose attention_mask is all 0) and there are no "
                "prefix_embeds; give every row at least one prompt token."
            )
    return input_ids, attention_mask, prefix_embeds, prefix_mask


def check_model(model, config, mask_token_id, total_slots: int, cache) -> str | None:
    """Check the model against the run; returns its attention layout (None if it declares none)."""
    vocab = model_config_value(model, "vocab_size")
    if vocab is not None and not 0 <= mask_token_id < vocab:
        raise ValueError(f"`mask_token_id` ({mask_token_id}) is not in the model's vocabulary [0, {vocab}).")
    limit = model_config_value(model, "max_position_embeddings")
    if limit is not None and total_slots > limit:
        raise ValueError(
            f"prefix + prompt + gen_length = {total_slots} slots exceed the model context "
            f"max_position_embeddings={limit}; shorten the prompt or lower `gen_length`."
        )
    layout = model_config_value(model, "attention_layout")
    if layout == "block_causal":
        size = model_config_value(model, "block_size")
        if size is not None and size != config.block_length:
            raise ValueError(
                f"The model is block_causal with block_size={size}; set `block_length`={size} so decoding "
                "blocks are the model's attention blocks."
            )
    allowed = getattr(cache, "layouts", None)
    if layout is not None and allowed is not None and layout not in allowed:
        raise ValueError(
            f"cache={config.cache!r} is valid for attention layouts {allowed}, but the model's "
            f"attention_layout is {layout!r}; use cache='none' or a cache made for {layout!r}."
        )
    return layout

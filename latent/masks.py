"""Attention masks of the four layouts, built from slot indices.

A slot is a position in the full sequence seen by one forward: cached slots first, then the new ones.
Masks are boolean, True where a query slot may attend a key slot, shaped [B, 1, Q, K].
See docs/backbone-contract.md for the rules of each layout.
"""

from __future__ import annotations

import torch

LAYOUTS = ("bidirectional", "causal", "block_causal", "prefix")
# Where block_causal blocks start: after the prefix (BD3-LM style prompts), or at slot 0 (SDAR,
# Fast-dLLM v2, LLaDA2: the prompt is cut into blocks too).
BLOCK_ALIGNMENTS = ("prefix", "start")


def _as_rows(prefix_length, batch: int, device) -> torch.Tensor:
    """prefix_length as a [B, 1] tensor (int or [B] tensor accepted)."""
    if prefix_length is None:
        prefix_length = 0
    t = torch.as_tensor(prefix_length, device=device, dtype=torch.long)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"prefix_length must be an int or a [{batch}] tensor, got shape {tuple(t.shape)}.")
    return t[:, None]


def block_index(slots: torch.Tensor, prefix_length: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block of each slot under block_causal: -1 inside the prefix, then blocks of block_size (a prefix_length
    of 0 gives the blocks counted from slot 0)."""
    rel = slots - prefix_length
    return torch.where(rel < 0, torch.full_like(rel, -1), torch.div(rel, block_size, rounding_mode="floor"))


def layout_mask(
    layout: str,
    query_slots: torch.Tensor,
    num_keys: int,
    batch: int,
    prefix_length=None,
    block_size: int = 1,
    block_alignment: str = "prefix",
) -> torch.Tensor | None:
    """[B, 1, Q, K] boolean layout mask, or None when every query may attend every key. `block_alignment`
    ("prefix" or "start") says where block_causal blocks begin; "start" ignores prefix_length."""
    device = query_slots.device
    q = query_slots.view(1, -1, 1)  # [1, Q, 1]
    k = torch.arange(num_keys, device=device).view(1, 1, -1)  # [1, 1, K]
    if layout == "bidirectional":
        return None
    if layout == "causal":
        allowed = k <= q
    elif layout == "prefix":
        p = _as_rows(prefix_length, batch, device)[:, :, None]  # [B, 1, 1]
        if int(p.max()) == 0:
            return None
        allowed = (q >= p) | (k < p)
    elif layout == "block_causal":
        if block_alignment not in BLOCK_ALIGNMENTS:
            raise ValueError(f"block_alignment={block_alignment!r} is unknown; choose one of {BLOCK_ALIGNMENTS}.")
        p = _as_rows(0 if block_alignment == "start" else prefix_length, batch, device)  # [B, 1]
        qb = block_index(query_slots.view(1, -1), p, block_size)[:, :, None]
        kb = block_index(torch.arange(num_keys, device=device).view(1, -1), p, block_size)[:, None, :]
        allowed = kb <= qb
    else:
        raise ValueError(f"attention_layout={layout!r} is unknown; choose one of {LAYOUTS}.")
    return allowed.expand(batch, -1, -1)[:, None]


def combine_masks(
    layout: torch.Tensor | None, key_keep: torch.Tensor | None, query_slots: torch.Tensor
) -> torch.Tensor | None:
    """AND the layout mask with a [B, K] key padding mask; rows left with no key attend to themselves."""
    if key_keep is None or bool(key_keep.all()):
        return layout
    mask = key_keep[:, None, None, :]
    mask = mask if layout is None else (layout & mask)
    empty = ~mask.any(-1, keepdim=True)
    if bool(empty.any()):
        own = torch.zeros_like(mask)
        own[..., torch.arange(query_slots.numel(), device=mask.device), query_slots] = True
        mask = mask | (empty & own)
    return mask


def block_diffusion_training_mask(seq_len: int, block_size: int, device=None) -> torch.Tensor:
    """[1, 1, 2L, 2L] mask for BD3-LM training on [noisy | clean] concatenated sequences.

    Noisy block b sees itself and clean blocks < b; clean block b sees clean blocks <= b.
    """
    blocks = torch.arange(seq_len, device=device) // block_size
    qb, kb = blocks[:, None], blocks[None, :]
    noisy_noisy = qb == kb
    noisy_clean = kb < qb
    clean_clean = kb <= qb
    clean_noisy = torch.zeros_like(noisy_noisy)
    top = torch.cat([noisy_noisy, noisy_clean], dim=1)
    bottom = torch.cat([clean_noisy, clean_clean], dim=1)
    return torch.cat([top, bottom], dim=0)[None, None]

"""Validation bound (bits per token) of a backbone.

- ``mdm``: Monte-Carlo masked-diffusion ELBO (:func:`latent.losses.elbo_nll`).
- ``block_diffusion``: the block-diffusion bound (each block given the clean blocks before it).
- ``sft``: the ELBO of the answers given the prompts.
- ``causal``: the exact autoregressive NLL (BOS = EOS prepended, so every token is scored, as in the
  diffusion bounds).

All are upper bounds on (or, for AR, equal to) the negative log-likelihood in bits per token, so the
numbers are comparable across objectives on the same validation sequences. Each validation batch
uses its own generator seeded by (seed, batch index): the value does not depend on the number of
processes that share the work.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from latent.losses import causal_nll, elbo_nll

__all__ = ["validation_bound"]


def _raw(model):
    while hasattr(model, "module"):
        model = model.module
    return model


@torch.no_grad()
def validation_bound(model, ids: torch.Tensor, objective: str, mask_token_id: int, eos_token_id: int | None,
                     num_samples: int = 8, batch_size: int = 16, schedule: str = "linear",
                     prompt_lengths: torch.Tensor | None = None, seed: int = 0, rank: int = 0,
                     world_size: int = 1, device=None, autocast=None, reduce=None, block_size: int | None = None) -> dict:
    """Returns ``{"bits_per_token", "nll_per_token", "tokens"}`` over all of ``ids``."""
    was_training = model.training
    model.eval()
    device = device or ids.device
    n_batches = math.ceil(len(ids) / batch_size)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    per_rank = math.ceil(n_batches / world_size)
    for j in range(per_rank):
        i = j * world_size + rank
        real = i < n_batches
        i = min(i, n_batches - 1)  # ranks without work repeat the last batch (FSDP needs every rank) and drop it
        x = ids[i * batch_size : (i + 1) * batch_size].to(device)
        g = torch.Generator().manual_seed(int(seed) * 100_003 + i)
        ctx = autocast() if autocast is not None else nullcontext()
        with ctx:
            target = None
            if prompt_lengths is not None:
                pl = prompt_lengths[i * batch_size : (i + 1) * batch_size].to(device)
                target = torch.arange(x.shape[1], device=device)[None] >= pl[:, None]
            if objective == "causal":
                out = causal_nll(model, x, bos_token_id=eos_token_id, prompt_mask=None if target is None else ~target)
            else:
                out = elbo_nll(model, x, mask_token_id, num_samples=num_samples, schedule=schedule,
                               block_size=block_size if objective == "block_diffusion" else None,
                               generator=g, target_mask=target)
        if real:
            nll += out.nll.double().sum()
            tokens += out.num_tokens.double().sum()
    if reduce is not None:
        nll, tokens = reduce(nll), reduce(tokens)
    model.train(was_training)
    per_tok = float(nll / tokens.clamp(min=1))
    return {"bits_per_token": per_tok / math.log(2), "nll_per_token": per_tok, "tokens": int(tokens)}

"""Training losses and likelihood bounds for masked (absorbing-state) diffusion language models.

Every loss takes the model as a callable ``model(input_ids, attention_mask=..., position_ids=..., **kw)``
returning an object with ``.logits`` ``[B, N, V]`` (a plain tensor is accepted too), so the same code
drives :class:`latent.backbone.DiffusionTransformer`, a DDP/FSDP wrapper of it, or a toy model in a test.

Randomness can be passed in explicitly: ``t`` (diffusion times) and ``noise`` (uniform numbers compared
with the mask probability). The trainer draws both for the *global* batch from a generator seeded by
the step, and each data-parallel rank slices its rows, so one process with the combined batch and N
processes see exactly the same masks. Without them, ``generator`` (or the global RNG) is used.

Objectives:

- :func:`masked_diffusion_loss` -- pre-training (LLaDA / MDLM): ``p = (1 - eps) t + eps``, each token
  masked with probability ``p``, ``loss = sum_masked CE * w(p) / #tokens`` with ``w = 1 / p`` for the
  linear schedule.
- :func:`sft_loss` -- prompt never masked, each sample's loss divided by its answer length.
- :func:`block_diffusion_loss` -- BD3-LM: noisy and clean copies in one forward under
  :func:`block_diffusion_attention_mask`; optionally complementary masks and an auxiliary AR loss.
- :func:`causal_lm_loss` -- next-token cross-entropy for the autoregressive baseline.
- :func:`elbo_nll` / :func:`elbo_bits_per_token` -- Monte-Carlo estimate of the diffusion ELBO.

Models with ``config.logit_shift`` (Dream, Fast-dLLM v2: logits[i] come from slot i - 1) are handled
where the shift changes what a logit may see: in the [noisy | clean] forward of block diffusion the
first token of each noisy block is predicted from the last clean token before it, as block-wise
sampling with a cache of finished blocks does. :func:`annealed_attention_mask` is the causal-to-
bidirectional mask of AR-to-diffusion adaptation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from latent.masks import block_diffusion_training_mask
from latent.schedules import LinearSchedule, MaskingSchedule, get_schedule, sample_times

__all__ = [
    "LossOutput",
    "ElboOutput",
    "corrupt",
    "masked_diffusion_loss",
    "sft_loss",
    "annealed_attention_mask",
    "block_diffusion_attention_mask",
    "block_diffusion_loss",
    "certainty_entropy",
    "causal_lm_loss",
    "causal_nll",
    "elbo_nll",
    "elbo_bits_per_token",
]

LN2 = math.log(2.0)


@dataclass
class LossOutput:
    """``loss``: scalar to back-propagate. ``num_tokens``: tokens in the denominator (for logging
    throughput). ``num_masked``: tokens that received a cross-entropy term."""

    loss: torch.Tensor
    num_tokens: int
    num_masked: int


@dataclass
class ElboOutput:
    """``nll``: per-sequence negative log-likelihood bound in nats ``[B]``; ``num_tokens``: scored
    tokens per sequence ``[B]``; ``bits_per_token``: ``sum nll / (sum num_tokens * ln 2)``."""

    nll: torch.Tensor
    num_tokens: torch.Tensor
    bits_per_token: float


def _logits(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _valid_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must be a [B, N] padding mask like input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(attention_mask.shape)}"
        )
    return attention_mask.bool()


def _shifts_logits(model) -> bool:
    return bool(getattr(getattr(_unwrap(model), "config", None), "logit_shift", False))


def _drop_pad_keys(allowed: torch.Tensor, keep_keys: torch.Tensor | None) -> torch.Tensor:
    """AND a square ``[1, 1, S, S]`` mask with a ``[B, S]`` key padding mask; a pad query then attends
    to itself, so no row is empty (no NaN) and real queries are unaffected."""
    if keep_keys is None:
        return allowed
    keep = keep_keys.bool().to(allowed.device)
    eye = torch.eye(allowed.shape[-1], dtype=torch.bool, device=allowed.device)
    return (allowed & keep[:, None, None, :]) | eye


def _uniform(shape, generator, device) -> torch.Tensor:
    # Drawn on the generator's device (CPU by default) so results do not depend on the accelerator.
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def corrupt(
    input_ids: torch.Tensor,
    mask_prob: torch.Tensor,
    mask_token_id: int,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    maskable: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward process: replace each token by ``mask_token_id`` with probability ``mask_prob``.

    ``mask_prob`` is ``[B]`` (one level per row) or ``[B, N]`` (per token). A token is masked when
    ``noise < mask_prob`` and ``maskable`` allows it. Returns ``(noisy_ids, masked)``.
    """
    if mask_prob.dim() == 1:
        mask_prob = mask_prob[:, None]
    if noise is None:
        noise = _uniform(input_ids.shape, generator, input_ids.device)
    masked = noise.to(input_ids.device) < mask_prob.to(input_ids.device)
    if maskable is not None:
        masked = masked & maskable
    noisy = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    return noisy, masked


def certainty_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """dParallel's certainty term: the mean entropy (nats) of softmax(logits / temperature) over the rows of
    ``logits`` [n, V] whose argmax is already ``targets`` [n] (0 when none is). Lowering it makes a model sure
    early of what it gets right, so a threshold rule commits more tokens per forward."""
    z = logits.float()
    right = z.argmax(-1) == targets
    entropy = torch.special.entr((z / temperature).softmax(-1)).sum(-1)
    return (entropy * right).sum() / right.sum().clamp(min=1)


def _times(t, shape, generator, low_discrepancy, device) -> torch.Tensor:
    if t is not None:
        t = torch.as_tensor(t, dtype=torch.float32, device=device)
        if t.shape != torch.Size(shape):
            raise ValueError(f"t must have shape {tuple(shape)}, got {tuple(t.shape)}")
        return t
    n = math.prod(shape)
    return sample_times(n, generator=generator, low_discrepancy=low_discrepancy).reshape(shape).to(device)


def _masked_ce(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (nats) at the masked positions only, as a flat vector in ``masked``'s order."""
    return F.cross_entropy(logits[masked].float(), targets[masked], reduction="none")


def masked_diffusion_loss(
    model,
    input_ids: torch.Tensor,
    mask_token_id: int,
    schedule: str | MaskingSchedule = "linear",
    eps: float = 1e-3,
    attention_mask: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    low_discrepancy: bool = True,
    model_mask: torch.Tensor | None = None,
    **model_kwargs,
) -> LossOutput:
    """Masked-diffusion pre-training loss (LLaDA / MDLM).

    ``t ~ U(0, 1)`` per row (stratified across the batch), ``s = (1 - eps) t + eps``, each valid
    token masked with probability ``mask_prob(s)``; the loss is ``sum_masked CE * weight(s)`` divided
    by the number of valid tokens. With the linear schedule, ``mask_prob(s) = s = p`` and the weight is
    ``1 / p``. Padding (``attention_mask == 0``) is never masked and not counted. ``model_mask``, a
    ``[B or 1, 1, N, N]`` boolean mask (e.g. :func:`annealed_attention_mask`), is given to the model in
    place of the padding mask, pad keys removed from it.
    """
    sched = get_schedule(schedule)
    B, N = input_ids.shape
    valid = _valid_mask(input_ids, attention_mask)
    t = _times(t, (B,), generator, low_discrepancy, input_ids.device)
    s = (1.0 - eps) * t + eps
    noisy, masked = corrupt(input_ids, sched.mask_prob(s), mask_token_id, noise, generator, maskable=valid)
    seen = attention_mask if model_mask is None else _drop_pad_keys(model_mask.bool(), attention_mask)
    logits = _logits(model(noisy, attention_mask=seen, **model_kwargs))
    ce = _masked_ce(logits, input_ids, masked)
    w = sched.weight(s)[:, None].expand(B, N)[masked]
    num_tokens = int(valid.sum())
    loss = (ce * w).sum() / max(num_tokens, 1)
    return LossOutput(loss, num_tokens, int(masked.sum()))


def sft_loss(
    model,
    input_ids: torch.Tensor,
    mask_token_id: int,
    prompt_mask: torch.Tensor | None = None,
    prompt_lengths: torch.Tensor | None = None,
    schedule: str | MaskingSchedule = "linear",
    eps: float = 1e-3,
    attention_mask: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    low_discrepancy: bool = True,
    **model_kwargs,
) -> LossOutput:
    """Supervised fine-tuning loss on prompt/answer pairs (LLaDA SFT).

    The prompt (``prompt_mask`` True, or the first ``prompt_lengths[b]`` tokens) is never masked.
    Answers are expected to be padded with EOS up to the full length (see
    :func:`latent.data.sft.collate_sft`), so the model learns to stop; those EOS tokens are part of
    the answer. Each masked answer token contributes ``CE * weight(s)``; a row's sum is divided by its
    answer length and the result is averaged over rows.
    """
    sched = get_schedule(schedule)
    B, N = input_ids.shape
    if (prompt_mask is None) == (prompt_lengths is None):
        raise ValueError("pass exactly one of prompt_mask [B, N] and prompt_lengths [B]")
    if prompt_mask is None:
        prompt_lengths = torch.as_tensor(prompt_lengths, device=input_ids.device)
        prompt_mask = torch.arange(N, device=input_ids.device)[None, :] < prompt_lengths[:, None]
    prompt_mask = prompt_mask.bool()
    valid = _valid_mask(input_ids, attention_mask)
    answer = valid & ~prompt_mask
    answer_len = answer.sum(1).clamp(min=1).float()
    t = _times(t, (B,), generator, low_discrepancy, input_ids.device)
    s = (1.0 - eps) * t + eps
    noisy, masked = corrupt(input_ids, sched.mask_prob(s), mask_token_id, noise, generator, maskable=answer)
    logits = _logits(model(noisy, attention_mask=attention_mask, **model_kwargs))
    ce = _masked_ce(logits, input_ids, masked)
    w = (sched.weight(s)[:, None] / answer_len[:, None]).expand(B, N)[masked]
    loss = (ce * w).sum() / B
    return LossOutput(loss, int(answer.sum()), int(masked.sum()))


def block_diffusion_attention_mask(
    seq_len: int,
    block_size: int,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean ``[B or 1, 1, 2N, 2N]`` mask (True = attend) for BD3-LM training in one forward.

    Slots ``0..N-1`` hold the noisy sequence, ``N..2N-1`` the clean one; ``block(i) = (i mod N) //
    block_size``. A noisy query of block b sees the noisy keys of block b and the clean keys of blocks
    < b; a clean query of block b sees the clean keys of blocks <= b and no noisy key. An optional
    ``[B, N]`` padding mask removes pad keys in both halves (a pad query then attends to itself).
    """
    allowed = block_diffusion_training_mask(seq_len, block_size, device=device)
    keys = None if attention_mask is None else torch.cat([attention_mask, attention_mask], dim=1)  # [B, 2N]
    return _drop_pad_keys(allowed, keys)


def annealed_attention_mask(
    seq_len: int,
    progress: float,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean ``[B or 1, 1, N, N]`` mask annealing causal attention into bidirectional attention.

    With ``w = floor(clamp(progress, 0, 1) * N)``, query ``i`` sees keys ``j <= i + w``: causal at
    progress 0, fully bidirectional at progress 1 (``w = N``), a window reaching ``w`` tokens into the
    future in between. An optional ``[B, N]`` padding mask removes pad keys.
    """
    w = math.floor(min(max(float(progress), 0.0), 1.0) * seq_len)
    pos = torch.arange(seq_len, device=device)
    allowed = (pos[None, :] <= pos[:, None] + w)[None, None]
    return _drop_pad_keys(allowed, attention_mask)


def _noisy_half_logits(model, noisy, clean, block_size, attention_mask, model_kwargs) -> torch.Tensor:
    """Logits of the noisy half of the BD3-LM ``[noisy | clean]`` forward, one per noisy position."""
    B, N = clean.shape
    x = torch.cat([noisy, clean], dim=1)
    pos = torch.arange(N, device=clean.device).repeat(2)[None, :].expand(B, 2 * N)
    mask4d = block_diffusion_attention_mask(N, block_size, attention_mask, device=clean.device)
    logits = _logits(model(x, attention_mask=mask4d, position_ids=pos, **model_kwargs))
    if not _shifts_logits(model):
        return logits[:, :N]
    # With the shift, logit j comes from slot j - 1. For the first token of noisy block b > 0 that slot is
    # noisy block b - 1's; sampling predicts it from the last clean token of block b - 1 (slot N + j - 1),
    # whose hidden state gives the shifted logit of clean slot N + j.
    j = torch.arange(N, device=clean.device)
    starts = (j % block_size == 0) & (j > 0)
    return torch.where(starts[None, :, None], logits[:, N:], logits[:, :N])


def _autoregressive_ce(model, input_ids, valid, model_kwargs) -> torch.Tensor:
    """Mean next-token cross-entropy of one forward under a causal 4D mask (whatever the model's layout):
    with the logit shift logit j predicts token j, otherwise token j + 1."""
    N = input_ids.shape[1]
    causal = _drop_pad_keys(annealed_attention_mask(N, 0.0, device=input_ids.device), valid)
    logits = _logits(model(input_ids, attention_mask=causal, **model_kwargs))
    logits = logits[:, 1:] if _shifts_logits(model) else logits[:, :-1]
    targets, scored = input_ids[:, 1:], valid[:, 1:] & valid[:, :-1]
    ce = F.cross_entropy(logits[scored].float(), targets[scored], reduction="sum")
    return ce / max(int(scored.sum()), 1)


def block_diffusion_loss(
    model,
    input_ids: torch.Tensor,
    mask_token_id: int,
    block_size: int,
    schedule: str | MaskingSchedule = "linear",
    eps: float = 1e-3,
    attention_mask: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    low_discrepancy: bool = True,
    per_block_t: bool = True,
    complementary: bool = False,
    ar_weight: float = 0.0,
    prompt_mask: torch.Tensor | None = None,
    certainty_weight: float = 0.0,
    certainty_temperature: float = 0.5,
    **model_kwargs,
) -> LossOutput:
    """Block-diffusion (BD3-LM) loss for the ``block_causal`` layout, in a single forward pass.

    The model sees ``[noisy | clean]`` (length 2N) with :func:`block_diffusion_attention_mask` and the
    rotary positions ``[0..N-1, 0..N-1]``, so every noisy block is denoised given the clean blocks
    before it -- exactly what block-wise sampling with a KV cache of finished blocks sees. Each block
    gets its own time ``t`` (``per_block_t``; shape ``[B, N // block_size]``, stratified across all
    blocks of the batch) or each row one time (shape ``[B]``). Loss as in
    :func:`masked_diffusion_loss`, over the noisy half's logits.

    ``complementary`` (Fast-dLLM v2): each row is trained twice, once with its masked set ``M`` (mask
    level ``p``) and once with the complement ``valid - M`` (level ``1 - p``, weight
    ``1 / max(1 - p, eps)``), so every token is predicted in exactly one of the two copies; the loss is
    the mean of the two estimates (linear schedule only, where ``1 - p`` is uniform like ``p``).
    ``ar_weight``: plus that weight times the next-token loss of a second forward of the clean sequence
    under a causal mask (keeps the autoregressive ability of an adapted AR model).
    ``prompt_mask`` ``[B, N]`` (SFT on prompt/answer rows): True positions are never masked and the loss is
    averaged over the other (answer) tokens; the clean prompt still conditions every block after it.
    ``certainty_weight``: plus that weight times :func:`certainty_entropy` over the masked positions (the
    data's tokens as targets, temperature ``certainty_temperature``): dParallel's certainty forcing folded
    into training, for a model that threshold decoding should run with fewer forwards.
    """
    sched = get_schedule(schedule)
    B, N = input_ids.shape
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if complementary and not isinstance(sched, LinearSchedule):
        raise ValueError("complementary masks need the linear schedule (the complement's level 1 - p is then uniform)")
    nb = -(-N // block_size)
    real = _valid_mask(input_ids, attention_mask)
    valid = real if prompt_mask is None else real & ~prompt_mask.bool()  # the tokens that may be targets
    t = _times(t, (B, nb) if per_block_t else (B,), generator, low_discrepancy, input_ids.device)
    s = (1.0 - eps) * t + eps
    if per_block_t:
        s_tok = s.repeat_interleave(block_size, dim=1)[:, :N]
    else:
        s_tok = s[:, None].expand(B, N)
    noisy, masked = corrupt(input_ids, sched.mask_prob(s_tok), mask_token_id, noise, generator, maskable=valid)
    w_tok = sched.weight(s_tok)
    clean, pad = input_ids, attention_mask
    if complementary:
        other = valid & ~masked
        noisy = torch.cat([noisy, torch.where(other, torch.full_like(input_ids, mask_token_id), input_ids)])
        masked = torch.cat([masked, other])
        w_tok = torch.cat([w_tok, 1.0 / (1.0 - s_tok).clamp(min=eps)])
        clean = torch.cat([input_ids, input_ids])
        pad = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
    logits = _noisy_half_logits(model, noisy, clean, block_size, pad, model_kwargs)
    scored, targets = logits[masked].float(), clean[masked]  # gathered once: the CE and the certainty term read it
    ce = F.cross_entropy(scored, targets, reduction="none")
    num_tokens = int(valid.sum())
    copies = 2 if complementary else 1
    loss = (ce * w_tok[masked]).sum() / max(copies * num_tokens, 1)
    if ar_weight:
        loss = loss + ar_weight * _autoregressive_ce(model, input_ids, real, model_kwargs)
    if certainty_weight:
        loss = loss + certainty_weight * certainty_entropy(scored, targets, certainty_temperature)
    return LossOutput(loss, num_tokens, int(masked.sum()))


def _check_causal(model) -> None:
    layout = getattr(getattr(_unwrap(model), "config", None), "attention_layout", None)
    if layout is not None and layout != "causal":
        raise ValueError(
            f"causal_lm_loss needs a model with attention_layout='causal', this one is {layout!r}: "
            "next-token training under bidirectional attention would let each position see its target"
        )


def _causal_ce(model, input_ids, attention_mask, bos_token_id, prompt_mask=None, **model_kwargs):
    valid = _valid_mask(input_ids, attention_mask)
    if bos_token_id is not None:
        bos = torch.full_like(input_ids[:, :1], bos_token_id)
        inputs = torch.cat([bos, input_ids[:, :-1]], dim=1)
        in_mask = None if attention_mask is None else torch.cat([attention_mask[:, :1], attention_mask[:, :-1]], 1)
        targets, scored = input_ids, valid
    else:
        inputs, in_mask = input_ids, attention_mask
        targets, scored = input_ids[:, 1:], valid[:, 1:] & valid[:, :-1]
    logits = _logits(model(inputs, attention_mask=in_mask, **model_kwargs))
    if bos_token_id is None:
        logits = logits[:, :-1]
    if prompt_mask is not None:  # targets inside the prompt are not scored
        scored = scored & ~(prompt_mask.bool() if bos_token_id is not None else prompt_mask[:, 1:].bool())
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return ce.view(targets.shape) * scored, scored


def causal_lm_loss(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    bos_token_id: int | None = None,
    prompt_mask: torch.Tensor | None = None,
    **model_kwargs,
) -> LossOutput:
    """Next-token cross-entropy (mean over scored tokens) for the autoregressive baseline.

    With ``bos_token_id`` the input is ``[bos, x_0 .. x_{N-2}]`` and every token ``x_0 .. x_{N-1}``
    is predicted (same length and same scored tokens as the diffusion losses); without it, tokens
    ``x_1 .. x_{N-1}`` are predicted from their prefixes. ``prompt_mask`` ``[B, N]`` (SFT): tokens where it
    is True are context only, not targets. The model must use the ``causal`` layout.
    """
    _check_causal(model)
    ce, scored = _causal_ce(model, input_ids, attention_mask, bos_token_id, prompt_mask, **model_kwargs)
    n = int(scored.sum())
    return LossOutput(ce.sum() / max(n, 1), n, n)


@torch.no_grad()
def causal_nll(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    bos_token_id: int | None = None,
    prompt_mask: torch.Tensor | None = None,
    **model_kwargs,
) -> ElboOutput:
    """Exact negative log-likelihood of an autoregressive model, in the :class:`ElboOutput` format (of the
    tokens outside ``prompt_mask`` when given)."""
    _check_causal(model)
    ce, scored = _causal_ce(model, input_ids, attention_mask, bos_token_id, prompt_mask, **model_kwargs)
    nll, n = ce.sum(1), scored.sum(1)
    return ElboOutput(nll, n, float(nll.sum() / (n.sum().clamp(min=1) * LN2)))


@torch.no_grad()
def elbo_nll(
    model,
    input_ids: torch.Tensor,
    mask_token_id: int,
    num_samples: int = 8,
    schedule: str | MaskingSchedule = "linear",
    attention_mask: torch.Tensor | None = None,
    block_size: int | None = None,
    generator: torch.Generator | None = None,
    t_min: float = 1e-4,
    target_mask: torch.Tensor | None = None,
    **model_kwargs,
) -> ElboOutput:
    """Monte-Carlo estimate of the masked-diffusion ELBO (an upper bound on the NLL), per sequence.

    ``-log p(x) <= E_t [ weight(t) * sum_masked CE ]``. Each row gets ``num_samples`` mask draws at
    stratified times ``t_k = (u + k) / K`` (clamped to ``t_min``), and the estimate is their mean.
    With ``block_size`` the block-diffusion bound is estimated instead (each block denoised given the
    clean blocks before it, one time per block), which is the right bound for ``block_causal`` models.
    ``target_mask`` ``[B, N]`` restricts the masked and scored tokens (e.g. the answers of SFT pairs,
    the prompt staying clean): the bound is then on ``-log p(answer | prompt)``.
    """
    sched = get_schedule(schedule)
    B, N = input_ids.shape
    valid = _valid_mask(input_ids, attention_mask)
    if target_mask is not None:
        valid = valid & target_mask.bool()
    total = torch.zeros(B, dtype=torch.float64, device=input_ids.device)
    nb = 1 if block_size is None else -(-N // block_size)
    # one offset per (row, block); draw k of K uses the k-th stratum
    u = _uniform((B, nb), generator, input_ids.device).double()
    for k in range(num_samples):
        t = ((u + k) / num_samples).float().clamp(min=t_min, max=1.0)  # [B, nb]
        if block_size is None:
            t_tok = t.expand(B, N)
        else:
            t_tok = t.repeat_interleave(block_size, dim=1)[:, :N]
        noisy, masked = corrupt(input_ids, sched.mask_prob(t_tok), mask_token_id, None, generator, maskable=valid)
        if block_size is None:
            logits = _logits(model(noisy, attention_mask=attention_mask, **model_kwargs))
        else:
            logits = _noisy_half_logits(model, noisy, input_ids, block_size, attention_mask, model_kwargs)
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), input_ids.reshape(-1), reduction="none")
        ce = ce.view(B, N) * masked * sched.weight(t_tok)
        total += ce.sum(1).double()
    nll = (total / num_samples).float()
    n = valid.sum(1)
    return ElboOutput(nll, n, float(nll.sum() / (n.sum().clamp(min=1) * LN2)))


def elbo_bits_per_token(model, input_ids, mask_token_id, **kwargs) -> float:
    """Shortcut: :func:`elbo_nll` in bits per token."""
    return elbo_nll(model, input_ids, mask_token_id, **kwargs).bits_per_token


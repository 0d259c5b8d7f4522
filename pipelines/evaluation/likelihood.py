"""Log-likelihood of a continuation given a context, for benchmark scoring.

Masked-diffusion models give a lower bound (the ELBO) on ``log p(continuation | context)``, estimated by
Monte Carlo with only continuation tokens masked (the context stays clean):

- ``"tokens"`` (LLaDA's evaluation estimator, the default): a draw masks ``l`` of the ``L`` continuation
  tokens, ``l`` uniform on ``{1..L}`` (stratified across the draws with ``latent.schedules.stratified_times``),
  the ``l`` positions uniform among the ``L``; its term is ``(L / l) * sum of the masked tokens' log-probs``.
  It has the same expectation as the training loss's form below (given ``l`` masked tokens the time form's
  weight ``1 / t`` averages to ``(L + 1) / l`` and ``l`` is uniform on ``{0..L}``), with less variance because
  the number of masked tokens is chosen, not drawn.
- ``"time"``: ``latent.losses.elbo_nll`` with the continuation as ``target_mask``: ``t`` stratified, each
  continuation token masked with probability ``t``, weight ``1 / t``; with ``block_size`` the block-diffusion
  bound, which is the one for ``block_causal`` models.

Causal models (``attention_layout="causal"``) give the exact sum of next-token log-probs.

Draws come from a generator seeded by ``seed`` and the request's tokens (:func:`request_generator`), so a
request scores the same whatever else is in the batch and in whichever order requests come.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from latent.losses import elbo_nll
from latent.schedules import stratified_times

__all__ = ["ESTIMATORS", "Score", "request_generator", "masked_token_draws", "diffusion_loglikelihood",
           "causal_loglikelihood"]

ESTIMATORS = ("tokens", "time")


@dataclass
class Score:
    """``loglikelihood``: the estimate (nats, the ELBO for a diffusion model); ``is_greedy``: whether
    greedy decoding gives the continuation (see :func:`diffusion_loglikelihood`)."""

    loglikelihood: float
    is_greedy: bool


def request_generator(seed: int, context: list[int], continuation: list[int]) -> torch.Generator:
    """A CPU generator seeded by `seed` and the request's tokens (a stable hash, the same in every process)."""
    key = zlib.crc32(torch.tensor([len(context), *context, *continuation], dtype=torch.int64).numpy().tobytes())
    return torch.Generator().manual_seed((int(seed) * 0x9E3779B1 + key) % (2**63))


def masked_token_draws(length: int, num_samples: int, generator: torch.Generator | None = None) -> torch.BoolTensor:
    """[num_samples, length] masks of the "tokens" estimator: row k masks l_k positions, l_k uniform on
    {1..length} (stratified across rows), the positions uniform without replacement."""
    if length < 1 or num_samples < 1:
        raise ValueError(f"need a continuation of at least one token and mc_samples >= 1, got {length}, {num_samples}")
    u = torch.rand((), generator=generator, dtype=torch.float64)
    counts = (stratified_times(num_samples, u) * length).long().clamp(max=length - 1) + 1
    ranks = torch.rand(num_samples, length, generator=generator).argsort(1).argsort(1)  # a random permutation per row
    return ranks < counts[:, None]


def _model_kwargs(model, context_len: int) -> dict:
    layout = getattr(getattr(model, "config", None), "attention_layout", None)
    return {"prefix_length": context_len} if layout == "prefix" else {}


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def _greedy_matches(logits: torch.Tensor, targets: torch.Tensor, mask_token_id: int | None) -> bool:
    logits = logits.clone()
    if mask_token_id is not None:
        logits[..., mask_token_id] = float("-inf")  # the sampler never proposes the mask token
    return bool((logits.argmax(-1) == targets).all())


def _greedy_one_step(model, ids: torch.Tensor, context_len: int, mask_token_id: int, block_size: int | None) -> bool:
    """Whether one argmax step on the masked continuation gives it: the whole continuation at once, or, for a
    block_causal model, each of its blocks given the clean blocks before it (as block-wise decoding sees them)."""
    n = ids.shape[0]
    starts = [context_len] if block_size is None else sorted(
        {context_len} | set(range(-(-context_len // block_size) * block_size, n, block_size)))
    kwargs = _model_kwargs(model, context_len)
    for i, lo in enumerate(starts):
        hi = starts[i + 1] if i + 1 < len(starts) else n
        noisy = ids.clone()
        noisy[lo:] = mask_token_id
        logits = model(noisy[None], **kwargs).logits[0, lo:hi]
        if not _greedy_matches(logits, ids[lo:hi], mask_token_id):
            return False
    return True


@torch.no_grad()
def diffusion_loglikelihood(model, context: list[int], continuation: list[int], mask_token_id: int, *,
                            num_samples: int = 32, estimator: str = "tokens", batch_size: int = 32,
                            generator: torch.Generator | None = None) -> Score:
    """ELBO of `continuation` given `context` (see the module docstring), and `is_greedy`: one argmax step
    on the fully masked continuation (mask id excluded, as the sampler does) reproduces it; for a
    block_causal model, block by block given the clean blocks before."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    config = getattr(model, "config", None)
    block_size = config.block_size if getattr(config, "attention_layout", None) == "block_causal" else None
    if block_size is not None and estimator != "time":
        raise ValueError("a block_causal model is scored with its block-diffusion bound: use estimator='time'")
    device = next(model.parameters()).device
    ids = torch.tensor([*context, *continuation], dtype=torch.long, device=device)
    p, length = len(context), len(continuation)
    if length == 0:
        raise ValueError("the continuation is empty; there is nothing to score")
    greedy = _greedy_one_step(model, ids, p, mask_token_id, block_size)
    if estimator == "time":
        target = torch.zeros_like(ids, dtype=torch.bool)
        target[p:] = True
        out = elbo_nll(model, ids[None], mask_token_id, num_samples=num_samples, target_mask=target[None],
                       block_size=block_size, generator=generator, **_model_kwargs(model, p))
        return Score(-float(out.nll[0]), greedy)
    draws = masked_token_draws(length, num_samples, generator).to(device)
    kwargs = _model_kwargs(model, p)
    terms = []
    for lo in range(0, num_samples, batch_size):
        masks = draws[lo : lo + batch_size]
        noisy = ids.repeat(masks.shape[0], 1)
        noisy[:, p:] = torch.where(masks, mask_token_id, noisy[:, p:])
        logp = _token_logprobs(model(noisy, **kwargs).logits[:, p:], ids[p:].expand_as(masks))
        terms.append((logp * masks).sum(1).double() * length / masks.sum(1))
    return Score(float(torch.cat(terms).mean()), greedy)


@torch.no_grad()
def causal_loglikelihood(model, context: list[int], continuation: list[int]) -> Score:
    """Exact log p(continuation | context) of a causal model from one forward, and whether every
    continuation token is the argmax of its prediction (teacher forced). `context` needs a token (lm-eval
    gives an empty context the EOS/BOS token)."""
    if not context:
        raise ValueError("a causal model predicts the first continuation token from the context: give one token")
    device = next(model.parameters()).device
    ids = torch.tensor([[*context, *continuation]], dtype=torch.long, device=device)
    logits = model(ids).logits[0]
    p, n = len(context), ids.shape[1]
    # logit j predicts token j + 1, or token j for a model with the logit shift (computed from slot j - 1)
    pred = logits[p:n] if getattr(model.config, "logit_shift", False) else logits[p - 1 : n - 1]
    target = ids[0, p:]
    return Score(float(_token_logprobs(pred, target).double().sum()), _greedy_matches(pred, target, None))


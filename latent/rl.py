"""Policy-gradient objectives for masked-diffusion language models (diffu-GRPO / GDPO / TraceRL style).

A masked-diffusion model has no cheap exact likelihood of a completion, so the PPO ratio and the KL penalty
are built on an estimate of ``log p(completion | prompt)``, computed the same way (same mask draws, same
steps) for the policy, the old policy and the reference so that their differences are consistent:

- :func:`elbo_logprob`: the Monte-Carlo ELBO over the completion tokens (the prompt is never masked);
  with ``coupled`` each draw is used with its complement (every completion token is predicted in exactly
  one of the two copies), which cuts the variance of the estimate (coupled-GRPO, GDPO).
- :func:`trajectory_logprob`: the log-probability of the decoding path the sampler actually took: for each
  decoding step, the log-probabilities of the tokens committed at that step given the canvas before it
  (TraceRL / MDPO). ``K`` steps per trajectory are scored (:func:`choose_steps`), weighted so that the sum
  stays unbiased.

:func:`group_advantages` normalises rewards within each group of completions of one prompt (GRPO, or the
mean-only Dr. GRPO form) and :func:`clipped_policy_loss` is the PPO clipped surrogate with the k3 estimate
of KL(policy || reference). Every random number is an argument (drawn by the caller for the whole batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["PolicyLoss", "group_advantages", "draw_elbo_masks", "elbo_logprob", "choose_steps",
           "trajectory_logprob", "clipped_policy_loss"]

ADVANTAGES = ("grpo", "drgrpo")


def _logits(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def group_advantages(rewards: torch.Tensor, group_size: int, kind: str = "grpo", eps: float = 1e-4) -> torch.Tensor:
    """Advantages ``[B]`` of rewards ``[B]`` laid out as consecutive groups of ``group_size`` completions of
    one prompt: ``(r - mean) / (std + eps)`` (``grpo``; std with Bessel's correction) or ``r - mean``
    (``drgrpo``, which keeps the reward scale and does not favour low-variance prompts)."""
    if kind not in ADVANTAGES:
        raise ValueError(f"advantage kind {kind!r} is not one of {', '.join(ADVANTAGES)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of group_size={group_size}")
    r = rewards.float().view(-1, group_size)
    centred = r - r.mean(1, keepdim=True)
    if kind == "grpo":
        std = r.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(-1)


def draw_elbo_masks(generator: torch.Generator, batch: int, length: int, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Times ``[B, K]`` (stratified per row: ``(u + k) / K``) and uniform noise ``[B, K, L]`` for
    :func:`elbo_logprob`."""
    u = torch.rand(batch, 1, generator=generator)
    t = (u + torch.arange(samples)[None, :]) / samples
    return t, torch.rand(batch, samples, length, generator=generator)


def elbo_logprob(model, sequences: torch.Tensor, prompt_length: int, t: torch.Tensor, noise: torch.Tensor,
                 mask_token_id: int, coupled: bool = True, eps: float = 1e-3, **model_kwargs) -> torch.Tensor:
    """ELBO estimate of ``log p(sequences[:, P:] | sequences[:, :P])`` per row, ``[B]`` (nats, with grad).

    Draw k masks completion token i when ``noise[b, k, i] < p`` with ``p = (1 - eps) t[b, k] + eps`` and
    scores ``-sum_masked CE / p``; with ``coupled`` the complement (level ``1 - p``, weight
    ``1 / max(1 - p, eps)``) is scored too and the two are averaged. The estimate is the mean over the K
    draws. All copies of all rows go through one forward.
    """
    B, N = sequences.shape
    L = N - prompt_length
    K = t.shape[1]
    if noise.shape != (B, K, L):
        raise ValueError(f"noise must have shape {(B, K, L)} (rows, draws, completion length), got {tuple(noise.shape)}")
    dev = sequences.device
    p = ((1.0 - eps) * t.to(dev).float() + eps)[..., None]  # [B, K, 1]
    masked = noise.to(dev) < p  # [B, K, L]
    weight = (1.0 / p).expand(B, K, L)
    if coupled:
        masked = torch.cat([masked, ~masked], 1)
        weight = torch.cat([weight, (1.0 / (1.0 - p).clamp(min=eps)).expand(B, K, L)], 1)
    copies = masked.shape[1]
    target = sequences[:, None, prompt_length:].expand(B, copies, L)
    answer = torch.where(masked, torch.full_like(target, mask_token_id), target)
    prompt = sequences[:, None, :prompt_length].expand(B, copies, prompt_length)
    noisy = torch.cat([prompt, answer], 2).reshape(B * copies, N)
    kw = {k: v.repeat_interleave(copies, 0) if isinstance(v, torch.Tensor) else v for k, v in model_kwargs.items()}
    logits = _logits(model(noisy, **kw))[:, prompt_length:].float()
    logp = -F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    per_copy = (logp.view(B, copies, L) * masked * weight).sum(2)  # [B, copies]
    if coupled:
        per_copy = 0.5 * (per_copy[:, :K] + per_copy[:, K:])
    return per_copy.mean(1)


def choose_steps(commit_step: torch.Tensor, samples: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples`` decoding steps per trajectory to score, uniformly without replacement among the steps that
    committed a token, and the weight that keeps the sum unbiased. ``commit_step`` ``[B, L]`` is the forward
    that wrote each completion token (:attr:`latent.sampling.Trajectory.commit_step`). Returns steps
    ``[B, K]`` (``-1`` pads rows with fewer than K such steps) and weights ``[B]`` (steps with a commit / steps
    chosen)."""
    B = commit_step.shape[0]
    if bool((commit_step < 0).any()):
        raise ValueError("every completion token must have a commit step (a trajectory with revision='none' and "
                         "stopping='block_full')")
    T = int(commit_step.max()) + 1
    has = torch.zeros(B, T, dtype=torch.bool).scatter_(1, commit_step.cpu().long(), True)
    priority = torch.rand(B, T, generator=generator).masked_fill(~has, float("inf"))
    K = min(samples, T)
    order = priority.argsort(dim=1, stable=True)[:, :K]
    chosen = torch.where(torch.gather(has, 1, order), order, torch.full_like(order, -1))
    n_steps = has.sum(1)
    return chosen, (n_steps / n_steps.clamp(max=K)).float()


def trajectory_logprob(model, sequences: torch.Tensor, prompt_length: int, commit_step: torch.Tensor,
                       steps: torch.Tensor, weights: torch.Tensor, mask_token_id: int, **model_kwargs) -> torch.Tensor:
    """Log-probability of the decoding path per row, ``[B]`` (nats, with grad), estimated from the chosen
    ``steps`` ``[B, K]`` (-1: none): for step s, the canvas holds the prompt and the tokens committed before s
    (the rest masked), and the tokens committed at s are scored by ``log softmax(logits)``; the sum over the
    chosen steps is multiplied by ``weights`` ``[B]``. The B * K canvases go through one forward."""
    B, N = sequences.shape
    K = steps.shape[1]
    dev = sequences.device
    cs = commit_step.to(dev)[:, None, :]  # [B, 1, L]
    s = steps.to(dev)[:, :, None]  # [B, K, 1]
    target = sequences[:, None, prompt_length:].expand(B, K, cs.shape[-1])
    known = cs < s
    scored = (cs == s) & (s >= 0)
    answer = torch.where(known, target, torch.full_like(target, mask_token_id))
    prompt = sequences[:, None, :prompt_length].expand(B, K, prompt_length)
    canvas = torch.cat([prompt, answer], 2).reshape(B * K, N)
    kw = {k: v.repeat_interleave(K, 0) if isinstance(v, torch.Tensor) else v for k, v in model_kwargs.items()}
    logits = _logits(model(canvas, **kw))[:, prompt_length:].float()
    logp = -F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return (logp.view(B, K, -1) * scored).sum((1, 2)) * weights.to(dev)


@dataclass
class PolicyLoss:
    """``loss``: the mean over rows of ``-min(ratio A, clip(ratio) A) + beta k3``; ``kl``: mean k3;
    ``clip_fraction``: rows whose clipped branch is active; ``ratio``: mean ratio."""

    loss: torch.Tensor
    kl: float
    clip_fraction: float
    ratio: float


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                        advantages: torch.Tensor, clip_eps: float = 0.2, beta: float = 0.0) -> PolicyLoss:
    """PPO clipped surrogate on sequence log-likelihoods ``[B]`` plus ``beta`` times the k3 estimator of
    KL(policy || reference), ``exp(ref - logp) - (ref - logp) - 1``. ``old_logp`` is treated as a constant;
    with one update per generation pass ``logp.detach()``: the ratio is then 1 in value and its gradient is
    that of ``logp``. ``ref_logp`` may be None when ``beta`` is 0."""
    ratio = torch.exp(logp - old_logp.detach())
    adv = advantages.to(logp.device).float()
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv)
    loss = -surrogate
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        d = ref_logp.detach() - logp
        kl = torch.exp(d) - d - 1.0
        loss = loss + beta * kl
    elif beta:
        raise ValueError("beta > 0 needs ref_logp, the reference model's log-likelihoods")
    clipped = ((ratio < 1.0 - clip_eps) & (adv < 0)) | ((ratio > 1.0 + clip_eps) & (adv > 0))
    return PolicyLoss(loss.mean(), float(kl.detach().mean()), float(clipped.float().mean()),
                      float(ratio.detach().mean()))

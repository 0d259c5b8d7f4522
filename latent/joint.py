"""CCDD joint mode: one forward of the backbone denoises the masked tokens and the noisy latents of the
same sequence; ``loss = CE + lam * MSE``; sampling evolves both streams, each on its own schedule.

Token stream: absorbing (masked) diffusion with a masking schedule from :mod:`latent.schedules`; the
corruption and the masked cross-entropy come from :mod:`latent.losses`. Latent stream: Gaussian
diffusion / flow matching from :mod:`latent.continuous`. The two streams draw independent noise
levels, so the model learns every combination (clean tokens + noisy latents, and the reverse), which
is what joint sampling meets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.utils import BaseOutput

from latent.continuous import GaussianDiffusion, _step_kwargs, check_finite, masked_mse
from latent.losses import _logits, _masked_ce, _valid_mask, corrupt
from latent.sampling.commit import confidence_rank, transfer_schedule
from latent.sampling.proposal import gumbel_max, uniform
from latent.schedules import get_schedule, sample_times

__all__ = ["JointLossOutput", "joint_loss", "JointSampleOutput", "joint_sample", "TOKEN_SCHEDULES",
           "shared_timesteps", "pure_noise_timestep", "aligned_transfer_schedule"]

TOKEN_SCHEDULES = ("linear", "aligned")


def pure_noise_timestep(diffusion: GaussianDiffusion) -> int:
    """The latent timestep whose ``x_t`` carries (almost) nothing of ``x0``: ``T - 1`` (DDPM), ``T`` (flow)."""
    return diffusion.num_train_timesteps if diffusion.is_flow else diffusion.num_train_timesteps - 1


def shared_timesteps(diffusion: GaussianDiffusion, t: torch.Tensor) -> torch.Tensor:
    """Latent timesteps at the token stream's noise level ``t`` in ``[0, 1]`` ``[B]``: ``t * T`` (integers
    clamped to ``[0, T)`` for DDPM, ``sigma = t`` clamped to ``[1e-3, 1]`` for flow), the pairing joint
    sampling walks along (mask ratio ``t`` next to latents at ``t``)."""
    T = diffusion.num_train_timesteps
    if diffusion.is_flow:
        return t.double().clamp(1e-3, 1.0) * T
    return (t.double() * T).long().clamp(0, T - 1)


def aligned_transfer_schedule(timesteps: torch.Tensor, T: int, gen_length: int) -> torch.Tensor:
    """Tokens to commit at each step ``[S]`` so that the masked fraction after step ``i`` follows the
    latent stream's next noise level ``timesteps[i + 1] / T`` (0 after the last step): the tokens finish
    with the latents instead of during the first ``gen_length`` steps."""
    level = torch.cat([timesteps[1:].double().cpu() / T, torch.zeros(1, dtype=torch.float64)])
    left = torch.round(gen_length * level.clamp(0, 1)).long()
    left = torch.minimum(left, torch.cummin(left, 0).values)  # never unmask fewer than before
    before = torch.cat([torch.tensor([gen_length]), left[:-1]])
    return before - left


@dataclass
class JointLossOutput:
    """``loss = ce + lam * mse``; ``ce``: weighted masked-token cross-entropy per scored token;
    ``mse``: latent regression error; ``num_masked``: tokens with a CE term."""

    loss: torch.Tensor
    ce: torch.Tensor
    mse: torch.Tensor
    num_masked: int


def joint_loss(
    model,
    input_ids: torch.Tensor,
    latents: torch.Tensor,
    mask_token_id: int,
    diffusion: GaussianDiffusion,
    lam: float = 1.0,
    schedule: str = "linear",
    eps: float = 1e-3,
    prompt_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    latent_mask: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    latent_noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    per_latent_timesteps: bool = False,
    self_latent_rows: torch.Tensor | None = None,
    **model_kwargs,
) -> JointLossOutput:
    """CCDD loss on token ids ``[B, N]`` and clean latents ``[B, M, C]`` of the same sequences.

    Tokens: ``s = (1 - eps) t + eps`` per row, each maskable token (valid and not in ``prompt_mask``)
    masked with probability ``mask_prob(s)``; CE weighted by the schedule's ELBO weight, summed and
    divided by the number of maskable tokens (as :func:`latent.losses.masked_diffusion_loss`).
    Latents: timesteps from ``diffusion`` (``[B]``, or ``[B, M]`` with ``per_latent_timesteps``), MSE
    to ``diffusion.target``. ``model`` is called once as
    ``model(noisy_ids, latents=x_t, timestep=t/T, attention_mask=..., **model_kwargs)``.

    ``self_latent_rows`` ``[B]`` (bool): in these rows the latent input is the model's own clean-latent
    estimate from pure noise (one extra forward without gradient), noised to the row's timestep with the
    same noise: what joint sampling feeds the tokens after its first step. The tokens then learn how far
    the model's own latents can be trusted; these rows carry no MSE term (their input is not the data's).
    """
    if lam < 0:
        raise ValueError(f"lam (the MSE weight) must be >= 0, got {lam}")
    check_finite(latents, "latents")
    cfg = getattr(getattr(model, "module", model), "config", None)
    want_c = getattr(cfg, "latent_dim", None) if cfg is not None else None
    if want_c is not None and want_c != latents.shape[-1]:
        raise ValueError(
            f"latents have {latents.shape[-1]} channels but the backbone's config.latent_dim is {want_c}."
        )
    sched = get_schedule(schedule)
    B, N = input_ids.shape
    if latents.shape[0] != B:
        raise ValueError(f"latents have batch {latents.shape[0]}, input_ids {B}.")
    valid = _valid_mask(input_ids, attention_mask)
    maskable = valid if prompt_mask is None else valid & ~prompt_mask.bool()
    if t is None:
        t = sample_times(B, generator=generator).to(input_ids.device)
    s = (1.0 - eps) * t + eps
    noisy, masked = corrupt(input_ids, sched.mask_prob(s), mask_token_id, noise, generator, maskable=maskable)

    M = latents.shape[1]
    if timesteps is None:
        timesteps = diffusion.sample_timesteps((B, M) if per_latent_timesteps else (B,), generator, latents.device)
    if latent_noise is None:
        latent_noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    x_t = diffusion.add_noise(latents, latent_noise, timesteps)
    if self_latent_rows is not None and bool(self_latent_rows.any()):
        rows = self_latent_rows.to(latents.device).bool()
        with torch.no_grad():
            k_max = torch.full_like(timesteps, pure_noise_timestep(diffusion))
            x_max = diffusion.add_noise(latents, latent_noise, k_max)
            guess = model(noisy, latents=x_max, timestep=diffusion.model_time(k_max).to(latents.device),
                          attention_mask=attention_mask, **model_kwargs)
            x0_hat = diffusion.predict_x0(guess.latent_pred.to(latents.dtype), x_max, k_max)
            x_t = torch.where(rows[:, None, None], diffusion.add_noise(x0_hat, latent_noise, timesteps), x_t)
        keep = (~rows)[:, None].expand(B, M)
        latent_mask = keep if latent_mask is None else latent_mask.bool() & keep

    out = model(noisy, latents=x_t, timestep=diffusion.model_time(timesteps).to(latents.device),
                attention_mask=attention_mask, **model_kwargs)
    logits = _logits(out)
    ce_terms = _masked_ce(logits, input_ids, masked) * sched.weight(s)[:, None].expand(B, N)[masked]
    ce = ce_terms.sum() / max(int(maskable.sum()), 1)
    mse = masked_mse(out.latent_pred, diffusion.target(latents, latent_noise, timesteps), latent_mask)
    return JointLossOutput(ce + lam * mse, ce, mse, int(masked.sum()))


@dataclass
class JointSampleOutput(BaseOutput):
    """``sequences``: ``[B, P + L]`` prompt + generated tokens; ``latents``: ``[B, M, C]`` or None;
    ``nfe``: forwards of the backbone."""

    sequences: torch.Tensor
    latents: torch.Tensor | None
    nfe: int


@torch.no_grad()
def joint_sample(
    model,
    prompt_ids: torch.Tensor,
    gen_length: int,
    mask_token_id: int,
    num_steps: int,
    latent_shape: tuple[int, int] | None = None,
    diffusion: GaussianDiffusion | None = None,
    scheduler=None,
    temperature: float = 0.0,
    order: str = "confidence",
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    callback_on_step_end: Callable | None = None,
    progress_bar: bool = False,
    token_schedule: str = "linear",
    **model_kwargs,
) -> JointSampleOutput:
    """Generate ``gen_length`` tokens after ``prompt_ids`` and (with ``latent_shape=(M, C)``) ``M``
    latents together, one backbone forward per step.

    Tokens follow LLaDA's linear transfer schedule (``floor(L / steps)`` committed per step, the most
    confident first, or in random order with ``order="random"``, MDLM's ancestral sampler, which suits
    unconditional generation; argmax, or Gumbel-max with ``temperature > 0``); latents follow ``scheduler``'s
    timesteps (any diffusers scheduler whose prediction type matches ``diffusion``). Without
    ``latent_shape`` this is plain masked diffusion with the same loop and step count (the
    discrete-only baseline). ``callback_on_step_end(step, timestep, {"sequences", "latents"})``.

    ``token_schedule="aligned"`` (joint sampling only) commits the tokens along the latent timesteps instead
    (:func:`aligned_transfer_schedule`): with more steps than tokens the linear quota commits every token in
    the first ``gen_length`` steps, next to latents that are still almost pure noise.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if token_schedule not in TOKEN_SCHEDULES:
        raise ValueError(f"token_schedule={token_schedule!r}; use one of {TOKEN_SCHEDULES}.")
    if order not in ("confidence", "random"):
        raise ValueError(f"order={order!r}; use 'confidence' or 'random'.")
    B, device = prompt_ids.shape[0], prompt_ids.device
    P = prompt_ids.shape[1]
    seq = torch.cat([prompt_ids, torch.full((B, gen_length), mask_token_id, dtype=torch.long, device=device)], 1)
    quota = transfer_schedule(torch.full((B,), gen_length, device=device), num_steps)  # [B, steps]
    joint = latent_shape is not None or latents is not None
    timesteps, T = None, None
    if joint:
        if diffusion is None or scheduler is None:
            raise ValueError("joint sampling needs diffusion= (what the model predicts) and scheduler=.")
        diffusion.check_scheduler(scheduler)
        if latents is None:
            latents = torch.randn((B, *latent_shape), generator=generator).to(device)
            latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
        check_finite(latents, "latents")
        scheduler.set_timesteps(num_steps, device=device)
        timesteps, T = scheduler.timesteps, scheduler.config.num_train_timesteps
        if len(timesteps) != num_steps:
            raise ValueError(f"{type(scheduler).__name__} made {len(timesteps)} timesteps for num_steps={num_steps}.")
        step_kw = _step_kwargs(scheduler, generator, None)
        if token_schedule == "aligned":
            quota = aligned_transfer_schedule(timesteps, T, gen_length).to(device).expand(B, num_steps)
    steps = range(num_steps)
    if progress_bar:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="joint diffusion", leave=False)
    for i in steps:
        kw = dict(model_kwargs)
        if joint:
            t = timesteps[i]
            x_in = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
            kw.update(latents=x_in, timestep=(t.float() / T).expand(B).to(device))
        out = model(seq, **kw)
        logits = _logits(out)[:, P:].float()
        logits[..., mask_token_id] = -torch.inf  # never propose the mask itself
        masked = seq[:, P:] == mask_token_id
        u = uniform(logits.shape, generator, device) if temperature > 0 else None
        proposal = gumbel_max(logits, temperature, u)
        if order == "random":
            conf = torch.rand(proposal.shape, generator=generator).to(device)
        else:
            conf = logits.softmax(-1).gather(-1, proposal[..., None]).squeeze(-1)
        conf = torch.where(masked, conf, torch.full_like(conf, -torch.inf))
        commit = masked & (confidence_rank(conf) < quota[:, i : i + 1])
        seq[:, P:] = torch.where(commit, proposal, seq[:, P:])
        if joint:
            pred = check_finite(out.latent_pred, f"latent_pred (model output at step {i})")
            latents = scheduler.step(pred, timesteps[i], latents, **step_kw).prev_sample
        if callback_on_step_end is not None:
            callback_on_step_end(i, None if timesteps is None else timesteps[i], {"sequences": seq, "latents": latents})
    return JointSampleOutput(sequences=seq, latents=latents, nfe=num_steps)

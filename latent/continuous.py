"""Gaussian diffusion and flow matching on continuous latents ``[B, M, C]``.

Training side (:class:`GaussianDiffusion`): the forward process, the regression target of each
prediction type and the loss. Sampling side (:func:`sample_latents`): one loop that drives whatever
diffusers scheduler it is handed (``DDIMScheduler``, ``DPMSolverMultistepScheduler``,
``FlowMatchEulerDiscreteScheduler``, ...), after checking that the scheduler expects the prediction
type the model was trained with.

Conventions (the same as diffusers', so its schedulers can be used unchanged):

- variance-preserving (DDPM) family, integer timesteps ``k`` in ``[0, T)``, ``abar_k`` the cumulative
  product of ``1 - beta``::

      x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps
      epsilon      -> target eps
      sample       -> target x0
      v_prediction -> target v = sqrt(abar_k) eps - sqrt(1 - abar_k) x0

- flow matching (rectified flow), ``sigma`` in ``[0, 1]`` and scheduler timestep ``sigma * T``::

      x_sigma = (1 - sigma) x0 + sigma eps
      flow    -> target u = eps - x0         (dx/dsigma)

The backbone is conditioned on a noise level in ``[0, 1]``: ``timestep / T`` for both families
(``k / T`` for DDPM, ``sigma`` for flow matching). The backbone adds that conditioning to the latent
slots only, so the token slots (and any prompt KV cache) never depend on it.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "PREDICTION_TYPES",
    "BETA_SCHEDULES",
    "normalize_prediction_type",
    "make_alphas_cumprod",
    "GaussianDiffusion",
    "LatentLossOutput",
    "scheduler_prediction_type",
    "check_scheduler",
    "check_finite",
    "sample_latents",
]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_ALIASES = {
    "eps": "epsilon", "epsilon": "epsilon", "noise": "epsilon",
    "x0": "sample", "sample": "sample",
    "v": "v_prediction", "v_prediction": "v_prediction",
    "flow": "flow", "flow_matching": "flow", "flow_prediction": "flow", "velocity": "flow",
}


def normalize_prediction_type(name: str) -> str:
    """Map ``eps``/``x0``/``v``/``flow`` (and diffusers' spellings) to one of :data:`PREDICTION_TYPES`."""
    key = str(name).lower()
    if key not in _ALIASES:
        raise ValueError(
            f"prediction_type={name!r} is unknown; use one of {PREDICTION_TYPES} "
            "(aliases: eps, x0, v, flow_prediction)."
        )
    return _ALIASES[key]


def make_alphas_cumprod(
    beta_schedule: str = "squaredcos_cap_v2",
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 2e-2,
) -> torch.Tensor:
    """``abar_k`` for ``k = 0 .. T-1`` (float64), with the beta schedules diffusers names the same way.

    ``linear``: betas evenly spaced; ``scaled_linear``: square roots evenly spaced; ``squaredcos_cap_v2``:
    the cosine schedule of improved DDPM (``abar(t) = cos^2((t + 0.008) / 1.008 * pi / 2)``, each beta
    capped at 0.999).
    """
    T = int(num_train_timesteps)
    if T < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        def abar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=torch.float64)
    else:
        raise ValueError(f"beta_schedule={beta_schedule!r} is unknown; use one of {BETA_SCHEDULES}.")
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass
class LatentLossOutput:
    """``loss``: scalar (mean squared error over the scored latents). ``pred``/``target``: ``[B, M, C]``.
    ``timesteps``: the scheduler-scale timesteps used, ``[B]`` or ``[B, M]``."""

    loss: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor


def _latent_pred(out) -> torch.Tensor:
    pred = out if isinstance(out, torch.Tensor) else getattr(out, "latent_pred", None)
    if pred is None:
        raise ValueError(
            "the model returned no latent_pred; the backbone needs latent_dim > 0 and latents= in the call."
        )
    return pred


def check_finite(x: torch.Tensor, name: str) -> torch.Tensor:
    """Raise a ValueError naming ``name`` when ``x`` holds NaN or infinity."""
    if x is not None and x.is_floating_point() and not bool(torch.isfinite(x).all()):
        n = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains {n} NaN/inf value(s) (shape {tuple(x.shape)}); check its source.")
    return x


class GaussianDiffusion:
    """Forward process, targets and loss of Gaussian diffusion / flow matching on latents.

    Args:
        prediction_type: ``"epsilon"`` | ``"sample"`` (x0) | ``"v_prediction"`` | ``"flow"``.
        num_train_timesteps: ``T``; the backbone sees ``timestep / T`` in ``[0, 1]``.
        beta_schedule, beta_start, beta_end: the DDPM noise schedule (ignored for ``flow``).
        flow_time_sampling: ``"uniform"`` or ``"logit_normal"`` (SD3-style) draws of ``sigma``.
    """

    def __init__(
        self,
        prediction_type: str = "epsilon",
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        beta_start: float = 1e-4,
        beta_end: float = 2e-2,
        flow_time_sampling: str = "uniform",
    ):
        self.prediction_type = normalize_prediction_type(prediction_type)
        self.num_train_timesteps = int(num_train_timesteps)
        self.beta_schedule, self.beta_start, self.beta_end = beta_schedule, beta_start, beta_end
        if flow_time_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"flow_time_sampling={flow_time_sampling!r}; use 'uniform' or 'logit_normal'.")
        self.flow_time_sampling = flow_time_sampling
        self.alphas_cumprod = None
        if not self.is_flow:
            self.alphas_cumprod = make_alphas_cumprod(beta_schedule, num_train_timesteps, beta_start, beta_end)

    @property
    def is_flow(self) -> bool:
        return self.prediction_type == "flow"

    def config(self) -> dict:
        return dict(
            prediction_type=self.prediction_type, num_train_timesteps=self.num_train_timesteps,
            beta_schedule=self.beta_schedule, beta_start=self.beta_start, beta_end=self.beta_end,
            flow_time_sampling=self.flow_time_sampling,
        )

    def __repr__(self) -> str:
        return f"GaussianDiffusion({', '.join(f'{k}={v!r}' for k, v in self.config().items())})"

    # ---- coefficients --------------------------------------------------------------------------
    def _coeffs(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)`` with ``x_t = a x0 + b eps``, broadcast to ``like`` ``[B, M, C]``."""
        t = torch.as_tensor(timesteps, device=like.device)
        if self.is_flow:
            sigma = t.double() / self.num_train_timesteps
            a, b = 1.0 - sigma, sigma
        else:
            idx = t.long().clamp(0, self.num_train_timesteps - 1)
            abar = self.alphas_cumprod.to(like.device)[idx]
            a, b = abar.sqrt(), (1.0 - abar).sqrt()
        while a.ndim < like.ndim:
            a, b = a[..., None], b[..., None]
        return a.to(like.dtype), b.to(like.dtype)

    def model_time(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The backbone's noise level in ``[0, 1]``: ``timestep / T``."""
        return torch.as_tensor(timesteps).float() / self.num_train_timesteps

    def sample_timesteps(self, shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Training timesteps: integers in ``[0, T)`` (DDPM) or floats ``sigma * T`` (flow)."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if self.is_flow:
            if self.flow_time_sampling == "logit_normal":
                sigma = torch.sigmoid(torch.randn(shape, generator=generator))
            else:
                sigma = torch.rand(shape, generator=generator)
            t = sigma.clamp(1e-3, 1.0) * self.num_train_timesteps
        else:
            t = torch.randint(0, self.num_train_timesteps, shape, generator=generator)
        return t.to(device) if device is not None else t

    # ---- forward process and targets ------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t`` from clean latents, Gaussian noise and timesteps ``[B]`` or ``[B, M]``."""
        a, b = self._coeffs(timesteps, x0)
        return a * x0 + b * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the model regresses for this prediction type."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        if self.prediction_type == "flow":
            return noise - x0
        a, b = self._coeffs(timesteps, x0)
        return a * noise - b * x0

    def predict_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Clean-latent estimate implied by a model output (any prediction type)."""
        if self.prediction_type == "sample":
            return model_output
        a, b = self._coeffs(timesteps, x_t)
        if self.prediction_type == "epsilon":
            return (x_t - b * model_output) / a.clamp(min=1e-8)
        if self.prediction_type == "flow":
            return x_t - b * model_output
        return a * x_t - b * model_output  # v: x0 = a x_t - b v (a^2 + b^2 = 1)

    def predict_noise(self, model_output: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Noise estimate implied by a model output (any prediction type)."""
        a, b = self._coeffs(timesteps, x_t)
        if self.prediction_type == "epsilon":
            return model_output
        if self.prediction_type == "v_prediction":
            return b * x_t + a * model_output
        if self.prediction_type == "flow":
            return x_t + a * model_output
        return (x_t - a * model_output) / b.clamp(min=1e-8)

    # ---- loss ------------------------------------------------------------------------------------
    def loss(
        self,
        model,
        x0: torch.Tensor,
        timesteps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        latent_mask: torch.Tensor | None = None,
        per_latent_timesteps: bool = False,
        **model_kwargs,
    ) -> LatentLossOutput:
        """Mean squared error between ``model(latents=x_t, timestep=t/T, **model_kwargs)`` and the target.

        ``model`` returns a tensor or an object with ``.latent_pred`` (the backbone). ``timesteps`` is
        ``[B]`` or ``[B, M]`` (drawn if omitted: one per row, or one per latent with
        ``per_latent_timesteps``); ``latent_mask`` ``[B, M]`` selects the scored latents.
        """
        check_finite(x0, "latents (x0)")
        B, M = x0.shape[:2]
        if timesteps is None:
            timesteps = self.sample_timesteps((B, M) if per_latent_timesteps else (B,), generator, x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        x_t = self.add_noise(x0, noise, timesteps)
        pred = _latent_pred(model(latents=x_t, timestep=self.model_time(timesteps).to(x0.device), **model_kwargs))
        target = self.target(x0, noise, timesteps)
        loss = masked_mse(pred, target, latent_mask)
        return LatentLossOutput(loss, pred, target, timesteps)

    # ---- schedulers ------------------------------------------------------------------------------
    def make_scheduler(self, kind: str = "ddim", **kwargs):
        """A diffusers scheduler that matches this process: ``ddim``, ``dpm`` (DPM-Solver++ multistep),
        ``ddpm`` or ``flow_euler`` (the only choice for ``flow``). ``kwargs`` override its config."""
        from diffusers import (
            DDIMScheduler,
            DDPMScheduler,
            DPMSolverMultistepScheduler,
            FlowMatchEulerDiscreteScheduler,
        )

        if self.is_flow:
            if kind not in ("flow_euler", "flow"):
                raise ValueError(f"prediction_type='flow' samples with kind='flow_euler', not {kind!r}.")
            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, **kwargs)
        base = dict(
            num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule,
            beta_start=self.beta_start, beta_end=self.beta_end, prediction_type=self.prediction_type,
        )
        classes = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "ddpm": DDPMScheduler}
        if kind not in classes:
            raise ValueError(f"scheduler kind {kind!r} is unknown for prediction_type={self.prediction_type!r}; "
                             f"use one of {sorted(classes)}.")
        if kind in ("ddim", "ddpm"):
            base.update(clip_sample=False)  # latents are not images in [-1, 1]
        if kind == "ddim":
            base.update(timestep_spacing="trailing", set_alpha_to_one=True)
        base.update(kwargs)
        return classes[kind](**base)

    def check_scheduler(self, scheduler) -> None:
        """Raise if ``scheduler`` expects another prediction type; warn if its noise schedule differs."""
        check_scheduler(scheduler, self.prediction_type)
        ac = getattr(scheduler, "alphas_cumprod", None)
        if self.alphas_cumprod is not None and ac is not None:
            ac = torch.as_tensor(ac, dtype=torch.float64)
            if ac.shape != self.alphas_cumprod.shape or not torch.allclose(ac, self.alphas_cumprod, atol=1e-5):
                warnings.warn(
                    f"scheduler.config.beta_schedule={scheduler.config.get('beta_schedule')!r} gives other noise "
                    f"levels than the model was trained with (beta_schedule={self.beta_schedule!r}, "
                    f"num_train_timesteps={self.num_train_timesteps}); samples will be off. Build the scheduler "
                    "with GaussianDiffusion.make_scheduler().",
                    stacklevel=2,
                )
        if getattr(scheduler.config, "clip_sample", False) or getattr(scheduler.config, "thresholding", False):
            warnings.warn(
                "scheduler.config.clip_sample/thresholding is on: x0 is clipped to the image range, which "
                "distorts latents; set clip_sample=False and thresholding=False.",
                stacklevel=2,
            )


def masked_mse(pred: torch.Tensor, target: torch.Tensor, latent_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over channels, then over the latents where ``latent_mask`` ``[B, M]`` is true (all if None)."""
    per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(-1)
    if latent_mask is None:
        return per.mean()
    m = latent_mask.to(per.dtype)
    return (per * m).sum() / m.sum().clamp(min=1.0)


# ---- sampling with diffusers schedulers ------------------------------------------------------------
def scheduler_prediction_type(scheduler) -> str:
    """The prediction type a diffusers scheduler expects from the model, in :data:`PREDICTION_TYPES` terms.

    Flow-matching schedulers (``FlowMatch*``) expect the velocity ``eps - x0`` (``"flow"``); the others
    state it in ``scheduler.config.prediction_type``.
    """
    name = type(scheduler).__name__
    if name.startswith("FlowMatch"):
        return "flow"
    cfg = getattr(scheduler, "config", None)
    pt = None if cfg is None else cfg.get("prediction_type", None)
    if pt is None:
        raise ValueError(
            f"{name} has no config.prediction_type, so the loop cannot tell what it expects from the model; "
            "pass a scheduler with prediction_type (DDIMScheduler, DPMSolverMultistepScheduler, ...) or a "
            "FlowMatchEulerDiscreteScheduler."
        )
    if pt == "flow_prediction" and not cfg.get("use_flow_sigmas", False):
        raise ValueError(
            f"{name} has prediction_type='flow_prediction' but use_flow_sigmas=False: its noise levels are "
            "not the flow-matching ones; set use_flow_sigmas=True."
        )
    return normalize_prediction_type(pt)


def check_scheduler(scheduler, prediction_type: str) -> None:
    """Raise a ValueError naming ``prediction_type`` when the scheduler and the model disagree."""
    want = normalize_prediction_type(prediction_type)
    have = scheduler_prediction_type(scheduler)
    if want != have:
        hint = (
            "use FlowMatchEulerDiscreteScheduler" if want == "flow"
            else f"build it with prediction_type={want!r} (e.g. {type(scheduler).__name__}.from_config("
            f"scheduler.config, prediction_type={want!r}))"
        )
        raise ValueError(
            f"the model predicts prediction_type={want!r} but {type(scheduler).__name__} expects "
            f"prediction_type={have!r}; {hint}."
        )


def _step_kwargs(scheduler, generator, eta):
    params = inspect.signature(scheduler.step).parameters
    kw = {}
    if "generator" in params:
        kw["generator"] = generator
    if eta is not None:
        if "eta" not in params:
            raise ValueError(f"eta={eta} was given but {type(scheduler).__name__}.step takes no eta.")
        kw["eta"] = eta
    return kw


@torch.no_grad()
def sample_latents(
    denoise_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler,
    shape: tuple[int, ...] | None = None,
    num_inference_steps: int = 50,
    prediction_type: str | None = None,
    latents: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    eta: float | None = None,
    device=None,
    dtype=torch.float32,
    callback_on_step_end: Callable | None = None,
    progress_bar: bool | Callable = False,
    diffusion: GaussianDiffusion | None = None,
) -> torch.Tensor:
    """Run a diffusers scheduler from noise to clean latents.

    ``denoise_fn(x_t, t)`` returns the model output for latents ``x_t`` ``[B, M, C]`` at the backbone
    noise level ``t = timestep / num_train_timesteps`` (a 0-d tensor in ``[0, 1]``); it holds the
    conditioning and any guidance. The scheduler's expected prediction type is checked against
    ``prediction_type`` (or ``diffusion.prediction_type``) before the first step.

    ``callback_on_step_end(step, timestep, latents)`` may return a tensor that replaces the latents.
    ``progress_bar``: True for a tqdm bar, or a callable wrapping the iterable (a pipeline's bar).
    """
    if diffusion is not None:
        prediction_type = prediction_type or diffusion.prediction_type
        diffusion.check_scheduler(scheduler)
    if prediction_type is None:
        raise ValueError("pass prediction_type (what the model predicts) or diffusion= so it can be checked.")
    check_scheduler(scheduler, prediction_type)
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if latents is None:
        if shape is None:
            raise ValueError("pass shape=(B, M, C) or initial latents=.")
        latents = torch.randn(tuple(shape), generator=generator, dtype=dtype)
        latents = latents.to(device) if device is not None else latents
        latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    else:
        check_finite(latents, "latents")
        latents = latents.to(device=device or latents.device, dtype=dtype)
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    T = scheduler.config.num_train_timesteps
    kw = _step_kwargs(scheduler, generator, eta)
    timesteps = scheduler.timesteps
    iterator = timesteps
    if progress_bar is True:
        from tqdm.auto import tqdm

        iterator = tqdm(timesteps, desc="latent diffusion", leave=False)
    elif callable(progress_bar):
        iterator = progress_bar(timesteps)
    for i, t in enumerate(iterator):
        x_in = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        out = denoise_fn(x_in, t.float() / T)
        out = _latent_pred(out)
        check_finite(out, f"latent_pred (model output at step {i}, timestep {float(t):g})")
        latents = scheduler.step(out.to(latents.dtype), t, latents, **kw).prev_sample.to(dtype)
        if callback_on_step_end is not None:
            new = callback_on_step_end(i, t, latents)
            if isinstance(new, torch.Tensor):
                latents = check_finite(new, "latents returned by callback_on_step_end")
    return latents

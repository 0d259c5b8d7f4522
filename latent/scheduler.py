"""A diffusers scheduler for the discrete (masked) diffusion process.

It is what a pipeline folder saves as `scheduler/scheduler_config.json`: the decoding defaults
(block length, commit rule, confidence, threshold, cache) and the forward masking schedule. It offers
the diffusers-style single step (`set_timesteps` + `step`) for hand-written loops over one block, the
forward process (`add_noise`) for training, and `sampler(...)`, the full decoding loop of
`latent.sampling` configured from these defaults, which the pipelines use.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from .config_checks import SCHEDULER_RULES, check_config
from .losses import corrupt
from .sampling import Sampler, SamplerConfig, create_part
from .sampling.state import DecodeState
from .sampling.step import decode_step
from .schedules import get_schedule

# The exact cache each layout allows; approximate caches (Fast-dLLM prefix/dual) are opt-in.
EXACT_CACHE = {"prefix": "prefix_exact", "block_causal": "block_exact", "causal": "prefix_exact"}


@dataclass
class MaskedDiffusionSchedulerOutput(BaseOutput):
    prev_sample: torch.LongTensor  # [B, L] the block after this step
    transfer_index: torch.BoolTensor  # [B, L] positions committed this step
    pred_original_sample: torch.LongTensor  # [B, L] the proposal x0 at every position
    confidence: torch.Tensor  # [B, L] -inf where nothing could be committed
    remask_index: torch.BoolTensor | None = None  # [B, L] tokens masked again by the revision part
    edit_index: torch.BoolTensor | None = None  # [B, L] tokens replaced by the revision part


class MaskedDiffusionScheduler(SchedulerMixin, ConfigMixin):
    """Masked-diffusion decoding defaults plus one-step and forward-process helpers.

    >>> scheduler = MaskedDiffusionScheduler(block_length=32, commit="threshold", threshold=0.9)
    >>> scheduler.set_timesteps(8)
    >>> for t in scheduler.timesteps:  # one block, by hand
    ...     logits = model(canvas).logits[:, -32:]
    ...     block = scheduler.step(logits, t, block, mask_token_id=m).prev_sample
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(
        self,
        block_length: int = 32,
        num_inference_steps: int | None = None,
        commit: str = "schedule",
        confidence: str = "low_confidence",
        revision: str = "none",
        verifier: str = "none",
        threshold: float = 0.9,
        factor: float = 1.0,
        temperature: float = 0.0,
        cache: str = "auto",
        noise_schedule: str = "linear",
        eps: float = 1e-3,
        mask_token_id: int | None = None,
        eos_token_id: int | None = None,
        eot_token_id: int | None = None,
    ):
        get_schedule(noise_schedule)  # fail early on an unknown name
        check_config(type(self), self.config, SCHEDULER_RULES)  # e.g. block_length 0 from scheduler_config.json
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.arange((num_inference_steps or 1) - 1, -1, -1)
        self._block_parts = None

    # ---- the full loop -------------------------------------------------------------------------
    def sampler_config(self, model=None, **overrides) -> SamplerConfig:
        """The sampler knobs: this scheduler's defaults, then every override that is not None."""
        cfg = self.config
        knobs = dict(
            block_length=cfg.block_length, steps=cfg.num_inference_steps, commit=cfg.commit,
            confidence=cfg.confidence, revision=cfg.revision, verifier=cfg.verifier,
            threshold=cfg.threshold, factor=cfg.factor,
            temperature=cfg.temperature, cache=cfg.cache,
        )
        # A checkpoint family's special tokens (e.g. a converted LLaDA's EoT); a tokenizer's ids override them.
        knobs.update({k: cfg[k] for k in ("mask_token_id", "eos_token_id", "eot_token_id") if cfg.get(k) is not None})
        known = {f.name for f in fields(SamplerConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"Unknown sampler argument(s) {unknown}; known: {sorted(known)}.")
        knobs.update({k: v for k, v in overrides.items() if v is not None})
        if knobs["cache"] == "auto":
            layout = getattr(getattr(model, "config", None), "attention_layout", None)
            knobs["cache"] = EXACT_CACHE.get(layout, "none")
        return SamplerConfig(**knobs)

    def sampler(self, model=None, **overrides) -> Sampler:
        return Sampler(self.sampler_config(model, **overrides))

    # ---- one step, diffusers style -------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        if not isinstance(num_inference_steps, int) or num_inference_steps <= 0:
            raise ValueError(f"`num_inference_steps` must be a positive int, got {num_inference_steps!r}.")
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.arange(num_inference_steps - 1, -1, -1, device=device)
        self._block_parts = None

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.LongTensor,
        *,
        mask_token_id: int,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        **overrides,
    ) -> MaskedDiffusionSchedulerOutput | tuple:
        """Commit tokens of one block. `model_output` [B, L, V] are the block's logits, `sample` [B, L]
        its tokens, `timestep` counts down from num_inference_steps - 1 (the first step of a block
        fixes the schedule rule's quota from the block's mask count). `overrides` are SamplerConfig
        knobs (temperature, threshold, revision, logits_eos_inf with eos_token_id, ...); the step is the
        decoding loop's own (`latent.sampling.step.decode_step`), with the noise drawn over the block only.
        The commit and revision parts keep their memory from the block's first timestep on; a revision's
        post steps on a full block belong to the loop (`sampler`), not to this single step."""
        if self.num_inference_steps is None:
            raise ValueError("Call `set_timesteps(num_inference_steps)` before `step`.")
        if model_output.shape[:2] != sample.shape:
            raise ValueError(
                f"`model_output` {tuple(model_output.shape)} must be [B, L, V] for `sample` {tuple(sample.shape)}."
            )
        step_index = self.num_inference_steps - 1 - int(timestep)
        cfg = self.sampler_config(
            gen_length=sample.shape[1], block_length=sample.shape[1], steps=self.num_inference_steps,
            noise_shape="block", **{"verifier": "none", **overrides},  # a verifier belongs to the loop, not the step
        ).validate()
        names = cfg.part_names()
        parts = {slot: create_part(slot, names[slot], cfg) for slot in ("proposal", "confidence", "stopping")}
        batch = sample.shape[0]
        state = DecodeState(
            model=None, x=sample, rows=torch.arange(batch, device=sample.device), batch_size=batch,
            attn=None, prefix_embeds=None, prompt_len=0, block_length=sample.shape[1],
            mask_token_id=mask_token_id, guidance=None, generator=generator, noise_shape="block",
            block_step=step_index,
        )
        if step_index == 0 or self._block_parts is None:  # e.g. the schedule's quota is fixed at the first step
            masked = (sample == mask_token_id).sum(1)
            self._block_parts = {slot: create_part(slot, names[slot], cfg) for slot in ("commit", "revision")}
            for part in self._block_parts.values():
                part.begin_block(state, masked)
        result = decode_step(model_output, sample, {**parts, **self._block_parts}, state, cfg)
        out = MaskedDiffusionSchedulerOutput(result.block, result.transfer, result.x0, result.confidence,
                                             result.remasked, result.edited)
        return out if return_dict else out.to_tuple()

    # ---- forward process (training) ------------------------------------------------------------
    def add_noise(
        self,
        original_samples: torch.LongTensor,
        timesteps: torch.Tensor,
        *,
        mask_token_id: int,
        generator: torch.Generator | None = None,
        maskable: torch.Tensor | None = None,
    ) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """Mask each token with probability mask_prob(t) of the configured schedule, t in [0, 1] per row.
        Returns (noisy ids, masked positions); `maskable` keeps e.g. prompts clean."""
        t = torch.as_tensor(timesteps, dtype=torch.float32, device=original_samples.device)
        if t.ndim != 1 or t.shape[0] != original_samples.shape[0] or bool(((t < 0) | (t > 1)).any()):
            raise ValueError(f"`timesteps` must be a [B] tensor of noise levels in [0, 1], got {tuple(t.shape)}.")
        p = (1 - self.config.eps) * get_schedule(self.config.noise_schedule).mask_prob(t) + self.config.eps
        return corrupt(original_samples, p, mask_token_id, generator=generator, maskable=maskable)

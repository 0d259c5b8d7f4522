"""Driving plans by masked diffusion (ViLaD style), as a diffusers pipeline (trained by the driving task,
`pipelines/tasks/driving.py`: `python train.py configs/driving_tiny.yaml`).

```python
from pipelines.planning import PlanningPipeline

pipe = PlanningPipeline.from_pretrained("runs/driving_tiny/pipeline")
out = pipe({"ego": {"speed": 25.0, "heading": 0.0, "lane": 1, "num_lanes": 3},
            "vehicles": [[20.0, 0.0, -3.0, 0.0, 1.0, 0.0]]})
out.actions[0]        # ['IDLE', 'SLOWER', 'IDLE']  next K meta-actions
out.waypoints[0]      # [K, 2] ego positions after 1..K decisions (ego frame, metres)
out.confidence[0]     # [3K] probability of each plan token when it was committed
out = pipe(obs_list, threshold=0.7)        # Fast-dLLM threshold decoding (the default rule, 0.9)
out = pipe(obs_list, steps=9)              # LLaDA schedule: one token per forward
out = pipe(bad_obs, on_error="record")     # rows with bad input get FALLBACK_ACTION, out.errors says why
out = pipe(obs_list, action_bias={"SLOWER": 1.0})            # logit offsets on every action slot
out = pipe(obs_list, action_bias=pipe.prior_correction(1.0))  # divide out the training label shares
```

The sensors become prefix embeddings (`modalities.driving.DrivingAdapter`); the plan is a canvas of 3K masked
tokens, (meta-action, dx, dy) per future decision (`modalities.data.driving.PlanTokenizer`), all decoded in
parallel by the sampler loop of `latent.sampling`. With the backbone's `prefix` layout the sensor tokens
attend only among themselves, so their K/V are computed once per decision and reused exactly at every step
(cache "prefix_exact", the scheduler's "auto"). Each plan slot may only take tokens of its kind (an action
slot an action, a dx slot a forward step...); proposals are restricted accordingly.

The same pipeline runs the autoregressive baseline: a backbone of the same size with
``attention_layout="causal"``, trained with next-token loss after a BOS token, decodes the 3K tokens left to
right (greedy, one forward per token with a KV cache). `decoding` in the output says which one ran.

Bad input: `on_error="raise"` (default) raises `DrivingInputError` (a ValueError) naming the field;
`on_error="record"` gives the offending rows the documented safe plan instead: ``FALLBACK_ACTION``
("SLOWER": keep the lane and slow down) for every decision, waypoints NaN (no trajectory is claimed),
confidence 0, `fallback[row] = True` and the reason in `errors[row]`.

**Action bias.** `action_bias` adds a logit offset per meta-action to every action slot before the commit
rule sees the probabilities (the diffusion decoder). `prior_correction(tau)` is the offset ``-tau * log(share)``
from the training labels' action shares that the driving task saves with the pipeline (`action_prior`):
post-hoc logit adjustment, which lifts whichever actions are rare among the training labels (in the
highway demonstrations the lane changes, about 1.5 % each; braking is about 30 %).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from latent.scheduler import MaskedDiffusionScheduler
from modalities.data.driving import ACTION_INDEX, ACTIONS, FALLBACK_ACTION, PlanTokenizer
from modalities.driving import DrivingInputError, DrivingInputs

from .base import MaskedDiffusionPipeline, PipelineOutput, callback_tensor_inputs, check_on_error

__all__ = ["PlanningPipeline", "PlanningPipelineOutput"]


@dataclass
class PlanningPipelineOutput(PipelineOutput):
    """
    actions: per row the K meta-action names (highway-env's DiscreteMetaAction names).
    tokens: [B, 3K] plan token ids (the mask id where nothing was decoded, i.e. fallback rows).
    action_ids: [B, K] their indices in `modalities.data.driving.ACTIONS` (what `env.step` takes).
    waypoints: [B, K, 2] ego positions after 1..K decisions (x forward, y right, metres); NaN for fallback rows.
    confidence: [B, 3K] probability of each plan token when committed; 0 for fallback rows.
    fallback: [B] bool, the row got the fallback plan; errors: the reason per row (None if fine).
    nfe: backbone forwards of the batch (the exact prefix cache's sensor forward included).
    row_steps: [B] decoding forwards each row needed (its last commit + 1; the batch runs until its slowest row
        is done, so at batch size 1 nfe = row_steps (+1 with the prefix cache)); 0 for fallback rows.
    decoding: "diffusion" or "autoregressive".

    `return_dict=False` returns these fields in this order: (actions, tokens, action_ids, waypoints, confidence,
    fallback, errors, nfe, row_steps, decoding).
    """

    actions: list[list[str]]
    tokens: torch.LongTensor
    action_ids: torch.LongTensor
    waypoints: torch.Tensor
    confidence: torch.Tensor
    fallback: torch.BoolTensor
    errors: list[str | None] = field(default_factory=list)
    nfe: int = 0
    row_steps: torch.LongTensor | None = None
    decoding: str = "diffusion"


class _SlotConstrained(torch.nn.Module):
    """The backbone with every plan slot's logits restricted to tokens of its kind. The sampler calls it on
    canvas positions [lo, N) (no cache, or an exact prefix cache), so the logits are the canvas tail."""

    def __init__(self, model, allowed: torch.BoolTensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.config = model.config
        self.allowed = allowed
        self.bias = bias  # [length, vocab] added to the logits (action_bias), or None

    def forward(self, input_ids, **kwargs):
        out = self.model(input_ids, **kwargs)
        if out.logits is not None and out.logits.shape[1]:
            n = out.logits.shape[1]
            allowed = self.allowed[self.allowed.shape[0] - n :].to(out.logits.device)
            logits = out.logits if self.bias is None else out.logits + self.bias[-n:].to(out.logits)
            out.logits = logits.masked_fill(~allowed, float("-inf"))
        return out


class PlanningPipeline(MaskedDiffusionPipeline):
    """observations -> plan (meta-actions, waypoints, per-token confidence). Modules: `driving_adapter`
    (`DrivingAdapter`), `model` (`latent.DiffusionTransformer`: "prefix" layout for diffusion, "causal" for the
    autoregressive baseline), `scheduler` (`MaskedDiffusionScheduler`: decoding defaults). `plan` is the
    `PlanTokenizer` config, saved in model_index.json."""

    model_cpu_offload_seq = "driving_adapter->model"

    def __init__(self, driving_adapter, model, scheduler: MaskedDiffusionScheduler, plan: dict | None = None,
                 action_prior: list[float] | None = None):
        super().__init__()
        tok = PlanTokenizer(**(plan or {}))
        vocab = getattr(model.config, "vocab_size", None)
        if vocab is not None and vocab < tok.vocab_size:
            raise ValueError(f"model.config.vocab_size={vocab} is smaller than the plan vocabulary ({tok.vocab_size}).")
        mask_id = getattr(model.config, "mask_token_id", tok.mask_token_id)
        if mask_id != tok.mask_token_id:
            raise ValueError(f"model.config.mask_token_id={mask_id} but the plan tokenizer's mask id is {tok.mask_token_id}.")
        d_a, d_m = getattr(driving_adapter.config, "hidden_size", None), getattr(model.config, "hidden_size", None)
        if d_a is not None and d_m is not None and d_a != d_m:
            raise ValueError(f"driving_adapter.config.hidden_size={d_a} but model.config.hidden_size={d_m}.")
        if action_prior is not None:
            action_prior = [float(x) for x in action_prior]
            if len(action_prior) != len(ACTIONS) or min(action_prior) < 0 or abs(sum(action_prior) - 1) > 1e-4:
                raise ValueError(f"`action_prior` must be {len(ACTIONS)} shares (one per action of {ACTIONS}) that "
                                 f"sum to 1, got {action_prior}.")
        self.register_modules(driving_adapter=driving_adapter, model=model, scheduler=scheduler)
        self.register_to_config(plan=tok.to_dict(), action_prior=action_prior)
        self.plan_tokenizer = tok

    @property
    def decoding(self) -> str:
        return "autoregressive" if getattr(self.model.config, "attention_layout", None) == "causal" else "diffusion"

    @property
    def reads_occupancy(self) -> bool:
        """Whether observations must carry the occupancy grid (the adapter has an occupancy encoder)."""
        return self.driving_adapter.occupancy_encoder is not None

    def prior_correction(self, tau: float = 1.0) -> dict[str, float]:
        """``action_bias`` that divides the training labels' action shares out of the planner's action
        probabilities, raised to ``tau`` (0: no change, 1: as if every action were equally frequent)."""
        prior = self.config.get("action_prior")
        if prior is None:
            raise ValueError("this pipeline holds no `action_prior` (the training labels' action shares); pass "
                             "`action_bias` yourself, or build it from DrivingDataset.action_shares() of the data.")
        if not tau >= 0:
            raise ValueError(f"`tau` must be >= 0, got {tau}.")
        # An action never seen in training gets the smallest seen share's offset, not an infinite one.
        floor = min(p for p in prior if p > 0)
        return {a: -float(tau) * math.log(max(p, floor)) for a, p in zip(ACTIONS, prior, strict=True)}

    def _bias_table(self, action_bias) -> torch.Tensor | None:
        """[length, vocab] logits offset from ``action_bias`` (a dict name -> offset, or one offset per action)."""
        if action_bias is None:
            return None
        if isinstance(action_bias, dict):
            unknown = sorted(set(action_bias) - set(ACTIONS))
            if unknown:
                raise ValueError(f"`action_bias` names unknown actions {unknown}; the actions are {ACTIONS}.")
            values = [float(action_bias.get(a, 0.0)) for a in ACTIONS]
        else:
            values = [float(x) for x in torch.as_tensor(action_bias, dtype=torch.float64).flatten()]
            if len(values) != len(ACTIONS):
                raise ValueError(f"`action_bias` must be a dict of action names or {len(ACTIONS)} offsets in the "
                                 f"order {ACTIONS}, got {len(values)} values.")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"`action_bias` must be finite, got {values}.")
        tok = self.plan_tokenizer
        table = torch.zeros(tok.length, tok.vocab_size)
        action_slots = [i for i, kind in enumerate(tok.slot_kinds()) if kind == "action"]
        table[action_slots, tok.action_offset : tok.action_offset + len(ACTIONS)] = torch.tensor(values)
        return table

    # ---- inputs ---------------------------------------------------------------------------------
    def check_inputs(self, observations, steps, threshold, on_error, callback, tensor_inputs) -> list[str]:
        if observations is None:
            raise DrivingInputError("give `observations`: one observation dict, a list of them, or DrivingInputs.")
        check_on_error(on_error)
        if steps is not None and (not isinstance(steps, int) or not 1 <= steps <= self.plan_tokenizer.length):
            raise ValueError(f"`steps` must be an int in [1, {self.plan_tokenizer.length}] (the plan length), got {steps!r}.")
        if threshold is not None and not 0 < threshold <= 1:
            raise ValueError(f"`threshold` must be in (0, 1], got {threshold}.")
        return callback_tensor_inputs(callback, tensor_inputs, self._callback_tensor_inputs, ["sequences"])

    def _row_errors(self, observations) -> tuple[list[str | None], int]:
        """Per-row error messages (None = fine) and the batch size."""
        if isinstance(observations, DrivingInputs):  # structural problems raise; bad values are per row
            return self.driving_adapter.row_errors(observations), observations.batch_size
        errors = self.driving_adapter.check_observations(observations)
        return errors, len(errors)

    # ---- call -----------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        observations: dict | list[dict] | DrivingInputs | None = None,
        *,
        steps: int | None = None,
        threshold: float | None = None,
        temperature: float | None = None,
        remasking: str | None = None,
        cache: str | None = None,
        action_bias: dict[str, float] | list[float] | None = None,
        on_error: str = "raise",
        generator: torch.Generator | None = None,
        callback_on_step_end: Callable[[Any, int, int, dict], Any] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        return_dict: bool = True,
        **sampler_kwargs,
    ) -> PlanningPipelineOutput | tuple:
        """Plan the next K decisions of every observation.

        Args:
            observations: one raw observation dict (see `modalities.driving`), a list of them, or a ready
                `DrivingInputs` batch (`driving_adapter.preprocess(...)` or `DrivingDataset.inputs(...)`).
            steps: forwards of the LLaDA schedule rule (3K = one token per forward, 1 = everything at once);
                giving it selects the schedule rule. threshold: Fast-dLLM threshold decoding (commit every
                token with confidence >= threshold, at least one per forward); default: the scheduler's rule.
            temperature: 0 = argmax; > 0 = Gumbel-max sampling (reproducible with `generator`).
            remasking: the confidence rule ("low_confidence", "margin", "neg_entropy", "random").
            cache: "auto" (exact prefix cache for the prefix layout), "none" or "prefix_exact".
            action_bias: logit offsets added to every action slot, as ``{action name: offset}`` or one offset
                per action of `ACTIONS`; `prior_correction(tau)` gives the label-prior correction. The
                diffusion decoder only.
            on_error: "raise" (a `DrivingInputError` naming the field) or "record" (the row gets the fallback
                plan and its reason in `errors`; see the module doc). A batch no row of which can be read
                (wrong feature counts, no rows) always raises.
            callback_on_step_end: `fn(pipe, step, block, callback_kwargs)` after every forward, or a diffusers
                `PipelineCallback`; a returned dict with "sequences" ([b, 3K], the plan canvas of the decoded
                rows) replaces the canvas (the diffusion decoder).
            sampler_kwargs: any other `latent.sampling.SamplerConfig` knob (confidence_dtype, factor...).

        Returns `PlanningPipelineOutput`, or its fields as a tuple with `return_dict=False`.
        """
        names = self.check_inputs(observations, steps, threshold, on_error, callback_on_step_end,
                                  callback_on_step_end_tensor_inputs)
        bias = self._bias_table(action_bias)
        if bias is not None and self.decoding == "autoregressive":
            raise ValueError("`action_bias` steers the diffusion decoder; this pipeline's model is causal.")
        errors, batch = self._row_errors(observations)
        bad = [i for i, e in enumerate(errors) if e is not None]
        if bad and on_error == "raise":
            raise DrivingInputError(errors[bad[0]])
        tok = self.plan_tokenizer
        length = tok.length
        tokens = torch.full((batch, length), tok.mask_token_id, dtype=torch.long)
        confidence = torch.zeros(batch, length)
        good = [i for i in range(batch) if errors[i] is None]
        nfe = 0
        row_steps = torch.zeros(batch, dtype=torch.long)
        if good:
            if isinstance(observations, DrivingInputs):
                inputs = observations if len(good) == batch else observations.select(good)
            else:
                obs = [observations] if isinstance(observations, dict) else list(observations)
                inputs = self.driving_adapter.preprocess([obs[i] for i in good])
            seq, conf, nfe, used = self._decode(inputs, steps, threshold, temperature, remasking, cache, bias,
                                                generator, callback_on_step_end, names, sampler_kwargs)
            rows = torch.as_tensor(good)
            tokens[rows], confidence[rows], row_steps[rows] = seq.cpu(), conf.cpu(), used.cpu()
        action_ids, waypoints = tok.decode(tokens)
        fallback = torch.tensor([e is not None for e in errors], dtype=torch.bool)
        if bad:
            action_ids[fallback] = ACTION_INDEX[FALLBACK_ACTION]
            waypoints[fallback] = float("nan")
        actions = [[ACTIONS[int(a)] for a in row] for row in action_ids]
        self.maybe_free_model_hooks()
        out = PlanningPipelineOutput(actions=actions, tokens=tokens, action_ids=action_ids, waypoints=waypoints,
                                     confidence=confidence, fallback=fallback, errors=errors, nfe=nfe,
                                     row_steps=row_steps, decoding=self.decoding)
        return out if return_dict else out.to_tuple()

    def plan_action(self, observation, **kwargs) -> int:
        """The first meta-action of one observation's plan, as the env's action index (closed-loop driving).
        Bad input gives FALLBACK_ACTION unless `on_error="raise"` is passed."""
        kwargs.setdefault("on_error", "record")
        return int(self(observation, **kwargs).action_ids[0, 0])

    # ---- decoding -------------------------------------------------------------------------------
    def _decode(self, inputs, steps, threshold, temperature, remasking, cache, bias, generator, callback, names,
                sampler_kwargs):
        p = next(self.driving_adapter.parameters())
        embeds, pmask = self.encode_prefix(self.driving_adapter, inputs.to(p.device, p.dtype))
        allowed = self.plan_tokenizer.allowed_tokens().to(embeds.device)
        if self.decoding == "autoregressive":
            if steps is not None or threshold is not None or remasking is not None:
                raise ValueError("steps / threshold / remasking are diffusion controls; this pipeline's model is causal "
                                 "(the autoregressive baseline decodes one token per forward).")
            return self._decode_autoregressive(embeds, pmask, allowed, temperature or 0.0, generator, callback)
        if cache not in (None, "auto", "none", "prefix_exact"):
            raise ValueError(f"`cache` must be 'auto', 'none' or 'prefix_exact' for plans, got {cache!r}.")
        tok = self.plan_tokenizer
        length = tok.length
        batch = embeds.shape[0]
        conf = torch.zeros(batch, length, device=embeds.device)
        used = torch.zeros(batch, dtype=torch.long, device=embeds.device)
        user_callback = self._step_callback(callback, names)

        def on_step(step, canvas, info):
            # Each token's confidence when it was committed, and the last step that committed in a row.
            rows, transfer = info["rows"], info["transfer"]
            conf[rows] = torch.where(transfer, info["confidence"].to(conf.dtype), conf[rows])
            used[rows[transfer.any(1)]] = step + 1
            return None if user_callback is None else user_callback(step, canvas, info)

        ids = torch.zeros(batch, 0, dtype=torch.long, device=embeds.device)
        # The plan is one block: every slot is decoded in parallel, and `steps` counts forwards for all of it.
        result = self._sample(
            ids, None, gen_length=length, block_length=length, model=_SlotConstrained(self.model, allowed, bias),
            prefix_embeds=embeds, prefix_mask=pmask, steps=steps, threshold=threshold, temperature=temperature,
            remasking=remasking, cache=cache, mask_token_id=tok.mask_token_id, generator=generator,
            step_callback=on_step, **sampler_kwargs,
        )
        return result.sequences, conf, result.nfe, used

    def _decode_autoregressive(self, embeds, pmask, allowed, temperature, generator, callback):
        from latent.sampling import autoregressive_generate  # noqa: PLC0415 - only the causal baseline needs it

        tok = self.plan_tokenizer
        batch, length = embeds.shape[0], tok.length
        on_step = None
        if callback is not None:

            def on_step(step, sequences, info):  # the plan so far, undecoded slots masked, as the diffusion path
                plan = torch.full((batch, length), tok.mask_token_id, dtype=torch.long, device=embeds.device)
                plan[:, : step + 1] = sequences[:, 1:]
                callback(self, step, 0, {"sequences": plan})

        bos = torch.full((batch, 1), tok.bos_token_id, dtype=torch.long, device=embeds.device)
        out = autoregressive_generate(
            self.model, bos, length, prefix_embeds=embeds, prefix_mask=None if bool(pmask.all()) else pmask,
            temperature=temperature, allowed_tokens=allowed, generator=generator, callback=on_step,
            progress_bar=lambda total: self.progress_bar(total=total),
        )
        return out.new_tokens, out.confidence, out.nfe, torch.full((batch,), length, dtype=torch.long)


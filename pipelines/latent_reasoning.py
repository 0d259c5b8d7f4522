"""Latent reasoning (LaDiR style): question -> thought blocks by latent diffusion -> answer by masked diffusion.

```python
from latent.data.arithmetic import encode_fixed
from pipelines.latent_reasoning import LatentReasoningPipeline

pipe = LatentReasoningPipeline.from_pretrained("runs/latent_reasoning/pipeline")   # configs/latent_reasoning.yaml
out = pipe("23+7*2-5", num_thought_blocks=3, num_inference_steps=10, generator=torch.Generator().manual_seed(0))
out.answers[0]        # "55"
out.thoughts[0]       # ["23+7=30", "30*2=60", "60-5=55"]: each block decoded by the thought VAE
out.thought_latents   # [B, K, k, C]

# thoughts of your own, encoded by the VAE: only the blocks after them are generated (all K: just the answer)
ids = encode_fixed(pipe.tokenizer, ["23+7=30"], pipe.thought_vae.config.max_length, pipe.tokenizer.pad_token_id, eos=True)
out = pipe("23+7*2-5", thought_latents=pipe.thought_vae.to_diffusion(ids)[None])
```

One backbone (``latent.DiffusionTransformer`` with ``latent_dim`` = the VAE's) sees the question
tokens, the answer canvas and the thought latents (``k`` latent slots per block, after the token slots as
the backbone contract requires) under a 4D attention mask built here:

============  =========================================================================
slot          may attend
============  =========================================================================
question      question
thought b     question, finished thought blocks < b, its own block (bidirectional within)
answer        question, all thought blocks, answer
============  =========================================================================

Rotary positions follow the reading order question, thoughts, answer. Thought blocks are generated one
at a time by Gaussian diffusion with any diffusers scheduler (finished blocks enter as clean latents at
noise level 0, which is exactly what :func:`latent_reasoning_loss` trains with: a clean copy of every
block beside its noisy copy, BD3-LM style); then the answer tokens are unmasked by masked diffusion.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline

from latent.continuous import GaussianDiffusion, check_finite, check_scheduler, sample_latents
from latent.joint import JointLossOutput, joint_loss, joint_sample, pure_noise_timestep

from .base import LocalPipelineMixin, PipelineOutput, callback_tensor_inputs, decode_texts

__all__ = ["LatentReasoningPipeline", "LatentReasoningOutput", "reasoning_layout", "latent_reasoning_loss",
           "LatentReasoningLossOutput"]


def reasoning_layout(
    batch: int,
    question_length: int,
    answer_length: int,
    block_size: int,
    total_blocks: int,
    clean_blocks: int,
    noisy_blocks: list[int] | range,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """4D boolean mask ``[B, 1, S, S]`` and positions ``[B, S]`` for slots
    ``[question | answer (if answer_length) | clean blocks 0..clean_blocks-1 | noisy blocks]``.

    Rules: the question sees itself; a clean block b sees the question and clean blocks <= b; a noisy
    block b sees the question, clean blocks < b and itself; the answer sees the question, every clean
    block and itself. Positions: question ``0..Q-1``, block b ``Q + b k ..``, answer after all
    ``total_blocks`` blocks.
    """
    Q, A, k = question_length, answer_length, block_size
    kinds, blocks, pos = [], [], []
    kinds += [0] * Q
    blocks += [-1] * Q
    pos += list(range(Q))
    kinds += [1] * A
    blocks += [-1] * A
    pos += [Q + total_blocks * k + j for j in range(A)]
    for b in range(clean_blocks):
        kinds += [2] * k
        blocks += [b] * k
        pos += [Q + b * k + j for j in range(k)]
    for b in noisy_blocks:
        kinds += [3] * k
        blocks += [b] * k
        pos += [Q + b * k + j for j in range(k)]
    kind = torch.tensor(kinds, device=device)
    blk = torch.tensor(blocks, device=device)
    qk, kk = kind[:, None], kind[None, :]
    qb, kb = blk[:, None], blk[None, :]
    see_question = kk == 0
    allowed = (
        ((qk == 0) & see_question)
        | ((qk == 1) & (see_question | (kk == 2) | (kk == 1)))
        | ((qk == 2) & (see_question | ((kk == 2) & (kb <= qb))))
        | ((qk == 3) & (see_question | ((kk == 2) & (kb < qb)) | ((kk == 3) & (kb == qb))))
    )
    S = len(kinds)
    mask = allowed[None, None].expand(batch, 1, S, S)
    positions = torch.tensor(pos, device=device)[None].expand(batch, S)
    return mask, positions


def latent_reasoning_loss(
    model,
    question_ids: torch.Tensor,
    answer_ids: torch.Tensor,
    thought_latents: torch.Tensor,
    mask_token_id: int,
    diffusion: GaussianDiffusion,
    lam: float = 1.0,
    p_uncond: float = 0.0,
    generator: torch.Generator | None = None,
    uncond_noise: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    latent_noise: torch.Tensor | None = None,
    thought_decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    thought_ids: torch.Tensor | None = None,
    thought_ce: float = 0.0,
    self_thought_rows: torch.Tensor | None = None,
) -> LatentReasoningLossOutput:
    """Training loss of the pipeline: masked-diffusion CE on the answer + ``lam`` * MSE on noisy thoughts
    (+ ``thought_ce`` * the decoder-aware term below).

    ``thought_latents``: ``[B, K, k, C]`` clean (scaled) VAE latents. Each block gets its own noise level;
    the model sees a clean copy of every block beside the noisy one (:func:`reasoning_layout`), so block b
    is denoised from the clean blocks before it, as at sampling time. With ``p_uncond`` the question of a
    row is replaced by mask tokens (for classifier-free guidance of the thoughts).

    Random draws made by the caller instead of ``generator``: ``uncond_noise`` ``[B]`` (uniform; a row is
    unconditional where it is below ``p_uncond``), ``timesteps`` ``[B, K]`` (one per block), and ``t``,
    ``noise``, ``latent_noise`` as :func:`latent.joint.joint_loss` takes them.

    Decoder-aware term (``thought_ce > 0``): the clean latents the model implies for each noisy block are
    decoded by ``thought_decoder`` (diffusion-scale latents ``[n, k, C]`` -> logits ``[n, L, V]``, the frozen
    VAE decoder) and scored by cross-entropy against ``thought_ids`` ``[B, K, L]``, the steps' tokens. The
    MSE weighs every latent direction alike; this term weighs them by what the decoded step needs, so a
    latent that decodes to the wrong digit costs more than one that is off in a direction the decoder
    ignores. (On the arithmetic task it bought nothing: experiments/results/latent_reasoning_diagnosis.md.)

    ``self_thought_rows`` ``[B]`` (bool): in these rows the thoughts that the answer and the later blocks
    read are the model's own, not the data's: each block's clean-latent estimate from pure noise (one
    extra forward without gradient, every block beside the data's earlier blocks). Trained on clean data
    thoughts only, the answer learns to copy the last thought and trusts a wrong sampled one; these rows
    show it, and each block, the model's own thoughts. Targets stay the data's. (On the arithmetic task,
    at 1200 steps, they made the thoughts worse; guidance at sampling is what helped.)
    """
    B, K, k, C = thought_latents.shape
    if thought_ce < 0:
        raise ValueError(f"thought_ce (the decoded-thought CE weight) must be >= 0, got {thought_ce}")
    if thought_ce > 0 and (thought_decoder is None or thought_ids is None):
        raise ValueError("thought_ce > 0 needs thought_decoder (latents -> logits) and thought_ids [B, K, L]")
    if thought_ids is not None and tuple(thought_ids.shape[:2]) != (B, K):
        raise ValueError(f"thought_ids must be [B, K, L] with B={B}, K={K}; got {tuple(thought_ids.shape)}")
    Q, A = question_ids.shape[1], answer_ids.shape[1]
    if p_uncond > 0:
        u = uncond_noise if uncond_noise is not None else torch.rand(B, generator=generator)
        drop = u.to(question_ids.device) < p_uncond
        question_ids = torch.where(drop[:, None], torch.full_like(question_ids, mask_token_id), question_ids)
    ids = torch.cat([question_ids, answer_ids], 1)
    prompt = torch.zeros_like(ids, dtype=torch.bool)
    prompt[:, :Q] = True
    clean = thought_latents.reshape(B, K * k, C)
    mask, pos = reasoning_layout(B, Q, A, k, K, K, range(K), device=ids.device)
    if timesteps is None:
        timesteps = diffusion.sample_timesteps((B, K), generator, ids.device)
    timesteps = timesteps.to(ids.device).repeat_interleave(k, dim=1)
    implied_x0 = []
    read = clean  # the thoughts that the answer and the later blocks see
    if self_thought_rows is not None and bool(self_thought_rows.any()):
        rows = self_thought_rows.to(ids.device).bool()
        with torch.no_grad():
            k_max = torch.full_like(timesteps, pure_noise_timestep(diffusion))
            eps = latent_noise if latent_noise is not None else torch.randn(clean.shape, generator=generator)
            x_max = diffusion.add_noise(clean, eps.reshape(B, K * k, C).to(clean.device), k_max)
            guess = model(torch.cat([question_ids, torch.full_like(answer_ids, mask_token_id)], 1),
                          latents=torch.cat([clean, x_max], 1),
                          timestep=torch.cat([torch.zeros_like(k_max), diffusion.model_time(k_max)], 1).float(),
                          attention_mask=mask, position_ids=pos).latent_pred[:, K * k :]
            own = diffusion.predict_x0(guess.to(clean.dtype), x_max, k_max)
        read = torch.where(rows[:, None, None], own, clean)

    def forward(noisy_ids, latents, timestep, attention_mask=None, **kw):
        out = model(noisy_ids, latents=torch.cat([read, latents], 1),
                    timestep=torch.cat([torch.zeros_like(timestep), timestep], 1),
                    attention_mask=mask, position_ids=pos)
        out.latent_pred = out.latent_pred[:, K * k :]
        if thought_ce > 0:
            implied_x0.append(diffusion.predict_x0(out.latent_pred, latents, timesteps))
        return out

    if latent_noise is not None:
        latent_noise = latent_noise.reshape(B, K * k, C)
    out = joint_loss(forward, ids, clean, mask_token_id, diffusion, lam=lam, prompt_mask=prompt,
                     timesteps=timesteps, t=t, noise=noise, latent_noise=latent_noise, generator=generator)
    tce = torch.zeros((), device=ids.device)
    if thought_ce > 0:
        logits = thought_decoder(implied_x0[-1].reshape(B * K, k, C))
        tce = F.cross_entropy(logits.transpose(1, 2), thought_ids.reshape(B * K, -1).to(logits.device))
    return LatentReasoningLossOutput(out.loss + thought_ce * tce, out.ce, out.mse, out.num_masked, tce)


@dataclass
class LatentReasoningLossOutput(JointLossOutput):
    """:class:`latent.joint.JointLossOutput` plus ``thought_ce``: the decoded-thought cross-entropy (0 when
    its weight is 0)."""

    thought_ce: torch.Tensor | None = None


@dataclass
class LatentReasoningOutput(PipelineOutput):
    """
    answers: decoded answers (``output_type="text"``) or None.
    answer_ids: ``[B, answer_length]``.
    thoughts: per row, the text each thought block decodes to through the VAE (readable reasoning); None
        with ``decode_thoughts=False``.
    thought_latents: ``[B, K, k, C]`` the generated thoughts (diffusion scale).
    nfe: backbone forwards (with guidance a forward holds both the conditional and unconditional rows).

    ``return_dict=False`` returns these fields in this order: (answers, answer_ids, thoughts, thought_latents, nfe).
    """

    answers: list[str] | None
    answer_ids: torch.Tensor
    thoughts: list[list[str]] | None
    thought_latents: torch.Tensor
    nfe: int = 0


class LatentReasoningPipeline(LocalPipelineMixin, DiffusionPipeline):
    """Question -> latent thought blocks (Gaussian diffusion, block by block) -> answer (masked diffusion).

    Modules: ``model`` (``DiffusionTransformer`` with ``latent_dim`` = ``thought_vae.config.latent_dim``),
    ``thought_vae`` (:class:`autoencoders.thought_vae.ThoughtVAE`), ``tokenizer`` (with mask and EOS
    tokens), ``scheduler`` (a diffusers scheduler for the thoughts). Config (saved in model_index.json):
    ``question_length``, ``answer_length``, ``num_thought_blocks`` (default K), ``prediction_type``
    (what the model was trained to predict for the latents) and ``guidance_scale`` (the default of calls;
    a model trained with question dropout usually thinks better guided, e.g. 2).
    """

    model_cpu_offload_seq = "model->thought_vae"
    # The callback runs after every thought step: the current block's latents [B, k, C] and the finished
    # blocks [B, b*k, C] (the answer is decoded after the last thought step, so it has no callback).
    _callback_tensor_inputs = ["latents", "thought_latents"]

    def __init__(self, model, thought_vae, tokenizer, scheduler, question_length: int = 16, answer_length: int = 4,
                 num_thought_blocks: int = 3, prediction_type: str = "v_prediction", guidance_scale: float = 1.0):
        super().__init__()
        self._check_modules(model, thought_vae, tokenizer)
        self.register_modules(model=model, thought_vae=thought_vae, tokenizer=tokenizer, scheduler=scheduler)
        self.register_to_config(question_length=question_length, answer_length=answer_length,
                                num_thought_blocks=num_thought_blocks, prediction_type=prediction_type,
                                guidance_scale=guidance_scale)

    @staticmethod
    def _check_modules(model, thought_vae, tokenizer):
        if model is None or thought_vae is None:
            return
        m_dim = getattr(model.config, "latent_dim", 0)
        v_dim = thought_vae.config.latent_dim
        if m_dim != v_dim:
            raise ValueError(
                f"latent dimension mismatch: model.config.latent_dim={m_dim} but "
                f"thought_vae.config.latent_dim={v_dim}; build the backbone with latent_dim={v_dim}."
            )
        if tokenizer is not None and (tokenizer.mask_token_id is None or tokenizer.eos_token_id is None):
            raise ValueError("the tokenizer needs a mask token (masked diffusion) and an EOS token (answer end).")

    def _cfg(self, name, default):
        return self.config.get(name, default)

    # ---- inputs --------------------------------------------------------------------------------------
    def encode_question(self, question: str | list[str]) -> torch.Tensor:
        qs = [question] if isinstance(question, str) else list(question)
        Q = self._cfg("question_length", 16)
        rows = []
        for q in qs:
            ids = self.tokenizer(q, add_special_tokens=False)["input_ids"]
            if len(ids) > Q:
                raise ValueError(f"question {q!r} has {len(ids)} tokens; the pipeline's question_length is {Q}.")
            rows.append([self.tokenizer.pad_token_id] * (Q - len(ids)) + ids)
        return torch.tensor(rows, dtype=torch.long, device=self.model.device)

    def check_inputs(self, num_thought_blocks, num_inference_steps, guidance_scale, scheduler, latents, batch,
                     callback_on_step_end, callback_on_step_end_tensor_inputs, thought_latents=None) -> list[str]:
        if not isinstance(num_thought_blocks, int) or num_thought_blocks < 1:
            raise ValueError(
                f"num_thought_blocks must be an int >= 1 (the answer is conditioned on the thoughts), got "
                f"{num_thought_blocks!r}; for answer-only generation use a masked-diffusion text pipeline."
            )
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        check_scheduler(scheduler, self._cfg("prediction_type", "v_prediction"))
        k, C = self.thought_vae.config.num_latents, self.thought_vae.config.latent_dim
        if latents is not None:
            want = (batch, num_thought_blocks, k, C)
            if tuple(latents.shape) != want:
                raise ValueError(f"latents (initial noise) must be [B, K, k, latent_dim]={want}, got {tuple(latents.shape)}.")
            check_finite(latents, "latents")
        if thought_latents is not None:
            t = tuple(thought_latents.shape)
            if len(t) != 4 or t[0] != batch or t[2:] != (k, C) or not 1 <= t[1] <= num_thought_blocks:
                raise ValueError(f"thought_latents (the given first blocks) must be [B, K', k, latent_dim] with B={batch}, "
                                 f"1 <= K' <= num_thought_blocks={num_thought_blocks}, k={k}, latent_dim={C}; "
                                 f"got {t}.")
            check_finite(thought_latents, "thought_latents")
        self._check_modules(self.model, self.thought_vae, self.tokenizer)
        return callback_tensor_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs,
                                      self._callback_tensor_inputs, ["latents"])

    # ---- generation ----------------------------------------------------------------------------------
    def _denoise_fn(self, q_ids, done, block, K, guidance_scale):
        """Model output for the noisy block `block` given the finished blocks `done` [B, block*k, C]."""
        B, Q = q_ids.shape
        k = self.thought_vae.config.num_latents
        mask_id = self.tokenizer.mask_token_id
        use_cfg = guidance_scale != 1.0
        q_in = torch.cat([q_ids, torch.full_like(q_ids, mask_id)]) if use_cfg else q_ids
        rows = q_in.shape[0]
        attn, pos = reasoning_layout(rows, Q, 0, k, K, block, [block], device=q_ids.device)
        done_in = torch.cat([done, done]) if use_cfg else done

        def fn(x, t):
            x_in = torch.cat([x, x]) if use_cfg else x
            lat = torch.cat([done_in, x_in], 1)
            ts = torch.cat([torch.zeros(rows, done.shape[1], device=x.device),
                            t.float().to(x.device).expand(rows, k)], 1)
            pred = self.model(q_in, latents=lat, timestep=ts, attention_mask=attn, position_ids=pos).latent_pred
            pred = pred[:, -k:]
            if use_cfg:
                cond, unc = pred.chunk(2)
                pred = unc + guidance_scale * (cond - unc)
            return pred

        return fn

    @torch.no_grad()
    def __call__(
        self,
        question: str | list[str] | None = None,
        question_ids: torch.Tensor | None = None,
        num_thought_blocks: int | None = None,
        num_inference_steps: int = 10,
        answer_steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler=None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        thought_latents: torch.Tensor | None = None,
        decode_thoughts: bool = True,
        output_type: str = "text",
        callback_on_step_end: Callable[[Any, int, Any, dict], dict | None] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        return_dict: bool = True,
    ):
        """
        Args:
            question / question_ids: text(s), or left-padded ids ``[B, question_length]``.
            num_thought_blocks: K thought blocks (>= 1; default: the config's).
            num_inference_steps: scheduler steps per thought block.
            answer_steps: masked-diffusion steps for the answer (default: answer_length, one token a step).
            guidance_scale: classifier-free guidance of the thoughts (unconditional = question masked);
                1.0 switches it off (one forward per step instead of a doubled batch); default: the config's.
            scheduler: any diffusers scheduler whose prediction type is the model's (default: the pipeline's).
            generator: seeds the initial noise (and stochastic schedulers).
            latents: initial noise ``[B, K, k, C]`` instead of drawing it.
            thought_latents: the first ``K'`` thought blocks given ``[B, K', k, C]`` (diffusion scale, e.g.
                ``thought_vae.to_diffusion`` of chosen steps); only blocks ``K'..K-1`` are generated, so
                ``K' = K`` answers from the given thoughts alone.
            callback_on_step_end: ``fn(pipe, step, timestep, callback_kwargs) -> dict | None`` after every
                thought step (``step`` counts over all blocks; ``callback_kwargs["block"]`` says which), or a
                diffusers ``PipelineCallback``; a returned ``"latents"`` replaces the current block's latents.
            callback_on_step_end_tensor_inputs: any of "latents" (default) and "thought_latents".

        Returns ``LatentReasoningOutput``, or its fields as a tuple with ``return_dict=False``.
        """
        K = self._cfg("num_thought_blocks", 3) if num_thought_blocks is None else num_thought_blocks
        scheduler = scheduler or self.scheduler
        if (question is None) == (question_ids is None):
            raise ValueError("pass exactly one of question and question_ids")
        q_ids = self.encode_question(question) if question_ids is None else question_ids.to(self.model.device)
        B = q_ids.shape[0]
        guidance_scale = self._cfg("guidance_scale", 1.0) if guidance_scale is None else guidance_scale
        names = self.check_inputs(K, num_inference_steps, guidance_scale, scheduler, latents, B,
                                  callback_on_step_end, callback_on_step_end_tensor_inputs, thought_latents)
        vae = self.thought_vae
        k, C = vae.config.num_latents, vae.config.latent_dim
        device = self.model.device
        if latents is None:
            latents = torch.randn((B, K, k, C), generator=generator).to(device)
        latents = latents.to(device)
        given = 0 if thought_latents is None else thought_latents.shape[1]
        done = torch.zeros(B, 0, C, device=device) if not given else thought_latents.to(device).reshape(B, given * k, C)
        step_count = [0]
        nfe = 0
        with self.progress_bar(total=(K - given) * num_inference_steps) as bar:
            for b in range(given, K):
                def on_step(i, t, lat, b=b, finished=done):
                    bar.update()
                    step_count[0] += 1
                    if callback_on_step_end is None:
                        return None
                    kw = {"latents": lat, "thought_latents": finished, "block": b}
                    out = callback_on_step_end(self, step_count[0] - 1, t, {n: kw[n] for n in names} | {"block": b})
                    return None if not out else out.get("latents")

                x = sample_latents(
                    self._denoise_fn(q_ids, done, b, K, guidance_scale), scheduler,
                    latents=latents[:, b] * getattr(scheduler, "init_noise_sigma", 1.0),
                    num_inference_steps=num_inference_steps, prediction_type=self._cfg("prediction_type", "v_prediction"),
                    generator=generator, callback_on_step_end=on_step,
                )
                nfe += num_inference_steps
                done = torch.cat([done, check_finite(x, f"thought block {b} latents")], 1)

        # answer: masked diffusion given the question and every thought block (clean, noise level 0)
        A = self._cfg("answer_length", 4)
        attn, pos = reasoning_layout(B, q_ids.shape[1], A, k, K, K, [], device=device)
        zeros = torch.zeros(B, K * k, device=device)

        def answer_model(ids, **kw):
            return self.model(ids, latents=done, timestep=zeros, attention_mask=attn, position_ids=pos)

        steps = answer_steps or A
        seq = joint_sample(answer_model, q_ids, A, self.tokenizer.mask_token_id, steps, generator=generator).sequences
        answer_ids = seq[:, q_ids.shape[1]:]
        nfe += steps
        thought_latents = done.view(B, K, k, C)

        answers = thoughts = None
        if output_type == "text":
            answers = decode_texts(self.tokenizer, answer_ids)
        if decode_thoughts:
            ids = vae.from_diffusion(done.reshape(B * K, k, C)).view(B, K, -1)
            texts = decode_texts(self.tokenizer, ids.reshape(B * K, -1))
            thoughts = [texts[b * K : (b + 1) * K] for b in range(B)]
        self.maybe_free_model_hooks()
        out = LatentReasoningOutput(answers=answers, answer_ids=answer_ids, thoughts=thoughts,
                                    thought_latents=thought_latents, nfe=nfe)
        return out if return_dict else out.to_tuple()

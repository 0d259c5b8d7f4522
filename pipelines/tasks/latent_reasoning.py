"""Latent reasoning (LaDiR style) on the arithmetic task, and its two baselines at matched compute.

    python train.py configs/latent_reasoning.yaml                         # method latent (trains the VAE first)
    python train.py configs/latent_reasoning.yaml objective.method=answer run.name=latent_reasoning_answer
    python train.py configs/latent_reasoning.yaml objective.method=cot run.name=latent_reasoning_cot

Methods (``objective.method``), all with the same backbone config and problems:

- ``latent``: each reasoning step is encoded by a trained ThoughtVAE (the ``thought_vae`` section names its
  run; its recipe trains it there on first use) into k thought latents; ``K = data.thought_blocks`` blocks per
  problem (shorter chains repeat their last step), trained with
  :func:`pipelines.latent_reasoning.latent_reasoning_loss` (CE on the answer + lam * MSE on noisy thought
  blocks, the question masked with probability ``p_uncond`` for guidance). Export: a
  :class:`pipelines.latent_reasoning.LatentReasoningPipeline` folder; every thought decodes back to text.
- ``answer``: ``[question | answer]`` with the masked-diffusion SFT loss on the answer;
- ``cot``: ``[question | step;step;...>answer]``, the same loss on chain + answer, sampled one token a step.
  Both baselines are the joint task's discrete mode (:mod:`pipelines.tasks.joint`) and export its
  :class:`~pipelines.tasks.joint.JointGenerator` folder.

Evaluation: exact-match accuracy on held-out problems (overall and per difficulty); for ``latent`` also how
often a decoded thought equals the true step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from latent.data.arithmetic import accuracy_by_difficulty, encode_fixed
from latent.schedules import sample_times
from latent.training.config import ConfigError
from latent.training.task import StepLoss, register_task
from pipelines.tasks.autoencoders import (
    ArithmeticData,
    PretrainedRef,
    check_data,
    pretrained_folder,
    write_training,
)
from pipelines.tasks.joint import JointTask, Layout, SamplingEval, check_sampling_eval, choose

__all__ = ["LatentReasoningTask", "reasoning_scores"]

METHODS = ("latent", "answer", "cot")


@dataclass
class ReasoningData(ArithmeticData):
    n_train: int = 8000
    n_test: int = 400
    question_length: int = 10  # left-padded question tokens
    answer_length: int = 3  # answer tokens, EOS included
    cot_length: int = 35  # cot: four steps of <= 7 characters, ";" between, ">", the answer, EOS
    thought_blocks: int = 4  # latent: K thought blocks per problem


@dataclass
class ReasoningObjective:
    method: str = "latent"  # latent | answer | cot
    lam: float = 1.0  # latent: loss = CE(answer) + lam * MSE(noisy thought blocks)
    p_uncond: float = 0.1  # latent: rows whose question is masked (classifier-free guidance)
    prediction_type: str = "v_prediction"
    thought_ce: float = 0.0  # latent: weight of the CE of the decoded implied clean thoughts (0 = off)
    p_self: float = 0.0  # latent: rows whose answer and later blocks read the model's own thoughts


@dataclass
class ReasoningEval(SamplingEval):
    batch_size: int = 100
    block_steps: int = 5  # latent: diffusion steps per thought block
    guidance_scale: float = 1.0  # latent: of the thoughts, 1 switches it off; saved as the pipeline's default


@torch.no_grad()
def reasoning_scores(pipe, problems, block_steps: int, batch_size: int = 100, guidance_scale: float | None = None):
    """Accuracy per difficulty of a LatentReasoningPipeline on problems, the fraction of decoded thoughts
    equal to the true step, and the outputs ``(answers, thoughts)``; batches are seeded by their first row.
    ``guidance_scale`` None: the pipeline's default."""
    Q = pipe.config.question_length
    tq = encode_fixed(pipe.tokenizer, [p.question for p in problems], Q, pipe.tokenizer.pad_token_id, left=True)
    answers, thoughts = [], []
    for i in range(0, len(problems), batch_size):
        out = pipe(question_ids=tq[i : i + batch_size], num_inference_steps=block_steps,
                   guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(i))
        answers += out.answers
        thoughts += out.thoughts
    hits = [sum(t == s for t, s in zip(th, p.steps, strict=False)) / len(p.steps)
            for th, p in zip(thoughts, problems, strict=False)]
    return accuracy_by_difficulty(problems, answers), sum(hits) / max(1, len(hits)), (answers, thoughts)


@register_task("latent_reasoning")
class LatentReasoningTask(JointTask):
    sections = {"data": ReasoningData, "objective": ReasoningObjective,
                "thought_vae": PretrainedRef, "eval": ReasoningEval}
    metric_fields = ("ce", "mse", "thought_ce")
    eval_fields = ("acc", "acc_d1", "acc_d2", "acc_d3", "acc_d4", "thought_step_acc")
    defaults = {"trainer": {"batch_size": 64},
                "thought_vae": {"path": "runs/latent_thought_vae", "recipe": "configs/latent_thought_vae.yaml"}}

    @classmethod
    def check_config(cls, cfg):
        check_data(cfg)
        check_sampling_eval(cfg)
        choose(cfg, "objective.method", METHODS)
        o = cfg.objective
        if o.lam < 0:
            raise ConfigError(f"objective.lam must be >= 0, got {o.lam}")
        if not 0 <= o.p_self <= 1:
            raise ConfigError(f"objective.p_self must be in [0, 1], got {o.p_self}")
        if o.thought_ce < 0:
            raise ConfigError(f"objective.thought_ce must be >= 0, got {o.thought_ce}")
        if not 0 <= o.p_uncond < 1:
            raise ConfigError(f"objective.p_uncond must be in [0, 1), got {o.p_uncond}")
        for key in ("data.thought_blocks", "eval.block_steps"):
            if OmegaConf.select(cfg, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {OmegaConf.select(cfg, key)}")
        if o.method == "latent" and not cfg.thought_vae.path:
            raise ConfigError("objective.method=latent needs thought_vae.path (the run folder of a thought VAE)")

    @property
    def mode(self) -> str:
        return "latent" if self.cfg.objective.method == "latent" else "discrete"

    def layout(self) -> Layout:
        d, method = self.cfg.data, self.cfg.objective.method
        cot = method == "cot"
        return Layout("cot" if cot else "answer", d.question_length, d.cot_length if cot else d.answer_length,
                      keys=("data.question_length", "data.cot_length" if cot else "data.answer_length"))

    # ---- the latent method ------------------------------------------------------------------------
    def build_latents(self, model) -> torch.Tensor:
        """Clean thought latents ``[n, K, k, C]`` of the training problems' steps (the VAE is frozen)."""
        from autoencoders.thought_vae import ThoughtVAE

        folder = pretrained_folder(self.cfg.thought_vae, "thought_vae", "ThoughtVAE", self.ctx.is_main)
        self.vae = vae = ThoughtVAE.from_pretrained(folder).eval().requires_grad_(False)
        vc, C, K = vae.config, model.config.latent_dim, self.cfg.data.thought_blocks
        if vc.latent_dim != C:
            raise ConfigError(f"model.latent_dim={C} but the thought VAE in {str(folder)!r} has latent_dim="
                              f"{vc.latent_dim}; the backbone's latent stream holds its thoughts")
        if vc.vocab_size != len(self.tokenizer):
            raise ConfigError(f"thought_vae.path={str(folder)!r} was trained on another tokenizer "
                              f"({vc.vocab_size} ids, the arithmetic tokenizer has {len(self.tokenizer)})")
        steps = [s for p in self.train_set for s in (p.steps + [p.steps[-1]] * K)[:K]]
        ids = encode_fixed(self.tokenizer, steps, vc.max_length, self.tokenizer.pad_token_id, eos=True)
        z = torch.cat([vae.to_diffusion(ids[i : i + 1024]) for i in range(0, len(ids), 1024)])
        self.thought_ids = ids.view(len(self.train_set), K, vc.max_length)
        vae.to(self.ctx.device)
        return z.view(len(self.train_set), K, vc.num_latents, C)

    def draw(self, g, idx):
        if self.mode != "latent":
            return super().draw(g, idx)
        B, N = len(idx), self.ids.shape[1]
        z = self.latents[idx]
        return {"ids": self.ids[idx], "latents": z, "thought_ids": self.thought_ids[idx],
                "uncond_noise": torch.rand(B, generator=g),
                "timesteps": self.diffusion.sample_timesteps((B, z.shape[1]), g), "t": sample_times(B, g),
                "noise": torch.rand(B, N, generator=g), "latent_noise": torch.randn(z.shape, generator=g),
                "self_noise": torch.rand(B, generator=g)}  # last: the draws before it are as without it

    def loss(self, modules, batch, stage):
        if self.mode != "latent":
            return super().loss(modules, batch, stage)
        from pipelines.latent_reasoning import latent_reasoning_loss

        b = {k: v.to(self.ctx.device) for k, v in batch.items()}
        Q, o = self.lay.question_length, self.cfg.objective
        out = latent_reasoning_loss(modules.model, b["ids"][:, :Q], b["ids"][:, Q:], b["latents"],
                                    self.tokenizer.mask_token_id, self.diffusion, lam=o.lam, p_uncond=o.p_uncond,
                                    uncond_noise=b["uncond_noise"], timesteps=b["timesteps"], t=b["t"],
                                    noise=b["noise"], latent_noise=b["latent_noise"], thought_ce=o.thought_ce,
                                    thought_decoder=self.decode_thoughts, thought_ids=b["thought_ids"],
                                    self_thought_rows=b["self_noise"] < o.p_self)
        return StepLoss(out.loss, {"ce": out.ce.item(), "mse": out.mse.item(), "thought_ce": out.thought_ce.item()})

    def decode_thoughts(self, latents: torch.Tensor) -> torch.Tensor:
        """Logits of the steps that diffusion-scale thought latents decode to (the frozen VAE decoder)."""
        return self.vae.decode(latents / self.vae.config.scaling_factor)

    def pipeline(self, modules):
        """The LatentReasoningPipeline over the live backbone and the frozen thought VAE."""
        from pipelines.latent_reasoning import LatentReasoningPipeline

        d = self.cfg.data
        pipe = LatentReasoningPipeline(modules.model, self.vae, self.tokenizer,
                                       self.diffusion.make_scheduler(self.cfg.eval.scheduler),
                                       question_length=d.question_length, answer_length=d.answer_length,
                                       num_thought_blocks=d.thought_blocks,
                                       prediction_type=self.cfg.objective.prediction_type,
                                       guidance_scale=self.cfg.eval.guidance_scale)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def evaluate(self, modules, step):
        if self.mode != "latent":
            return super().evaluate(modules, step)
        ec = self.cfg.eval
        acc, thought_acc, _ = reasoning_scores(self.pipeline(modules), self.eval_set, ec.block_steps, ec.batch_size,
                                               ec.guidance_scale)
        return {"acc": acc["all"], **{f"acc_d{d}": v for d, v in acc.items() if d != "all"},
                "thought_step_acc": thought_acc}

    def export(self, modules, folder, stage):
        if self.mode != "latent":
            return super().export(modules, folder, stage)
        self.pipeline(modules).save_pretrained(str(folder))
        write_training(folder, self.registered_name, self.cfg)

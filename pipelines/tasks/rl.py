"""Reinforcement learning with verifiable rewards for a masked-diffusion policy (diffu-GRPO / GDPO / TraceRL).

    python train.py configs/rl_arithmetic.yaml model.init_from=runs/rl_sft_arithmetic/pipeline

The policy starts from a trained pipeline (``model.init_from``: a joint / latent-reasoning "answer" export,
or any folder holding a DiffusionTransformer and its tokenizer); the reference is a frozen copy of it. Each
generation step samples ``batch_size / rollout.group_size`` prompts (arithmetic problems, or countdown with
``data.problems: countdown``), ``group_size`` completions per prompt through the project's sampler
(:func:`latent.sampling.generate`, temperature > 0, seeded by the step), scores them
(:mod:`pipelines.tasks.rewards`) and normalises the rewards within each group. The loss is the PPO clipped
surrogate on sequence log-likelihoods plus ``beta`` times the k3 KL to the reference
(:func:`latent.rl.clipped_policy_loss`), the likelihood being (``objective.likelihood``):

- ``elbo``: the Monte-Carlo ELBO over the completion tokens, with coupled (complementary) mask draws that
  the policy, the old policy and the reference share (:func:`latent.rl.elbo_logprob`);
- ``trajectory``: the log-probability of the decoding path the sampler took, ``objective.trajectory_steps``
  of its steps scored per completion (:func:`latent.rl.trajectory_logprob`); tokens are scored under the
  model's distribution at temperature 1, the one rollouts at ``rollout.temperature: 1`` sample from (the
  choice of which positions commit, made by the confidence rule, is not scored).

With ``objective.inner_steps`` = mu > 1 one generation serves mu optimizer steps: its completions, rewards,
draws and the old policy's log-likelihoods are kept (in the task state, so a resume in the middle is exact);
with mu = 1 the old policy is the policy itself, detached (the ratio is 1 in value, not in gradient).
Evaluation: greedy exact-match accuracy on held-out problems. Export: a
:class:`pipelines.tasks.joint.JointGenerator` folder, like the SFT policy's.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from latent.data.arithmetic import Problem, encode_fixed, split
from latent.data.countdown import countdown_dataset
from latent.rl import (
    choose_steps,
    clipped_policy_loss,
    draw_elbo_masks,
    elbo_logprob,
    group_advantages,
    trajectory_logprob,
)
from latent.training.config import ConfigError
from latent.training.task import StepLoss, Task, register_task, step_generator
from pipelines.tasks.autoencoders import check_data, write_training
from pipelines.tasks.joint import JointGenerator, choose, spread
from pipelines.tasks.rewards import CORRECTNESS, score_completions

__all__ = ["RLTask"]

PROBLEMS = ("arithmetic", "countdown")


@dataclass
class RLData:
    problems: str = "arithmetic"  # arithmetic | countdown
    n_train: int = 8000
    n_test: int = 200  # held-out problems (chains of 2+ operations never seen in training)
    difficulties: list[int] = field(default_factory=lambda: [1, 2])
    seed: int = 0
    # the layout the policy was trained with; null: from its joint.json
    question_length: int | None = None
    question_suffix: str | None = None
    answer_length: int | None = None


@dataclass
class RLRollout:
    group_size: int = 8  # G completions per prompt
    temperature: float = 1.0
    steps: int | None = None  # sampler forwards; null: answer_length (one token a step)
    block_length: int | None = None  # null: answer_length
    confidence: str = "low_confidence"


@dataclass
class RLObjective:
    likelihood: str = "elbo"  # elbo | trajectory
    advantage: str = "grpo"  # grpo: (r - mean) / (std + eps) | drgrpo: r - mean
    advantage_eps: float = 1.0e-4
    clip_eps: float = 0.2
    beta: float = 0.04  # KL(policy || reference) coefficient (k3 estimator)
    inner_steps: int = 1  # mu: optimizer steps per generation
    length_normalize: bool = True  # log-likelihoods per completion token in the ratio and the KL
    elbo_samples: int = 2  # elbo: mask draws per completion (each with its complement when coupled)
    coupled: bool = True
    mask_eps: float = 1.0e-3
    trajectory_steps: int = 4  # trajectory: decoding steps scored per completion


@dataclass
class RLReward:
    correct: str = "auto"  # exact_match | countdown | contains | auto (by data.problems)
    format_weight: float = 0.1  # reward = correct + format_weight * well-formed
    contains: str = ""  # correct=contains: the text a completion must contain


@dataclass
class RLEval:
    problems: int = 200
    batch_size: int = 200


def _joint_settings(path) -> dict:
    """The layout a joint-task export records (joint.json in the folder or its pipeline/), or {}."""
    for sub in ("", "pipeline"):
        f = Path(path) / sub / "joint.json"
        if f.is_file():
            return json.loads(f.read_text())
    return {}


def _countdown_split(d) -> tuple[list[Problem], list[Problem]]:
    train = countdown_dataset(d.n_train, tuple(d.difficulties), d.seed)
    seen = {p.question for p in train}
    pool = [p for p in countdown_dataset(d.n_test * 3, tuple(d.difficulties), d.seed + 1)
            if p.difficulty == 1 or p.question not in seen]
    per = d.n_test // len(d.difficulties)
    return train, [p for k in d.difficulties for p in [q for q in pool if q.difficulty == k][:per]]


@register_task("rl")
class RLTask(Task):
    sections = {"data": RLData, "rollout": RLRollout, "objective": RLObjective, "reward": RLReward, "eval": RLEval}
    free_sections = ("model",)
    aliases = {"backbone": ["model.*"]}
    metric_fields = ("reward", "accuracy", "formatted", "kl", "clip_frac", "ratio")
    eval_fields = ("acc", "acc_d1", "acc_d2", "acc_d3", "acc_d4", "formatted")
    defaults = {"trainer": {"batch_size": 64}, "optim": {"lr": 1.0e-5, "weight_decay": 0.0, "warmup_steps": 0,
                                                        "min_lr_ratio": 1.0}}

    @classmethod
    def check_config(cls, cfg):
        check_data(cfg)
        choose(cfg, "data.problems", PROBLEMS)
        choose(cfg, "objective.likelihood", ("elbo", "trajectory"))
        choose(cfg, "objective.advantage", ("grpo", "drgrpo"))
        choose(cfg, "reward.correct", (*CORRECTNESS, "auto"))
        if not cfg.model.get("init_from"):
            raise ConfigError("model.init_from must name the policy: a trained pipeline or run folder "
                              "(e.g. runs/rl_sft_arithmetic/pipeline)")
        other = [k for k, v in cfg.model.items() if k != "init_from" and v is not None]
        if other:
            raise ConfigError(f"model.{other[0]}: the policy's architecture comes from model.init_from; "
                              "drop the other model keys")
        if any(OmegaConf.select(OmegaConf.create(s), "init_from") for s in cfg.stages):
            raise ConfigError("stages[].init_from: the rl task takes its policy (and reference) from "
                              "model.init_from")
        r, o = cfg.rollout, cfg.objective
        if r.group_size < 2:
            raise ConfigError(f"rollout.group_size must be >= 2 (advantages compare completions), got {r.group_size}")
        for st in cfg.stages:
            if (st.get("batch_size") or cfg.trainer.batch_size) % r.group_size:
                raise ConfigError(f"trainer.batch_size (completions per step) must be a multiple of "
                                  f"rollout.group_size={r.group_size}")
        if not r.temperature > 0:
            raise ConfigError(f"rollout.temperature must be > 0 (rollouts must explore), got {r.temperature}")
        for key in ("objective.inner_steps", "objective.elbo_samples", "objective.trajectory_steps",
                    "eval.problems", "eval.batch_size"):
            if OmegaConf.select(cfg, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {OmegaConf.select(cfg, key)}")
        if o.clip_eps <= 0 or o.beta < 0:
            raise ConfigError(f"objective.clip_eps must be > 0 and objective.beta >= 0, got {o.clip_eps}, {o.beta}")
        if cfg.reward.correct == "contains" and not cfg.reward.contains:
            raise ConfigError("reward.correct=contains needs reward.contains, the text to look for")

    # ---- build ----------------------------------------------------------------------------------
    def build(self):
        from latent.data.tokenizer import load_tokenizer
        from pipelines.tasks.common import find_tokenizer_dir, load_backbone

        cfg, d = self.cfg, self.cfg.data
        path = cfg.model.init_from
        policy = load_backbone(path, layouts=("bidirectional", "prefix"))
        tok_dir = find_tokenizer_dir(path)
        if tok_dir is None:
            raise ConfigError(f"model.init_from={path!r} holds no tokenizer (looked in tokenizer/, pipeline/tokenizer/)")
        self.tokenizer = tok = load_tokenizer(tok_dir)
        if len(tok) > policy.config.vocab_size:
            raise ConfigError(f"model.init_from={path!r}: its tokenizer has {len(tok)} tokens, the model "
                              f"{policy.config.vocab_size}")
        saved = _joint_settings(path)
        self.P = self._layout(d.question_length, saved, "question_length")
        self.suffix = self._layout(d.question_suffix, saved, "question_suffix", default="")
        self.L = self._layout(d.answer_length, saved, "target_length", key="answer_length")
        if self.P + self.L > policy.config.max_position_embeddings:
            raise ConfigError(f"data.question_length + data.answer_length = {self.P + self.L} exceeds the policy's "
                              f"max_position_embeddings={policy.config.max_position_embeddings}")
        if d.problems == "countdown":
            self.train_set, test = _countdown_split(d)
        else:
            self.train_set, test = split(d.n_train, d.n_test, tuple(d.difficulties), d.seed)
        self.eval_set = spread(test, cfg.eval.problems)
        self.prompts = self.encode(self.train_set)
        self.eval_prompts = self.encode(self.eval_set)
        self.rule = cfg.reward.correct if cfg.reward.correct != "auto" else \
            {"arithmetic": "exact_match", "countdown": "countdown"}[d.problems]
        self.mask_id = int(policy.config.mask_token_id)
        r = cfg.rollout
        self.knobs = dict(gen_length=self.L, block_length=r.block_length or self.L, steps=r.steps or self.L,
                          confidence=r.confidence, mask_token_id=self.mask_id)
        self.policy = policy
        self.ref = copy.deepcopy(policy).requires_grad_(False).eval().to(self.ctx.device)
        self.rollout = None  # the generation that inner steps reuse (inner_steps > 1)
        return {"model": policy}

    def _layout(self, value, saved: dict, saved_key: str, default=None, key: str | None = None):
        key = f"data.{key or saved_key}"
        if value is None:
            value = saved.get(saved_key, default)
            if value is None:
                raise ConfigError(f"{key} is needed: model.init_from holds no joint.json recording it")
        elif saved_key in saved and saved[saved_key] != value:
            raise ConfigError(f"{key}={value!r} but the policy was trained with {saved[saved_key]!r} "
                              "(its joint.json); drop the key to use the policy's layout")
        return value

    def encode(self, problems) -> torch.Tensor:
        tok = self.tokenizer
        try:
            return encode_fixed(tok, [p.question + self.suffix for p in problems], self.P, tok.pad_token_id, left=True)
        except ValueError as err:
            raise ConfigError(f"data.question_length={self.P} is too short: {err}") from None

    # ---- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: torch.Tensor, generator: torch.Generator | None, temperature: float,
               record_trajectory: bool = False):
        from latent.sampling import generate

        was = self.policy.training
        self.policy.eval()
        try:
            return generate(self.policy, prompts.to(self.ctx.device), temperature=temperature, generator=generator,
                            record_trajectory=record_trajectory, **self.knobs)
        finally:
            self.policy.train(was)

    def make_rollout(self, step: int, rows: int) -> dict:
        """Completions of one generation step and every random number its loss uses."""
        cfg, G = self.cfg, self.cfg.rollout.group_size
        o = cfg.objective
        g = step_generator(self.ctx.seed, step)
        idx = torch.randint(0, len(self.prompts), (rows // G,), generator=g).repeat_interleave(G)
        traj = o.likelihood == "trajectory"
        out = self.sample(self.prompts[idx], step_generator(self.ctx.seed, step, salt=1), cfg.rollout.temperature,
                          record_trajectory=traj)
        seq = out.sequences.cpu()
        scores = score_completions(self.tokenizer, seq[:, self.P:], [self.train_set[i] for i in idx.tolist()],
                                   self.rule, cfg.reward.format_weight, cfg.reward.contains)
        batch = {"sequences": seq, "advantages": group_advantages(scores.reward, G, o.advantage, o.advantage_eps),
                 "reward": scores.reward, "correct": scores.correct, "formatted": scores.formatted}
        if traj:
            commit = out.trajectory.commit_step
            steps, weights = choose_steps(commit, o.trajectory_steps, g)
            batch.update(commit_step=commit, score_steps=steps, step_weights=weights)
        else:
            batch["t"], batch["noise"] = draw_elbo_masks(g, rows, self.L, o.elbo_samples)
        if o.inner_steps > 1:
            with torch.no_grad():
                batch["old_logp"] = self.logprob(self.policy, batch).cpu()
        return batch

    def batch(self, step, stage):
        rows = stage.batch_size or self.cfg.trainer.batch_size
        mu = self.cfg.objective.inner_steps
        first = step - step % mu
        if mu == 1:
            return self.make_rollout(step, rows)
        if self.rollout is None or self.rollout["step"] != first:
            self.rollout = {"step": first, **self.make_rollout(first, rows)}
        return {k: v for k, v in self.rollout.items() if k != "step"}

    # ---- loss -----------------------------------------------------------------------------------
    def logprob(self, model, batch) -> torch.Tensor:
        """The chosen likelihood estimate of each completion, ``[rows]``."""
        dev, o = self.ctx.device, self.cfg.objective
        seq = batch["sequences"].to(dev)
        if o.likelihood == "trajectory":
            return trajectory_logprob(model, seq, self.P, batch["commit_step"], batch["score_steps"],
                                      batch["step_weights"], self.mask_id)
        return elbo_logprob(model, seq, self.P, batch["t"], batch["noise"], self.mask_id, coupled=o.coupled,
                            eps=o.mask_eps)

    def loss(self, modules, batch, stage):
        o = self.cfg.objective
        logp = self.logprob(modules.model, batch)
        old = batch["old_logp"].to(logp.device) if "old_logp" in batch else logp.detach()
        ref = None
        if o.beta > 0:
            with torch.no_grad():
                ref = self.logprob(self.ref, batch)
        scale = 1.0 / self.L if o.length_normalize else 1.0
        out = clipped_policy_loss(logp * scale, old * scale, None if ref is None else ref * scale,
                                  batch["advantages"], o.clip_eps, o.beta)
        return StepLoss(out.loss, {"reward": float(batch["reward"].mean()), "accuracy": float(batch["correct"].mean()),
                                   "formatted": float(batch["formatted"].mean()), "kl": out.kl,
                                   "clip_frac": out.clip_fraction, "ratio": out.ratio})

    def count(self, batch):
        return int(batch["sequences"].shape[0])

    # ---- evaluation, state, export ----------------------------------------------------------------
    def scores(self, problems, prompts) -> tuple[dict, float, list[str]]:
        """Greedy accuracy per difficulty (and "all"), the well-formed fraction and the answers."""
        texts, correct, formatted = [], [], []
        bs = self.cfg.eval.batch_size
        for i in range(0, len(problems), bs):
            seq = self.sample(prompts[i : i + bs], None, 0.0).sequences.cpu()
            s = score_completions(self.tokenizer, seq[:, self.P:], problems[i : i + bs], self.rule, 0.0,
                                  self.cfg.reward.contains)
            texts += s.texts
            correct += s.correct.tolist()
            formatted += s.formatted.tolist()
        per: dict = {}
        for p, c in zip(problems, correct, strict=True):
            per.setdefault(p.difficulty, []).append(c)
        acc = {k: sum(v) / len(v) for k, v in sorted(per.items())}
        acc["all"] = sum(correct) / max(1, len(correct))
        return acc, sum(formatted) / max(1, len(formatted)), texts

    def evaluate(self, modules, step):
        acc, formatted, _ = self.scores(self.eval_set, self.eval_prompts)
        return {"acc": acc["all"], **{f"acc_d{k}": v for k, v in acc.items() if k != "all"}, "formatted": formatted}

    def state_dict(self):
        return {"rollout": self.rollout} if self.rollout is not None else {}

    def load_state_dict(self, state):
        if state.get("rollout") is not None:
            self.rollout = {k: (v if k == "step" else torch.as_tensor(v)) for k, v in state["rollout"].items()}
            self.rollout["step"] = int(self.rollout["step"])

    def export(self, modules, folder, stage):
        settings = {"mode": "discrete", "target": "answer", "question_length": self.P, "target_length": self.L,
                    "question_suffix": self.suffix, "latent_shape": None, "latent_source": None,
                    "encoder_path": None, "diffusion": None}
        JointGenerator(modules.model, self.tokenizer, settings).save_pretrained(folder)
        write_training(folder, self.registered_name, self.cfg)

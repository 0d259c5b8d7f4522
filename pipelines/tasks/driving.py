"""Driving: a planner from sensor frames to the next K decisions, by masked diffusion (ViLaD style), its
autoregressive baseline, and the CCDD variant (actions as tokens, waypoints as continuous latents).

    python train.py configs/driving_tiny.yaml         # diffusion planner -> runs/driving_tiny/pipeline
    python train.py configs/driving_tiny_ar.yaml      # the AR baseline: model.attention_layout=causal
    python train.py configs/driving_tiny_ccdd.yaml    # objective.name=ccdd

Data: demonstrations of the rule-based driver in highway-env, recorded into ``data.dir`` on first use
(:func:`modalities.data.driving.build_demonstrations`, deterministic from ``data.seed`` / ``data.valid_seed``,
kept while the settings match), or npz files of your own (``data.train`` and ``data.valid``). A step's rows
are drawn with replacement from the training set by the step's generator.

DAgger (``data.dagger``, off with ``rounds: 0``): after every ``every`` steps (default ``trainer.max_steps //
(rounds + 1)``), up to ``rounds`` times, the planner being trained drives ``episodes_per_round`` episodes per
density in the simulator, the demonstrator acting instead with probability ``beta ** i`` in round i; the
demonstrator labels every visited state with its plan from there
(:func:`modalities.data.driving.record` with a policy), and the labelled states join the training set for
the remaining steps. Round i records on seeds ``dagger.seed + 10000 i + 1000 j + e`` (density j, episode e).
The collected states are part of the task's checkpoint state, so a resumed run trains on the very rows the
interrupted one had collected (a round that was due after the last checkpoint is collected again from the
same weights, hence the same rows). Every process collects the same rows (the weights and seeds agree).

Objectives (``objective.name``):

- ``plan``: the 3K plan tokens of :class:`PlanTokenizer` after the sensor prefix. Diffusion layouts
  (``prefix``, ``bidirectional``): the SFT masked-diffusion loss (nothing is a prompt: the sensors are the
  prefix), its noise drawn for the global batch; ``full_mask_share`` of the rows get the whole plan masked
  (the case closed loop decodes from). ``causal``: next-token loss after a BOS token. Export: a
  :class:`pipelines.planning.PlanningPipeline` folder (decoding defaults from ``decoding``).
- ``ccdd``: the K meta-actions as masked tokens and the K waypoint steps (dx, dy), standardised with the
  training set's mean and std, as the continuous latents of the same backbone (``latent_dim`` 2), trained with
  :func:`latent.joint.joint_loss`. Export: a :class:`CCDDPlanner` folder.

Evaluation (every ``trainer.eval_every`` steps): ``val_loss``, the loss on the validation set with noise that
is the same at every evaluation.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from latent.training.config import ConfigError
from latent.training.task import StepLoss, Task, register_task, step_generator
from modalities.data.driving import ACTIONS, DrivingDataset, PlanTokenizer, build_demonstrations, record
from modalities.driving import DrivingAdapter
from pipelines.tasks.common import (
    Decoding,
    adapter_keys,
    backbone_from_config,
    sft_noise,
)

__all__ = ["DrivingTask", "plan_loss", "ccdd_loss", "build_planner", "planner_modules", "planning_pipeline",
           "CCDDPlanner"]

_LAYOUTS = {"plan": ("prefix", "bidirectional", "causal"), "ccdd": ("prefix", "bidirectional")}
_EVAL_BATCH = 256


@dataclass
class DaggerConfig:
    rounds: int = 0  # 0: behaviour cloning only
    episodes_per_round: int = 5  # per density of data.densities
    beta: float = 0.5  # round i (1..rounds): the demonstrator acts with probability beta ** i, the planner otherwise
    every: int | None = None  # training steps between rounds (null: trainer.max_steps // (rounds + 1))
    seed: int = 20_000  # round i, density j, episode e: seed + 10000 i + 1000 j + e


@dataclass
class DrivingData:
    dir: str = "data/driving"  # demonstrations recorded here on first use (train.npz, valid.npz)
    train: str | None = None  # an npz of your own instead of <dir>/train.npz (give valid too; nothing is recorded)
    valid: str | None = None
    densities: list[float] = field(default_factory=lambda: [1.0, 1.5, 2.0])  # traffic densities recorded
    train_episodes: int = 40  # per density
    valid_episodes: int = 10
    seed: int = 0  # episode e of density i uses seed + 1000 i + e
    valid_seed: int = 500
    duration: int | None = None  # episode length [s] (null: the env's 30)
    max_steps: int | None = None  # decisions per episode (quick recordings)
    occupancy: bool = False  # also record ego-centred occupancy grids (adapter.occupancy_channels: 2)
    dagger: DaggerConfig = field(default_factory=DaggerConfig)  # on-policy rounds labelled by the demonstrator


@dataclass
class DrivingObjective:
    name: str = "plan"  # plan | ccdd
    lam: float = 1.0  # ccdd: weight of the latent MSE
    prediction: str = "v_prediction"  # ccdd: what the backbone predicts for the latents
    # plan, diffusion layouts: share of training rows whose whole plan is masked (t = 1). Closed loop reads the
    # first action from the sensors alone; with t ~ U(0, 1) that case is rare and the other plan tokens
    # (future waypoints) give the action away, so the model learns less about reading the scene.
    full_mask_share: float = 0.0


# ------------------------------------------------------------------------------------------ losses
def plan_loss(adapter: DrivingAdapter, model, inputs, plan_ids: torch.LongTensor, tokenizer: PlanTokenizer,
              t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
              generator: torch.Generator | None = None):
    """The loss of a planner on (observations, plan tokens): the SFT masked-diffusion loss on the plan
    (:func:`latent.losses.sft_loss`, noise levels ``t`` [B] and mask draws ``noise`` [B, 3K] when given) for
    diffusion layouts, the next-token loss after BOS for a causal backbone; the sensors are the prefix.
    Returns the ``LossOutput``."""
    from latent.losses import causal_lm_loss, sft_loss

    prefix = adapter(inputs)
    b, n = plan_ids.shape
    full_mask = None if bool(prefix.mask.all()) else prefix.attention_mask(num_tokens=n)

    def call(ids, attention_mask=None, **kw):
        return model(ids, attention_mask=full_mask, prefix_embeds=prefix.embeds, **kw)

    if getattr(model.config, "attention_layout", None) == "causal":
        return causal_lm_loss(call, plan_ids, bos_token_id=tokenizer.bos_token_id)
    return sft_loss(lambda ids, attention_mask=None: call(ids, prefix_length=prefix.length), plan_ids,
                    tokenizer.mask_token_id, prompt_lengths=torch.zeros(b, dtype=torch.long, device=plan_ids.device),
                    t=t, noise=noise, generator=generator)


class _PrefixedJoint:
    """The joint backbone as latent.joint calls it: the sensor prefix added, every canvas slot restricted to
    the action tokens (the canvas of the CCDD planner holds only actions)."""

    def __init__(self, model, prefix, tokenizer: PlanTokenizer):
        self.model, self.prefix = model, prefix
        self.allowed = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=prefix.embeds.device)
        self.allowed[tokenizer.action_offset: tokenizer.action_offset + len(ACTIONS)] = True

    def __call__(self, ids, latents=None, timestep=None, attention_mask=None, **kw):
        p = self.prefix
        mask = None if bool(p.mask.all()) else p.attention_mask(num_tokens=ids.shape[1])
        out = self.model(ids, latents=latents, timestep=timestep, prefix_embeds=p.embeds, attention_mask=mask,
                         prefix_length=p.length)
        out.logits = out.logits.masked_fill(~self.allowed, float("-inf"))
        return out


def ccdd_loss(adapter: DrivingAdapter, model, inputs, action_tokens, latents, tokenizer: PlanTokenizer, diffusion,
              lam: float = 1.0, **noise):
    """The CCDD loss of a planner: :func:`latent.joint.joint_loss` on the action tokens [B, K] and the
    standardised waypoint steps [B, K, 2]; ``noise`` holds its pre-drawn ``t``, ``noise``, ``timesteps`` and
    ``latent_noise``. Returns the ``JointLossOutput``."""
    from latent.joint import joint_loss

    net = _PrefixedJoint(model, adapter(inputs), tokenizer)
    return joint_loss(net, action_tokens, latents, tokenizer.mask_token_id, diffusion, lam=lam, **noise)


# ------------------------------------------------------------------------------------------ modules
def planner_modules(adapter_cfg, model_cfg, tokenizer: PlanTokenizer, canvas: int | None = None,
                    layouts=_LAYOUTS["plan"], latent_dim: int | None = None):
    """(DrivingAdapter, DiffusionTransformer) from the ``adapter`` / ``model`` sections: the backbone is sized
    to the plan vocabulary and to [prefix | canvas (default 3K tokens) | BOS], or loaded from
    ``model.init_from``; the adapter embeds into the backbone's ``hidden_size``."""
    mcfg = {k: v for k, v in dict(model_cfg).items() if v is not None}
    acfg = {k: v for k, v in dict(adapter_cfg).items() if k != "type"}
    mcfg.setdefault("hidden_size", 128)
    adapter = DrivingAdapter(hidden_size=int(mcfg["hidden_size"]), **acfg)
    context = adapter.num_prefix_tokens + (canvas or tokenizer.length) + 1
    mcfg.setdefault("max_position_embeddings", context)
    mcfg.setdefault("vocab_size", tokenizer.vocab_size)
    mcfg.setdefault("mask_token_id", tokenizer.mask_token_id)
    if latent_dim is not None:
        mcfg.setdefault("latent_dim", latent_dim)
    model = backbone_from_config(mcfg, None, layouts=layouts)
    mc = model.config
    checks = {"hidden_size": (mc.hidden_size == adapter.config.hidden_size, adapter.config.hidden_size),
              "max_position_embeddings": (mc.max_position_embeddings >= context, f">= prefix + canvas + 1 = {context}"),
              "vocab_size": (mc.vocab_size >= tokenizer.vocab_size, f">= the plan vocabulary ({tokenizer.vocab_size})"),
              "mask_token_id": (mc.mask_token_id == tokenizer.mask_token_id, tokenizer.mask_token_id)}
    if latent_dim is not None:
        checks["latent_dim"] = (getattr(mc, "latent_dim", None) == latent_dim, latent_dim)
    for key, (ok, want) in checks.items():
        if not ok:
            raise ConfigError(f"model.{key}={getattr(mc, key, None)} must be {want}")
    return adapter, model


def planning_pipeline(adapter, model, tokenizer: PlanTokenizer, decoding: dict | None = None,
                      action_prior: list[float] | None = None):
    """A PlanningPipeline of trained (or fresh) modules; ``decoding`` overrides the scheduler's defaults;
    ``action_prior``: the training labels' action shares (`PlanningPipeline.prior_correction`)."""
    from latent.scheduler import MaskedDiffusionScheduler
    from pipelines.planning import PlanningPipeline

    dec = {"block_length": tokenizer.length, **asdict(Decoding()), **dict(decoding or {})}
    return PlanningPipeline(adapter, model, MaskedDiffusionScheduler(**dec), plan=tokenizer.to_dict(),
                            action_prior=action_prior)


def build_planner(adapter_cfg: dict, model_cfg: dict, tokenizer: PlanTokenizer, decoding: dict | None = None,
                  seed: int = 0):
    """A fresh (untrained) PlanningPipeline: adapter + backbone sized from ``model_cfg`` + scheduler."""
    torch.manual_seed(seed)
    return planning_pipeline(*planner_modules(adapter_cfg, model_cfg, tokenizer), tokenizer, decoding)


def waypoint_steps(waypoints) -> torch.Tensor:
    """Waypoints [B, K, 2] -> the step of each decision [B, K, 2] (the first one from the ego)."""
    w = torch.as_tensor(waypoints, dtype=torch.float32)
    return torch.cat([w[:, :1], w[:, 1:] - w[:, :-1]], 1)


class CCDDPlanner:
    """What the ``ccdd`` objective exports: the sensor adapter, the joint backbone and the waypoint-step
    statistics. ``planner(inputs, steps)`` gives (action ids [B, K], waypoints [B, K, 2]) in the units of
    PlanningPipeline's ``action_ids`` / ``waypoints``: tokens on LLaDA's linear schedule, latents with
    DPM-Solver++, one backbone forward per step for both."""

    def __init__(self, adapter, model, tokenizer: PlanTokenizer, mean, std, prediction: str = "v_prediction"):
        from latent.continuous import GaussianDiffusion

        self.adapter, self.model, self.tokenizer = adapter, model, tokenizer
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)
        self.prediction = prediction
        self.diffusion = GaussianDiffusion(prediction)
        self.scheduler = self.diffusion.make_scheduler("dpm")  # built once: set_timesteps resets it every call

    def latents(self, waypoints) -> torch.Tensor:
        return (waypoint_steps(waypoints) - self.mean) / self.std

    def save_pretrained(self, folder) -> None:
        folder = Path(folder)
        self.adapter.save_pretrained(str(folder / "driving_adapter"))
        self.model.save_pretrained(str(folder / "model"))
        (folder / "ccdd.json").write_text(json.dumps({"plan": self.tokenizer.to_dict(), "mean": self.mean.tolist(),
                                                      "std": self.std.tolist(), "prediction": self.prediction}))

    @classmethod
    def from_pretrained(cls, folder, device=None) -> CCDDPlanner:
        from latent.backbone import DiffusionTransformer

        folder = Path(folder)
        meta = json.loads((folder / "ccdd.json").read_text())
        adapter = DrivingAdapter.from_pretrained(str(folder / "driving_adapter")).to(device or "cpu").eval()
        model = DiffusionTransformer.from_pretrained(str(folder / "model")).to(device or "cpu").eval()
        return cls(adapter, model, PlanTokenizer(**meta["plan"]), meta["mean"], meta["std"], meta["prediction"])

    @torch.no_grad()
    def __call__(self, inputs, steps: int, generator: torch.Generator | None = None):
        from latent.joint import joint_sample

        p = next(self.adapter.parameters())
        inputs = inputs.to(p.device, p.dtype)
        tok, k = self.tokenizer, self.tokenizer.horizon
        net = _PrefixedJoint(self.model, self.adapter(inputs), tok)
        res = joint_sample(net, torch.zeros(inputs.batch_size, 0, dtype=torch.long, device=p.device), k,
                           tok.mask_token_id, steps, latent_shape=(k, 2), diffusion=self.diffusion,
                           scheduler=self.scheduler, generator=generator)
        way = (res.latents.float().cpu() * self.std + self.mean).cumsum(1)
        return res.sequences.cpu() - tok.action_offset, way


def dagger_every(cfg) -> int:
    """Training steps between DAgger rounds (``data.dagger.every``, default max_steps // (rounds + 1))."""
    dg = cfg.data.dagger
    return int(dg.every) if dg.every is not None else int(cfg.trainer.max_steps) // (int(dg.rounds) + 1)


# ------------------------------------------------------------------------------------------ the task
@register_task("driving")
class DrivingTask(Task):
    sections = {"data": DrivingData, "plan": PlanTokenizer, "decoding": Decoding, "objective": DrivingObjective}
    free_sections = ("model", "adapter")
    aliases = {"adapter": ["adapter.*"], "backbone": ["model.*"]}
    pipeline_components = {"adapter": "driving_adapter", "model": "model"}  # the pipeline or the CCDD planner
    metric_fields = ("ce", "mse")  # ccdd: the two terms of the loss
    eval_fields = ("val_loss",)

    @classmethod
    def section_keys(cls, section, user):
        if section == "model":
            return super().section_keys(section, user)
        return [k for k in adapter_keys({"type": "driving"}, extra=()) if k != "hidden_size"]  # width: the model's

    @classmethod
    def check_config(cls, cfg):
        from latent.scheduler import MaskedDiffusionScheduler

        try:
            tok = PlanTokenizer(**cfg.plan)
        except ValueError as err:
            raise ConfigError(f"plan: {err}") from None
        try:
            MaskedDiffusionScheduler(block_length=tok.length, **cfg.decoding).sampler_config(gen_length=tok.length).validate()
        except ValueError as err:
            raise ConfigError(f"decoding: {err}") from None
        d, name = cfg.data, cfg.objective.name
        if name not in _LAYOUTS:
            raise ConfigError(f"objective.name={name!r} is not one of {', '.join(_LAYOUTS)}")
        layout = cfg.model.get("attention_layout")
        if layout is not None and layout not in _LAYOUTS[name]:
            raise ConfigError(f"model.attention_layout={layout!r}; objective.name={name!r} needs one of {_LAYOUTS[name]}")
        share = cfg.objective.full_mask_share
        if not 0.0 <= share < 1.0:
            raise ConfigError(f"objective.full_mask_share must be in [0, 1) (the share of fully masked plans), got {share}")
        if share and (name != "plan" or layout == "causal"):
            raise ConfigError("objective.full_mask_share applies to the plan objective with a diffusion layout "
                              "(prefix / bidirectional); set it to 0 here")
        if (d.train is None) != (d.valid is None):
            raise ConfigError("give both data.train and data.valid (your own npz files), or neither (recorded into "
                              "data.dir)")
        for key in ("data.train_episodes", "data.valid_episodes"):
            if OmegaConf.select(cfg, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {OmegaConf.select(cfg, key)}")
        if not d.densities:
            raise ConfigError("data.densities is empty; list the traffic densities to record, e.g. [1.0, 1.5, 2.0]")
        dg = d.dagger
        if dg.rounds < 0:
            raise ConfigError(f"data.dagger.rounds must be >= 0 (0: no DAgger), got {dg.rounds}")
        if dg.rounds:
            if dg.episodes_per_round < 1:
                raise ConfigError(f"data.dagger.episodes_per_round must be >= 1, got {dg.episodes_per_round}")
            if not 0.0 <= dg.beta <= 1.0:
                raise ConfigError(f"data.dagger.beta must be in [0, 1] (the demonstrator's share), got {dg.beta}")
            every = dagger_every(cfg)
            if every < 1 or dg.rounds * every >= cfg.trainer.max_steps:
                raise ConfigError(f"data.dagger: {dg.rounds} rounds every {every} steps do not fit before "
                                  f"trainer.max_steps={cfg.trainer.max_steps}; lower data.dagger.every or rounds")

    # ---- build ----------------------------------------------------------------------------------
    def _data_files(self) -> tuple[str, str]:
        d, ctx = self.cfg.data, self.ctx
        if d.train is not None:
            return d.train, d.valid
        if ctx.is_main:  # the others wait for the main process (Trainer builds it first), then read
            try:
                build_demonstrations(d.dir, list(d.densities), d.train_episodes, d.valid_episodes, d.seed,
                                     d.valid_seed, self.tok.horizon, occupancy=d.occupancy, duration=d.duration,
                                     max_steps=d.max_steps, progress=bool(self.cfg.trainer.progress))
            except ValueError as err:
                raise ConfigError(f"data.dir={d.dir!r}: {err}") from None
        return str(Path(d.dir) / "train.npz"), str(Path(d.dir) / "valid.npz")

    def build(self):
        cfg = self.cfg
        self.tok = PlanTokenizer(**cfg.plan)
        self.ccdd = cfg.objective.name == "ccdd"
        train_file, valid_file = self._data_files()
        train, valid = DrivingDataset.load(train_file), DrivingDataset.load(valid_file)
        for path, data in ((train_file, train), (valid_file, valid)):
            if data.actions.shape[1] != self.tok.horizon:
                raise ConfigError(f"plan.horizon={self.tok.horizon} but {path} holds {data.actions.shape[1]} decisions")
            if len(data) == 0:
                raise ValueError(f"{path} holds no sample (episodes too short for plan.horizon?)")
        k = self.tok.horizon
        adapter, model = planner_modules(cfg.adapter, cfg.model, self.tok, canvas=2 * k if self.ccdd else None,
                                         layouts=_LAYOUTS[cfg.objective.name], latent_dim=2 if self.ccdd else None)
        self.causal = model.config.attention_layout == "causal"
        if self.ccdd:
            steps = waypoint_steps(train.waypoints)
            self.planner = CCDDPlanner(adapter, model, self.tok, steps.mean((0, 1)),
                                       steps.std((0, 1)).clamp_min(1e-3), cfg.objective.prediction)
        self.base_train, self.dagger_parts, self.dagger_log = train, [], []
        self._planner_modules = (adapter, model)  # the very modules the trainer trains (DAgger drives them)
        self.train_rows, self.valid_rows = self._rows(train), self._rows(valid)
        return {"adapter": adapter, "model": model}

    # ---- DAgger ---------------------------------------------------------------------------------
    def _policy(self):
        """The planner being trained as a closed-loop policy: observation -> first action of its plan."""
        adapter, model = self._planner_modules
        if self.ccdd:
            def act(env, raw):
                a, _ = self.planner(adapter.preprocess([raw]), steps=self.tok.horizon)
                return int(a[0, 0])
            return act
        pipe = planning_pipeline(adapter, model, self.tok, self.cfg.decoding)
        pipe.set_progress_bar_config(disable=True)
        return lambda env, raw: pipe.plan_action(raw)

    def _collect_due(self, step: int) -> None:
        """Collect every DAgger round due before step ``step`` (0-based) that has not been collected."""
        dg = self.cfg.data.dagger
        every = dagger_every(self.cfg) if dg.rounds else 0
        while len(self.dagger_parts) < dg.rounds and (len(self.dagger_parts) + 1) * every <= step:
            i = len(self.dagger_parts) + 1
            adapter, model = self._planner_modules
            was = (adapter.training, model.training)
            adapter.eval()
            model.eval()
            try:
                with torch.no_grad():
                    d = self.cfg.data
                    part = record(list(d.densities), dg.episodes_per_round, dg.seed + 10_000 * i, self.tok.horizon,
                                  occupancy=d.occupancy, duration=d.duration, max_steps=d.max_steps,
                                  progress=bool(self.cfg.trainer.progress), policy=self._policy(), beta=dg.beta ** i)
            finally:
                adapter.train(was[0])
                model.train(was[1])
            self.dagger_parts.append(part)
            m = part.meta
            self.dagger_log.append({"round": i, "step": step, "beta": m["beta"], "states": len(part),
                                    "episodes": m["episodes_driven"], "crashes": m["crashes"],
                                    "decisions": m["decisions"], "planner_decisions": m["policy_decisions"]})
            self.ctx.log(f"[dagger] {json.dumps(self.dagger_log[-1])}")
            self._aggregate()

    def _aggregate(self) -> None:
        self.train_rows = self._rows(self.training_set())

    def training_set(self) -> DrivingDataset:
        """The demonstrations and every DAgger round collected so far, in order."""
        return DrivingDataset.concat([self.base_train, *self.dagger_parts]) if self.dagger_parts else self.base_train

    def state_dict(self):
        parts = {f"round{i + 1}": {k: torch.from_numpy(v) for k, v in p.arrays().items()}
                 for i, p in enumerate(self.dagger_parts)}
        return {"dagger_rounds": len(self.dagger_parts), "dagger_parts": parts,
                "dagger_meta": [json.dumps(p.meta) for p in self.dagger_parts], "dagger_log": list(self.dagger_log)}

    def load_state_dict(self, state):
        n = int(state.get("dagger_rounds", 0))
        parts, metas = state.get("dagger_parts", {}), state.get("dagger_meta", [])
        self.dagger_parts = [DrivingDataset(**{k: v.numpy() for k, v in parts[f"round{i + 1}"].items()},
                                            meta=json.loads(metas[i])) for i in range(n)]
        self.dagger_log = list(state.get("dagger_log", []))
        if n:
            self._aggregate()

    def _rows(self, data: DrivingDataset) -> dict:
        """Every row of a dataset as the tensors a batch takes rows of."""
        if self.ccdd:
            return {"inputs": data.inputs(), "actions": torch.as_tensor(data.actions) + self.tok.action_offset,
                    "latents": self.planner.latents(data.waypoints)}
        return {"inputs": data.inputs(), "plan": data.plan_ids(self.tok)}

    def _take(self, rows: dict, index: torch.Tensor, g: torch.Generator) -> dict:
        """The rows ``index`` and their noise, drawn from ``g`` for all of them at once."""
        out = {k: v.select(index) if k == "inputs" else v[index] for k, v in rows.items()}
        n, k = len(index), self.tok.horizon
        if self.ccdd:
            out["t"], out["noise"] = sft_noise(g, n, k)
            out["timesteps"] = self.planner.diffusion.sample_timesteps((n,), g)
            out["latent_noise"] = torch.randn(n, k, 2, generator=g)
        elif not self.causal:
            out["t"], out["noise"] = sft_noise(g, n, self.tok.length)
        return out

    # ---- steps ----------------------------------------------------------------------------------
    def batch(self, step, stage):
        self._collect_due(step)
        g = step_generator(self.ctx.seed, step)
        n = self.train_rows["inputs"].batch_size
        rows = torch.randint(n, (stage.batch_size or self.cfg.trainer.batch_size,), generator=g)
        out = self._take(self.train_rows, rows, g)
        share = self.cfg.objective.full_mask_share
        if share:  # drawn only when on, so recipes without it keep their noise stream
            out["t"] = out["t"].masked_fill(torch.rand(len(rows), generator=g) < share, 1.0)
        return out

    def _loss(self, modules, batch):
        dev = self.ctx.device
        b = {k: v.to(dev) for k, v in batch.items()}
        if self.ccdd:
            noise = {k: b[k] for k in ("t", "noise", "timesteps", "latent_noise")}
            return ccdd_loss(modules.adapter, modules.model, b["inputs"], b["actions"], b["latents"], self.tok,
                             self.planner.diffusion, self.cfg.objective.lam, **noise)
        return plan_loss(modules.adapter, modules.model, b["inputs"], b["plan"], self.tok, t=b.get("t"),
                         noise=b.get("noise"))

    def loss(self, modules, batch, stage):
        out = self._loss(modules, batch)
        return StepLoss(out.loss, {"ce": out.ce.item(), "mse": out.mse.item()} if self.ccdd else {})

    def evaluate(self, modules, step):
        ctx = self.ctx
        n = self.valid_rows["inputs"].batch_size
        total = torch.zeros(2, device=ctx.device)
        for i, lo in enumerate(range(0, n, _EVAL_BATCH)):
            if i % ctx.world_size != ctx.rank:  # the batches are shared out; each has its own fixed noise
                continue
            rows = torch.arange(lo, min(n, lo + _EVAL_BATCH))
            batch = self._take(self.valid_rows, rows, step_generator(ctx.seed, i, salt=1))
            with ctx.autocast() if ctx.autocast else nullcontext():
                loss = self._loss(modules, batch).loss.float()
            total += torch.stack([loss * len(rows), torch.tensor(float(len(rows)), device=ctx.device)])
        if ctx.reduce is not None:
            total = ctx.reduce(total, "sum")
        return {"val_loss": float(total[0] / total[1].clamp_min(1))}

    # ---- weights from elsewhere, export ---------------------------------------------------------
    def export(self, modules, folder, stage):
        data = self.training_set()  # concatenates the DAgger rounds: once per export
        if self.ccdd:
            self.planner.save_pretrained(folder)  # it holds the trained adapter and backbone
        else:
            planning_pipeline(modules.adapter, modules.model, self.tok, self.cfg.decoding,
                              action_prior=data.action_shares()).save_pretrained(str(folder))
        training = {"objective": self.cfg.objective.name, "config": OmegaConf.to_container(self.cfg),
                    "training_rows": len(data), "dagger_rounds": self.dagger_log}
        (folder / "training.json").write_text(json.dumps(training, indent=2))

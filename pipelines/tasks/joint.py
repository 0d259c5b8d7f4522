"""Joint diffusion of tokens and continuous latents (CCDD) on the arithmetic task, and either stream alone.

    python train.py configs/latent_joint.yaml                               # CCDD: answer tokens + MiniLM latents
    python train.py configs/latent_joint.yaml objective.mode=discrete run.name=latent_joint_discrete
    python train.py configs/latent_textgen.yaml                             # text generated as compressor latents
    python train.py configs/latent_textgen.yaml objective.mode=discrete run.name=latent_textgen_token

Sequences (``data.target``): ``answer``: ``[question + data.question_suffix (left-padded, never masked) |
answer (EOS-padded)]``; ``cot``: the same with ``step;step;...>answer`` as the answer; ``equation``: the whole
``question=answer`` text and no prompt (unconditional generation). Problems are generated on the fly
(:mod:`latent.data.arithmetic`).

Modes (``objective.mode``), at equal parameters (``model.latent_dim`` is set in every mode):

- ``joint``: one forward denoises the masked tokens and the noisy latents of the same sequence,
  ``loss = CE + lam * MSE`` (:func:`latent.joint.joint_loss`); sampling evolves both streams together;
- ``discrete``: the masked-diffusion SFT loss on the tokens (the latent stream unused): the baseline;
- ``continuous``: Gaussian diffusion of the latents only, decoded to text by the compressor.

Joint-mode training options (all off by default): ``objective.time_coupling=shared`` puts the latents at the
tokens' noise level; ``objective.latent_dropout`` gives a fraction of the rows pure-noise latents, so the
tokens learn to answer alone; ``objective.self_latents`` feeds a fraction of the rows the model's own
re-noised latent estimate (what sampling hands the tokens). ``experiments/latent_joint_ablation.py`` measures
them.

Latents (``latents.source``): ``minilm``: the frozen MiniLM's token states of the equation text, projected on
their top ``model.latent_dim`` principal directions (fitted on the training texts) and standardised, the
continuous view of the same sequence as in CCDD; ``compressor``: a trained TextCompressor's latents of the
equation (the ``compressor`` section names its run, which its recipe trains on first use).

Evaluation: exact-match accuracy on held-out problems (overall and per difficulty), or for ``equation`` the
fraction of samples that are true equations and of distinct samples. Export: ``<run>/pipeline`` is a
:class:`JointGenerator` folder: ``JointGenerator.from_pretrained(folder)(questions=["4+5*2"]).texts``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.utils import BaseOutput
from omegaconf import OmegaConf

from latent.continuous import GaussianDiffusion, sample_latents
from latent.data.arithmetic import (
    accuracy_by_difficulty,
    cot_text,
    decode_answer,
    encode_fixed,
    equation_text,
    is_true_equation,
    make_tokenizer,
)
from latent.joint import joint_loss, joint_sample, pure_noise_timestep, shared_timesteps
from latent.losses import sft_loss
from latent.schedules import sample_times
from latent.training.config import ConfigError
from latent.training.task import StepLoss, Task, register_task, step_generator
from pipelines.tasks.autoencoders import (
    ArithmeticData,
    PretrainedRef,
    arithmetic_split,
    check_data,
    pretrained_folder,
    write_training,
)
from pipelines.tasks.common import backbone_from_config

__all__ = ["JointTask", "JointGenerator", "JointGeneration", "Layout", "minilm_latents", "answer_scores",
           "equation_scores", "SamplingEval"]

MODES = ("joint", "discrete", "continuous")
TARGETS = ("answer", "cot", "equation")


@dataclass
class JointData(ArithmeticData):
    n_train: int = 8000
    n_test: int = 400
    target: str = "answer"  # answer | cot | equation (no prompt)
    question_suffix: str = "="
    question_length: int = 11  # prompt tokens, suffix included (left-padded)
    target_length: int = 3  # generated tokens, EOS included (EOS-padded)


@dataclass
class JointObjective:
    mode: str = "joint"  # joint | discrete | continuous
    lam: float = 1.0  # joint: loss = CE + lam * MSE
    prediction_type: str = "v_prediction"  # of the latent stream
    schedule: str = "linear"  # masking schedule of the token stream
    eps: float = 1.0e-3
    # joint: latent noise levels drawn independently of the tokens' (independent) or equal to them (shared,
    # the pairing joint sampling walks along)
    time_coupling: str = "independent"
    # joint: fraction of rows whose latents are pure noise, so the tokens learn to answer without them
    latent_dropout: float = 0.0
    # joint: fraction of rows whose latent input is the model's own estimate from pure noise, re-noised (one
    # extra forward without gradient), so the tokens learn how far the sampled latents can be trusted
    self_latents: float = 0.0


@dataclass
class JointLatents:
    source: str = "minilm"  # minilm | compressor
    tokens: int = 16  # minilm: token states per text (padded/truncated)
    # minilm: mean of each run of this many consecutive token states, one latent slot each: the latent stream
    # costs the backbone tokens / pool positions instead of tokens
    pool: int = 1
    encoder_path: str | None = None  # minilm: the encoder's local folder; null: the installed MiniLM
    cache_dir: str | None = None  # minilm: keep the encoder states of the training texts here (safetensors)


@dataclass
class SamplingEval:
    problems: int = 100  # held-out problems scored, spread over the difficulties
    steps: int | None = None  # token sampling steps (and latent steps in joint mode); null: one token a step
    scheduler: str = "dpm"  # ddim | dpm: the latent stream's diffusers scheduler
    temperature: float = 0.0
    order: str = "confidence"  # confidence | random (MDLM ancestral order, for unconditional samples)
    batch_size: int = 200


@dataclass
class JointEval(SamplingEval):
    samples: int = 100  # equation target: unconditional samples scored
    # joint mode: joint (denoise the latents with the tokens) | noise (leave them at pure noise, decode the
    # tokens alone); saved as the export's default
    latent_stream: str = "joint"


@dataclass
class Layout:
    """Where the prompt and the generated part sit; ``keys`` name the config keys of the two lengths."""

    target: str
    question_length: int
    target_length: int
    question_suffix: str = ""
    keys: tuple[str, str] = ("data.question_length", "data.target_length")

    @property
    def prompt_length(self) -> int:
        return 0 if self.target == "equation" else self.question_length


def target_text(p, target: str) -> str:
    return {"answer": p.answer, "cot": cot_text(p), "equation": equation_text(p)}[target]


def answer_of(text: str, target: str) -> str:
    """The answer in a generated text (a chain of thought ends with ``>answer``)."""
    if target == "cot":
        return text.split(">")[-1] if ">" in text else ""
    return text


def spread(problems, n: int) -> list:
    """About ``n`` problems taken evenly from a list ordered by difficulty, so every difficulty is scored."""
    step = max(1, len(problems) // max(1, n))
    return problems[::step][:n]


def choose(cfg, key: str, choices) -> None:
    v = OmegaConf.select(cfg, key)
    if v not in choices:
        raise ConfigError(f"{key}={v!r} is not one of {', '.join(choices)}")


def check_sampling_eval(cfg) -> None:
    ec = cfg.eval
    for key in ("problems", "batch_size"):
        if ec[key] < 1:
            raise ConfigError(f"eval.{key} must be >= 1, got {ec[key]}")
    if ec.steps is not None and ec.steps < 1:
        raise ConfigError(f"eval.steps must be >= 1 or null, got {ec.steps}")
    choose(cfg, "eval.order", ("confidence", "random"))
    choose(cfg, "eval.scheduler", ("ddim", "dpm"))


def pool_states(h: torch.Tensor, keep: torch.Tensor, pool: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each run of ``pool`` consecutive states ``[B, N, D]`` over the kept ones (``keep`` ``[B, N]``),
    ``[B, ceil(N / pool), D]``, and which slots hold any kept state; a slot with none is 0."""
    if pool < 1:
        raise ValueError(f"pool must be >= 1, got {pool}")
    B, N, D = h.shape
    pad = -N % pool
    w = torch.nn.functional.pad(keep.to(h.dtype), (0, pad)).view(B, -1, pool, 1)
    total = (torch.nn.functional.pad(h, (0, 0, 0, pad)).view(B, -1, pool, D) * w).sum(2)
    count = w.sum(2)
    return total / count.clamp(min=1), count[..., 0] > 0


@torch.no_grad()
def minilm_latents(texts, dim: int, max_tokens: int, basis: dict | None = None, encoder_path: str | None = None,
                   device="cpu", batch_size: int = 256, cache_dir: str | None = None, pool: int = 1):
    """Frozen MiniLM token states of each text -> ``[B, ceil(max_tokens / pool), dim]``: with ``pool > 1`` each
    slot is the mean of ``pool`` consecutive token states (:func:`pool_states`); projected on the top ``dim``
    principal directions of the (pooled) states (fitted here, exactly, when ``basis`` is None) and
    standardised; padding slots are 0. Returns ``(latents, basis)``. With ``cache_dir`` the encoder states are
    kept there, named by a hash of the encoder folder, ``max_tokens`` and the texts (the encoder is frozen, so
    runs on the same texts share them)."""
    from transformers import AutoModel, AutoTokenizer

    from autoencoders.compressor import default_encoder_path
    from latent.loading import load_hf_model

    path = encoder_path or default_encoder_path()
    cache = None
    if cache_dir is not None:
        import hashlib

        from safetensors.torch import load_file, save_file

        key = hashlib.sha256("\n".join([str(Path(path).resolve()), str(max_tokens), *texts]).encode()).hexdigest()
        cache = Path(cache_dir) / f"minilm_states_{key[:24]}.safetensors"
    if cache is not None and cache.is_file():
        saved = load_file(str(cache))
        h, keep = saved["states"], saved["keep"].bool()
    else:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        enc = load_hf_model(AutoModel, path, "text encoder").eval().to(device)  # safetensors only
        hs, keep = [], []
        for i in range(0, len(texts), batch_size):
            b = tok(list(texts[i : i + batch_size]), padding="max_length", max_length=max_tokens, truncation=True,
                    return_tensors="pt").to(device)
            hs.append(enc(**b).last_hidden_state.float().cpu())
            keep.append(b["attention_mask"].bool().cpu())
        h, keep = torch.cat(hs), torch.cat(keep)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            save_file({"states": h.contiguous(), "keep": keep.to(torch.uint8)}, str(cache))
    if pool > 1:
        h, keep = pool_states(h, keep, pool)
    if basis is None:
        flat = h[keep].double()
        mean = flat.mean(0)
        cov = (flat - mean).T @ (flat - mean) / max(1, len(flat) - 1)
        comps = torch.linalg.eigh(cov)[1][:, -dim:].flip(-1)  # eigh: ascending eigenvalues
        basis = {"mean": mean.float(), "components": comps.float(), "std": ((flat - mean) @ comps).std(0).float()}
    z = ((h - basis["mean"]) @ basis["components"]) / basis["std"]
    return z * keep[..., None], basis


# ---- what the task exports -----------------------------------------------------------------------------
@dataclass
class JointGeneration(BaseOutput):
    """``texts``: the generated part of each row decoded up to EOS (or the compressor's decoding of the
    latents); ``sequences``: ``[B, P + L]`` prompt + tokens (None in continuous mode); ``latents``: the
    generated latents ``[B, M, C]`` (None in discrete mode)."""

    texts: list[str]
    sequences: torch.Tensor | None = None
    latents: torch.Tensor | None = None


class JointGenerator:
    """The joint task's export: a backbone, the character tokenizer, the latent scheduler and what maps text
    to latents (the MiniLM basis) or latents to text (the compressor), with ``joint.json`` saying how the
    sequence is laid out.

    ```python
    gen = JointGenerator.from_pretrained("runs/latent_joint/pipeline")
    gen(questions=["4+5*2"], steps=4, generator=torch.Generator().manual_seed(0)).texts     # ["13"]
    gen(num_samples=8, steps=4, temperature=1.0, order="random").texts                    # equation target
    ```
    """

    def __init__(self, model, tokenizer, settings: dict, scheduler=None, compressor=None, basis=None):
        self.model, self.tokenizer, self.settings = model, tokenizer, dict(settings)
        self.scheduler, self.compressor, self.basis = scheduler, compressor, basis
        self.diffusion = GaussianDiffusion(**settings["diffusion"]) if settings.get("diffusion") else None

    @property
    def mode(self) -> str:
        return self.settings["mode"]

    def encode_questions(self, questions) -> torch.Tensor:
        s = self.settings
        return encode_fixed(self.tokenizer, [q + s["question_suffix"] for q in questions], s["question_length"],
                            self.tokenizer.pad_token_id, left=True)

    @torch.no_grad()
    def encode_latents(self, texts) -> torch.Tensor:
        """Clean latents of texts, as the model was trained with (e.g. the oracle diagnostic)."""
        if self.basis is not None:
            s = self.settings
            pool = s.get("latent_pool", 1)  # folders saved before pooling existed hold one slot per token
            tokens = s.get("latent_tokens", s["latent_shape"][0] * pool)
            return minilm_latents(texts, s["latent_shape"][1], tokens, self.basis, s.get("encoder_path"),
                                  self.model.device, pool=pool)[0].to(self.model.device)
        if self.compressor is not None:
            return self.compressor.encode_text(list(texts))
        raise ValueError("this generator holds neither a MiniLM basis nor a compressor")

    @torch.no_grad()
    def __call__(self, questions=None, num_samples: int | None = None, steps: int | None = None,
                 generator: torch.Generator | None = None, temperature: float = 0.0, order: str = "confidence",
                 latents: torch.Tensor | None = None, clean_latents: torch.Tensor | None = None,
                 token_schedule: str = "linear", latent_stream: str | None = None) -> JointGeneration:
        """Answers to ``questions`` (answer / cot targets), or ``num_samples`` texts (equation target).
        ``steps``: sampling steps (default one token a step); ``latents``: the latent stream's initial noise;
        ``clean_latents``: decode the tokens next to these clean latents (noise level 0) instead;
        ``token_schedule``: ``linear`` or ``aligned`` (joint mode: tokens committed along the latent noise
        levels, :func:`latent.joint.aligned_transfer_schedule`).

        ``latent_stream`` (joint mode): ``joint`` denoises the latents beside the tokens; ``noise`` leaves them
        at pure noise, at the stream's pure-noise level, and decodes the tokens alone (the rows that
        ``objective.latent_dropout`` trains): the latent stream then serves training only, and a step costs
        what the discrete mode's does plus the latent slots; ``latents`` in the output is None. Default: the
        folder's ``latent_stream`` setting (the recipe's ``eval.latent_stream``), else ``joint``."""
        latent_stream = latent_stream or self.settings.get("latent_stream") or "joint"
        if latent_stream not in ("joint", "noise"):
            raise ValueError(f"latent_stream={latent_stream!r}; use 'joint' (denoise the latents with the tokens) "
                             "or 'noise' (leave them at pure noise)")
        s, dev = self.settings, self.model.device
        L = s["target_length"]
        steps = steps or L
        if s["target"] == "equation":
            if num_samples is None:
                raise ValueError("this generator makes whole equations: pass num_samples, not questions")
            prompt = torch.zeros(num_samples, 0, dtype=torch.long)
        else:
            if questions is None:
                raise ValueError("pass questions (a list of str)")
            prompt = self.encode_questions(list(questions))
        prompt, B = prompt.to(dev), prompt.shape[0]
        shape = tuple(s["latent_shape"]) if s.get("latent_shape") else None
        if self.mode == "continuous":
            def denoise(x, t):
                return self.model(latents=x, timestep=t.expand(x.shape[0])).latent_pred

            lat = sample_latents(denoise, self.scheduler, shape=(B, *shape), num_inference_steps=steps,
                                 diffusion=self.diffusion, latents=latents, generator=generator, device=dev)
            return JointGeneration(texts=self.compressor.decode_text(lat), latents=lat)
        model, kw, fixed = self.model, {}, None  # fixed: (latents, level) the latent stream is held at
        if clean_latents is not None:
            fixed = clean_latents.to(dev), torch.zeros(len(clean_latents), device=dev)
        elif self.mode == "joint" and latent_stream == "noise":
            noise = latents if latents is not None else torch.randn((B, *shape), generator=generator)
            fixed = noise.to(dev), self.diffusion.model_time(torch.full((B,), pure_noise_timestep(self.diffusion))).to(dev)
        elif self.mode == "joint":
            kw = dict(latent_shape=shape, diffusion=self.diffusion, scheduler=self.scheduler, latents=latents,
                      token_schedule=token_schedule)
        if fixed is not None:
            def model(ids, **_):
                return self.model(ids, latents=fixed[0], timestep=fixed[1])
        out = joint_sample(model, prompt, L, self.tokenizer.mask_token_id, steps, temperature=temperature,
                           order=order, generator=generator, **kw)
        P = prompt.shape[1]
        texts = [decode_answer(self.tokenizer, r[P:].tolist()) for r in out.sequences]
        return JointGeneration(texts=texts, sequences=out.sequences.cpu(), latents=out.latents)

    def save_pretrained(self, folder) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(folder / "model"))
        self.tokenizer.save_pretrained(str(folder / "tokenizer"))
        settings = dict(self.settings)
        if self.scheduler is not None:
            self.scheduler.save_pretrained(str(folder / "scheduler"))
            settings["scheduler_class"] = type(self.scheduler).__name__
        if self.compressor is not None:
            self.compressor.save_pretrained(str(folder / "compressor"))
        if self.basis is not None:
            save_file({k: v.contiguous() for k, v in self.basis.items()}, str(folder / "latent_basis.safetensors"))
        (folder / "joint.json").write_text(json.dumps(settings, indent=2))

    @classmethod
    def from_pretrained(cls, folder) -> JointGenerator:
        import diffusers
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        from latent.backbone import DiffusionTransformer

        folder = Path(folder)
        if not (folder / "joint.json").is_file():
            raise FileNotFoundError(f"{str(folder)!r} holds no joint.json: not a folder the joint task exported")
        settings = json.loads((folder / "joint.json").read_text())
        scheduler = compressor = basis = None
        name = settings.pop("scheduler_class", None)
        if name:
            scheduler = getattr(diffusers, name).from_pretrained(str(folder / "scheduler"))
        if (folder / "compressor").is_dir():
            from autoencoders.compressor import TextCompressor

            compressor = TextCompressor.from_pretrained(folder / "compressor").eval()
        if (folder / "latent_basis.safetensors").is_file():
            basis = load_file(str(folder / "latent_basis.safetensors"))
        model = DiffusionTransformer.from_pretrained(str(folder / "model")).eval()
        tok = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
        return cls(model, tok, settings, scheduler, compressor, basis)


def answer_scores(generate, problems, target: str, batch_size: int = 200, **kw) -> tuple[dict, list[str]]:
    """Accuracy per difficulty (and ``"all"``) of ``generate(questions=..., generator=...)`` on problems, in
    batches seeded by their first row; returns ``(accuracy, generated texts)``."""
    texts = []
    for i in range(0, len(problems), batch_size):
        out = generate(questions=[p.question for p in problems[i : i + batch_size]],
                       generator=torch.Generator().manual_seed(i), **kw)
        texts += out.texts
    return accuracy_by_difficulty(problems, [answer_of(t, target) for t in texts]), texts


def equation_scores(generate, n: int, batch_size: int = 100, **kw) -> tuple[dict, list[str]]:
    """Fraction of ``n`` samples that are true equations, and of distinct samples."""
    texts = []
    for i in range(0, n, batch_size):
        texts += generate(num_samples=min(batch_size, n - i), generator=torch.Generator().manual_seed(i), **kw).texts
    return {"valid": sum(map(is_true_equation, texts)) / n, "distinct": len(set(texts)) / n}, texts


# ---- the task ---------------------------------------------------------------------------------------------
@register_task("joint")
class JointTask(Task):
    sections = {"data": JointData, "objective": JointObjective, "latents": JointLatents,
                "compressor": PretrainedRef, "eval": JointEval}
    free_sections = ("model",)
    aliases = {"backbone": ["model.*"]}
    metric_fields = ("ce", "mse")
    eval_fields = ("acc", "acc_d1", "acc_d2", "acc_d3", "acc_d4", "valid", "distinct")
    defaults = {"trainer": {"batch_size": 64}}
    # the discrete mode leaves the latent stream's parameters unused (and the continuous one the tokens')
    may_skip_parameters = True

    @classmethod
    def check_config(cls, cfg):
        check_data(cfg)
        check_sampling_eval(cfg)
        choose(cfg, "objective.mode", MODES)
        choose(cfg, "data.target", TARGETS)
        choose(cfg, "latents.source", ("minilm", "compressor"))
        choose(cfg, "eval.latent_stream", ("joint", "noise"))
        mode, target = cfg.objective.mode, cfg.data.target
        if cfg.objective.lam < 0:
            raise ConfigError(f"objective.lam must be >= 0, got {cfg.objective.lam}")
        choose(cfg, "objective.time_coupling", ("independent", "shared"))
        for key in ("latent_dropout", "self_latents"):
            if not 0.0 <= cfg.objective[key] <= 1.0:
                raise ConfigError(f"objective.{key} must be in [0, 1], got {cfg.objective[key]}")
        if mode == "continuous" and (target != "equation" or cfg.latents.source != "compressor"):
            raise ConfigError("objective.mode=continuous generates whole texts from latents: it needs "
                              f"data.target=equation and latents.source=compressor (got {target!r}, "
                              f"{cfg.latents.source!r})")
        if cfg.eval.samples < 1:
            raise ConfigError(f"eval.samples must be >= 1, got {cfg.eval.samples}")
        if int(cfg.latents.pool) < 1:
            raise ConfigError(f"latents.pool must be >= 1 (1: one latent slot per MiniLM token), got {cfg.latents.pool}")
        if int(cfg.latents.pool) > 1 and cfg.latents.source != "minilm":
            raise ConfigError("latents.pool pools MiniLM token states: it needs latents.source=minilm "
                              f"(got {cfg.latents.source!r})")

    # ---- what a subclass changes ------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self.cfg.objective.mode

    def layout(self) -> Layout:
        d = self.cfg.data
        return Layout(d.target, d.question_length, d.target_length, d.question_suffix)

    # ---- build ----------------------------------------------------------------------------------
    def build(self):
        cfg = self.cfg
        self.tokenizer = tok = make_tokenizer()
        model = backbone_from_config(cfg.model, tok)  # built first: its initial weights depend on run.seed only
        self.lay = lay = self.layout()
        self.train_set, test = arithmetic_split(cfg)
        self.eval_set = spread(test, cfg.eval.problems)
        self.ids = self.encode(self.train_set)
        obj = cfg.objective
        self.schedule, self.eps = obj.get("schedule", "linear"), obj.get("eps", 1e-3)
        self.diffusion = GaussianDiffusion(obj.prediction_type)
        if self.mode != "discrete" and not model.config.latent_dim:
            raise ConfigError(f"model.latent_dim must be > 0: the {self.mode} mode trains the latent stream")
        self.basis = self.compressor = None
        self.latents = None if self.mode == "discrete" else self.build_latents(model)
        n = lay.prompt_length + lay.target_length
        if n > model.config.max_position_embeddings:
            raise ConfigError(f"the sequence has {n} tokens but model.max_position_embeddings="
                              f"{model.config.max_position_embeddings}")
        return {"model": model}

    def encode(self, problems) -> torch.Tensor:
        """Token ids ``[n, P + L]`` of problems: the left-padded prompt, then the EOS-padded target."""
        lay, tok = self.lay, self.tokenizer
        try:
            prompt = (encode_fixed(tok, [p.question + lay.question_suffix for p in problems], lay.question_length,
                                   tok.pad_token_id, left=True) if lay.prompt_length else
                      torch.zeros(len(problems), 0, dtype=torch.long))
        except ValueError as err:
            raise ConfigError(f"{lay.keys[0]}={lay.question_length} is too short: {err}") from None
        try:
            target = encode_fixed(tok, [target_text(p, lay.target) for p in problems], lay.target_length,
                                  tok.eos_token_id, eos=True)
        except ValueError as err:
            raise ConfigError(f"{lay.keys[1]}={lay.target_length} is too short: {err}") from None
        return torch.cat([prompt, target], 1)

    def build_latents(self, model) -> torch.Tensor:
        """Clean latents ``[n, M, C]`` of the training problems (frozen encoders: computed once)."""
        cfg, C = self.cfg, model.config.latent_dim
        texts = [equation_text(p) for p in self.train_set]
        if cfg.latents.source == "minilm":
            z, self.basis = minilm_latents(texts, C, cfg.latents.tokens, encoder_path=cfg.latents.encoder_path,
                                           device=self.ctx.device, cache_dir=cfg.latents.get("cache_dir"),
                                           pool=int(cfg.latents.pool))
            return z
        from autoencoders.compressor import TextCompressor

        folder = pretrained_folder(cfg.compressor, "compressor", "TextCompressor", self.ctx.is_main)
        self.compressor = comp = TextCompressor.from_pretrained(folder).eval().to(self.ctx.device)
        if comp.config.latent_dim != C:
            raise ConfigError(f"model.latent_dim={C} but the compressor in {str(folder)!r} makes "
                              f"{comp.config.latent_dim}-channel latents")
        return torch.cat([comp.encode_text(texts[i : i + 256]).cpu() for i in range(0, len(texts), 256)])

    # ---- steps ----------------------------------------------------------------------------------
    def batch(self, step, stage):
        B = stage.batch_size or self.cfg.trainer.batch_size
        g = step_generator(self.ctx.seed, step)
        return self.draw(g, torch.randint(0, len(self.ids), (B,), generator=g))

    def draw(self, g: torch.Generator, idx: torch.Tensor) -> dict:
        """The rows ``idx`` and every random number their loss uses (see latent.training.task)."""
        B, N = len(idx), self.ids.shape[1]
        out = {"ids": self.ids[idx]}
        if self.mode != "continuous":
            out.update(t=sample_times(B, g), noise=torch.rand(B, N, generator=g))
        if self.mode != "discrete":
            z = self.latents[idx]
            out.update(latents=z, timesteps=self.diffusion.sample_timesteps(B, g),
                       latent_noise=torch.randn(z.shape, generator=g))
            obj = self.cfg.objective
            if self.mode == "joint" and obj.get("time_coupling", "independent") == "shared":
                out["timesteps"] = shared_timesteps(self.diffusion, out["t"]).to(out["timesteps"].dtype)
            p = obj.get("latent_dropout", 0.0) if self.mode == "joint" else 0.0
            if p > 0:  # drawn last, so the other numbers stay those of a run without dropout
                drop = torch.rand(B, generator=g) < p
                noise_only = torch.full_like(out["timesteps"], pure_noise_timestep(self.diffusion))
                out["timesteps"] = torch.where(drop, noise_only, out["timesteps"])
            p = obj.get("self_latents", 0.0) if self.mode == "joint" else 0.0
            if p > 0:
                out["self_latent_rows"] = torch.rand(B, generator=g) < p
        return out

    def loss(self, modules, batch, stage):
        model, dev = modules.model, self.ctx.device
        b = {k: v.to(dev) for k, v in batch.items()}
        ids = b["ids"]
        B, N = ids.shape
        P = self.lay.prompt_length
        if self.mode == "continuous":
            out = self.diffusion.loss(model, b["latents"], timesteps=b["timesteps"], noise=b["latent_noise"])
            return StepLoss(out.loss, {"mse": out.loss.item()})
        common = dict(schedule=self.schedule, eps=self.eps, t=b["t"], noise=b["noise"])
        if self.mode == "discrete":
            out = sft_loss(model, ids, self.tokenizer.mask_token_id, prompt_lengths=torch.full((B,), P, device=dev),
                           **common)
            return StepLoss(out.loss, {"ce": out.loss.item()})
        prompt = (torch.arange(N, device=dev) < P).expand(B, N)
        out = joint_loss(model, ids, b["latents"], self.tokenizer.mask_token_id, self.diffusion,
                         lam=self.cfg.objective.lam, prompt_mask=prompt, timesteps=b["timesteps"],
                         latent_noise=b["latent_noise"], self_latent_rows=b.get("self_latent_rows"), **common)
        return StepLoss(out.loss, {"ce": out.ce.item(), "mse": out.mse.item()})

    # ---- evaluation and export --------------------------------------------------------------------
    def settings(self, model) -> dict:
        lay, mc = self.lay, model.config
        joint = self.mode != "discrete"
        z = self.latents
        return {"mode": self.mode, "target": lay.target, "question_length": lay.question_length,
                "target_length": lay.target_length, "question_suffix": lay.question_suffix,
                "latent_shape": [int(z.shape[1]), int(mc.latent_dim)] if joint else None,
                "latent_source": OmegaConf.select(self.cfg, "latents.source") if joint else None,
                "encoder_path": OmegaConf.select(self.cfg, "latents.encoder_path"),
                # subclasses (the latent-reasoning task) have no latents section nor eval.latent_stream
                "latent_tokens": OmegaConf.select(self.cfg, "latents.tokens"),
                "latent_pool": int(OmegaConf.select(self.cfg, "latents.pool", default=1)),
                "latent_stream": OmegaConf.select(self.cfg, "eval.latent_stream", default="joint") if joint else None,
                "diffusion": self.diffusion.config() if joint else None}

    def generator(self, modules) -> JointGenerator:
        """The export, over the live modules."""
        joint = self.mode != "discrete"
        sched = self.diffusion.make_scheduler(self.cfg.eval.scheduler) if joint else None
        return JointGenerator(modules.model, self.tokenizer, self.settings(modules.model), scheduler=sched,
                              compressor=self.compressor if self.mode == "continuous" else None, basis=self.basis)

    def evaluate(self, modules, step):
        ec = self.cfg.eval
        gen = self.generator(modules)
        kw = dict(steps=ec.steps, temperature=ec.temperature, order=ec.order)
        if self.lay.target == "equation":
            return equation_scores(gen, ec.samples, ec.batch_size, **kw)[0]
        acc = answer_scores(gen, self.eval_set, self.lay.target, ec.batch_size, **kw)[0]
        return {"acc": acc["all"], **{f"acc_d{d}": v for d, v in acc.items() if d != "all"}}

    def export(self, modules, folder, stage):
        self.generator(modules).save_pretrained(folder)
        write_training(folder, self.registered_name, self.cfg)

"""Text latent autoencoders on the arithmetic task's text: the TextCompressor and the ThoughtVAE.

    python train.py configs/latent_compressor.yaml                    # c = 4; model.compression=8 for c = 8
    python train.py configs/latent_thought_vae.yaml

Data: the problems of :mod:`latent.data.arithmetic`, generated on the fly from ``data`` (nothing to build
first). The compressor (``task: compressor``, :class:`autoencoders.compressor.TextCompressor`) learns the
``question=answer`` texts and the single steps, from the frozen encoder's states computed once; its loss is
the module's own (reconstruction + alignment, with latent-noise and token-masking augmentations). The thought
VAE (``task: thought_vae``, :class:`autoencoders.thought_vae.ThoughtVAE`) learns single reasoning steps
(``"9*2=18"``) with CE + beta KL. Evaluation: token reconstruction accuracy on held-out texts (compressor: at
each ``eval.noise_levels`` standard deviation of latent noise; VAE: with z = mu and z ~ q, exact-match rate
and KL). Export: ``<run>/pipeline`` is the autoencoder folder (``TextCompressor.from_pretrained`` /
``ThoughtVAE.from_pretrained`` load it) with ``training.json``; the VAE's also holds its character tokenizer
(``tokenizer/``) and the ``scaling_factor`` fitted on the training steps.

Other tasks use these exports through a :class:`PretrainedRef` section (a path, and the recipe that trains
the model there when the path holds none yet): see :func:`pretrained_folder`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from latent.data.arithmetic import encode_fixed, equation_text, make_tokenizer, split
from latent.training.config import ConfigError
from latent.training.task import StepLoss, Task, register_task, step_generator

__all__ = ["ArithmeticData", "PretrainedRef", "arithmetic_split", "check_data", "pretrained_folder", "saved_class",
           "write_training", "CompressorTask", "ThoughtVAETask", "compressor_texts", "compressor_accuracy",
           "thought_vae_metrics"]

REPO = Path(__file__).resolve().parents[2]


@dataclass
class ArithmeticData:
    n_train: int = 3000  # generated training problems
    n_test: int = 200  # held-out problems (chains of 2+ operations never seen in training)
    difficulties: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # operations per problem
    seed: int = 0


@dataclass
class PretrainedRef:
    """A model another recipe trains: its run folder (or export folder), and the recipe that trains it
    there when the folder holds none yet."""

    path: str | None = None
    recipe: str | None = None  # null: the folder must exist
    overrides: list[str] = field(default_factory=list)  # for the recipe, e.g. [trainer.max_steps=600]


def check_data(cfg) -> None:
    d = cfg.data
    if d.n_train < 1:
        raise ConfigError(f"data.n_train must be >= 1, got {d.n_train}")
    if not d.difficulties or any(not 1 <= x <= 8 for x in d.difficulties):
        raise ConfigError(f"data.difficulties must be operation counts in 1..8, got {list(d.difficulties)}")
    if d.n_test < len(d.difficulties):
        raise ConfigError(f"data.n_test={d.n_test} must be >= the number of difficulties ({len(d.difficulties)})")


def arithmetic_split(cfg):
    """(train, test) problems of a config's ``data`` section."""
    d = cfg.data
    return split(d.n_train, d.n_test, tuple(d.difficulties), d.seed)


def saved_class(folder) -> str | None:
    """The ``_class_name`` of the model saved in ``folder`` (diffusers config.json), or None."""
    f = Path(folder) / "config.json"
    if not f.is_file() or not any(Path(folder).glob("*.safetensors")):
        return None
    return json.loads(f.read_text()).get("_class_name")


def _run_recipe(recipe: str, output_dir: Path, overrides, key: str) -> None:
    path = Path(recipe)
    if not path.is_file() and (REPO / recipe).is_file():
        path = REPO / recipe
    if not path.is_file():
        raise ConfigError(f"{key}.recipe={recipe!r} not found")
    # A child process: this run's RNG, threads and accelerator state stay its own, and under torchrun the
    # child is one plain process (the distributed variables are not passed on).
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                        "MASTER_ADDR", "MASTER_PORT") and not k.startswith("TORCHELASTIC")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, str(REPO / "train.py"), str(path), *map(str, overrides), f"run.output_dir={output_dir}"]
    print(f"[{key}] training it first: {' '.join(cmd[1:])}", flush=True)
    if subprocess.run(cmd, env=env).returncode != 0:
        raise RuntimeError(f"{key}.recipe={recipe!r} failed (command: {' '.join(cmd[1:])})")


def pretrained_folder(ref, key: str, class_name: str, train_here: bool = True) -> Path:
    """The folder holding the ``class_name`` model of a :class:`PretrainedRef` section ``key``: ``path``
    itself or its ``pipeline/`` export (a run folder). When neither holds it and ``recipe`` is set (and
    ``train_here``: the main process), the recipe trains it into ``path`` first."""
    if not ref.path:
        raise ConfigError(f"{key}.path is not set: give the run folder of a trained {class_name}")
    base = Path(ref.path)

    def found():
        return next((d for d in (base, base / "pipeline") if saved_class(d) == class_name), None)

    if found() is None and ref.recipe and train_here:
        _run_recipe(ref.recipe, base, ref.overrides or [], key)
    folder = found()
    if folder is None:
        hint = f"; set {key}.recipe to a recipe that trains it there" if not ref.recipe else ""
        raise FileNotFoundError(f"{key}.path={ref.path!r} holds no saved {class_name} (looked in it and its "
                                f"pipeline/){hint}")
    return folder


def write_training(folder: Path, task: str, cfg) -> None:
    (folder / "training.json").write_text(json.dumps({"task": task, "config": OmegaConf.to_container(cfg)},
                                                     indent=2))


class _AutoencoderTask(Task):
    """What the two autoencoder tasks share: the arithmetic split, rows drawn by the step's generator."""

    @classmethod
    def check_config(cls, cfg):
        check_data(cfg)

    def _rows(self, step, stage) -> tuple[torch.Generator, torch.Tensor]:
        B = stage.batch_size or self.cfg.trainer.batch_size
        g = step_generator(self.ctx.seed, step)
        return g, torch.randint(0, self.n_rows, (B,), generator=g)

    def export_module(self, module, folder: Path) -> None:
        module.save_pretrained(str(folder))
        write_training(folder, self.registered_name, self.cfg)


# ---- TextCompressor ---------------------------------------------------------------------------------------
@dataclass
class CompressorModel:
    encoder_path: str | None = None  # the frozen encoder's local folder; null: the installed MiniLM
    max_length: int = 16  # tokens per text; latents = max_length / compression
    compression: int = 4
    latent_dim: int = 32
    hidden_size: int = 128
    num_layers: int = 2
    decoder_layers: int = 2
    num_heads: int = 4
    latent_noise: float = 0.3  # training augmentation: latent noise level drawn per row in [0, latent_noise]
    token_mask_prob: float = 0.1  # training augmentation: encoder input tokens hidden
    align_weight: float = 0.5
    domain_vocab: bool = False  # the decoder emits only the encoder tokens of the training texts (cheap softmax)


@dataclass
class CompressorEval:
    noise_levels: list[float] = field(default_factory=lambda: [0.0, 0.3, 0.6])  # latent noise std at evaluation
    batch_size: int = 64


def compressor_texts(problems) -> list[str]:
    """The compressor's texts: every ``question=answer`` equation, then every single step."""
    return [equation_text(p) for p in problems] + [s for p in problems for s in p.steps]


def _domain_vocab(tokenizer, texts, max_length) -> list[int]:
    ids = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length)["input_ids"]
    return sorted({i for row in ids for i in row} | set(tokenizer.all_special_ids))


@torch.no_grad()
def _encoder_states(model, ids, am, device, chunk: int = 256) -> torch.Tensor:
    model.to(device)
    return torch.cat([model.encoder_states(ids[i : i + chunk].to(device), am[i : i + chunk].to(device)).cpu()
                      for i in range(0, len(ids), chunk)])


@torch.no_grad()
def compressor_accuracy(model, texts, noise_levels, batch_size: int = 64, seed: int = 0, states=None) -> dict:
    """Token reconstruction accuracy of held-out ``texts`` at each latent-noise level (no token masking)."""
    was = model.training
    model.eval()
    b = model.tokenize(texts)
    ids, am = b["input_ids"], b["attention_mask"]
    if states is None:
        states = _encoder_states(model, ids, am, model.queries.device)
    res = {}
    for s in noise_levels:
        hits = 0.0
        for i in range(0, len(ids), batch_size):
            o = model.loss(ids[i : i + batch_size], am[i : i + batch_size], latent_noise=s, token_mask_prob=0.0,
                           generator=torch.Generator().manual_seed(seed + i), states=states[i : i + batch_size])
            hits += o.accuracy * len(ids[i : i + batch_size])
        res[float(s)] = hits / len(ids)
    model.train(was)
    return res


@register_task("compressor")
class CompressorTask(_AutoencoderTask):
    sections = {"data": ArithmeticData, "model": CompressorModel, "eval": CompressorEval}
    aliases = {"decoder": ["compressor.decoder.*", "compressor.to_word.*", "compressor.word_bias"]}
    metric_fields = ("ce", "align", "acc")
    eval_fields = ("acc_noise_0", "acc_noise_0.3", "acc_noise_0.6")
    defaults = {"trainer": {"batch_size": 32}}

    @classmethod
    def check_config(cls, cfg):
        super().check_config(cfg)
        m = cfg.model
        if m.compression < 1 or m.max_length % m.compression:
            raise ConfigError(f"model.max_length={m.max_length} must be a multiple of model.compression={m.compression}")

    def build(self):
        from transformers import AutoTokenizer

        from autoencoders.compressor import TextCompressor, default_encoder_path

        m = dict(self.cfg.model)
        domain = m.pop("domain_vocab")
        train, test = arithmetic_split(self.cfg)
        texts = compressor_texts(train)
        self.test_texts = compressor_texts(test)[: self.cfg.data.n_test]
        vocab = None
        if domain:
            tk = AutoTokenizer.from_pretrained(m["encoder_path"] or default_encoder_path(), local_files_only=True)
            vocab = _domain_vocab(tk, texts, m["max_length"])
        model = TextCompressor(**m, output_vocab=vocab)
        b = model.tokenize(texts)
        self.ids, self.am = b["input_ids"], b["attention_mask"]
        self.n_rows = len(texts)
        # the encoder is frozen: its states of the training texts are computed once
        self.states = _encoder_states(model, self.ids, self.am, self.ctx.device)
        bt = model.tokenize(self.test_texts)
        self.test_states = _encoder_states(model, bt["input_ids"], bt["attention_mask"], self.ctx.device)
        return {"compressor": model}

    def batch(self, step, stage):
        g, idx = self._rows(step, stage)
        m, B = self.cfg.model, len(idx)
        M = m.max_length // m.compression
        return {"ids": self.ids[idx], "mask": self.am[idx], "states": self.states[idx],
                "token_noise": torch.rand(B, m.max_length, generator=g), "level_noise": torch.rand(B, generator=g),
                "latent_noise": torch.randn(B, M, m.latent_dim, generator=g)}

    def loss(self, modules, batch, stage):
        b = {k: v.to(self.ctx.device) for k, v in batch.items()}
        out = modules.compressor.loss(b["ids"], b["mask"], states=b["states"],
                                      noise=(b["token_noise"], b["level_noise"], b["latent_noise"]))
        return StepLoss(out.loss, {"ce": out.ce.item(), "align": out.align.item(), "acc": out.accuracy})

    def evaluate(self, modules, step):
        ec = self.cfg.eval
        acc = compressor_accuracy(modules.compressor, self.test_texts, ec.noise_levels, ec.batch_size,
                                  states=self.test_states)
        return {f"acc_noise_{s:g}": v for s, v in acc.items()}

    def export(self, modules, folder, stage):
        self.export_module(modules.compressor, folder)


# ---- ThoughtVAE -------------------------------------------------------------------------------------------
@dataclass
class ThoughtVAEModel:
    max_length: int = 10  # characters of one step, EOS included
    num_latents: int = 4  # thought tokens per step
    latent_dim: int = 16
    hidden_size: int = 96
    num_layers: int = 2
    num_heads: int = 4
    beta: float = 1.0e-3  # KL weight


@torch.no_grad()
def thought_vae_metrics(vae, ids, seed: int = 1) -> dict:
    """Reconstruction of step ids with z = mu and with z ~ q: token accuracy, exact-match rate, KL."""
    o = vae.loss(ids, sample=False)
    o_s = vae.loss(ids, sample=True, generator=torch.Generator().manual_seed(seed))
    return {"acc": o.accuracy, "exact": o.exact, "kl": float(o.kl), "acc_sampled": o_s.accuracy,
            "exact_sampled": o_s.exact}


@register_task("thought_vae")
class ThoughtVAETask(_AutoencoderTask):
    sections = {"data": ArithmeticData, "model": ThoughtVAEModel}
    metric_fields = ("ce", "kl", "acc")
    eval_fields = ("acc", "exact", "kl", "acc_sampled", "exact_sampled")
    defaults = {"trainer": {"batch_size": 64}}

    def build(self):
        from autoencoders.thought_vae import ThoughtVAE

        m = self.cfg.model
        self.tokenizer = tok = make_tokenizer()
        train, test = arithmetic_split(self.cfg)

        def encode(problems, part):
            try:
                return encode_fixed(tok, [s for p in problems for s in p.steps], m.max_length, tok.pad_token_id,
                                    eos=True)
            except ValueError as err:
                raise ConfigError(f"model.max_length={m.max_length} is too short for the {part} steps: {err}") from None

        self.ids, self.test_ids = encode(train, "training"), encode(test, "test")
        self.n_rows = len(self.ids)
        vae = ThoughtVAE(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **m)
        return {"thought_vae": vae}

    def batch(self, step, stage):
        g, idx = self._rows(step, stage)
        m = self.cfg.model
        return {"ids": self.ids[idx], "noise": torch.randn(len(idx), m.num_latents, m.latent_dim, generator=g)}

    def loss(self, modules, batch, stage):
        dev = self.ctx.device
        out = modules.thought_vae.loss(batch["ids"].to(dev), noise=batch["noise"].to(dev))
        return StepLoss(out.loss, {"ce": out.ce.item(), "kl": out.kl.item(), "acc": out.accuracy})

    def evaluate(self, modules, step):
        return thought_vae_metrics(modules.thought_vae, self.test_ids)

    def export(self, modules, folder, stage):
        vae = modules.thought_vae
        vae.fit_scaling_factor(self.ids.to(vae.pos.device))  # unit-scale diffusion latents; not a weight
        self.export_module(vae, folder)
        self.tokenizer.save_pretrained(str(folder / "tokenizer"))

"""Training recipes: OmegaConf YAML + dot-list overrides, checked against a typed schema.

``load_config("configs/text_tiny.yaml", ["trainer.max_steps=200", "model.hidden_size=256"])`` merges,
in order: the defaults below, the model preset named by ``model.preset`` (``configs/model/<preset>.yaml``
next to the recipe, or in the repository's ``configs/model``), the recipe, then the overrides. A key
that does not exist raises :class:`ConfigError` naming the close matches; a value of the wrong type
raises too. The ``model`` section takes the keyword arguments of the registered model builder
(``model.name``, see :mod:`latent.training.models`) plus ``name``, ``preset`` and ``init_from``.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = ["ConfigError", "TrainConfig", "load_config", "save_config", "flat_keys", "REPO_CONFIGS"]

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MODEL_RESERVED = ("name", "preset", "init_from")


class ConfigError(ValueError):
    pass


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs/${run.name}"
    seed: int = 0


@dataclass
class DataConfig:
    format: str = "text"  # text: packed documents | sft: prompt/answer pairs
    corpus: str | None = "english"  # built-in corpus built into corpus_dir when the files are not given
    corpus_dir: str = "data/english"
    corpus_max_docs: int | None = None  # cap per source (quick builds)
    train_files: list[str] | None = None  # txt/jsonl; null = the built-in corpus's split
    valid_files: list[str] | None = None
    text_key: str = "text"
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    seq_len: int = 128


@dataclass
class TokenizerConfig:
    path: str | None = None  # tokenizer.json or a local HF tokenizer folder; null = train one
    train_dir: str = "${data.corpus_dir}/tokenizer-bpe${tokenizer.vocab_size}"
    vocab_size: int = 4096
    train_max_chars: int = 5_000_000


@dataclass
class ObjectiveConfig:
    name: str = "mdm"  # mdm | sft | block_diffusion | causal
    schedule: str = "linear"
    eps: float = 1e-3
    low_discrepancy: bool = True
    per_block_t: bool = True  # block_diffusion: one time per block


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    grad_clip: float = 1.0  # 0 disables
    freeze: list[str] = field(default_factory=list)  # glob patterns of parameter names kept frozen


@dataclass
class TrainerConfig:
    max_steps: int = 200
    batch_size: int = 16  # sequences per optimizer step, all ranks and accumulation steps together
    grad_accum: int = 1
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, else no) | no | bf16 | fp16
    device: str = "auto"  # auto | cpu
    threads: int = 0  # CPU threads for torch (0: torch's default); 1 is fastest for tiny models on a busy CPU
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the start and the end
    eval_at_start: bool = True
    save_every: int = 100  # 0: only the final checkpoint
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto (newest complete checkpoint in output_dir) | never | a checkpoint path
    stop_at_step: int | None = None  # stop (and checkpoint) early without changing the LR schedule
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True


@dataclass
class EvalConfig:
    valid_sequences: int = 64
    batch_size: int = 16
    elbo_samples: int = 8
    final: bool = True
    num_samples: int = 4  # text samples printed and saved at the end (0 disables)
    sample_length: int = 64
    sample_steps: int = 64
    sample_block_length: int = 32
    temperature: float = 0.0
    prompts: list[str] = field(default_factory=lambda: ["The", "A man", "What does \"love\" mean?", "To be"])


@dataclass
class TrainConfig:
    task: str = "text"  # other tasks (e.g. caption) are dispatched by train.py to their own loop
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: dict[str, Any] = field(default_factory=lambda: {"name": "diffusion_transformer"})
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def flat_keys(cfg, prefix: str = "") -> list[str]:
    """Dotted keys of the leaves (a dict value that is itself a dict is walked)."""
    out = []
    items = cfg.items_ex(resolve=False) if isinstance(cfg, DictConfig) else cfg.items()
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, (dict, DictConfig)):
            sub = flat_keys(v, key + ".")
            out.extend(sub if sub else [key])
        else:
            out.append(key)
    return out


def _valid_keys(model_name: str) -> list[str]:
    from latent.training.models import model_parameters

    schema = OmegaConf.structured(TrainConfig)
    keys = [k for k in flat_keys(schema) if not k.startswith("model.")]
    keys += [f"model.{p}" for p in (*MODEL_RESERVED, *model_parameters(model_name))]
    return keys


def _check_keys(user: DictConfig, model_name: str) -> None:
    valid = _valid_keys(model_name)
    valid_set = set(valid)
    sections = {k.split(".")[0] for k in valid}
    unknown = []
    for key in flat_keys(user):
        if key in valid_set:
            continue
        # a dict-valued leaf such as model.rope_scaling={type: ntk} is fine when its parent is valid
        if any(key.startswith(v + ".") for v in valid_set):
            continue
        unknown.append(key)
    if unknown:
        lines = []
        for key in unknown:
            near = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
            if not near and key.split(".")[0] not in sections:
                near = difflib.get_close_matches(key.split(".")[0], sorted(sections), n=2)
            hint = f" -- did you mean {', '.join(near)}?" if near else ""
            lines.append(f"  {key}{hint}")
        raise ConfigError("unknown config key(s):\n" + "\n".join(lines))


def _find_preset(preset: str, recipe_dir: Path | None) -> Path:
    cands = []
    p = Path(preset)
    if p.suffix in (".yaml", ".yml"):
        cands.append(p)
    for base in [recipe_dir, REPO_CONFIGS]:
        if base is not None:
            cands.append(base / "model" / f"{preset}.yaml")
    for c in cands:
        if c.is_file():
            return c
    known = sorted(f.stem for f in (REPO_CONFIGS / "model").glob("*.yaml")) if (REPO_CONFIGS / "model").is_dir() else []
    near = difflib.get_close_matches(preset, known, n=3)
    hint = f"; did you mean {', '.join(near)}?" if near else f" (known presets: {', '.join(known)})"
    raise ConfigError(f"model preset {preset!r} not found{hint}")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()) -> DictConfig:
    """Build the resolved training config. See the module docstring."""
    parts = []
    recipe_dir = None
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        recipe_dir = path.parent
        try:
            recipe = OmegaConf.load(path)
        except Exception as err:  # yaml errors come in many types
            raise ConfigError(f"cannot parse {path}: {err}") from err
        if not isinstance(recipe, DictConfig):
            raise ConfigError(f"{path} must hold a mapping of sections (run, data, model, ...)")
        parts.append(recipe)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got: {' '.join(bad)}")
    try:
        parts.append(OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {err}") from err
    user = OmegaConf.merge(*parts) if parts else OmegaConf.create({})
    model = user.get("model") or {}
    model_name = model.get("name", "diffusion_transformer")
    from latent.training.models import check_model_name

    check_model_name(model_name)
    preset_name = model.get("preset")
    preset = OmegaConf.create({})
    if preset_name:
        preset_cfg = OmegaConf.load(_find_preset(str(preset_name), recipe_dir))
        preset = OmegaConf.create({"model": preset_cfg})
    _check_keys(OmegaConf.merge(preset, user), model_name)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), preset, user)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid config value: {err}") from err
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))  # plain, resolved, mutable
    _check_values(cfg)
    return cfg


_CHOICES = {
    "task": ("text",),
    "data.format": ("text", "sft"),
    "objective.name": ("mdm", "sft", "block_diffusion", "causal"),
    "trainer.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "trainer.device": ("auto", "cpu"),
}


def _check_values(cfg: DictConfig) -> None:
    for key, choices in _CHOICES.items():
        v = OmegaConf.select(cfg, key)
        if v not in choices:
            raise ConfigError(f"{key}={v!r} is not one of {', '.join(choices)}")
    for key in ("trainer.max_steps", "trainer.batch_size", "trainer.grad_accum", "data.seq_len",
                "eval.elbo_samples", "eval.batch_size"):
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {OmegaConf.select(cfg, key)}")
    if (cfg.objective.name == "sft") != (cfg.data.format == "sft"):
        raise ConfigError(
            f"objective.name={cfg.objective.name!r} needs data.format="
            f"{'sft' if cfg.objective.name == 'sft' else 'text'!r} (got {cfg.data.format!r})"
        )


def save_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(OmegaConf.to_yaml(cfg))
    os.replace(tmp, path)


def to_container(cfg) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg

"""Recipes: OmegaConf YAML + dot-list overrides, checked against one schema for every task.

``load_config("configs/text_tiny.yaml", ["trainer.max_steps=200", "model.hidden_size=256"])`` merges, in
order: the common sections below (``run``, ``trainer``, ``optim``, ``stages``), the task's own sections and
defaults (the task is the recipe's ``task:`` key, ``text`` when absent), the model preset named by
``model.preset`` (``configs/model/<preset>.yaml`` next to the recipe or in the repository's ``configs/model``),
the recipe, then the overrides. The same things have the same names in every recipe: ``trainer.max_steps``,
``trainer.save_every``, ``trainer.log_every``, ``trainer.resume``, ``run.output_dir``, ``run.seed``,
``stages:``. A key that does not exist raises :class:`ConfigError` naming the close matches; a value of the
wrong type raises too.

Stages: a recipe without ``stages`` has one stage of ``trainer.max_steps`` steps that trains everything
but ``optim.freeze``. With ``stages``, each stage sets its own ``steps`` and ``trainer.max_steps`` is their
sum (setting another value is an error).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from latent.training.errors import ConfigError

__all__ = ["ConfigError", "load_config", "save_config", "flat_keys", "REPO_CONFIGS", "task_of",
           "RunConfig", "TrainerConfig", "OptimConfig"]

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs/${run.name}"
    seed: int = 0


@dataclass
class TrainerConfig:
    max_steps: int = 200  # with stages: their sum
    batch_size: int = 16  # rows per optimizer step, all processes and accumulation steps together
    grad_accum: int = 1
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, else no) | no | bf16 | fp16
    device: str = "auto"  # auto | cpu
    threads: int = 0  # CPU threads for torch (0: torch's default); 1 is fastest for tiny models on a busy CPU
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the start and the end
    eval_at_start: bool = True
    save_every: int = 100  # 0: checkpoints only at stage ends and the end
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto (newest complete checkpoint in output_dir) | never | a checkpoint path
    stop_at_step: int | None = None  # stop (and checkpoint) early without changing the LR schedule
    time_limit_minutes: float | None = None  # stop, checkpoint and export what was trained; rerun to go on
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the end of each stage
    grad_clip: float = 1.0  # 0 disables
    freeze: list[str] = field(default_factory=list)  # glob patterns of parameter names frozen in every stage


COMMON = {"run": RunConfig, "trainer": TrainerConfig, "optim": OptimConfig}
_CHOICES = {
    "trainer.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "trainer.device": ("auto", "cpu"),
}
_POSITIVE = ("trainer.max_steps", "trainer.batch_size", "trainer.grad_accum", "trainer.log_every")
_NON_NEGATIVE = ("trainer.save_every", "trainer.eval_every", "trainer.keep_checkpoints", "trainer.threads",
                 "optim.warmup_steps", "optim.lr", "optim.weight_decay", "optim.grad_clip")


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


def _near(key: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    if not near:
        near = difflib.get_close_matches(key.split(".")[-1], [v.split(".")[-1] for v in valid], n=3, cutoff=0.7)
        near = [v for v in valid if v.split(".")[-1] in near][:3]
    return f" -- did you mean {', '.join(near)}?" if near else ""


def task_of(recipe) -> str:
    return str(recipe.get("task", "text")) if isinstance(recipe, (dict, DictConfig)) else "text"


def _task_class(name: str):
    from latent.registry import UnknownNameError
    from latent.training.task import TASKS

    try:
        return TASKS.get(name)
    except UnknownNameError as err:
        hint = "" if TASKS.names() else "; import pipelines.tasks first (it registers the built-in tasks)"
        raise ConfigError(f"task={name!r}: {err}{hint}") from None


def _schema(task) -> DictConfig:
    parts = {"task": task.registered_name}
    for name, cls in {**COMMON, **task.sections}.items():
        parts[name] = OmegaConf.structured(cls)
    for name in task.free_sections:
        parts.setdefault(name, {})
    parts["stages"] = []
    schema = OmegaConf.create(parts)
    if task.defaults:
        schema = OmegaConf.merge(schema, OmegaConf.create(task.defaults))
    return schema


def _stage_keys(task) -> list[str]:
    return [f.name for f in fields(task.stage_class)]


def _check_keys(task, schema: DictConfig, user: DictConfig, label: str) -> None:
    valid = [k for k in flat_keys(schema) if k.split(".")[0] not in (*task.free_sections, "stages")]
    sections = sorted(set([k.split(".")[0] for k in valid] + list(task.free_sections) + ["stages", "task"]))
    unknown = []
    for section in user.keys():
        section = str(section)
        if section not in sections:
            unknown.append(f"  {section}{_near(section, sections)}")
            continue
        value = user[section]
        if section == "stages":
            unknown += _check_stages(task, value)
        elif section in task.free_sections:
            allowed = task.section_keys(section, OmegaConf.to_container(value) if value is not None else {})
            if allowed is not None and isinstance(value, DictConfig):
                full = [f"{section}.{k}" for k in allowed]
                for key in value.keys():
                    if str(key) not in allowed:
                        unknown.append(f"  {section}.{key}{_near(f'{section}.{key}', full)}")
        elif isinstance(value, DictConfig):
            for key in flat_keys(value, section + "."):
                if key not in valid and not any(key.startswith(v + ".") for v in valid):
                    unknown.append(f"  {key}{_near(key, valid)}")
    if unknown:
        raise ConfigError(f"unknown config key(s) in {label} (task {task.registered_name!r}):\n" + "\n".join(unknown))


def _check_stages(task, stages) -> list[str]:
    if stages is None:
        return []
    if isinstance(stages, DictConfig):  # an override such as stages.1.steps=0 before it meets the list
        items = [(str(k), v) for k, v in stages.items()]
    elif isinstance(stages, ListConfig):
        items = [(str(i), v) for i, v in enumerate(stages)]
    else:
        return [f"  stages must be a list of stages, got {type(stages).__name__}"]
    keys, bad = _stage_keys(task), []
    for i, st in items:
        if not isinstance(st, DictConfig):
            bad.append(f"  stages.{i} must be a mapping (name, steps, lr, train, ...)")
            continue
        for key in st.keys():
            if str(key) not in keys:
                bad.append(f"  stages.{i}.{key}{_near(str(key), keys)}")
    return bad


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
    model_dir = REPO_CONFIGS / "model"
    known = sorted(f.stem for f in model_dir.glob("*.yaml")) if model_dir.is_dir() else []
    near = difflib.get_close_matches(preset, known, n=3)
    hint = f"; did you mean {', '.join(near)}?" if near else f" (known presets: {', '.join(known)})"
    raise ConfigError(f"model.preset={preset!r} not found{hint}")


def _parse_overrides(overrides) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        key, sep, raw = str(item).partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. trainer.max_steps=200")
        try:
            value = OmegaConf.from_dotlist([f"v={raw}"]).v  # parsed like any dot-list value
        except OmegaConfBaseException as err:
            raise ConfigError(f"cannot parse override {item!r}: {err}") from err
        out.append((key, value))
    return out


def _as_nested(pairs) -> DictConfig:
    nested = OmegaConf.create({})
    for key, value in pairs:
        OmegaConf.update(nested, key, value, force_add=True)
    return nested


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple = (),
                task: str | None = None) -> DictConfig:
    """The resolved config of a recipe (see the module docstring). ``task`` names it when ``path`` is None."""
    recipe, recipe_dir = OmegaConf.create({}), None
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
            raise ConfigError(f"{path} must hold a mapping of sections (task, run, trainer, ...)")
    pairs = _parse_overrides(overrides)
    over = dict(pairs)
    name = str(over.get("task", task or task_of(recipe)))
    task_cls = _task_class(name)
    schema = _schema(task_cls)
    _check_keys(task_cls, schema, recipe, str(path) if path is not None else "the recipe")
    _check_keys(task_cls, schema, _as_nested(pairs), "the overrides")

    preset = OmegaConf.create({})
    preset_name = over.get("model.preset", OmegaConf.select(recipe, "model.preset"))
    if preset_name:
        preset = OmegaConf.create({"model": OmegaConf.load(_find_preset(str(preset_name), recipe_dir))})
    try:
        cfg = OmegaConf.merge(schema, preset, recipe)
        for key, value in pairs:  # update (not merge) so that stages.1.steps=0 reaches into the list
            OmegaConf.update(cfg, key, value, force_add=key.split(".")[0] in (*task_cls.free_sections, "stages"))
        cfg.task = name
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid config value: {err}") from err
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))  # plain, resolved, mutable
    _resolve_stages(task_cls, cfg, recipe, over)
    _check_values(cfg)
    task_cls.check_config(cfg)
    return cfg


def _resolve_stages(task_cls, cfg: DictConfig, recipe: DictConfig, over: dict) -> None:
    stage_schema = OmegaConf.structured(task_cls.stage_class)
    given = list(cfg.stages or [])
    user_max = over.get("trainer.max_steps", OmegaConf.select(recipe, "trainer.max_steps"))
    if not given:
        given = [{"name": "main", "steps": int(cfg.trainer.max_steps)}]
    stages = []
    for i, st in enumerate(given):
        try:
            merged = OmegaConf.merge(stage_schema, st)
        except OmegaConfBaseException as err:
            raise ConfigError(f"stages.{i}: {err}") from err
        stages.append(OmegaConf.to_container(merged))
    names = [s["name"] for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"stage names must be unique (they name the exported pipelines), got {names}")
    for i, s in enumerate(stages):
        if not isinstance(s["steps"], int) or s["steps"] < 0:
            raise ConfigError(f"stages.{i}.steps ({s['name']}) must be an int >= 0, got {s['steps']!r}")
        if not s["train"]:
            raise ConfigError(f"stages.{i}.train ({s['name']}) is empty; list what the stage trains, e.g. ['*']")
    total = sum(s["steps"] for s in stages)
    if cfg.stages and user_max is not None and int(user_max) != total:
        raise ConfigError(
            f"trainer.max_steps={user_max} but the stages' steps add up to {total}; with stages, set each "
            "stage's steps (e.g. stages.0.steps=100) and leave trainer.max_steps out"
        )
    if total < 1:
        raise ConfigError("the run has no step to train: every stage has steps: 0")
    cfg.stages = stages
    cfg.trainer.max_steps = total


def _check_values(cfg: DictConfig) -> None:
    for key, choices in _CHOICES.items():
        v = OmegaConf.select(cfg, key)
        if v not in choices:
            raise ConfigError(f"{key}={v!r} is not one of {', '.join(choices)}")
    for key in _POSITIVE:
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {OmegaConf.select(cfg, key)}")
    for key in _NON_NEGATIVE:
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {OmegaConf.select(cfg, key)}")
    limit = cfg.trainer.time_limit_minutes
    if limit is not None and not limit > 0:
        raise ConfigError(f"trainer.time_limit_minutes must be > 0 or null, got {limit}")


def save_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(OmegaConf.to_yaml(cfg))
    os.replace(tmp, path)


def to_container(cfg) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg

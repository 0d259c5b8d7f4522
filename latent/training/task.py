"""What a task tells the trainer: how to build its modules, give batches, compute the loss, evaluate and export.

The trainer (:mod:`latent.training.trainer`) owns the loop, the optimizer, stages, checkpoints, logs and
distribution; a task owns everything that is specific to one kind of model. A task is a class registered
by name, selected by the recipe's ``task:`` key::

    @register_task("toy")
    class ToyTask(Task):
        sections = {"data": ToyData}                # typed config sections of this task (dataclasses)
        free_sections = ("model", "adapter")         # sections whose keys section_keys() names
        aliases = {"adapter": ["adapter.*"], "backbone": ["model.*"]}   # stage train/freeze shorthands

        def build(self):                             # modules with weights, by name
            return {"adapter": ..., "model": ...}

        def batch(self, step, stage):                # the global batch of a step, randomness included
            ...

        def loss(self, modules, batch, stage):       # StepLoss(loss, metrics)
            ...

        def export(self, modules, folder, stage):    # a pipeline folder users load
            ...

Exactness rules the trainer relies on: ``batch(step, stage)`` is a function of the step (and the task's
``state_dict``), and it draws every random number of the step for the whole global batch (noise levels,
mask draws, augmentation), so that the rows a process takes (``split``) give the same loss as the same rows
in one process, and a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import abc
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from latent.registry import Registry

__all__ = ["Task", "TaskContext", "StepLoss", "Stage", "TASKS", "register_task", "split_batch", "step_generator"]

TASKS = Registry("task")


def register_task(name: str, *aliases: str):
    """Class decorator: make a :class:`Task` selectable with ``task: name`` in a recipe."""
    return TASKS.register(name, *aliases)


@dataclass
class Stage:
    """One stage of a recipe: what it trains, for how long, at which learning rate.

    ``train`` and ``freeze`` are glob patterns over parameter names (``model.*``, ``adapter.projector.*``) or
    the task's aliases for them; a parameter is trained when it matches ``train`` and not ``freeze`` (nor the
    recipe-wide ``optim.freeze``). ``init_from`` loads weights from another run's output before the stage."""

    name: str = "main"
    steps: int = 0
    lr: float | None = None  # None: optim.lr
    warmup_steps: int | None = None  # None: optim.warmup_steps
    batch_size: int | None = None  # None: trainer.batch_size
    train: list[str] = field(default_factory=lambda: ["*"])
    freeze: list[str] = field(default_factory=list)
    init_from: str | None = None


@dataclass
class StepLoss:
    """What a task's loss returns: the scalar to minimise and numbers to log (floats, per micro-batch)."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TaskContext:
    """What the trainer tells a task about the run."""

    cfg: Any  # the resolved config (plain OmegaConf DictConfig)
    run_dir: Path
    device: torch.device
    seed: int
    rank: int = 0
    world_size: int = 1
    is_main: bool = True
    progress: bool = True
    autocast: Any = None  # a context-manager factory (mixed precision)
    reduce: Any = None  # reduce(tensor, "sum" | "mean") across processes (identity in one process)
    log: Any = print


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """The generator of one training step: a function of (seed, step), the same in every process."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) * 7 + int(salt))


def split_batch(batch: Any, rows: slice) -> Any:
    """Rows ``rows`` of a batch: tensors and lists are sliced along their first dimension, mappings and
    tuples recursively, objects with ``select(index)`` (``AudioBatch``, ``DrivingInputs``) through it; other
    values (numbers, strings, None) are shared by every row and passed through."""
    if isinstance(batch, torch.Tensor):
        return batch[rows] if batch.ndim else batch
    if isinstance(batch, dict):
        return {k: split_batch(v, rows) for k, v in batch.items()}
    if isinstance(batch, list):
        return batch[rows]
    if isinstance(batch, tuple):
        return tuple(split_batch(v, rows) for v in batch)
    if hasattr(batch, "select"):
        return batch.select(torch.arange(rows.start, rows.stop))
    return batch


class Task(abc.ABC):
    """Base of every task; see the module docstring. Subclasses override the hooks they need."""

    registered_name: ClassVar[str] = ""
    sections: ClassVar[dict[str, type]] = {}  # config section -> dataclass of its keys and defaults
    free_sections: ClassVar[tuple[str, ...]] = ()  # sections checked by section_keys
    stage_class: ClassVar[type] = Stage
    aliases: ClassVar[dict[str, list[str]]] = {}  # stage pattern shorthands ("!glob" subtracts)
    defaults: ClassVar[dict] = {}  # overrides of the common sections' defaults (e.g. trainer.batch_size)
    metric_fields: ClassVar[tuple[str, ...]] = ()  # StepLoss.metrics keys logged in train.csv
    eval_fields: ClassVar[tuple[str, ...]] = ()  # evaluate() keys logged in eval.csv
    # Trainable parameters a step may leave unused (e.g. a stage mixing tasks that skip a module): DDP
    # then has to look for them (find_unused_parameters), which costs a little time per step.
    may_skip_parameters: ClassVar[bool] = False
    # init_from: module name -> the component folder of this task's exported pipeline that holds it
    # (e.g. {"model": "model", "adapter": "vision_adapter"}), and whether a checkpoint may hold a subset
    # of the modules (a run of an earlier stage without a head this one adds).
    pipeline_components: ClassVar[dict[str, str]] = {}
    init_partial: ClassVar[bool] = False

    def __init__(self, ctx: TaskContext):
        self.ctx = ctx
        self.cfg = ctx.cfg

    # ---- config ---------------------------------------------------------------------------------
    @classmethod
    def section_keys(cls, section: str, user: dict) -> list[str] | None:
        """The keys a free section accepts (None: any). ``user`` is what the recipe wrote there. A ``model``
        section takes the registered model builder's arguments (``model.name``) and name/preset/init_from."""
        if section == "model":
            from latent.training.models import model_section_keys

            return model_section_keys(user)
        return None

    @classmethod
    def check_config(cls, cfg) -> None:
        """Value checks beyond types, raising ConfigError naming the field (after the merge)."""
        return None  # optional hook: none by default

    # ---- hooks the trainer calls ----------------------------------------------------------------
    @abc.abstractmethod
    def build(self) -> dict[str, torch.nn.Module]:
        """Read or build the data and return the modules with weights, by name (called once per process,
        the main process first, so it may build data files the others then read)."""

    @abc.abstractmethod
    def batch(self, step: int, stage) -> Any:
        """The global batch of global step ``step`` (see the module docstring)."""

    def split(self, batch: Any, rows: slice) -> Any:
        """The rows of ``batch`` one process takes in one micro-step."""
        return split_batch(batch, rows)

    @abc.abstractmethod
    def loss(self, modules, batch, stage) -> StepLoss:
        """The loss of one micro-batch (a StepLoss: the tensor to backpropagate and logged metrics)."""

    def count(self, batch: Any) -> int:
        """Units processed by a step (logged as ``samples``): rows by default, tokens for text."""
        first = next((v for v in (batch.values() if isinstance(batch, dict) else [batch])
                      if isinstance(v, torch.Tensor) and v.ndim), None)
        return int(first.shape[0]) if first is not None else 0

    def evaluate(self, modules, step: int) -> dict:
        """Numbers for eval.csv (every process calls it; the keys are ``eval_fields``). Default: nothing."""
        return {}

    def export(self, modules, folder: Path, stage) -> None:
        """Write what users load (a pipeline folder) into ``folder``, a fresh temporary folder that the
        trainer renames into place. Called on the main process only."""
        return None  # optional hook: a task without an export writes only checkpoints

    def after_export(self, folder: Path) -> dict:
        """Optional work on the exported folder once it is in place (e.g. samples); main process only."""
        return {}

    def init_from(self, modules, path: str, stage) -> None:
        """Load weights from another run's output before ``stage``: a pipeline folder this task exported
        (component by component, see ``pipeline_components``), else a run folder of this trainer (its newest
        checkpoint) or a checkpoint folder, whose weights are loaded by name (all of them unless
        ``init_partial``)."""
        from latent.training.checkpoint import (
            load_module_weights,
            load_pipeline_components,
            resolve_checkpoint,
        )

        what = f"stages[{stage.name}].init_from"
        components = self.pipeline_components
        if components and any((Path(path) / sub).is_dir() for sub in components.values()):
            load_pipeline_components(modules, path, components, what)
        else:
            load_module_weights(resolve_checkpoint(path), modules, what=what, strict=not self.init_partial)

    def state_dict(self) -> dict:
        """Data position etc. saved in checkpoints (tensors, numbers, strings, lists, dicts)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None  # optional hook: nothing saved, nothing to restore

    def close(self) -> None:
        """Release files or workers at the end of a run."""
        return None  # optional hook

    # ---- stages ---------------------------------------------------------------------------------
    def trainable(self, modules: torch.nn.Module, stage, frozen_everywhere=()) -> list[str]:
        """Set requires_grad for ``stage`` and return the trained parameter names (frozen ones never enter
        the optimizer). Unknown patterns raise, naming what parameter names look like."""
        names = [n for n, _ in modules.named_parameters()]
        train = self._expand(stage.train, names, f"stages[{stage.name}].train")
        frozen = self._expand([*stage.freeze, *frozen_everywhere], names, f"stages[{stage.name}].freeze")
        chosen = []
        for name, p in modules.named_parameters():
            on = name in train and name not in frozen
            p.requires_grad_(on)
            if on:
                chosen.append(name)
        if not chosen:
            raise ValueError(f"stage {stage.name!r} trains no parameter (train={list(stage.train)}, "
                             f"freeze={list(stage.freeze) + list(frozen_everywhere)})")
        return chosen

    def _expand(self, patterns, names: list[str], what: str) -> set[str]:
        out: set[str] = set()
        for pat in patterns:
            globs = self.aliases.get(pat, [pat])
            plus = [g for g in globs if not g.startswith("!")]
            minus = [g[1:] for g in globs if g.startswith("!")]
            hit = {n for n in names if any(fnmatch.fnmatchcase(n, g) for g in plus)
                   and not any(fnmatch.fnmatchcase(n, g) for g in minus)}
            if not hit:
                known = ", ".join(sorted(self.aliases)) or "none"
                some = ", ".join(names[:5])
                raise ValueError(f"{what}: {pat!r} matches no parameter (aliases: {known}; parameter names look "
                                 f"like {some}, ...)")
            out |= hit
        return out

    def train_mode(self, modules: torch.nn.Module) -> None:
        """Train mode for a step; a top-level module with nothing to train stays in eval mode (dropout and
        batch-norm statistics of frozen parts stay fixed)."""
        modules.train()
        for child in modules.children():
            params = list(child.parameters())
            if params and not any(p.requires_grad for p in params):
                child.eval()

"""Training tasks: one file of task logic per kind of model, driven by the one trainer (latent.training).

Importing this package registers the built-in tasks; a recipe selects one with ``task: <name>``:

| task | file | trains |
|---|---|---|
| text | text.py | masked-diffusion pre-training, SFT, block diffusion, the autoregressive baseline |

A new task is a :class:`latent.training.task.Task` subclass decorated with ``@register_task("name")``.
"""

import importlib

from latent.training.config import ConfigError, load_config
from latent.training.task import TASKS, StepLoss, Task, register_task
from latent.training.trainer import Trainer, TrainResult, train

__all__ = ["BUILTIN", "ConfigError", "StepLoss", "TASKS", "Task", "TrainResult", "Trainer", "load_config",
           "register_task", "train"]

BUILTIN = ("text", "caption", "spoken_qa", "driving")

for _name in BUILTIN:
    importlib.import_module(f"pipelines.tasks.{_name}")

"""Training tasks: one file of task logic per kind of model, driven by the one trainer (latent.training).

Importing this package announces the built-in tasks (each module is imported when its task is first used,
so one task's dependencies never slow down or break another's); a recipe selects one with ``task: <name>``:

| task | file | trains |
|---|---|---|
| text | text.py | masked-diffusion pre-training, SFT, block diffusion, the autoregressive baseline |
| copy | copy.py | the decoding benchmark's verifiable copy task, for every layout (AR peer included); its key-value and passkey retrieval variants (long context) |
| caption | caption.py | a vision adapter (and optionally trunk and backbone) on image-caption pairs |
| spoken_qa | spoken_qa.py | speech adapters on a masked-diffusion backbone, DIFFA-style stages |
| driving | driving.py | the sensor adapter and planner on highway-env demonstrations (diffusion or AR) |
| compressor, thought_vae | autoencoders.py | the TextCompressor and the ThoughtVAE on arithmetic text |
| joint | joint.py | CCDD tokens + latents in one forward, or either stream alone (arithmetic) |
| latent_reasoning | latent_reasoning.py | latent thought blocks then the answer, or the answer / CoT baselines |
| commit_filter | commit_filter.py | Learn2PD's commit filter on a copy pipeline's decoding trajectories |
| block_predictor | block_predictor.py | a learned sub-block size for dynamic blocks (CtrlDiff), on the same trajectories |
| certainty_forcing | certainty_forcing.py | dParallel's certainty-forcing self-distillation of a copy pipeline |
| rl | rl.py | RL with verifiable rewards (GRPO on ELBO or trajectory likelihoods) from a trained policy |

A new task is a :class:`latent.training.task.Task` subclass decorated with ``@register_task("name")``.
"""

from latent.training.config import ConfigError, load_config
from latent.training.task import TASKS, StepLoss, Task, register_task
from latent.training.trainer import Trainer, TrainResult, train

__all__ = ["BUILTIN", "ConfigError", "StepLoss", "TASKS", "Task", "TrainResult", "Trainer", "load_config",
           "register_task", "train"]

# task name -> the module that registers it
BUILTIN = {
    "text": "text", "copy": "copy", "caption": "caption", "spoken_qa": "spoken_qa", "driving": "driving",
    "compressor": "autoencoders", "thought_vae": "autoencoders", "joint": "joint",
    "latent_reasoning": "latent_reasoning", "rl": "rl",
    "commit_filter": "commit_filter", "block_predictor": "block_predictor", "certainty_forcing": "certainty_forcing",
}

for _task, _module in BUILTIN.items():
    if _task not in TASKS:
        TASKS.register_lazy(_task, f"pipelines.tasks.{_module}")

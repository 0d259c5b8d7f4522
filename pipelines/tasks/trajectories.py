"""A trained copy pipeline's own decoding trajectories: the data of the tasks that learn from how a model
decodes (``commit_filter``: Learn2PD's filter; ``certainty_forcing``: dParallel's distillation).

``load_copy_pipeline(path)`` reads what the copy task exports (``<run>/pipeline/model`` + ``task.json``).
``decode_trajectories`` runs the project's sampler with the schedule rule (semi-autoregressive blocks,
``steps`` forwards over the answer; by default one token per forward) and keeps, per row, the final tokens
and the forward that committed each one. Committed tokens never change there, so the canvas the model saw
at forward ``t`` is rebuilt exactly from them (``Trajectories.states``): the prompt, the final tokens
committed before ``t``, the mask elsewhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from latent.training.config import ConfigError

from .common import find_backbone_dir, load_backbone
from .copy import CopyData

__all__ = ["CopyPipeline", "Trajectories", "load_copy_pipeline", "decode_trajectories", "decode_scores", "model_device"]


def model_device(model) -> torch.device:
    """Where a model's weights are (CPU for a plain callable)."""
    return getattr(model, "device", torch.device("cpu"))


@dataclass
class CopyPipeline:
    model: torch.nn.Module  # the backbone, in eval mode
    data: CopyData  # the task settings it was trained with
    task: dict  # task.json as saved

    @property
    def mask_id(self) -> int:
        return self.data.symbols

    @property
    def block_length(self) -> int:
        """The decoding block the copy task evaluates with (copy.CopyTask.evaluate)."""
        if self.model.config.attention_layout == "block_causal":
            return self.model.config.block_size
        return self.data.prompt_length if self.data.kind == "copy" else self.data.answer_length


def load_copy_pipeline(path, what: str = "base.pipeline") -> CopyPipeline:
    """The backbone and task settings of a copy run or pipeline folder."""
    try:
        model_dir = find_backbone_dir(path)
    except FileNotFoundError as err:
        raise ConfigError(f"{what}: {err}; train one first, e.g. python train.py configs/copy_bidirectional.yaml") from None
    task_file = next((d / "task.json" for d in (model_dir.parent, Path(path), Path(path) / "pipeline")
                      if (d / "task.json").is_file()), None)
    if task_file is None:
        raise ConfigError(f"{what}={str(path)!r} has no task.json next to its model: it is not a copy pipeline")
    task = json.loads(task_file.read_text())
    if task.get("task") != "copy":
        raise ConfigError(f"{what}={str(path)!r} was trained by task {task.get('task')!r}; these tasks need a copy pipeline")
    data = CopyData(**{f.name: task[f.name] for f in fields(CopyData) if f.name in task})
    model = load_backbone(model_dir, layouts=("bidirectional", "block_causal"), what=what).eval()
    return CopyPipeline(model=model, data=data, task=task)


@dataclass
class Trajectories:
    prompts: torch.LongTensor  # [n, P]
    answers: torch.LongTensor  # [n, G] the task's correct answers
    final: torch.LongTensor  # [n, G] the decoder's answers
    commit_step: torch.LongTensor  # [n, G] the forward that committed each final token
    steps_per_block: int  # forwards of the schedule per block
    block_length: int
    mask_id: int

    @property
    def num_forwards(self) -> int:
        return int(self.commit_step.max()) + 1

    def block_of(self, t: torch.Tensor) -> torch.Tensor:
        """The block a forward decodes."""
        return t // self.steps_per_block

    def states(self, rows: torch.Tensor, t: torch.Tensor) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """The canvases [k, P + G] that forward t[i] of row rows[i] saw, and the loss region [k, G]: the
        positions of that forward's block still masked then."""
        seen = self.commit_step[rows] < t[:, None]
        gen = torch.where(seen, self.final[rows], self.mask_id)
        position = torch.arange(gen.shape[1])
        block = (position[None] // self.block_length) == self.block_of(t)[:, None]
        return torch.cat([self.prompts[rows], gen], 1), block & ~seen


@torch.no_grad()
def decode_trajectories(model, rows: torch.Tensor, prompt_length: int, block_length: int, mask_id: int,
                        steps: int | None = None, batch_size: int = 32) -> Trajectories:
    """Decode ``rows``' prompts with the schedule rule (``steps`` forwards over the answer, None: one token
    per forward) and keep what each forward committed."""
    from latent.sampling import Sampler

    rows = rows.to(model_device(model))
    prompts, answers = rows[:, :prompt_length], rows[:, prompt_length:]
    gen = answers.shape[1]
    sampler = Sampler(gen_length=gen, block_length=block_length, steps=steps or gen, mask_token_id=mask_id)
    final, when = [], []
    for lo in range(0, len(rows), batch_size):
        out = sampler(model, prompts[lo : lo + batch_size], record_trajectory=True)
        final.append(out.sequences[:, prompt_length:].cpu())
        when.append(out.trajectory.commit_step.cpu())
    return Trajectories(prompts=prompts.cpu(), answers=answers.cpu(), final=torch.cat(final),
                        commit_step=torch.cat(when), steps_per_block=sampler.config.steps_per_block,
                        block_length=block_length, mask_id=mask_id)


@torch.no_grad()
def decode_scores(model, rows: torch.Tensor, prompt_length: int, block_length: int, batch_size: int = 32,
                  **knobs) -> dict:
    """Decode ``rows``' prompts with the sampler (``knobs``: any SamplerConfig field) and score the answers:
    exact-match accuracy per token, mean forwards per sequence (the forwards each row took part in), model
    calls per batch, and the decoded answers [n, G]."""
    from latent.sampling import generate

    rows = rows.to(model_device(model))
    prompts, answers = rows[:, :prompt_length], rows[:, prompt_length:]
    decoded, steps, calls = [], [], []
    for lo in range(0, len(rows), batch_size):
        out = generate(model, prompts[lo : lo + batch_size], gen_length=answers.shape[1], block_length=block_length,
                       **knobs)
        decoded.append(out.sequences[:, prompt_length:].cpu())
        steps.append(out.steps.float().cpu())
        calls.append(out.nfe)
    decoded = torch.cat(decoded)
    return {"accuracy": float((decoded == answers.cpu()).float().mean()), "forwards_per_sequence": float(torch.cat(steps).mean()),
            "calls_per_batch": sum(calls) / len(calls), "answers": decoded}

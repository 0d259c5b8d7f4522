"""The copy task: a verifiable decoding benchmark. The prompt is a random sequence of ``data.prompt_length``
symbols and the answer repeats it up to ``data.answer_length`` tokens, so quality is exact-match accuracy.

    python train.py configs/copy_bidirectional.yaml      # SFT loss (LLaDA-style decoding, Fast-dLLM caches)
    python train.py configs/copy_block_causal.yaml       # BD3-LM loss (exact block cache)
    python train.py configs/copy_causal.yaml             # next-token loss: the autoregressive peer

Symbols are ids ``0 .. symbols-1`` and the mask id is ``symbols`` (no tokenizer). ``benchmarks/decoding.py``
trains its models with these recipes and compares decoders on them. The export is the backbone
(``<run>/pipeline/model``) and ``task.json`` with the task's settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from latent.losses import block_diffusion_loss, causal_lm_loss, sft_loss
from latent.schedules import sample_times
from latent.training.config import ConfigError
from latent.training.task import StepLoss, Task, register_task, step_generator

__all__ = ["CopyTask", "copy_batch", "copy_accuracy"]

OBJECTIVES = {"sft": "bidirectional", "block_diffusion": "block_causal", "causal": "causal"}


@dataclass
class CopyData:
    symbols: int = 48
    prompt_length: int = 32
    answer_length: int = 256
    eval_rows: int = 16  # held-out prompts for val_accuracy (greedy / threshold 0.9 decoding)


@dataclass
class CopyObjective:
    name: str = "sft"  # sft | block_diffusion | causal


def copy_batch(n: int, prompt_length: int, answer_length: int, symbols: int, generator: torch.Generator):
    """[n, prompt + answer] rows: a random prompt, then the prompt repeated."""
    p = torch.randint(0, symbols, (n, prompt_length), generator=generator)
    reps = -(-(prompt_length + answer_length) // prompt_length)
    return p.repeat(1, reps)[:, : prompt_length + answer_length]


@torch.no_grad()
def copy_accuracy(model, rows: torch.Tensor, prompt_length: int, block_length: int, **knobs) -> tuple[float, int]:
    """Exact-match accuracy of the answers decoded for ``rows``' prompts, and the forwards used."""
    from latent.sampling import autoregressive_generate, generate

    prompts, answer = rows[:, :prompt_length], rows[:, prompt_length:]
    if model.config.attention_layout == "causal":
        out = autoregressive_generate(model, prompts, answer.shape[1])
        return float((out.new_tokens == answer).float().mean()), out.nfe
    knobs = {"commit": "threshold", "threshold": 0.9, **knobs}
    out = generate(model, prompts, gen_length=answer.shape[1], block_length=block_length, **knobs)
    return float((out.sequences[:, prompt_length:] == answer).float().mean()), out.nfe


@register_task("copy")
class CopyTask(Task):
    sections = {"data": CopyData, "objective": CopyObjective}
    free_sections = ("model",)
    aliases = {"backbone": ["model.*"]}
    eval_fields = ("val_accuracy", "val_forwards")

    @classmethod
    def check_config(cls, cfg):
        name = cfg.objective.name
        if name not in OBJECTIVES:
            raise ConfigError(f"objective.name={name!r} is not one of {', '.join(OBJECTIVES)}")
        layout = cfg.model.get("attention_layout", "bidirectional")
        if layout != OBJECTIVES[name]:
            raise ConfigError(f"objective.name={name!r} trains model.attention_layout={OBJECTIVES[name]!r}, got {layout!r}")
        d = cfg.data
        if name == "block_diffusion" and d.prompt_length != cfg.model.get("block_size", 32):
            raise ConfigError(f"data.prompt_length ({d.prompt_length}) must equal model.block_size "
                              f"({cfg.model.get('block_size', 32)}): the prompt is the clean first block")
        for key in ("symbols", "prompt_length", "answer_length"):
            if d[key] < 1:
                raise ConfigError(f"data.{key} must be >= 1, got {d[key]}")

    def build(self):
        from latent.training.models import build_model

        d = self.cfg.data
        model = build_model({**dict(self.cfg.model), "vocab_size": d.symbols + 1, "mask_token_id": d.symbols,
                             "max_position_embeddings": self.cfg.model.get("max_position_embeddings")
                             or d.prompt_length + d.answer_length})
        self.mask_id = d.symbols
        self.eval_rows = copy_batch(d.eval_rows, d.prompt_length, d.answer_length, d.symbols,
                                    torch.Generator().manual_seed(10_007 + self.ctx.seed))
        return {"model": model}

    def batch(self, step, stage):
        d = self.cfg.data
        b = stage.batch_size or self.cfg.trainer.batch_size
        g = step_generator(self.ctx.seed, step)
        x = copy_batch(b, d.prompt_length, d.answer_length, d.symbols, g)
        name = self.cfg.objective.name
        if name == "block_diffusion":
            nb = -(-x.shape[1] // self.cfg.model.get("block_size", 32))
            t = sample_times(b * nb, g, True).view(b, nb)
        else:
            t = sample_times(b, g, True)
        return {"ids": x, "t": t, "noise": torch.rand(x.shape, generator=g)}

    def loss(self, modules, batch, stage):
        model, name, d = modules.model, self.cfg.objective.name, self.cfg.data
        x = batch["ids"]
        if name == "causal":
            return StepLoss(causal_lm_loss(model, x).loss)
        if name == "block_diffusion":
            out = block_diffusion_loss(model, x, self.mask_id, model.config.block_size, t=batch["t"], noise=batch["noise"])
        else:
            plens = torch.full((x.shape[0],), d.prompt_length)
            out = sft_loss(model, x, self.mask_id, prompt_lengths=plens, t=batch["t"], noise=batch["noise"])
        return StepLoss(out.loss)

    def evaluate(self, modules, step):
        model = modules.model
        block = model.config.block_size if model.config.attention_layout == "block_causal" else self.cfg.data.prompt_length
        acc, nfe = copy_accuracy(model, self.eval_rows.to(self.ctx.device), self.cfg.data.prompt_length, block)
        return {"val_accuracy": acc, "val_forwards": nfe}

    def export(self, modules, folder, stage):
        modules.model.save_pretrained(str(folder / "model"))
        (folder / "task.json").write_text(json.dumps({"task": "copy", **dict(self.cfg.data),
                                                      "objective": self.cfg.objective.name}, indent=2))

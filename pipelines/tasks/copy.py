"""The copy task: a verifiable decoding benchmark. The prompt is a random sequence of ``data.prompt_length``
symbols and the answer repeats it up to ``data.answer_length`` tokens, so quality is exact-match accuracy.

    python train.py configs/copy_bidirectional.yaml      # SFT loss (LLaDA-style decoding, Fast-dLLM caches)
    python train.py configs/copy_block_causal.yaml       # BD3-LM loss (exact block cache)
    python train.py configs/copy_causal.yaml             # next-token loss: the autoregressive peer
    python train.py configs/passkey_bidirectional.yaml   # passkey retrieval (experiments/long_context.py)

``data.kind: retrieval`` swaps the rows for key-value retrieval: the prompt lists (prompt_length -
answer_length) / 2 two-token slots of pairs (a key, its value; keys distinct within a row) and then
answer_length of the keys again; the answer is their values, in that order. Symbols are keys, then
``data.value_symbols`` values, then ``data.filler_symbols`` filler tokens; with filler, only the asked
pairs stand in the listing (needles in a haystack of filler). ``data.kind: passkey`` is passkey retrieval:
prompt_length - 1 tokens of filler holding one needle (a key, then answer_length values) at a random
offset, then the key again; the answer is the values (digit j from the j-th share of the value symbols).
A row's length is only its haystack, so the same
weights are evaluated on longer rows (experiments/long_context.py).

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

__all__ = ["CopyTask", "copy_batch", "copy_accuracy", "passkey_batch", "retrieval_batch", "task_rows"]

OBJECTIVES = {"sft": "bidirectional", "block_diffusion": "block_causal", "causal": "causal"}


@dataclass
class CopyData:
    symbols: int = 48
    prompt_length: int = 32
    answer_length: int = 256
    eval_rows: int = 16  # held-out prompts for val_accuracy (greedy / threshold 0.9 decoding)
    kind: str = "copy"  # copy | retrieval
    value_symbols: int = 16  # retrieval: symbols after the keys that are values
    filler_symbols: int = 0  # retrieval: the last symbols, filling every slot of the listing that is not asked
    # retrieval/passkey training: each step's prompts have a length drawn from [min_prompt_length, prompt_length]
    # (0: always prompt_length), so no one length is learnt; evaluation uses prompt_length
    min_prompt_length: int = 0


@dataclass
class CopyObjective:
    name: str = "sft"  # sft | block_diffusion | causal


def copy_batch(n: int, prompt_length: int, answer_length: int, symbols: int, generator: torch.Generator):
    """[n, prompt + answer] rows: a random prompt, then the prompt repeated."""
    p = torch.randint(0, symbols, (n, prompt_length), generator=generator)
    reps = -(-(prompt_length + answer_length) // prompt_length)
    return p.repeat(1, reps)[:, : prompt_length + answer_length]


def retrieval_batch(n: int, pairs: int, queries: int, symbols: int, values: int, generator: torch.Generator,
                    filler: int = 0):
    """[n, 2 * pairs + 2 * queries] rows: a listing of `pairs` two-token slots holding key/value pairs
    (distinct keys), then `queries` of those keys, then their values. With `filler` symbols, only the asked
    pairs stand in the listing (needles) and every other slot holds two filler tokens (the haystack).
    Symbols: keys first, then `values` values, then `filler` filler tokens."""
    keys = torch.rand(n, symbols - values - filler, generator=generator).argsort(1)[:, :pairs]
    vals = torch.randint(symbols - values - filler, symbols - filler, (n, pairs), generator=generator)
    asked = torch.rand(n, pairs, generator=generator).argsort(1)[:, :queries]
    listing = torch.stack([keys, vals], 2)
    if filler:
        hay = torch.ones(n, pairs, dtype=torch.bool).scatter(1, asked, False)
        noise = torch.randint(symbols - filler, symbols, (n, pairs, 2), generator=generator)
        listing = torch.where(hay[..., None], noise, listing)
    return torch.cat([listing.view(n, 2 * pairs), keys.gather(1, asked), vals.gather(1, asked)], 1)


def passkey_batch(n: int, length: int, digits: int, symbols: int, values: int, filler: int,
                  generator: torch.Generator) -> torch.Tensor:
    """[n, length + 1 + digits] rows: `length` tokens of filler in which a needle (a key, then `digits` values)
    stands at a random offset, then the key again, then the values (passkey retrieval). Digit j is one of the
    j-th `values / digits` value symbols, so each answer position knows which needle token it looks for and
    what is measured is only whether it finds it across the haystack."""
    hay = torch.randint(symbols - filler, symbols, (n, length), generator=generator)
    key = torch.randint(0, symbols - values - filler, (n, 1), generator=generator)
    per_digit = values // digits
    digits_ = (symbols - values - filler + per_digit * torch.arange(digits)
               + torch.randint(0, per_digit, (n, digits), generator=generator))
    offset = torch.randint(0, length - digits, (n, 1), generator=generator)
    at = torch.arange(length)[None] - offset  # position within the needle
    needle = torch.cat([key, digits_], 1)
    hay = torch.where((at >= 0) & (at <= digits), needle.gather(1, at.clamp(0, digits)), hay)
    return torch.cat([hay, key, digits_], 1)


def task_rows(data, n: int, generator: torch.Generator, prompt_length: int | None = None) -> torch.Tensor:
    """``n`` rows of the task ``data`` describes (copy, retrieval or passkey), with prompts of
    ``prompt_length`` tokens (default ``data.prompt_length``; retrieval rounds it down to whole pairs)."""
    prompt_length = data.prompt_length if prompt_length is None else prompt_length
    if data.kind == "passkey":
        return passkey_batch(n, prompt_length - 1, data.answer_length, data.symbols, data.value_symbols,
                             data.filler_symbols, generator)
    if data.kind == "retrieval":
        pairs = (prompt_length - data.answer_length) // 2
        return retrieval_batch(n, pairs, data.answer_length, data.symbols, data.value_symbols, generator,
                               data.filler_symbols)
    return copy_batch(n, data.prompt_length, data.answer_length, data.symbols, generator)


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
        if d.kind not in ("copy", "retrieval", "passkey"):
            raise ConfigError(f"data.kind={d.kind!r} is not one of copy, retrieval, passkey")
        if d.min_prompt_length and (d.kind == "copy" or not d.answer_length + 3 <= d.min_prompt_length <= d.prompt_length):
            raise ConfigError(f"data.min_prompt_length ({d.min_prompt_length}) varies retrieval and passkey prompts: it "
                              f"must lie in [answer_length + 3, prompt_length] (0: off)")
        if d.kind == "passkey" and (d.filler_symbols < 1 or d.value_symbols < d.answer_length
                                    or d.symbols - d.value_symbols - d.filler_symbols < 1
                                    or d.prompt_length < d.answer_length + 3):
            raise ConfigError("data.kind=passkey needs filler_symbols >= 1, value_symbols >= answer_length (each digit "
                              "has value_symbols // answer_length symbols), at least one key symbol (symbols - "
                              "value_symbols - filler_symbols) and prompt_length >= answer_length + 3")
        if d.kind == "retrieval":
            pairs, odd = divmod(d.prompt_length - d.answer_length, 2)
            keys = d.symbols - d.value_symbols - d.filler_symbols
            distinct = d.answer_length if d.filler_symbols else pairs  # keys that must differ within a row
            if odd or not d.answer_length <= pairs or distinct > keys or d.value_symbols < 1 or d.filler_symbols < 0:
                raise ConfigError(
                    f"data.kind=retrieval lists (prompt_length - answer_length) / 2 pairs and asks answer_length of "
                    f"them: prompt_length - answer_length ({d.prompt_length - d.answer_length}) must be even, "
                    f"answer_length <= pairs, value_symbols >= 1, and the {keys} key symbols (symbols - value_symbols "
                    f"- filler_symbols) must cover the {distinct} distinct keys of a row")

    def build(self):
        from latent.training.models import build_model

        d = self.cfg.data
        model = build_model({**dict(self.cfg.model), "vocab_size": d.symbols + 1, "mask_token_id": d.symbols,
                             "max_position_embeddings": self.cfg.model.get("max_position_embeddings")
                             or d.prompt_length + d.answer_length})
        self.mask_id = d.symbols
        self.eval_rows = task_rows(d, d.eval_rows, torch.Generator().manual_seed(10_007 + self.ctx.seed))
        return {"model": model}

    def batch(self, step, stage):
        d = self.cfg.data
        b = stage.batch_size or self.cfg.trainer.batch_size
        g = step_generator(self.ctx.seed, step)
        plen = d.prompt_length
        if d.min_prompt_length:
            plen = int(torch.randint(d.min_prompt_length, d.prompt_length + 1, (1,), generator=g))
        x = task_rows(d, b, g, plen)
        name = self.cfg.objective.name
        if name == "block_diffusion":
            nb = -(-x.shape[1] // self.cfg.model.get("block_size", 32))
            t = sample_times(b * nb, g, True).view(b, nb)
        else:
            t = sample_times(b, g, True)
        return {"ids": x, "t": t, "noise": torch.rand(x.shape, generator=g), "prompt_length": x.shape[1] - d.answer_length}

    def loss(self, modules, batch, stage):
        model, name = modules.model, self.cfg.objective.name
        x = batch["ids"]
        if name == "causal":
            return StepLoss(causal_lm_loss(model, x).loss)
        if name == "block_diffusion":
            out = block_diffusion_loss(model, x, self.mask_id, model.config.block_size, t=batch["t"], noise=batch["noise"])
        else:
            plens = torch.full((x.shape[0],), batch["prompt_length"])
            out = sft_loss(model, x, self.mask_id, prompt_lengths=plens, t=batch["t"], noise=batch["noise"])
        return StepLoss(out.loss)

    def evaluate(self, modules, step):
        model = modules.model
        d = self.cfg.data
        block = d.prompt_length if d.kind == "copy" else d.answer_length  # a retrieval answer is one block
        if model.config.attention_layout == "block_causal":
            block = model.config.block_size
        acc, nfe = copy_accuracy(model, self.eval_rows.to(self.ctx.device), self.cfg.data.prompt_length, block)
        return {"val_accuracy": acc, "val_forwards": nfe}

    def export(self, modules, folder, stage):
        modules.model.save_pretrained(str(folder / "model"))
        (folder / "task.json").write_text(json.dumps({"task": "copy", **dict(self.cfg.data),
                                                      "objective": self.cfg.objective.name}, indent=2))

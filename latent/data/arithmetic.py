"""A verifiable multi-step arithmetic task, generated on the fly, and its character tokenizer.

A problem is a left-to-right chain of operations on numbers in ``[0, MAX_VALUE]``::

    question  "4+5*2-5"          (evaluated left to right, every partial result stays in 0..19)
    steps     ["4+5=9", "9*2=18", "18-5=13"]
    answer    "13"

The difficulty is the number of operations. Answers are checked by exact string match and whole
equations by :func:`is_true_equation`, so every score is verifiable. The latent tasks (compressor,
thought VAE, joint diffusion, latent reasoning) train on it: it needs no download, and a tiny model
learns each step on a CPU in minutes, so accuracy measures composing steps. The tokenizer is a
transformers fast tokenizer, so pipelines save and load it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

__all__ = ["CHARS", "SPECIALS", "MAX_VALUE", "Problem", "make_tokenizer", "make_problem", "make_dataset", "split",
           "encode_fixed", "decode_answer", "accuracy_by_difficulty", "is_true_equation", "cot_text",
           "equation_text"]

CHARS = list("0123456789+-*=;?> ")
SPECIALS = ["[PAD]", "[UNK]", "[EOS]", "[SEP]", "[MASK]"]
MAX_VALUE = 19


def make_tokenizer():
    """Character-level ``PreTrainedTokenizerFast``: ids 0..4 are the specials, then :data:`CHARS`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]",
        mask_token="[MASK]", sep_token="[SEP]",
    )


@dataclass
class Problem:
    question: str
    steps: list[str]
    answer: str
    difficulty: int


def make_problem(rng: random.Random, difficulty: int, max_value: int = MAX_VALUE) -> Problem:
    """One chain of ``difficulty`` operations on single-digit operands (``*`` by 2 or 3); retries until
    every partial result is in ``0..max_value``. A small value range keeps each step a fact a tiny model
    learns quickly, so accuracy measures composing steps, not multi-digit arithmetic."""
    while True:
        x = rng.randint(0, max_value)
        q, steps = str(x), []
        for _ in range(difficulty):
            op = rng.choice("+-*")
            n = rng.randint(2, 3) if op == "*" else rng.randint(1, 9)
            y = x + n if op == "+" else x - n if op == "-" else x * n
            if not 0 <= y <= max_value:
                break
            steps.append(f"{x}{op}{n}={y}")
            q += f"{op}{n}"
            x = y
        else:
            return Problem(q, steps, str(x), difficulty)


def make_dataset(n: int, difficulties=(1, 2, 3), seed: int = 0) -> list[Problem]:
    rng = random.Random(seed)
    return [make_problem(rng, difficulties[i % len(difficulties)]) for i in range(n)]


def split(n_train: int, n_test: int, difficulties=(1, 2, 3), seed: int = 0):
    """Train and test sets. Test chains of 2+ operations never occur in training; single operations
    (difficulty 1, a few hundred facts, all of which training covers) are the primitives and are kept.
    The test set holds ``n_test // len(difficulties)`` problems per difficulty, in difficulty order."""
    difficulties = tuple(difficulties)
    train = make_dataset(n_train, difficulties, seed)
    seen = {p.question for p in train}
    pool = make_dataset(n_test * 3, difficulties, seed + 1)
    test = [p for p in pool if p.difficulty == 1 or p.question not in seen]
    per = n_test // len(difficulties)
    out = []
    for d in difficulties:
        out += [p for p in test if p.difficulty == d][:per]
    return train, out


def equation_text(p: Problem) -> str:
    """The whole problem as one true equation, e.g. ``"4+5*2-5=13"``."""
    return p.question + "=" + p.answer


def cot_text(p: Problem) -> str:
    """The chain of thought in text followed by the answer: ``"4+5=9;9*2=18;18-5=13>13"``."""
    return ";".join(p.steps) + ">" + p.answer


def encode_fixed(tokenizer, texts, length: int, pad_id: int, eos: bool = False, left: bool = False):
    """Token ids ``[B, length]``: each text (plus EOS) padded with ``pad_id`` (right, or left)."""
    rows = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else [])
        if len(ids) > length:
            raise ValueError(f"{t!r} needs {len(ids)} tokens, more than length={length}")
        pad = [pad_id] * (length - len(ids))
        rows.append(pad + ids if left else ids + pad)
    return torch.tensor(rows, dtype=torch.long).view(len(rows), length)


def decode_answer(tokenizer, ids) -> str:
    """Text up to the first EOS, specials dropped."""
    ids = list(ids)
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def accuracy_by_difficulty(problems, predictions) -> dict:
    """Exact-match accuracy per difficulty and over all (``"all"``)."""
    out: dict = {}
    for p, pred in zip(problems, predictions, strict=False):
        out.setdefault(p.difficulty, []).append(pred == p.answer)
    res = {d: sum(v) / len(v) for d, v in sorted(out.items())}
    res["all"] = sum(sum(v) for v in out.values()) / max(1, sum(len(v) for v in out.values()))
    return res


def is_true_equation(text: str, max_value: int = MAX_VALUE) -> bool:
    """Whether ``text`` is a well-formed chain ``a op b op c ... = r`` that is true when evaluated left to
    right with every partial result in ``0..max_value`` (the task's own rule)."""
    s = text.replace(" ", "")
    m = re.fullmatch(r"(\d+)((?:[+\-*]\d+)+)=(\d+)", s)
    if not m:
        return False
    x = int(m.group(1))
    for op, n in re.findall(r"([+\-*])(\d+)", m.group(2)):
        x = x + int(n) if op == "+" else x - int(n) if op == "-" else x * int(n)
        if not 0 <= x <= max_value:
            return False
    return x == int(m.group(3))

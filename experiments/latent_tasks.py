"""Shared pieces of the latent-diffusion experiments: a verifiable multi-step arithmetic task split by
difficulty, a character tokenizer (a transformers fast tokenizer, so pipelines save and load it), and
small helpers for padding and training loops.

A problem is a left-to-right chain of operations on numbers in [0, 19]::

    question  "3+7*2-5"            (evaluated left to right, every partial result stays in 0..19)
    steps     ["3+7=10", "10*2=20"...]   e.g. ["4+5=9", "9*2=18", "18-5=13"]
    answer    "13"

The difficulty is the number of operations (1 .. 4). Answers are checked by exact string match, so
every score is verifiable. No real word-problem set installs offline here (PyPI has none that ships its
data; GSM8K wrappers fetch it from a hub at run time), so only this generated task is used.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

CHARS = list("0123456789+-*=;?> ")
SPECIALS = ["[PAD]", "[UNK]", "[EOS]", "[SEP]", "[MASK]"]


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


MAX_VALUE = 19


def make_problem(rng: random.Random, difficulty: int, max_value: int = MAX_VALUE) -> Problem:
    """One chain of ``difficulty`` operations on single-digit operands (``*`` by 2 or 3); retries until
    every partial result is in ``0..max_value``. A small value range keeps each step a fact a tiny model
    learns in minutes on a CPU, so accuracy measures composing steps, not multi-digit arithmetic."""
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
    (difficulty 1, a few hundred facts, all of which training covers) are the primitives and are kept."""
    train = make_dataset(n_train, difficulties, seed)
    seen = {p.question for p in train}
    pool = make_dataset(n_test * 3, difficulties, seed + 1)
    test = [p for p in pool if p.difficulty == 1 or p.question not in seen]
    per = n_test // len(difficulties)
    out = []
    for d in difficulties:
        out += [p for p in test if p.difficulty == d][:per]
    return train, out


def encode_fixed(tokenizer, texts, length: int, pad_id: int, eos: bool = False, left: bool = False):
    """Token ids ``[B, length]``: each text (plus EOS) padded with ``pad_id`` (right, or left)."""
    rows = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else [])
        if len(ids) > length:
            raise ValueError(f"{t!r} needs {len(ids)} tokens, more than length={length}")
        pad = [pad_id] * (length - len(ids))
        rows.append(pad + ids if left else ids + pad)
    return torch.tensor(rows, dtype=torch.long)


def decode_answer(tokenizer, ids) -> str:
    """Text up to the first EOS, specials dropped."""
    ids = list(ids)
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def batches(n: int, batch_size: int, steps: int, seed: int = 0):
    """``steps`` random index batches over ``range(n)``."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(0, n, (batch_size,), generator=g)


def accuracy_by_difficulty(problems, predictions) -> dict:
    out: dict = {}
    for p, pred in zip(problems, predictions, strict=False):
        out.setdefault(p.difficulty, []).append(pred == p.answer)
    res = {d: sum(v) / len(v) for d, v in sorted(out.items())}
    res["all"] = sum(sum(v) for v in out.values()) / max(1, sum(len(v) for v in out.values()))
    return res


def markdown_table(header: list[str], rows: list[list]) -> str:
    def fmt(x):
        return f"{x:.3f}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def parse_args(ap, argv=None):
    """argparse with an optional ``--config file.yaml`` (OmegaConf) whose keys (the option names, dashes
    or underscores) become defaults; options on the command line still win. Unknown keys are errors."""
    ap.add_argument("--config", default=None, help="YAML recipe (configs/latent_*.yaml) setting these options")
    pre, _ = ap.parse_known_args(argv)
    if pre.config:
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(OmegaConf.load(pre.config), resolve=True) or {}
        known = {a.dest for a in ap._actions}
        cfg = {k.replace("-", "_"): v for k, v in cfg.items()}
        bad = sorted(set(cfg) - known)
        if bad:
            raise ValueError(f"{pre.config}: unknown option(s) {bad}; known: {sorted(known - {'help', 'config'})}")
        ap.set_defaults(**cfg)
    return ap.parse_args(argv)

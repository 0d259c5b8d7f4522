"""Verifiable rewards of the RL task (:mod:`pipelines.tasks.rl`): a completion's token ids are decoded up to
the first EOS and checked by a rule, never by a model.

- ``exact_match``: the text equals the problem's answer (arithmetic);
- ``countdown``: the text is a chain using exactly the question's numbers that reaches its target
  (:func:`latent.data.countdown.is_solution`);
- ``contains``: the text contains a given string (a sanity check of the learning loop, not a task);
- the format reward: the completion is one well-formed answer (a number, or a chain for countdown) followed
  by nothing but EOS padding.

``reward = correct + format_weight * formatted``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from latent.data.arithmetic import Problem, decode_answer
from latent.data.countdown import is_solution

__all__ = ["CORRECTNESS", "ANSWER_PATTERNS", "Scores", "is_correct", "is_well_formed", "score_completions"]

CORRECTNESS = ("exact_match", "countdown", "contains")
ANSWER_PATTERNS = {"exact_match": r"\d+", "countdown": r"\d+(?:[+\-*]\d+)+", "contains": r".+"}


def is_correct(rule: str, text: str, problem: Problem, contains: str = "") -> bool:
    if rule == "exact_match":
        return text == problem.answer
    if rule == "countdown":
        return is_solution(text, problem.question)
    if rule == "contains":
        return bool(contains) and contains in text
    raise ValueError(f"reward rule {rule!r} is not one of {', '.join(CORRECTNESS)}")


def is_well_formed(tokenizer, ids, rule: str) -> bool:
    """An EOS ends the answer, only EOS follows it, and the text before it matches the rule's pattern."""
    ids, eos = list(ids), tokenizer.eos_token_id
    if eos not in ids:
        return False
    end = ids.index(eos)
    if any(t != eos for t in ids[end:]):
        return False
    text = tokenizer.decode(ids[:end], skip_special_tokens=False)
    return re.fullmatch(ANSWER_PATTERNS[rule], text) is not None


@dataclass
class Scores:
    """Per completion ``[B]``: ``reward``, ``correct`` (0/1) and ``formatted`` (0/1); ``texts`` decoded."""

    reward: torch.Tensor
    correct: torch.Tensor
    formatted: torch.Tensor
    texts: list[str]


def score_completions(tokenizer, completions: torch.Tensor, problems: list[Problem], rule: str = "exact_match",
                      format_weight: float = 0.0, contains: str = "") -> Scores:
    """Scores of completions ``[B, L]`` (token ids after the prompt), one problem per row."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(problems)} problems")
    texts = [decode_answer(tokenizer, row.tolist()) for row in completions]
    correct = torch.tensor([float(is_correct(rule, t, p, contains)) for t, p in zip(texts, problems, strict=True)])
    formatted = torch.tensor([float(is_well_formed(tokenizer, row.tolist(), rule)) for row in completions])
    return Scores(correct + format_weight * formatted, correct, formatted, texts)

"""Countdown-style problems on the arithmetic task's vocabulary: reach a target with given numbers.

A problem lists numbers and a target, ``"4 5 2 5?13"``; a solution is a chain that uses every number
exactly once, evaluated left to right with every partial result in ``0..MAX_VALUE`` (the arithmetic task's
rule), e.g. ``"4+5*2-5"``. Problems are made from arithmetic chains, so each has at least one solution
(kept as the problem's ``answer``); :func:`is_solution` checks any answer.
"""

from __future__ import annotations

import random
import re

from latent.data.arithmetic import MAX_VALUE, Problem, is_true_equation, make_problem

__all__ = ["make_countdown", "countdown_dataset", "countdown_question", "parse_countdown", "is_solution"]


def countdown_question(numbers, target: int) -> str:
    return " ".join(str(n) for n in numbers) + f"?{target}"


def parse_countdown(question: str) -> tuple[list[int], int]:
    """The numbers and the target of a question written by :func:`countdown_question`."""
    m = re.fullmatch(r"(\d+(?: \d+)*)\?(\d+)", question)
    if not m:
        raise ValueError(f"{question!r} is not a countdown question like '4 5 2?18'")
    return [int(x) for x in m.group(1).split()], int(m.group(2))


def make_countdown(rng: random.Random, operations: int, max_value: int = MAX_VALUE) -> Problem:
    """A problem from one arithmetic chain of ``operations`` operations: its numbers shuffled, its result
    the target; the chain is the kept solution."""
    chain = make_problem(rng, operations, max_value)
    numbers = [int(x) for x in re.findall(r"\d+", chain.question)]
    rng.shuffle(numbers)
    return Problem(countdown_question(numbers, int(chain.answer)), chain.steps, chain.question, operations)


def countdown_dataset(n: int, difficulties=(1, 2), seed: int = 0) -> list[Problem]:
    rng = random.Random(seed)
    return [make_countdown(rng, difficulties[i % len(difficulties)]) for i in range(n)]


def is_solution(answer: str, question: str, max_value: int = MAX_VALUE) -> bool:
    """Whether ``answer`` is a chain using exactly the question's numbers that reaches its target."""
    numbers, target = parse_countdown(question)
    s = answer.replace(" ", "")
    if not re.fullmatch(r"\d+(?:[+\-*]\d+)+", s):
        return False
    used = sorted(int(x) for x in re.findall(r"\d+", s))
    return used == sorted(numbers) and is_true_equation(f"{s}={target}", max_value)

"""The project's metrics in one place: captions (BLEU-4 and CIDEr-D from `pycocoevalcap`, attribute accuracy
on rendered scenes), speech (corpus WER, exact-match answer accuracy), confidence intervals of rates (Wilson)
and means (percentile bootstrap) for closed-loop driving.

COCO's own tokenizer (PTBTokenizer) needs Java, so captions are tokenised here the same simple way for
predictions and references: lowercase, punctuation dropped, split on whitespace.
"""

from __future__ import annotations

import math
import re

from modalities.data.scenes import parse_caption

__all__ = ["tokenize", "caption_scores", "attribute_accuracy", "normalize_text", "word_error_rate", "answer_accuracy",
           "wilson_interval", "rate_ratio_interval", "bootstrap_mean_interval"]


def tokenize(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def caption_scores(predictions: list[str], references: list[list[str] | str]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr of predictions against one or more references per image."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as err:  # pragma: no cover
        raise ImportError("caption metrics need pycocoevalcap: pip install pycocoevalcap") from err
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references.")
    if not predictions:
        raise ValueError("no predictions to score.")
    res = {i: [tokenize(p) or "<empty>"] for i, p in enumerate(predictions)}
    gts = {i: [tokenize(r) for r in ([refs] if isinstance(refs, str) else refs)] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


# ---- captions of rendered scenes --------------------------------------------------------------------------
def attribute_accuracy(predictions: list[str], attributes: list[dict]) -> dict:
    """Per-attribute accuracy, the accuracy of the (colour, shape) pair, and all-attributes-right."""
    if len(predictions) != len(attributes):
        raise ValueError(f"{len(predictions)} predictions for {len(attributes)} references.")
    keys = ("count", "size", "colour", "shape", "position")
    hits = {k: 0 for k in (*keys, "colour+shape", "all")}
    for pred, ref in zip(predictions, attributes, strict=True):
        got = parse_caption(pred)  # the scene vocabulary's parser
        ok = {k: got[k] == ref[k] for k in keys}
        for k in keys:
            hits[k] += ok[k]
        hits["colour+shape"] += ok["colour"] and ok["shape"]
        hits["all"] += all(ok.values())
    n = max(len(predictions), 1)
    return {k: v / n for k, v in hits.items()}


# ---- speech --------------------------------------------------------------------------------------------
def normalize_text(text: str) -> str:
    """Lowercase, keep letters/digits/apostrophes, single spaces."""
    return " ".join(re.findall(r"[a-z0-9']+", (text or "").lower()))


def _edits(ref: list[str], hyp: list[str]) -> int:
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Corpus WER: word-level Levenshtein edits (substitutions + deletions + insertions) summed over the
    corpus, divided by the number of reference words. Texts are normalised with `normalize_text`."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references.")
    edits = words = 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        r, h = normalize_text(ref).split(), normalize_text(hyp).split()
        edits += _edits(r, h)
        words += len(r)
    if words == 0:
        raise ValueError("the references hold no words.")
    return edits / words


def answer_accuracy(references: list[str], predictions: list[str]) -> float:
    """Fraction of exact matches after `normalize_text`."""
    if len(references) != len(predictions) or not references:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references.")
    return sum(normalize_text(r) == normalize_text(p) for r, p in zip(references, predictions, strict=True)) / len(references)


Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial rate (95 % by default): unlike the normal approximation it stays
    inside [0, 1] and is not empty at 0 or n successes."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got successes={successes}, n={n}.")
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_ratio_interval(events: int, n: int, ref_events: int, ref_n: int, z: float = Z95) -> tuple[float, float, float]:
    """(ratio, low, high): the ratio of two binomial rates, (events / n) / (ref_events / ref_n), with the Katz
    log interval (95 % by default; scipy's `relative_risk` gives the same). With a zero count every cell of the
    2 x 2 table gets 0.5 (Haldane-Anscombe), so the ratio and interval stay finite."""
    for k, m, name in ((events, n, "events"), (ref_events, ref_n, "ref_events")):
        if m < 1 or not 0 <= k <= m:
            raise ValueError(f"need 0 <= {name} <= its n and n >= 1, got {name}={k}, n={m}.")
    a, b, c, d = float(events), float(n - events), float(ref_events), float(ref_n - ref_events)
    if 0 in (a, c):
        a, b, c, d = a + 0.5, b + 0.5, c + 0.5, d + 0.5
    ratio = (a / (a + b)) / (c / (c + d))
    half = z * math.sqrt(1 / a - 1 / (a + b) + 1 / c - 1 / (c + d))
    return ratio, ratio * math.exp(-half), ratio * math.exp(half)


def bootstrap_mean_interval(values, level: float = 0.95, samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: means of ``samples`` resamples with replacement (from a
    generator seeded by ``seed``, so the same values give the same interval)."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"values must be a non-empty 1-d sequence, got shape {x.shape}.")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    means = x[np.random.default_rng(seed).integers(0, len(x), (samples, len(x)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)

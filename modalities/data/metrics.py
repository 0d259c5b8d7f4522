"""The project's metrics in one place: captions (BLEU-4 and CIDEr-D from `pycocoevalcap`, attribute accuracy
on rendered scenes), speech (corpus WER, exact-match answer accuracy).

COCO's own tokenizer (PTBTokenizer) needs Java, so captions are tokenised here the same simple way for
predictions and references: lowercase, punctuation dropped, split on whitespace.
"""

from __future__ import annotations

import re

from modalities.data.scenes import parse_caption

__all__ = ["tokenize", "caption_scores", "attribute_accuracy", "normalize_text", "word_error_rate", "answer_accuracy"]


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

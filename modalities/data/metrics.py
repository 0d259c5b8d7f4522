"""Caption metrics: BLEU-4 and CIDEr-D from `pycocoevalcap` (its pure-Python scorers only).

COCO's own tokenizer (PTBTokenizer) needs Java, so captions are tokenised here the same simple way for
predictions and references: lowercase, punctuation dropped, split on whitespace.
"""

from __future__ import annotations

import re

__all__ = ["tokenize", "caption_scores"]


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

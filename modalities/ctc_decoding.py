"""CTC prefix beam search with an optional token n-gram language model (shallow fusion).

Greedy CTC decoding (`modalities.audio.ctc_best_path`) takes the best label of every frame on its own, so an
accent it never heard turns "what is sixteen minus ten" into "how many is sixteen minus". A beam search sums
every alignment of a label sequence and, with a language model fitted on transcripts, prefers sequences that
read like the questions the recognizer is for. The score of a label sequence y of a clip x is

    log P_ctc(y | x) + lm_weight * log P_lm(y </s>) + length_bonus * len(y)

and with a beam at least as wide as the number of prefixes the search returns its exact maximum.

```python
from modalities.ctc_decoding import CTCBeamSearch, TokenNGram

lm = TokenNGram.fit([tok.encode(t, add_special_tokens=False) for t in transcripts], vocab_size=len(tok))
decoder = CTCBeamSearch(beam_width=16, lm=lm, lm_weight=0.8, length_bonus=1.0)
decoder.save_pretrained("runs/asr/ctc_decoder"); decoder = CTCBeamSearch.from_pretrained("runs/asr/ctc_decoder")
ids = adapter.ctc_decode(batch, decoder)                       # one list of token ids per clip
pipe(audio=clips, read="ctc_text", ctc_decoder=decoder)        # the cascade, reading the beam's transcript
```
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["TokenNGram", "CTCBeamSearch", "ctc_prefix_beam_search"]

_NEG_INF = float("-inf")


def _logaddexp(a: float, b: float) -> float:
    if a == _NEG_INF:
        return b
    if b == _NEG_INF:
        return a
    hi, lo = (a, b) if a > b else (b, a)
    return hi + math.log1p(math.exp(lo - hi))


class TokenNGram:
    """Interpolated Kneser-Ney n-gram model over token ids 0..vocab_size-1, with a sentence end.

    Every sequence is read as `<s>^(order-1) y </s>`; `log_prob(history, token)` is log P(token | the last
    order-1 tokens of history), with token `end` (= vocab_size) for `</s>`. The lowest order interpolates with
    the uniform distribution over all tokens and `</s>`, so no token has probability 0. Saved as JSON: the
    counts of the highest order, from which everything else is derived.
    """

    def __init__(self, counts: dict[tuple[int, ...], int], order: int, vocab_size: int, discount: float = 0.75):
        if order < 1:
            raise ValueError(f"`order` must be >= 1, got {order}.")
        if not 0.0 < discount < 1.0:
            raise ValueError(f"`discount` must be in (0, 1), got {discount}.")
        if vocab_size < 1:
            raise ValueError(f"`vocab_size` must be >= 1, got {vocab_size}.")
        self.order, self.vocab_size, self.discount = order, vocab_size, discount
        self.end, self.start = vocab_size, vocab_size + 1
        self.counts = dict(counts)
        # per order k (1..order): count (highest order) or continuation count (lower orders) of every k-gram,
        # and per (k-1)-gram history: the total and the number of distinct continuations
        self._gram: list[dict[tuple[int, ...], int]] = [{} for _ in range(order + 1)]
        self._gram[order] = dict(counts)
        for k in range(order - 1, 0, -1):
            cont: dict[tuple[int, ...], int] = defaultdict(int)
            for gram in self._gram[k + 1]:
                cont[gram[1:]] += 1
            self._gram[k] = dict(cont)
        self._total = [dict() for _ in range(order + 1)]
        self._types = [dict() for _ in range(order + 1)]
        for k in range(1, order + 1):
            total: dict[tuple[int, ...], int] = defaultdict(int)
            types: dict[tuple[int, ...], int] = defaultdict(int)
            for gram, c in self._gram[k].items():
                total[gram[:-1]] += c
                types[gram[:-1]] += 1
            self._total[k], self._types[k] = dict(total), dict(types)

    @classmethod
    def fit(cls, sequences: Iterable[Sequence[int]], vocab_size: int, order: int = 3,
            discount: float = 0.75) -> TokenNGram:
        """Count the n-grams of `sequences` (lists of token ids below vocab_size)."""
        counts: dict[tuple[int, ...], int] = defaultdict(int)
        start, end = vocab_size + 1, vocab_size
        n = 0
        for seq in sequences:
            seq = [int(t) for t in seq]
            bad = [t for t in seq if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"token ids must be in [0, {vocab_size}) (vocab_size); got {bad[:5]} in a sequence.")
            padded = [start] * (order - 1) + seq + [end]
            for i in range(order - 1, len(padded)):
                counts[tuple(padded[i - order + 1 : i + 1])] += 1
            n += 1
        if n == 0:
            raise ValueError("TokenNGram.fit needs at least one sequence.")
        return cls(dict(counts), order, vocab_size, discount)

    def log_prob(self, history: Sequence[int], token: int) -> float:
        """log P(token | history); token == self.end is the sentence end."""
        if self.order == 1:
            context = ()
        else:
            context = tuple(([self.start] * (self.order - 1) + [int(t) for t in history])[-(self.order - 1):])
        return math.log(self._prob(context, int(token)))

    def _prob(self, context: tuple[int, ...], token: int) -> float:
        k = len(context) + 1
        if k == 1:
            base = 1.0 / (self.vocab_size + 1)  # tokens and </s>
        else:
            base = self._prob(context[1:], token)
        total = self._total[k].get(context, 0)
        if total == 0:
            return base
        c = self._gram[k].get(context + (token,), 0)
        d = self.discount
        return max(c - d, 0.0) / total + d * self._types[k][context] / total * base

    def save(self, path: str | Path) -> None:
        data = {"order": self.order, "vocab_size": self.vocab_size, "discount": self.discount,
                "ngrams": [[*gram, c] for gram, c in sorted(self.counts.items())]}
        Path(path).write_text(json.dumps(data))

    @classmethod
    def load(cls, path: str | Path) -> TokenNGram:
        data = json.loads(Path(path).read_text())
        counts = {tuple(row[:-1]): int(row[-1]) for row in data["ngrams"]}
        return cls(counts, int(data["order"]), int(data["vocab_size"]), float(data["discount"]))


def ctc_prefix_beam_search(log_probs: torch.Tensor, blank: int, beam_width: int = 16, lm: TokenNGram | None = None,
                           lm_weight: float = 0.0, length_bonus: float = 0.0,
                           token_top_k: int | None = None) -> tuple[list[int], float]:
    """The best label sequence of one clip's frame log-probabilities [T, V] (blank among the V labels).

    Prefix beam search: every kept prefix carries the summed probability of its alignments that end in a blank
    and of those that end in its last label, so repeated labels split by a blank stay two tokens. Each new
    token adds `lm_weight * log P_lm(token | prefix) + length_bonus`; the end adds the LM's `</s>` term.
    `token_top_k` looks only at the k most likely labels of each frame (blank always), a speed-up that can
    miss the exact best. Returns (token ids, score).
    """
    if log_probs.ndim != 2:
        raise ValueError(f"log_probs must be [T, V], got {tuple(log_probs.shape)}.")
    if beam_width < 1:
        raise ValueError(f"`beam_width` must be >= 1, got {beam_width}.")
    if lm is not None and lm.vocab_size < log_probs.shape[1] - 1:
        raise ValueError(f"the LM knows {lm.vocab_size} tokens but log_probs label {log_probs.shape[1] - 1} "
                         "(plus blank); fit the LM with vocab_size = the CTC head's vocabulary.")
    lp = log_probs.detach().float().cpu()
    v = lp.shape[1]
    k = v if token_top_k is None else min(v, token_top_k)
    lm_cache: dict[tuple[tuple[int, ...], int], float] = {}

    def fused(prefix: tuple[int, ...], token: int) -> float:
        if lm is None or lm_weight == 0.0:
            return length_bonus
        key = (prefix[-(lm.order - 1):] if lm.order > 1 else (), token)
        if key not in lm_cache:
            lm_cache[key] = lm.log_prob(prefix, token)
        return lm_weight * lm_cache[key] + length_bonus

    beams: dict[tuple[int, ...], list[float]] = {(): [0.0, _NEG_INF]}  # prefix -> [ends in blank, ends in label]
    for t in range(lp.shape[0]):
        frame = lp[t]
        labels = range(v) if k == v else set(torch.topk(frame, k).indices.tolist()) | {blank}
        row = frame.tolist()
        new: dict[tuple[int, ...], list[float]] = defaultdict(lambda: [_NEG_INF, _NEG_INF])
        for prefix, (pb, pnb) in beams.items():
            both = _logaddexp(pb, pnb)
            last = prefix[-1] if prefix else None
            for c in labels:
                p = row[c]
                if c == blank:
                    entry = new[prefix]
                    entry[0] = _logaddexp(entry[0], both + p)
                    continue
                extended = prefix + (c,)
                entry = new[extended]
                if c == last:
                    # a repeat only extends after a blank; without one it is the same token held longer
                    entry[1] = _logaddexp(entry[1], pb + p + fused(prefix, c))
                    same = new[prefix]
                    same[1] = _logaddexp(same[1], pnb + p)
                else:
                    entry[1] = _logaddexp(entry[1], both + p + fused(prefix, c))
        ranked = sorted(new.items(), key=lambda kv: _logaddexp(*kv[1]), reverse=True)
        beams = dict(ranked[:beam_width])

    def final(item):
        prefix, (pb, pnb) = item
        end = lm_weight * lm.log_prob(prefix, lm.end) if lm is not None and lm_weight else 0.0
        return _logaddexp(pb, pnb) + end

    best = max(beams.items(), key=final)
    return list(best[0]), final(best)


@dataclass
class CTCBeamSearch:
    """A CTC decoding rule: prefix beam search with an optional n-gram LM. Saved as a folder with
    `ctc_decoder.json` (and `lm.json`), loaded with `from_pretrained`."""

    beam_width: int = 16
    lm: TokenNGram | None = None
    lm_weight: float = 0.0
    length_bonus: float = 0.0
    token_top_k: int | None = 8
    # test-time frequency warps (`AudioAdapter.ctc_decode`): each clip is also decoded with its mel axis
    # stretched by these factors and the best-scoring hypothesis wins; () decodes the features as they are
    warps: tuple[float, ...] = ()

    def __post_init__(self):
        self.warps = tuple(float(w) for w in self.warps)
        if any(not 0 < w < 2 for w in self.warps):
            raise ValueError(f"`warps` are frequency stretch factors in (0, 2), e.g. (0.9, 1.1); got {self.warps}.")
        if self.beam_width < 1:
            raise ValueError(f"`beam_width` must be >= 1, got {self.beam_width}.")
        if self.lm_weight < 0:
            raise ValueError(f"`lm_weight` must be >= 0, got {self.lm_weight}.")
        if self.lm_weight > 0 and self.lm is None:
            raise ValueError("`lm_weight` > 0 needs an `lm` (a TokenNGram fitted on transcripts).")
        if self.token_top_k is not None and self.token_top_k < 1:
            raise ValueError(f"`token_top_k` must be >= 1 or None, got {self.token_top_k}.")

    def decode(self, logits: torch.Tensor, mask: torch.Tensor, blank: int) -> list[list[int]]:
        """Token ids of every clip from frame logits [B, T, V] and the valid-frame mask [B, T]."""
        return [ids for ids, _ in self.decode_scored(logits, mask, blank)]

    def decode_scored(self, logits: torch.Tensor, mask: torch.Tensor, blank: int) -> list[tuple[list[int], float]]:
        """(token ids, score) of every clip: the score is the search's objective of those ids."""
        log_probs = torch.log_softmax(logits.detach().float(), -1).cpu()
        mask = mask.bool().cpu()
        return [ctc_prefix_beam_search(row[valid], blank, self.beam_width, self.lm, self.lm_weight,
                                       self.length_bonus, self.token_top_k)
                for row, valid in zip(log_probs, mask, strict=True)]

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ctc_decoder.json").write_text(json.dumps(
            {"beam_width": self.beam_width, "lm_weight": self.lm_weight, "length_bonus": self.length_bonus,
             "token_top_k": self.token_top_k, "warps": list(self.warps),
             "lm": "lm.json" if self.lm is not None else None}, indent=2))
        if self.lm is not None:
            self.lm.save(folder / "lm.json")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> CTCBeamSearch:
        folder = Path(folder)
        path = folder / "ctc_decoder.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: give a folder written by CTCBeamSearch.save_pretrained.")
        cfg = json.loads(path.read_text())
        lm = TokenNGram.load(folder / cfg.pop("lm")) if cfg.get("lm") else None
        cfg.pop("lm", None)
        return cls(lm=lm, **cfg)

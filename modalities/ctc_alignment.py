"""CTC forced alignment: the frame labels of a given transcript's most likely CTC path.

A transcript decoded with a beam search and a language model (`modalities.ctc_decoding`) is a label sequence, not
a frame labelling. `ctc_align` finds, by Viterbi over the usual CTC lattice (blank, y1, blank, y2, ..., blank), the
single path with the highest log-probability that collapses to the transcript. The semantic adapter then pools
the frames of each aligned token into one slot, exactly as it pools the runs of its greedy best path: the greedy
best path is the Viterbi alignment of its own collapsed transcript, so aligning the greedy transcript changes
nothing.

```python
from modalities.ctc_alignment import ctc_align, align_batch

labels = ctc_align(log_probs, [17, 4, 4, 9], blank=V - 1)      # [T] frame labels, blank where no token
labels = align_batch(logits, mask, transcripts, blank)         # [B, T]; frames past a clip's end are blank
```
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["CTCAlignmentError", "ctc_align", "align_batch"]


class CTCAlignmentError(ValueError):
    """The transcript cannot be aligned: it needs more frames than the clip has."""


def ctc_align(log_probs: torch.Tensor, targets: Sequence[int], blank: int) -> torch.Tensor:
    """[T] frame labels of the most likely CTC path of ``log_probs`` [T, V] that collapses to ``targets``.

    Ties go to the path that stays in its state (then: that comes from the nearer state). Raises
    `CTCAlignmentError` when the T frames cannot hold the targets (each token one frame, plus one blank between
    two equal neighbours)."""
    if log_probs.ndim != 2:
        raise ValueError(f"log_probs must be [T, V], got {tuple(log_probs.shape)}.")
    targets = [int(t) for t in targets]
    t_len, v = log_probs.shape
    if any(not 0 <= t < v or t == blank for t in targets):
        raise ValueError(f"targets must be labels in [0, {v}) other than the blank ({blank}), got {targets}.")
    need = len(targets) + sum(a == b for a, b in zip(targets[:-1], targets[1:], strict=True))
    if need > t_len:
        raise CTCAlignmentError(f"a transcript of {len(targets)} tokens needs {need} frames; the clip has {t_len}.")
    if not targets:
        return torch.full((t_len,), blank, dtype=torch.long)
    lp = log_probs.detach().float().cpu()
    states = [blank]
    for t in targets:
        states += [t, blank]
    s_len = len(states)
    lab = torch.tensor(states)
    # a label state may skip the blank before it unless that blank separates two equal labels
    skip = torch.zeros(s_len, dtype=torch.bool)
    for s in range(3, s_len, 2):
        skip[s] = states[s] != states[s - 2]
    neg = torch.tensor(float("-inf"))
    score = torch.full((s_len,), float("-inf"))
    score[0], score[1] = lp[0, blank], lp[0, states[1]]
    back = torch.zeros(t_len, s_len, dtype=torch.long)  # 0: stayed, 1: from s-1, 2: from s-2
    for t in range(1, t_len):
        one = torch.cat([neg[None], score[:-1]])
        two = torch.where(skip, torch.cat([neg.expand(2), score[:-2]]), neg)
        best, step = torch.stack([score, one, two]).max(0)  # max returns the first maximum: stay, then s-1
        score = best + lp[t, lab]
        back[t] = step
    # the path ends in the last label or the blank after it
    s = s_len - 1 if score[-1] >= score[-2] else s_len - 2
    out = torch.empty(t_len, dtype=torch.long)
    for t in range(t_len - 1, -1, -1):
        out[t] = states[s]
        s -= int(back[t, s])
    return out


def align_batch(logits: torch.Tensor, mask: torch.Tensor, transcripts: Sequence[Sequence[int]], blank: int,
                fallback: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] frame labels: each clip's transcript aligned on its valid frames (``logits`` [B, T, V], ``mask``
    [B, T]); the frames past a clip's end are blank. A clip whose transcript cannot be aligned takes its row of
    ``fallback`` (e.g. the greedy labels) when one is given, and raises `CTCAlignmentError` otherwise."""
    if len(transcripts) != logits.shape[0]:
        raise ValueError(f"{len(transcripts)} transcripts for {logits.shape[0]} clips.")
    lp = logits.detach().float().log_softmax(-1)
    out = torch.full(logits.shape[:2], blank, dtype=torch.long)
    for i, ids in enumerate(transcripts):
        n = int(mask[i].sum())
        try:
            out[i, :n] = ctc_align(lp[i, :n], ids, blank)
        except CTCAlignmentError:
            if fallback is None:
                raise
            out[i] = fallback[i].cpu()
    return out.to(logits.device)

"""Classifier guidance (CtrlDiff's controllable generation; docs/sampling.md, "More decoders of the
literature").

The proposal distribution of each position becomes p(x_t = v | x) * p(c | x_t = v, x)^w: the guided logits
are `L + w * log p(c | ...)`. `classifier(canvas [b, N], start, end)` returns the log-probability of the
wanted class c when canvas position t (in [start, end), the current block) takes token v and the rest is
the canvas as it stands (masks included), as [b, end - start, V] or anything that broadcasts to it (e.g. [V]
for a classifier that scores tokens alone). A classifier that is constant in v changes nothing. The
classifier is the caller's (a trained one, or a rule); with `cfg_scale` > 0 it steers the CFG-combined logits.
"""

from __future__ import annotations

from .guidance import ClassifierFreeGuidance, NoGuidance
from .registry import Part, register_guidance


@register_guidance("classifier")
class ClassifierGuidance(Part):
    """L + classifier_scale * log p(c | x_t = v), on the logits of the guidance below it (none, or CFG when
    cfg_scale > 0)."""

    def __init__(self, classifier, classifier_scale: float = 1.0, cfg_scale: float = 0.0):
        if not callable(classifier):
            raise ValueError("guidance='classifier' needs `classifier`, a callable (canvas, start, end) -> log p(c | "
                             f"x_t = v) of shape [b, end - start, V]; got {type(classifier).__name__}.")
        self.classifier, self.scale = classifier, float(classifier_scale)
        self.base = ClassifierFreeGuidance(cfg_scale) if cfg_scale > 0 else NoGuidance()
        self.copies = self.base.copies

    @classmethod
    def from_config(cls, config):
        return cls(config.classifier, config.classifier_scale, config.cfg_scale)

    @classmethod
    def check_config(cls, config) -> None:
        if config.classifier is None:
            raise ValueError("guidance='classifier' needs `classifier`, a callable (canvas, start, end) -> log p(c | "
                             "x_t = v) of shape [b, end - start, V].")
        if not 0 <= config.classifier_scale < float("inf"):
            raise ValueError(f"`classifier_scale` must be finite and >= 0 (0 = off), got {config.classifier_scale}.")

    def ids(self, ids, lo, prompt_len, mask_token_id):
        return self.base.ids(ids, lo, prompt_len, mask_token_id)

    def repeat(self, t):
        return self.base.repeat(t)

    def combine(self, logits):
        return self.base.combine(logits)

    def rows(self, index, batch):
        return self.base.rows(index, batch)

    def steer(self, logits, state):
        """The block's logits [b, L, V] with the classifier's log-probabilities added, w times."""
        log_class = self.classifier(state.x, state.block_start, state.block_end)
        return logits + self.scale * log_class.to(logits.device, logits.dtype)

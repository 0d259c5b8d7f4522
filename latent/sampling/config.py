"""The sampler's knobs: one flat, serialisable dataclass (configs and pipeline arguments map onto it).

Part names are resolved here ("auto" choices), and every knob is checked with an error that names
the argument and how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .registry import REGISTRIES, part_name

NOISE_SHAPES = ("canvas", "block")
CONFIDENCE_DTYPES = ("auto", None, "float32", "float64")
SCHED_SCHEDULES = ("linear", "cosine")
ROW_BLOCKS = ("shared", "independent")
# The parts row_blocks="independent" supports (any confidence part): ones that read only each row's own
# block and its step, and caches whose forward runs from a point every row's block lies after (row_blocks.py).
INDEPENDENT_ROW_PARTS = {
    "proposal": ("argmax", "gumbel"), "commit": ("threshold", "factor", "schedule"), "revision": ("none",),
    "stopping": ("block_full", "eos_early_stop"), "guidance": ("none", "cfg"),
    "cache": ("none", "prefix_exact", "block_exact", "prefix", "dual"), "verifier": ("none",),
}


@dataclass
class SamplerConfig:
    gen_length: int = 128
    block_length: int = 32
    steps: int | None = None  # total forwards of the schedule rule (LLaDA's `steps`); None = gen_length
    # Fast-dLLM v2: decode each block of block_length as sub-blocks of this length (None: whole blocks);
    # an exact block cache still caches whole blocks, once the block is done
    sub_block_length: int | None = None
    # The model computes logits only at the block's masked positions (exact: nothing else reads them; the
    # step callback's x0 is then 0 elsewhere). None: on when every part reads masked positions only.
    masked_logits_only: bool | None = None
    # "shared": the batch decodes block by block, each block until its slowest row is done; "independent":
    # a row moves on to its next block as soon as its own block is done, and leaves after its last one
    row_blocks: str = "shared"
    # parts, by registered name (or a ready-made object)
    proposal: Any = "auto"  # argmax at temperature 0, else gumbel
    confidence: Any = "low_confidence"
    commit: Any = "schedule"
    revision: Any = "none"  # which committed tokens may change again
    stopping: Any = "block_full"
    guidance: Any = "auto"  # cfg when cfg_scale > 0, else none
    cache: Any = "none"
    verifier: Any = "none"  # whether drafted tokens are accepted
    # proposal
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    noise_shape: str = "canvas"  # "canvas": LLaDA's full [B, T, V] draw; "block": only the block (cheaper)
    # confidence: "auto" = the logits' dtype for the schedule rule (LLaDA), float64 otherwise (Fast-dLLM)
    confidence_dtype: str | None = "auto"
    # commit rules
    threshold: float = 0.9
    factor: float = 1.0
    commit_filter: Any = None  # commit "learned" (Learn2PD): a CommitFilter folder (train.py, task commit_filter) or object
    filter_threshold: float = 0.5  # learned: commit candidates whose filter probability is > this (and the best one)
    # revision (docs/sampling.md, "Revision")
    editing_threshold: float = 0.5  # editing_threshold: replace a token when another has probability > this
    max_post_steps: int = 16  # editing_threshold: at most this many editing-only forwards on a full block
    saber_min_commit: int = 2  # saber (commit and revision): n, the fewest tokens committed per step
    ccd_window: int = 2  # ccd: the distributions of the last d steps are averaged
    ccd_entropy: float = 0.1  # ccd: a masked position whose averaged distribution has entropy < this commits
    # early commit of a whole block (stopping "prophet" / "sched"), thresholds on the mean top-2 logit gap
    prophet_thresholds: tuple = (7.5, 5.0, 2.5)  # before 1/3, before 2/3, after 2/3 of the answer decoded
    sched_thresholds: tuple = (7.5, 2.5)  # at the start and at the end of the answer
    sched_schedule: str = "linear"  # "linear" or "cosine" decay from the first to the second
    # guidance
    cfg_scale: float = 0.0
    # cache "dual": a full refresh at every k-th block start; the others rerun only the previous block and this one
    dual_refresh_every: int = 1
    # cache "dkv": every `dkv_refresh`-th forward of a block (and its first two) recomputes every K/V
    dkv_refresh: int = 4
    # verifier (docs/sampling.md, "Verifier")
    freedave_drafts: int = 4  # freedave: candidate blocks checked per forward (the sampler's next steps)
    verifier_model: Any = None  # diffuspec: the autoregressive verifier (any causal model returning .logits)
    diffuspec_draft_lengths: tuple = (20, 30)  # diffuspec: (k_min, k_max) of the draft window; k starts at k_max
    diffuspec_growth: int = 10  # diffuspec: delta, added to k while acceptance keeps up with the draft
    diffuspec_ema: float = 0.5  # diffuspec: rho, the weight of the newest step in the length averages
    diffuspec_candidates: int = 15  # diffuspec CPS: at most M candidates per position ...
    diffuspec_mass: float = 0.8  # ... the fewest whose probability reaches tau (EOS always one)
    diffuspec_beam: int = 3  # diffuspec CPS: beam width
    diffuspec_weight: float = 0.5  # diffuspec CPS: lambda, the drafter's share of the score (1 - it: the proxy's)
    diffuspec_proxy: Any = None  # diffuspec CPS: a causal proxy (e.g. an n-gram model); None = the drafter alone
    # decoders of docs/sampling.md, "More decoders of the literature"
    freecache_refresh: int = 0  # cache freecache: every n-th forward recomputes every K/V (0 = never, as FreeCache)
    freecache_window: int | None = None  # cache freecache: positions after the block a forward runs (None: all)
    guide_model: Any = None  # commit ar_guided: the autoregressive guide (any causal model returning .logits)
    ar_guided_top_k: int = 2  # ar_guided: a draft is accepted when among the guide's top k ...
    ar_guided_ratio: float = 0.5  # ... with at least this share of the guide's top probability
    dynamic_block_sizes: tuple = (4, 8, 16)  # stopping dynamic_block: the sub-block lengths it chooses from
    dynamic_block_entropy: float = 0.5  # dynamic_block: the longest size whose mean entropy (nats) is <= this
    block_predictor: Any = None  # dynamic_block: a BlockSizePredictor folder (train.py, task block_predictor) or object
    block_predictor_threshold: float = 0.5  # dynamic_block + predictor: the longest size judged safe with p > this
    classifier: Any = None  # guidance classifier: fn(canvas [b, N], start, end) -> log p(c | x_t = v), [b, L, V]
    classifier_scale: float = 1.0  # guidance classifier: w in p(x) p(c | x)^w
    energy_model: Any = None  # proposal edlm: the autoregressive energy model (causal, returning .logits)
    num_candidates: int = 2  # edlm: proposals drawn per step and reranked by the energy
    edlm_window: tuple = (0.4, 0.6)  # edlm: importance sampling while the answer's masked share is in [lo, hi]
    edlm_temperature: float = 1.0  # edlm: weights softmax(-energy / this)
    # special tokens; mask_token_id defaults to model.config.mask_token_id
    mask_token_id: int | None = None
    eos_token_id: int | None = None
    eot_token_id: int | None = None  # end of turn, for confidence_eos_eot_inf
    logits_eos_inf: bool = False  # EOS logit -> -inf before everything: EOS is never proposed
    confidence_eos_eot_inf: bool = False  # EOS/EOT logits -> -inf in the confidence: committed last
    eos_early_stop: bool = False  # shorthand for stopping="eos_early_stop"

    @property
    def decode_length(self) -> int:
        """The length of a decoding block: sub_block_length, else block_length."""
        return self.sub_block_length or self.block_length

    @property
    def num_blocks(self) -> int:
        """Decoding blocks (sub-blocks with sub_block_length) over the answer when they start right after the
        prompt; blocks counted from slot 0 (block_alignment="start") can add one."""
        return self.gen_length // self.decode_length

    def to_dict(self) -> dict:
        # Shallow on purpose: a ready-made part object is passed through, never deep-copied.
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def part_names(self) -> dict[str, Any]:
        """The part chosen for each slot, "auto" and shorthands resolved."""
        names = {slot: getattr(self, slot) for slot in REGISTRIES}
        if names["proposal"] == "auto":
            names["proposal"] = "argmax" if self.temperature == 0 else "gumbel"
        if names["guidance"] == "auto":
            names["guidance"] = "cfg" if self.cfg_scale > 0 else "none"
        if self.eos_early_stop:
            names["stopping"] = "eos_early_stop"
        return names

    @property
    def total_steps(self):
        """The schedule rule's forwards over the whole answer: `steps`, or gen_length when it is None."""
        return self.gen_length if self.steps is None else self.steps

    @property
    def steps_per_block(self) -> int:
        """Forwards per block of the schedule rule: total_steps / num_blocks."""
        return max(1, self.total_steps // max(1, self.num_blocks))

    @property
    def resolved_confidence_dtype(self) -> str | None:
        """`confidence_dtype` with "auto" resolved: None (the logits' dtype) for the schedule rule, as
        LLaDA; float64 for the other rules, as Fast-dLLM."""
        if self.confidence_dtype != "auto":
            return self.confidence_dtype
        return None if part_name(self.commit) == "schedule" else "float64"

    def validate(self) -> SamplerConfig:
        for name in ("gen_length", "block_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        if self.gen_length % self.block_length:
            raise ValueError(
                f"`gen_length` ({self.gen_length}) must be a multiple of `block_length` ({self.block_length}); "
                f"set block_length to a divisor of {self.gen_length} or round gen_length up to "
                f"{-(-self.gen_length // self.block_length) * self.block_length}."
            )
        if self.sub_block_length is not None and (
            not isinstance(self.sub_block_length, int) or isinstance(self.sub_block_length, bool)
            or self.sub_block_length <= 0 or self.block_length % self.sub_block_length
        ):
            raise ValueError(
                f"`sub_block_length` must be None or a positive divisor of block_length ({self.block_length}), "
                f"got {self.sub_block_length!r}."
            )
        names = self.part_names()
        if self.eos_early_stop and self.stopping not in ("block_full", "eos_early_stop"):
            raise ValueError(
                f"`eos_early_stop=True` selects stopping='eos_early_stop', but `stopping` is {self.stopping!r}; "
                "set only one of them."
            )
        for slot, name in names.items():
            if isinstance(name, str):
                check = getattr(REGISTRIES[slot].get(name), "check_config", None)  # unknown names raise here
                if check is not None:  # a part that checks its own settings
                    check(self)
        if names["commit"] == "schedule":
            steps = self.total_steps
            if not isinstance(steps, int) or steps <= 0:
                raise ValueError(f"`steps` must be a positive int, got {steps!r}.")
            if steps % self.num_blocks:
                raise ValueError(
                    f"`steps` ({steps}) must be a multiple of the number of blocks gen_length/"
                    f"{'sub_block_length' if self.sub_block_length else 'block_length'} = {self.num_blocks} (the "
                    f"schedule rule runs steps/num_blocks steps per block); use steps="
                    f"{max(1, steps // self.num_blocks) * self.num_blocks} or change block_length."
                )
        if not 0 <= self.temperature < float("inf"):  # written so that NaN fails too
            raise ValueError(f"`temperature` must be finite and >= 0 (0 = argmax), got {self.temperature}.")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"`top_k` must be None or an int >= 0 (0 = off), got {self.top_k!r}.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"`top_p` must be None or in (0, 1], got {self.top_p}.")
        if (self.top_k or (self.top_p is not None and self.top_p < 1)) and names["proposal"] == "argmax":
            raise ValueError("`top_k`/`top_p` only act when sampling; set temperature > 0 (or proposal='gumbel').")
        if self.noise_shape not in NOISE_SHAPES:
            raise ValueError(f"`noise_shape` must be one of {NOISE_SHAPES}, got {self.noise_shape!r}.")
        if self.confidence_dtype not in CONFIDENCE_DTYPES:
            raise ValueError(f"`confidence_dtype` must be one of {CONFIDENCE_DTYPES}, got {self.confidence_dtype!r}.")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"`threshold` must be in (0, 1], got {self.threshold}.")
        if not 0 < self.factor < float("inf"):
            raise ValueError(f"`factor` must be finite and > 0, got {self.factor}.")
        self._validate_revision_and_stopping(names)
        self._validate_cache_and_verifier(names)
        self._validate_row_blocks(names)
        if not 0 <= self.cfg_scale < float("inf"):
            raise ValueError(f"`cfg_scale` must be finite and >= 0 (0 = off), got {self.cfg_scale}.")
        if names["guidance"] == "cfg" and self.cfg_scale == 0:
            raise ValueError("guidance='cfg' needs `cfg_scale` > 0.")
        needs_eos = self.logits_eos_inf or self.confidence_eos_eot_inf or names["stopping"] == "eos_early_stop"
        if needs_eos and self.eos_token_id is None:
            raise ValueError(
                "`eos_token_id` is required by logits_eos_inf, confidence_eos_eot_inf and eos_early_stop; "
                "pass the tokenizer's eos_token_id."
            )
        return self

    def _validate_revision_and_stopping(self, names: dict) -> None:
        if not 0 < self.editing_threshold <= 1:
            raise ValueError(f"`editing_threshold` must be in (0, 1] (1 = never edit), got {self.editing_threshold}.")
        for name in ("max_post_steps", "saber_min_commit", "ccd_window"):
            value, low = getattr(self, name), 0 if name == "max_post_steps" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
        if self.ccd_entropy < 0:
            raise ValueError(f"`ccd_entropy` must be >= 0 (0 = no extra commits), got {self.ccd_entropy}.")
        for name, size in (("prophet_thresholds", 3), ("sched_thresholds", 2)):
            value = getattr(self, name)
            if len(value) != size or not all(isinstance(v, (int, float)) for v in value):
                raise ValueError(f"`{name}` must be {size} numbers (logit gaps), got {value!r}.")
        if self.sched_schedule not in SCHED_SCHEDULES:
            raise ValueError(f"`sched_schedule` must be one of {SCHED_SCHEDULES}, got {self.sched_schedule!r}.")
        if part_name(names["revision"]) == "saber" and part_name(names["commit"]) == "schedule":
            raise ValueError(
                "revision='saber' re-masks tokens at every step, so the block cannot run a fixed number of steps; "
                "use commit='saber' (its adaptive rule), 'threshold' or 'factor'."
            )

    def _validate_row_blocks(self, names: dict) -> None:
        if self.row_blocks not in ROW_BLOCKS:
            raise ValueError(f"`row_blocks` must be one of {ROW_BLOCKS}, got {self.row_blocks!r}.")
        if self.row_blocks == "shared":
            return
        if part_name(names["cache"]) == "dual" and self.dual_refresh_every != 1:
            raise ValueError(
                f"row_blocks='independent' refreshes the dual cache whenever a row starts a block, so "
                f"dual_refresh_every={self.dual_refresh_every!r} has no meaning there; use dual_refresh_every=1 "
                "or row_blocks='shared'."
            )
        for slot, allowed in INDEPENDENT_ROW_PARTS.items():
            name = part_name(names[slot])
            if name not in allowed:
                raise ValueError(
                    f"row_blocks='independent' supports {slot} {' / '.join(map(repr, allowed))}, got {slot}={name!r}; "
                    f"set {slot} to one of them, or row_blocks='shared' for this {slot}."
                )

    def _validate_cache_and_verifier(self, names: dict) -> None:
        cache, verifier = part_name(names["cache"]), part_name(names["verifier"])
        if not isinstance(self.dkv_refresh, int) or isinstance(self.dkv_refresh, bool) or self.dkv_refresh < 1:
            raise ValueError(f"`dkv_refresh` must be an int >= 1 (1 = recompute every forward), got {self.dkv_refresh!r}.")
        if cache == "dkv" and (part_name(names["revision"]) != "none" or part_name(names["stopping"]) == "sched"):
            raise ValueError("cache='dkv' computes no logits for tokens whose K/V it reuses; revision parts and "
                             "stopping='sched' read them, so use revision='none' and another stopping part.")
        if not isinstance(self.dual_refresh_every, int) or isinstance(self.dual_refresh_every, bool) \
                or self.dual_refresh_every < 1:
            raise ValueError(f"`dual_refresh_every` must be an int >= 1 (1 = a full refresh at every block), got "
                             f"{self.dual_refresh_every!r}.")
        if not isinstance(self.freedave_drafts, int) or self.freedave_drafts < 1:
            raise ValueError(f"`freedave_drafts` must be an int >= 1, got {self.freedave_drafts!r}.")
        if verifier in ("freedave", "diffuspec"):
            if part_name(names["proposal"]) != "argmax" or self.temperature > 0:
                raise ValueError(f"verifier={verifier!r} checks drafts against greedy decoding; use temperature=0.")
            if part_name(names["revision"]) != "none":
                raise ValueError(f"verifier={verifier!r} needs revision='none' (drafts assume committed tokens are final).")
        if verifier == "freedave":
            if part_name(names["confidence"]) == "random" or part_name(names["commit"]) == "saber":
                raise ValueError("verifier='freedave' re-runs the sampler's step on drafts, so the step must depend only "
                                 "on the block and its logits: not confidence='random', not commit='saber'.")
            if cache == "dkv":
                raise ValueError("verifier='freedave' runs several drafts per forward, which cache='dkv' does not support.")
        if names["verifier"] == "diffuspec":  # by name: the part is built from these fields
            if self.verifier_model is None:
                raise ValueError("verifier='diffuspec' needs `verifier_model`, the autoregressive model that verifies.")
            low, high = self.diffuspec_draft_lengths
            if not 1 <= low <= high:
                raise ValueError(f"`diffuspec_draft_lengths` must be (k_min, k_max) with 1 <= k_min <= k_max, got "
                                 f"{self.diffuspec_draft_lengths!r}.")
            if not 0 < self.diffuspec_ema <= 1 or not 0 <= self.diffuspec_weight <= 1 or not 0 < self.diffuspec_mass <= 1:
                raise ValueError("`diffuspec_ema` must be in (0, 1], `diffuspec_weight` in [0, 1] and `diffuspec_mass` "
                                 "in (0, 1].")
            if min(self.diffuspec_candidates, self.diffuspec_beam) < 1 or self.diffuspec_growth < 0:
                raise ValueError("`diffuspec_candidates` and `diffuspec_beam` must be >= 1, `diffuspec_growth` >= 0.")

"""Decoders of the literature as sampler parts (latent/sampling: revision.py, the saber commit rule, the
prophet/sched stopping parts) and decoding trajectories (trajectory.py, pipelines, `mmdlm trajectory`).

Each member is checked token for token at temperature 0 against a plain re-implementation of its
paper's rule written below (one row at a time, Python lists), on the real tiny backbone and on a
scripted model whose logits change from forward to forward, so that revisions really happen; the
editing rule is also checked against diffusers' own BlockRefinementScheduler. Then the defining
properties: an editing threshold of 1 and unreachable early-commit thresholds change nothing, no
revision leaves a mask in a finished block, and the recorded trajectory is the callback's story.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from test_sampling import (
    MASK,
    MaskLogitOff,
    V,
    backbone_inputs,
    prompts,
    tiny_backbone,
    top_by_confidence,
)

from latent.sampling import Sampler, create_part, generate, list_parts, plot_trajectory
from latent.sampling.trajectory import COMMIT, EDIT, REMASK, Trajectory

INF = float("inf")


class ScriptedModel:
    """Logits read from a fixed random script: a page [N, V] chosen by a hash of the row's canvas. So the
    logits are a function of the canvas (rows independent, extra forwards on an unchanged canvas change
    nothing), yet every new token turns a new page: the model "changes its mind" from step to step and
    committed tokens meet better proposals. `growth` makes pages of fuller canvases surer."""

    def __init__(self, seed=0, pages=97, length=40, scale=3.0, growth=0.0, mask_id=MASK, vocab=V):
        g = torch.Generator().manual_seed(seed)
        self.script = torch.randn(pages, length, vocab, generator=g) * scale
        self.script[..., mask_id] = -INF
        self.weights = torch.randint(1, 1000, (length,), generator=g)
        self.mask_id, self.growth = mask_id, growth

    def __call__(self, x, attention_mask=None):
        page = (x * self.weights[: x.shape[1]]).sum(1) % self.script.shape[0]
        sure = 1 + self.growth * (x != self.mask_id).sum(1, keepdim=True)[..., None]
        return SimpleNamespace(logits=self.script[page, : x.shape[1]] * sure)


# ---- the plain loop every reference shares: blocks left to right, one full forward per step ---------
def plain_decode(model, prompt, mask, rule, *, gen_length, block_length, mask_id=MASK):
    batch, plen = prompt.shape
    x = [row + [mask_id] * gen_length for row in prompt.tolist()]
    keys = None if mask is None else torch.cat([mask, torch.ones(batch, gen_length, dtype=torch.long)], 1)
    rule.mask_id, rule.gen_length, rule.prompt_len = mask_id, gen_length, plen
    nfe = 0
    for b in range(gen_length // block_length):
        block = range(plen + b * block_length, plen + (b + 1) * block_length)
        rule.start(x, block)
        step = 0
        while rule.more(x, block, step):
            with torch.no_grad():
                logits = model(torch.tensor(x), attention_mask=keys).logits
            nfe += 1
            rule.forward(logits, x, block, step)
            step += 1
    return torch.tensor(x), nfe


class PlainRule:
    """LLaDA's quota (steps per block) and the common reading of a row's logits."""

    steps = None

    def start(self, x, block):
        masked = [sum(row[t] == self.mask_id for t in block) for row in x]
        if self.steps:
            s = self.steps
            self.quota = [[m // s + (1 if i < m % s else 0) for i in range(s)] for m in masked]

    def masked(self, row, block):
        return [t for t in block if row[t] == self.mask_id]

    def more(self, x, block, step):
        return any(self.masked(row, block) for row in x) and (self.steps is None or step < self.steps)

    def read(self, logits_row, dtype=torch.float32):
        """Proposal (argmax, never the mask id) and its probability at every position."""
        proposal = logits_row.clone()
        proposal[:, self.mask_id] = -INF
        x0 = proposal.argmax(-1).tolist()
        p = logits_row.to(dtype).softmax(-1)
        return x0, [p[t, x0[t]].item() for t in range(len(x0))], p


class PlainEditing(PlainRule):
    """LLaDA2Pipeline's block loop around BlockRefinementScheduler.step (threshold 1, i.e. the quota
    only). `max_post` counts as diffusers does: it allows max_post + 1 post forwards. With
    `use_diffusers` the step itself is diffusers' scheduler; otherwise it is written out here."""

    def __init__(self, steps, editing_threshold, max_post, use_diffusers=False):
        self.steps, self.tau, self.max_post = steps, editing_threshold, max_post
        if use_diffusers:
            from diffusers import BlockRefinementScheduler

            self.scheduler = BlockRefinementScheduler()
        else:
            self.scheduler = None

    def start(self, x, block):
        super().start(x, block)
        self.step_idx, self.post, self.stop = 0, 0, False
        if self.scheduler is not None:
            self.scheduler.set_timesteps(self.steps, block_length=len(block))

    def more(self, x, block, step):
        return not self.stop

    def forward(self, logits, x, block, step):
        masks_remaining = any(self.masked(row, block) for row in x)
        self.post += not masks_remaining
        edited = False
        for j, row in enumerate(x):
            before = list(row)
            if self.scheduler is not None:
                out = self.scheduler.step(logits[j : j + 1, block.start : block.stop], self.step_idx,
                                          torch.tensor([before[block.start : block.stop]]), mask_token_id=self.mask_id,
                                          threshold=1.0, editing_threshold=self.tau)
                row[block.start : block.stop] = out.prev_sample[0].tolist()
                edited |= bool(out.editing_transfer_index.any())
                continue
            x0, conf, p = self.read(logits[j])
            masked = self.masked(before, block)
            k = self.quota[j][min(self.step_idx, self.steps - 1)] if masked else 0
            for t in block:
                if before[t] != self.mask_id and x0[t] != before[t] and p[t, x0[t]].item() > self.tau:
                    row[t], edited = x0[t], True
            for t in top_by_confidence(conf, masked, k):
                row[t] = x0[t]
        self.step_idx += masks_remaining
        self.stop = ((not masks_remaining and not edited) or (masks_remaining and self.step_idx >= self.steps)
                     or (not masks_remaining and self.post > self.max_post))


class PlainRCR(PlainRule):
    """MDPO's running-confidence remasking: every masked position of the block takes its proposal and
    this step's confidence; then, unless it is the block's last step, the tokens the remaining quota
    still owes are masked again, least confident first (the higher position first among equals)."""

    def __init__(self, steps):
        self.steps = steps

    def start(self, x, block):
        super().start(x, block)
        self.stored = [dict() for _ in x]

    def forward(self, logits, x, block, step):
        for j, row in enumerate(x):
            x0, conf, _ = self.read(logits[j])
            for t in self.masked(row, block):
                row[t], self.stored[j][t] = x0[t], conf[t]
            owed = sum(self.quota[j][step + 1 :])
            for t in sorted(block, key=lambda t: (self.stored[j][t], -t))[:owed]:
                row[t] = self.mask_id


class PlainSaber(PlainRule):
    """Saber: commit every masked position more confident than the mean commit-time confidence of the
    answer's tokens (1 before any), at least the n most confident; then, while the block has masks,
    mask again the r = min(max(n // 2, ceil(f / 8)), f - 1) tokens whose confidence fell most since the
    previous step (f = tokens committed now)."""

    def __init__(self, n=2):
        self.n, self.at_commit = n, None

    def start(self, x, block):
        super().start(x, block)
        if self.at_commit is None:
            self.at_commit = [dict() for _ in x]
        self.previous = [None for _ in x]

    def forward(self, logits, x, block, step):
        for j, row in enumerate(x):
            x0, conf, _ = self.read(logits[j], torch.float64)
            masked = self.masked(row, block)
            seen = [c for t, c in self.at_commit[j].items() if t < block.stop]
            tau = sum(seen) / len(seen) if seen else 1.0
            chosen = [t for t in masked if conf[t] > tau]
            if len(chosen) < self.n:
                chosen = top_by_confidence(conf, masked, self.n)
            for t in chosen:
                row[t], self.at_commit[j][t] = x0[t], conf[t]
            previous, self.previous[j] = self.previous[j], conf
            if previous is None or not self.masked(row, block):
                continue
            f = len(chosen)
            r = max(0, min(max(self.n // 2, math.ceil(f / 8)), f - 1))
            held = [t for t in block if row[t] != self.mask_id]
            for t in sorted(held, key=lambda t: (conf[t] - previous[t], t))[:r]:
                row[t] = self.mask_id
                del self.at_commit[j][t]


class PlainCCD(PlainRule):
    """CCD: the block's distributions of the last `window` steps are averaged; the proposal and its
    confidence come from that average, and besides the quota every masked position whose averaged
    distribution has entropy < eps is committed."""

    def __init__(self, steps, window, eps):
        self.steps, self.window, self.eps = steps, window, eps

    def start(self, x, block):
        super().start(x, block)
        self.history = [[] for _ in x]

    def forward(self, logits, x, block, step):
        for j, row in enumerate(x):
            here = logits[j, block.start : block.stop]
            self.history[j].append(here.float().softmax(-1))
            recent = self.history[j][-self.window :]
            marginal = torch.stack(recent).mean(0)
            rectified = here if len(recent) == 1 else marginal.log()
            x0, conf, _ = self.read(rectified)
            entropy = torch.special.entr(marginal).sum(-1).tolist()
            masked = [t - block.start for t in self.masked(row, block)]
            chosen = set(top_by_confidence(conf, masked, self.quota[j][step]))
            chosen |= {t for t in masked if entropy[t] < self.eps}
            for t in chosen:
                row[block.start + t] = x0[t]


class PlainEarlyCommit(PlainRule):
    """Prophet (mean top-2 logit gap over the block's masked positions, piecewise threshold) or SchED (over
    the whole block, threshold decaying with progress); progress = share of the answer decoded. Once the
    gap reaches the threshold, every masked position of the block is committed; otherwise the quota."""

    def __init__(self, steps, kind, thresholds, schedule="linear"):
        self.steps, self.kind, self.thresholds, self.schedule = steps, kind, thresholds, schedule

    def threshold(self, progress):
        if self.kind == "prophet":
            early, mid, late = self.thresholds
            return early if progress < 0.33 else mid if progress < 0.67 else late
        high, low = self.thresholds
        left = 1 - progress if self.schedule == "linear" else (1 + math.cos(math.pi * progress)) / 2
        return low + (high - low) * left

    def forward(self, logits, x, block, step):
        for j, row in enumerate(x):
            x0, conf, _ = self.read(logits[j])
            masked = self.masked(row, block)
            proposal = logits[j].clone()
            proposal[:, self.mask_id] = -INF
            top = proposal.topk(2, -1).values
            gaps = (top[:, 0] - top[:, 1]).tolist()
            region = masked if self.kind == "prophet" else list(block)
            progress = sum(t != self.mask_id for t in row[self.prompt_len :]) / self.gen_length
            if masked and sum(gaps[t] for t in region) / len(region) >= self.threshold(progress):
                chosen = masked
            else:
                chosen = top_by_confidence(conf, masked, self.quota[j][step])
            for t in chosen:
                row[t] = x0[t]


# =====================================================================================================
# Each member against its plain re-implementation
# =====================================================================================================
def models():
    """(name, model, prompt ids, mask, mask id): the real tiny backbone and the scripted model."""
    backbone = MaskLogitOff(tiny_backbone("bidirectional"))
    ids, mask, _ = backbone_inputs()
    sids, smask = prompts((4, 3, 4))
    return [("backbone", backbone, ids, mask, 63), ("scripted", ScriptedModel(), sids, smask, MASK)]


MODELS = models()
SHORT, LONG = dict(gen_length=8, block_length=4), dict(gen_length=16, block_length=16)
MEMBERS = {  # name: (sampler knobs, plain rule, run)
    "editing": (dict(revision="editing_threshold", steps=8, editing_threshold=0.3, max_post_steps=3),
                lambda: PlainEditing(4, 0.3, 2), SHORT),
    "editing_post_steps": (dict(revision="editing_threshold", steps=16, editing_threshold=0.25, max_post_steps=3),
                           lambda: PlainEditing(16, 0.25, 2), dict(gen_length=8, block_length=8)),
    "rcr": (dict(revision="rcr", steps=8), lambda: PlainRCR(4), SHORT),
    "rcr_two_per_step": (dict(revision="rcr", steps=8), lambda: PlainRCR(8), LONG),
    "saber": (dict(revision="saber", commit="saber"), lambda: PlainSaber(2), LONG),
    "saber_n3": (dict(revision="saber", commit="saber", saber_min_commit=3), lambda: PlainSaber(3), LONG),
    "ccd": (dict(revision="ccd", steps=8, ccd_window=2, ccd_entropy=1.5), lambda: PlainCCD(4, 2, 1.5), SHORT),
    "prophet": (dict(stopping="prophet", steps=8, prophet_thresholds=(6.0, 4.0, 1.0)),
                lambda: PlainEarlyCommit(4, "prophet", (6.0, 4.0, 1.0)), SHORT),
    "sched_cosine": (dict(stopping="sched", steps=8, sched_thresholds=(2.5, 0.5), sched_schedule="cosine"),
                     lambda: PlainEarlyCommit(4, "sched", (2.5, 0.5), "cosine"), SHORT),
    "sched_linear": (dict(stopping="sched", steps=8, sched_thresholds=(1.5, 0.5)),
                     lambda: PlainEarlyCommit(4, "sched", (1.5, 0.5)), SHORT),
}


@pytest.mark.parametrize("which", [m[0] for m in MODELS])
@pytest.mark.parametrize("member", list(MEMBERS))
def test_member_matches_plain_reimplementation(member, which):
    _, model, ids, mask, mask_id = next(m for m in MODELS if m[0] == which)
    knobs, rule, run = MEMBERS[member]
    want, want_nfe = plain_decode(model, ids, mask, rule(), mask_id=mask_id, **run)
    seen = []
    out = generate(model, ids, mask, mask_token_id=mask_id, **run, **knobs,
                   callback_on_step_end=lambda s, c, info: seen.append(info))
    assert torch.equal(out.sequences, want)
    assert out.nfe == want_nfe
    assert not (out.sequences == mask_id).any()
    if which == "scripted" and member.startswith(("editing", "rcr", "saber")):  # the rule really acted
        assert any(bool(i["edited"].any() or i["remasked"].any()) for i in seen)
    if member.startswith(("ccd", "prophet", "sched")):  # extra or early commits saved forwards
        assert out.nfe < 8


def test_editing_matches_diffusers_block_refinement_scheduler():
    # The same loop with diffusers' own step (threshold 1: commits follow the quota alone).
    for _, model, ids, mask, mask_id in MODELS:
        for steps, tau in ((4, 0.3), (16, 0.25)):
            run = dict(gen_length=16, block_length=8, mask_id=mask_id)
            want, nfe = plain_decode(model, ids, mask, PlainEditing(steps, tau, 2, use_diffusers=True), **run)
            plain, _ = plain_decode(model, ids, mask, PlainEditing(steps, tau, 2), **run)
            assert torch.equal(plain, want)
            out = generate(model, ids, mask, gen_length=16, block_length=8, steps=2 * steps, mask_token_id=mask_id,
                           revision="editing_threshold", editing_threshold=tau, max_post_steps=3)
            assert torch.equal(out.sequences, want) and out.nfe == nfe


# =====================================================================================================
# Defining properties
# =====================================================================================================
BASE_RUNS = [dict(steps=8), dict(steps=4), dict(commit="threshold", threshold=0.5)]


@pytest.mark.parametrize("run", BASE_RUNS, ids=["one_per_step", "two_per_step", "threshold"])
@pytest.mark.parametrize("which", [m[0] for m in MODELS])
def test_unreachable_settings_change_nothing(which, run):
    _, model, ids, mask, mask_id = next(m for m in MODELS if m[0] == which)
    common = dict(gen_length=8, block_length=4, mask_token_id=mask_id, **run)
    base = generate(model, ids, mask, **common)
    same = [
        dict(revision="none"),
        dict(revision="editing_threshold", editing_threshold=1.0, max_post_steps=0),
        dict(revision="ccd", ccd_window=1, ccd_entropy=0.0),
        dict(stopping="prophet", prophet_thresholds=(INF, INF, INF)),
        dict(stopping="sched", sched_thresholds=(INF, INF)),
    ]
    for knobs in same:
        out = generate(model, ids, mask, **common, **knobs)
        assert torch.equal(out.sequences, base.sequences), knobs
        assert out.nfe == base.nfe and torch.equal(out.steps, base.steps), knobs
    # an editing threshold of 1 never edits, even with post steps on full blocks
    edit = generate(model, ids, mask, **common, revision="editing_threshold", editing_threshold=1.0)
    assert torch.equal(edit.sequences, base.sequences)


@pytest.mark.parametrize("knobs", [
    dict(revision="editing_threshold", editing_threshold=0.2, steps=16),
    dict(revision="rcr", steps=8),
    dict(revision="rcr", commit="threshold", threshold=0.3),
    dict(revision="saber", commit="saber"),
    dict(revision="saber", commit="factor", factor=2.0),
    dict(revision="ccd", ccd_entropy=2.0, steps=16),
    dict(stopping="prophet", prophet_thresholds=(3.0, 2.0, 1.0), steps=16),
    dict(stopping="sched", steps=16),
], ids=lambda k: "_".join(str(v) for v in k.values())[:40])
def test_no_mask_is_left_in_a_finished_block(knobs):
    model = ScriptedModel(seed=3, growth=0.1)
    ids, mask = prompts((4, 3, 4))
    blocks_seen = []

    def check(step, canvas, info):
        if blocks_seen and info["block"] != blocks_seen[-1]:  # the previous block is finished
            done = canvas[:, ids.shape[1] : ids.shape[1] + info["block"] * 4]
            assert not (done == MASK).any()
        blocks_seen.append(info["block"])

    out = generate(model, ids, mask, gen_length=16, block_length=4, mask_token_id=MASK, callback_on_step_end=check,
                   record_trajectory=True, **knobs)
    assert blocks_seen[-1] == 3 and not (out.sequences == MASK).any()


def test_rcr_keeps_the_schedule_count_and_revises():
    model = ScriptedModel(seed=1)
    ids, mask = prompts((4, 3, 4))
    counts = []
    out = generate(model, ids, mask, gen_length=8, block_length=8, steps=4, mask_token_id=MASK, revision="rcr",
                   callback_on_step_end=lambda s, c, info: counts.append((c[:, ids.shape[1]:] != MASK).sum(1).tolist()))
    assert counts == [[2] * 3, [4] * 3, [6] * 3, [8] * 3]  # the committed count follows LLaDA's schedule
    assert out.trajectory is None  # only recorded when asked


def test_saber_commits_more_as_confidence_stays_high_and_backtracks():
    ids, mask = prompts((4, 3, 4))
    runs = {}
    for growth in (0.0, 0.5):  # with growth, fuller canvases make surer proposals
        out = generate(ScriptedModel(seed=2, growth=growth), ids, mask, gen_length=32, block_length=32,
                       mask_token_id=MASK, revision="saber", commit="saber", record_trajectory=True)
        runs[growth] = out.nfe, (out.trajectory.events == COMMIT).sum(2).float().mean(0), out.trajectory.events
    (flat_nfe, flat, flat_events), (sure_nfe, sure, _) = runs[0.0], runs[0.5]
    assert flat[0] == sure[0] == 2  # nothing committed yet: tau = 1, so the n most confident
    assert sure.max() > 3 * flat[:3].mean() and sure_nfe < flat_nfe / 2  # acceleration
    assert (flat_events == REMASK).any()  # backtracking


def test_editing_gets_post_steps_on_full_blocks():
    model = ScriptedModel(seed=4)
    ids, mask = prompts((4, 3, 4))
    base = generate(model, ids, mask, gen_length=8, block_length=8, commit="threshold", threshold=0.2,
                    mask_token_id=MASK)
    out = generate(model, ids, mask, gen_length=8, block_length=8, commit="threshold", threshold=0.2,
                   mask_token_id=MASK, revision="editing_threshold", editing_threshold=0.3, max_post_steps=4,
                   record_trajectory=True)
    assert base.nfe < out.nfe <= base.nfe + 4
    assert (out.trajectory.events == EDIT).any()


def test_scheduler_step_applies_the_revision():
    from latent.scheduler import MaskedDiffusionScheduler

    for revision in ("rcr", "editing_threshold"):
        model = ScriptedModel(seed=5)
        ids, mask = prompts((4, 3, 4))
        scheduler = MaskedDiffusionScheduler(block_length=8, num_inference_steps=8, revision=revision)
        canvas = torch.cat([ids, torch.full((3, 8), MASK)], 1)
        full_mask = torch.cat([mask, torch.ones(3, 8, dtype=torch.long)], 1)
        scheduler.set_timesteps(8)
        revised = False
        for t in scheduler.timesteps:
            logits = model(canvas, attention_mask=full_mask).logits[:, -8:]
            out = scheduler.step(logits, t, canvas[:, -8:], mask_token_id=MASK, editing_threshold=0.3)
            revised |= bool(out.remask_index.any() or out.edit_index.any())
            canvas[:, -8:] = out.prev_sample
        want = generate(model, ids, mask, gen_length=8, block_length=8, steps=8, mask_token_id=MASK,
                        revision=revision, editing_threshold=0.3, noise_shape="block")
        assert torch.equal(canvas, want.sequences) and revised, revision


def test_parts_are_registered_and_read_their_knobs():
    assert {"none", "editing_threshold", "rcr", "saber", "ccd"} <= set(list_parts("revision"))
    assert {"prophet", "sched"} <= set(list_parts("stopping")) and "saber" in list_parts("commit")
    cfg = dict(editing_threshold=0.7, max_post_steps=5, saber_min_commit=4, ccd_window=3, ccd_entropy=0.2,
               prophet_thresholds=(3, 2, 1), sched_thresholds=(4, 1), sched_schedule="cosine")
    editing = create_part("revision", "editing_threshold", **cfg)
    assert (editing.threshold, editing.max_post_steps) == (0.7, 5)
    assert create_part("revision", "saber", **cfg).n == 4 and create_part("commit", "saber", **cfg).n == 4
    ccd = create_part("revision", "ccd", **cfg)
    assert (ccd.window, ccd.entropy) == (3, 0.2)
    assert create_part("stopping", "prophet", **cfg).thresholds == (3.0, 2.0, 1.0)
    sched = create_part("stopping", "sched", **cfg)
    assert (sched.high, sched.low, sched.schedule) == (4.0, 1.0, "cosine")
    assert Sampler.from_config({"revision": "rcr", "gen_length": 8, "block_length": 4}).config.revision == "rcr"


@pytest.mark.parametrize("kwargs, match", [
    (dict(revision="saber"), "revision='saber'.*commit='saber'"),
    (dict(revision="redo"), "Known revision names"),
    (dict(editing_threshold=0.0), "editing_threshold"),
    (dict(max_post_steps=-1), "max_post_steps"),
    (dict(saber_min_commit=0), "saber_min_commit"),
    (dict(ccd_window=0), "ccd_window"),
    (dict(ccd_entropy=-1.0), "ccd_entropy"),
    (dict(prophet_thresholds=(1.0, 2.0)), "prophet_thresholds"),
    (dict(sched_schedule="exp"), "sched_schedule"),
])
def test_revision_and_stopping_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampler(gen_length=8, block_length=4, **kwargs)


# =====================================================================================================
# Trajectories
# =====================================================================================================
@pytest.mark.parametrize("knobs", [dict(steps=8), dict(revision="rcr", steps=8),
                                   dict(revision="editing_threshold", editing_threshold=0.3, steps=8)])
def test_trajectory_is_the_callbacks_story(knobs):
    model = ScriptedModel(seed=6)
    ids, mask = prompts((4, 3, 4))
    seen = []
    out = generate(model, ids, mask, gen_length=8, block_length=4, mask_token_id=MASK, record_trajectory=True,
                   callback_on_step_end=lambda s, c, info: seen.append((s, c.clone(), info)), **knobs)
    traj = out.trajectory
    assert traj.events.shape == (3, out.nfe, 8) and len(seen) == out.nfe
    for step, _, info in seen:  # each forward's events are the callback's masks, at the block's columns
        lo = info["block"] * 4
        for code, key in ((COMMIT, "transfer"), (REMASK, "remasked"), (EDIT, "edited")):
            assert torch.equal(traj.events[info["rows"], step, lo : lo + 4] == code, info[key])
        assert (traj.events[:, step, :lo] == 0).all() and (traj.events[:, step, lo + 4 :] == 0).all()
    # the last commit or edit of each position wrote its final token, which the canvas then kept
    final = out.sequences[:, ids.shape[1] :]
    for row in range(3):
        for g in range(8):
            step = int(traj.commit_step[row, g])
            assert int(seen[step][1][row, ids.shape[1] + g]) == int(final[row, g])
    assert torch.equal(traj.decoded()[:, -1], torch.ones(3, 8, dtype=torch.bool))
    if knobs.get("revision") is None:
        assert (traj.revisions == 0).all() and ((traj.events == COMMIT).sum(1) == 1).all()


def test_trajectory_gather_and_picture(tmp_path):
    a = Trajectory(torch.tensor([[[1, 0], [0, 1]]], dtype=torch.int8))
    b = Trajectory(torch.tensor([[[1, 1]], [[0, 1]]], dtype=torch.int8))
    joined = Trajectory.gather([(a, [2]), (b, [0, 1])], 4)
    assert joined.events.shape == (4, 2, 2) and joined.events[3].sum() == 0
    assert joined.commit_step.tolist() == [[0, 0], [-1, 0], [0, 1], [-1, -1]]
    model = ScriptedModel(seed=7)
    ids, mask = prompts((4, 3, 4))
    out = generate(model, ids, mask, gen_length=8, block_length=4, steps=8, mask_token_id=MASK, revision="rcr",
                   record_trajectory=True)
    path = tmp_path / "t.png"
    plot_trajectory(out.trajectory, path, row=1, labels=[str(t) for t in out.sequences[1, -8:].tolist()], title="rcr")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pipelines_return_the_trajectory_and_the_command_line_draws_it(tmp_path):
    from test_text_pipeline import make_pipe

    from pipelines.cli import main

    pipe = make_pipe()
    prompts_ = ["the cat sat", "", "a dog"]  # the empty prompt is a bad row: it gets no events
    out = pipe(prompts_, gen_length=8, steps=8, revision="editing_threshold", editing_threshold=0.3,
               on_error="record", output_type="ids", trajectory=True)
    ids, mask = pipe.encode_prompt([prompts_[0], prompts_[2]])
    ref = generate(pipe.model, ids, mask, gen_length=8, block_length=4, steps=8, revision="editing_threshold",
                   editing_threshold=0.3, record_trajectory=True)
    steps = ref.trajectory.events.shape[1]
    assert out.trajectory.events.shape == (3, steps, 8)
    assert torch.equal(out.trajectory.events[[0, 2]], ref.trajectory.events) and out.trajectory.events[1].sum() == 0
    as_tuple = pipe("the cat", gen_length=8, steps=8, output_type="ids", return_dict=False, trajectory=True)
    assert isinstance(as_tuple[-1], Trajectory) and len(as_tuple) == 5
    assert "trajectory" not in pipe("the cat", gen_length=8, steps=8, output_type="ids")
    pipe.save_pretrained(tmp_path / "pipe")
    png = tmp_path / "x.png"
    assert main(["trajectory", "--model", str(tmp_path / "pipe"), "--prompt", "the cat", "--out", str(png),
                 "--gen-length", "8", "--steps", "8", "--set", "revision=rcr"]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"

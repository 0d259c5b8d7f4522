"""Rows that decode their own blocks (row_blocks="independent", latent/sampling/row_blocks.py).

The defining property: a row of a batch decodes to exactly the tokens it gets alone (batch 1), in as
many forwards as alone, and the batch takes as many forwards as its slowest row, never more than the
shared loop, where every block waits for the slowest row.
"""

from __future__ import annotations

import pytest
import torch
from test_sampling import MaskLogitOff, backbone_inputs, stale_forward, tiny_backbone

from latent.sampling import Sampler, generate
from latent.sampling.trajectory import NOTHING

pytestmark = pytest.mark.usefixtures("one_thread")

MASK, GEN, BLOCK = 63, 16, 4
RULES = {"threshold": dict(commit="threshold", threshold=0.5), "factor": dict(commit="factor", factor=1.5),
         "schedule": dict(commit="schedule", steps=8)}


def equal_length_prompts(batch=4, length=6, seed=3):
    return torch.randint(0, 60, (batch, length), generator=torch.Generator().manual_seed(seed))


def alone(model, ids, mask=None, **run):
    """Each row decoded by itself, its pads dropped: (its generated tokens, its forwards)."""
    outs = []
    for row in range(len(ids)):
        pads = 0 if mask is None else int((mask[row] == 0).sum())
        outs.append(generate(model, ids[row : row + 1, pads:], **run))
    return torch.stack([o.sequences[0, -GEN:] for o in outs]), torch.tensor([o.nfe for o in outs])


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("layout, cache, extra", [
    ("bidirectional", "none", {}),
    ("bidirectional", "none", dict(masked_logits_only=True)),
    ("bidirectional", "none", dict(cfg_scale=0.5)),
    ("prefix", "prefix_exact", {}),
    ("block_causal", "none", {}),
    ("block_causal", "prefix_exact", dict(masked_logits_only=True)),
    ("block_causal", "block_exact", {}),
    ("block_causal", "block_exact", dict(masked_logits_only=True)),
], ids=["bidir-none", "bidir-none-masked-logits", "bidir-none-cfg", "prefix-prefix_exact", "block_causal-none",
        "block_causal-prefix_exact-masked-logits", "block_causal-block_exact", "block_causal-block_exact-masked-logits"])
@pytest.mark.parametrize("padded", [False, True], ids=["equal_prompts", "left_padded"])
def test_each_row_decodes_as_it_would_alone(rule, layout, cache, extra, padded):
    backbone = tiny_backbone(layout)
    # the plain backbone where the wrapper does not do: it has no logits_positions, and its -inf mask logit
    # gives CFG's combination NaN
    model = backbone if extra.get("masked_logits_only") or extra.get("cfg_scale") else MaskLogitOff(backbone)
    ids, mask = (backbone_inputs()[:2]) if padded else (equal_length_prompts(), None)
    run = dict(gen_length=GEN, block_length=BLOCK, cache=cache, **RULES[rule], **extra)
    want, want_nfe = alone(model, ids, mask, **run)
    blocks = []
    out = Sampler(row_blocks="independent", **run)(model, ids, mask,
                                                   callback_on_step_end=lambda s, c, info: blocks.append(info["block"]))
    shared = generate(model, ids, mask, **run)
    assert torch.equal(out.sequences[:, -GEN:], want)
    prefill = int(cache in ("prefix_exact", "block_exact"))  # the prompt's one forward
    assert torch.equal(out.steps, want_nfe - prefill)  # each row takes part in as many forwards as alone
    assert out.nfe == int(want_nfe.max())  # the batch, as many as its slowest row
    assert out.nfe <= shared.nfe
    apart = any(len(set(b.tolist())) > 1 for b in blocks)  # rows stood in different blocks at some forward
    if rule != "schedule":
        assert apart
    else:  # a fixed step count per block: the rows move in step, as in the shared loop
        assert not apart and torch.equal(out.sequences, shared.sequences) and out.nfe == shared.nfe
    if cache == "block_exact":  # the cache saves work: fewer positions run than without it
        plain = Sampler(row_blocks="independent", **{**run, "cache": "none"})(model, ids, mask)
        assert torch.equal(plain.sequences, out.sequences) and out.forward_tokens < plain.forward_tokens
    if extra.get("masked_logits_only"):  # logits at each row's own masked positions only: the same tokens
        every = generate(model, ids, mask, row_blocks="independent", **{**run, "masked_logits_only": False})
        assert torch.equal(every.sequences, out.sequences)


def test_fewer_forwards_than_the_shared_loop_when_rows_differ():
    model = MaskLogitOff(tiny_backbone("bidirectional"))
    ids = equal_length_prompts(batch=8, seed=5)
    run = dict(gen_length=32, block_length=BLOCK, **RULES["threshold"])
    out = generate(model, ids, row_blocks="independent", **run)
    shared = generate(model, ids, **run)
    _, want_nfe = alone(model, ids, **run)
    assert out.nfe == int(want_nfe.max()) < shared.nfe
    # the shared loop runs every row in every forward; independent rows leave when they are done
    assert int(shared.steps.min()) == shared.nfe and torch.equal(out.steps, want_nfe)


@pytest.mark.parametrize("knobs", [
    dict(temperature=1.0, commit="threshold", threshold=0.5),
    dict(temperature=1.0, commit="schedule", steps=8, confidence="random", noise_shape="block"),
    dict(commit="factor", factor=1.5, confidence="random"),
], ids=["gumbel", "gumbel-random-block-noise", "random-confidence"])
def test_noise_at_batch_one_is_the_shared_loops(knobs):
    # one row: its own block is the shared block, so it draws the same numbers from the same generator
    model = MaskLogitOff(tiny_backbone("bidirectional"))
    ids = equal_length_prompts(batch=1)
    run = dict(gen_length=GEN, block_length=BLOCK, **knobs)
    out = generate(model, ids, row_blocks="independent", generator=torch.Generator().manual_seed(4), **run)
    shared = generate(model, ids, generator=torch.Generator().manual_seed(4), **run)
    other = generate(model, ids, row_blocks="independent", generator=torch.Generator().manual_seed(5), **run)
    assert torch.equal(out.sequences, shared.sequences) and out.nfe == shared.nfe
    assert not torch.equal(other.sequences, out.sequences)  # the noise really decides tokens


def approx_cache_reference(model, ids, threshold, eos=None, dual=False):
    """Fast-dLLM's approximate caches for rows with blocks of their own, written plainly. A forward when some
    active row starts a block refreshes the cache (a full forward); the other forwards run against its
    stale K/V. Prefix cache: they run from the earliest active row's block at the refresh to the canvas end.
    Dual cache (`dual`): the refresh runs instead when the earliest active row's block differs from the last
    refresh's, or a row has left; the other forwards run only the span of the active rows' blocks (fresh)
    against the refresh's K/V outside it. Each row commits its own block by the threshold rule; a row leaves after its
    last block, or, with `eos`, once its answer up to an EOS is decoded (the rest becomes EOS)."""
    batch, plen = ids.shape
    x = torch.cat([ids, torch.full((batch, GEN), MASK)], 1)
    n, keep = x.shape[1], torch.ones(batch, plen + GEN, dtype=torch.bool)
    block, step, stopped = [0] * batch, [0] * batch, [False] * batch
    nfe, fresh_from, x_ref, was_active, refreshed_at = 0, None, None, None, None
    while True:
        active = [r for r in range(batch) if block[r] < GEN // BLOCK and not stopped[r]]
        if not active:
            return x, nfe
        left = was_active is not None and active != was_active
        was_active = active
        span = (min(plen + block[r] * BLOCK for r in active), max(plen + (block[r] + 1) * BLOCK for r in active))
        earliest = min(block[r] for r in active)
        if (earliest != refreshed_at or left) if dual else any(step[r] == 0 for r in active):
            logits, x_ref, refreshed_at = model(x).logits, x.clone(), earliest
            fresh_from = span[0]
        elif dual:
            logits = stale_forward(model, x_ref, x, span[0], span[1], None, keep, span)
        else:
            logits = stale_forward(model, x_ref, x, fresh_from, n, None, keep, (fresh_from, n))
        nfe += 1
        p = logits.double().softmax(-1)
        for r in active:
            start = plen + block[r] * BLOCK
            cands = [t for t in range(start, start + BLOCK) if x[r, t] == MASK]
            x0 = {t: int(logits[r, t].argmax()) for t in cands}
            conf = {t: float(p[r, t, x0[t]]) for t in cands}
            best = max(cands, key=lambda t: (conf[t], -t))  # ties to the lower position
            for t in cands:
                if t == best or conf[t] >= threshold:
                    x[r, t] = x0[t]
            step[r] += 1
            if not (x[r, start : start + BLOCK] == MASK).any():
                block[r], step[r] = block[r] + 1, 0
            answer = x[r, plen:].tolist()
            first = next((i for i, t in enumerate(answer) if t in (eos, MASK)), None)
            if eos is not None and first is not None and answer[first] == eos:
                x[r, plen + first :], stopped[r] = eos, True


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("eos", [None, 8], ids=["all_blocks", "eos_early_stop"])
def test_approximate_caches_refresh_when_a_row_starts_a_block(eos, cache):
    # with EOS 8 the row furthest behind leaves while the others are mid-block: the next forward must still
    # start where the cache ends, before the blocks of the rows left
    model = MaskLogitOff(tiny_backbone("bidirectional"))
    ids = equal_length_prompts(seed=7)
    with torch.no_grad():
        want, want_nfe = approx_cache_reference(model, ids, threshold=0.9, eos=eos, dual=cache == "dual")
    run = dict(gen_length=GEN, block_length=BLOCK, commit="threshold", threshold=0.9)
    if eos is not None:
        run.update(eos_token_id=eos, eos_early_stop=True)
    out = generate(model, ids, row_blocks="independent", cache=cache, **run)
    assert torch.equal(out.sequences, want) and out.nfe == want_nfe
    assert out.forward_tokens < generate(model, ids, row_blocks="independent", **run).forward_tokens
    assert eos is None or out.finished.any() and not out.finished.all()


def test_eos_early_stop_retires_rows_as_alone():
    model = MaskLogitOff(tiny_backbone("bidirectional"))
    ids = equal_length_prompts(batch=4)
    run = dict(gen_length=GEN, block_length=BLOCK, **RULES["threshold"])
    plain = generate(model, ids, **run)
    gen = plain.sequences[:, ids.shape[1] :]
    eos = next(t for t in gen[1].tolist() if not (gen == t).any(1).all())  # row 1 writes it, another row never
    run.update(eos_token_id=eos, eos_early_stop=True)
    out = generate(model, ids, row_blocks="independent", **run)
    assert out.finished.any() and not out.finished.all()
    for row in range(len(ids)):
        one = generate(model, ids[row : row + 1], **run)
        assert torch.equal(out.sequences[row], one.sequences[0]), row
        assert bool(out.finished[row]) == bool(one.finished[0]) and int(out.steps[row]) == one.nfe


def test_callback_and_trajectory_see_each_rows_own_block():
    model = MaskLogitOff(tiny_backbone("bidirectional"))
    ids = equal_length_prompts(batch=3)
    run = dict(gen_length=GEN, block_length=BLOCK, **RULES["threshold"])
    seen, last = [], {}
    plen = ids.shape[1]

    def on_step(step, canvas, info):
        rows, starts = info["rows"], info["block_start"]
        assert info["block"].shape == starts.shape == info["block_step"].shape == rows.shape
        assert torch.equal(starts, plen + BLOCK * info["block"])
        before = last.get("canvas", torch.full_like(canvas, MASK))
        for i, row in enumerate(rows.tolist()):
            changed = (before[row] == MASK) & (canvas[row] != MASK)
            where = torch.zeros_like(changed)
            where[int(starts[i]) : int(starts[i]) + BLOCK] = info["transfer"][i]
            assert torch.equal(changed[plen:], where[plen:])  # this step's commits, in the row's own block
            seen.append((row, int(info["block"][i]), int(info["block_step"][i])))
        last["canvas"] = canvas.clone()

    out = Sampler(row_blocks="independent", **run)(model, ids, callback_on_step_end=on_step, record_trajectory=True)
    for row in range(len(ids)):  # a row's steps count 0, 1, ... in each block, blocks 0, 1, ... in turn
        mine = [(b, s) for r, b, s in seen if r == row]
        assert all(s == 0 if b != pb else s == ps + 1 for (pb, ps), (b, s) in zip(mine, mine[1:], strict=False))
        assert [b for b, s in mine if s == 0] == list(range(GEN // BLOCK))
        one = generate(model, ids[row : row + 1], record_trajectory=True, **run).trajectory.events[0]
        events = out.trajectory.events[row]
        assert torch.equal(events[: len(one)], one)  # forward for forward what the row does alone
        assert (events[len(one) :] == NOTHING).all()  # then it has left


@pytest.mark.parametrize("knobs", [
    dict(cache="dual", dual_refresh_every=2), dict(cache="freecache"), dict(commit="saber"),
    dict(revision="rcr"), dict(verifier="freedave"), dict(stopping="prophet"), dict(stopping="dynamic_block"),
    dict(revision="editing_threshold"), dict(row_blocks="per_row"),
])
def test_unsupported_parts_are_refused_naming_row_blocks(knobs):
    with pytest.raises(ValueError, match="row_blocks"):
        Sampler(**{"row_blocks": "independent", "gen_length": GEN, "block_length": BLOCK, "commit": "threshold",
                   **knobs})


def start_aligned_backbone():
    """tiny_backbone's block_causal model with its blocks counted from slot 0 (block_alignment="start")."""
    from latent import DiffusionTransformer

    model = DiffusionTransformer(**{**dict(tiny_backbone("block_causal").config), "block_alignment": "start"})
    model.load_state_dict(tiny_backbone("block_causal").state_dict())
    return model.eval()


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("cache, masked_logits", [("none", False), ("prefix_exact", True), ("block_exact", False),
                                                  ("block_exact", True)],
                         ids=["none", "prefix_exact-masked-logits", "block_exact", "block_exact-masked-logits"])
@pytest.mark.parametrize("prompt", [5, 2], ids=["blocks_3_4_4_4_1", "blocks_2_4_4_4_2"])
def test_blocks_of_unequal_length_decode_as_alone(rule, cache, masked_logits, prompt):
    # a block_alignment="start" model with a prompt off its block grid: the first and last decoding blocks
    # are shorter than block_length, and each row still decodes (and records) what it does alone
    backbone = start_aligned_backbone()
    model = backbone if masked_logits else MaskLogitOff(backbone)
    ids = equal_length_prompts(batch=4, length=prompt, seed=1)
    run = dict(gen_length=GEN, block_length=BLOCK, cache=cache, masked_logits_only=masked_logits, **RULES[rule])
    want, want_nfe = alone(model, ids, **run)
    blocks = []
    out = Sampler(row_blocks="independent", **run)(model, ids, record_trajectory=True,
                                                   callback_on_step_end=lambda s, c, info: blocks.append(info["block"]))
    assert torch.equal(out.sequences[:, :prompt], ids)  # the prompt is never written
    assert torch.equal(out.sequences[:, -GEN:], want)
    first = generate(model, ids[:1], **run)
    prefill = first.nfe - int(first.steps[0])  # the prompt's forward of a cache, when it has whole blocks to cache
    assert torch.equal(out.steps, want_nfe - prefill) and out.nfe == int(want_nfe.max())
    assert max(int(b.max()) for b in blocks) == 4  # five decoding blocks: 3 (2) + 4 + 4 + 4 + 1 (2)
    if rule != "schedule":
        assert any(len(set(b.tolist())) > 1 for b in blocks)  # rows stood in different blocks
    for row in range(len(ids)):
        one = generate(model, ids[row : row + 1], record_trajectory=True, **run).trajectory.events[0]
        events = out.trajectory.events[row]
        assert torch.equal(events[: len(one)], one)
        assert (events[len(one) :] == NOTHING).all()


def test_prompt_masks_outside_the_window_block_stay():
    # a mask token in the prompt lies in the first (shorter) block's window but not in the block: the shared
    # loop never decodes it, nor may independent rows
    model = MaskLogitOff(start_aligned_backbone())
    ids = equal_length_prompts(batch=3, length=5, seed=2)
    ids[:, 3] = MASK
    run = dict(gen_length=GEN, block_length=BLOCK, **RULES["threshold"])
    out = generate(model, ids, row_blocks="independent", **run)
    want, _ = alone(model, ids, **run)
    assert (out.sequences[:, 3] == MASK).all() and torch.equal(out.sequences[:, -GEN:], want)


def test_gumbel_noise_of_a_shorter_block_at_batch_one_is_the_shared_loops():
    # the window draws the canvas positions' own numbers, so the short first block samples as the shared loop
    model = MaskLogitOff(start_aligned_backbone())
    ids = equal_length_prompts(batch=1, length=5)
    run = dict(gen_length=GEN, block_length=BLOCK, temperature=1.0, commit="threshold", threshold=0.5)
    out = generate(model, ids, row_blocks="independent", generator=torch.Generator().manual_seed(4), **run)
    shared = generate(model, ids, generator=torch.Generator().manual_seed(4), **run)
    assert torch.equal(out.sequences, shared.sequences) and out.nfe == shared.nfe

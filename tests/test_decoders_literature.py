"""Decoders of the literature as sampler parts: FreeCache's K/V reuse (cache "freecache") and its
AR-guided unmasking (commit "ar_guided"), CtrlDiff's dynamic block length (stopping "dynamic_block", its
rule; the learned predictor is tests/test_block_predictor.py) and classifier guidance (guidance
"classifier"), EDLM's energy-reranked proposals (proposal "edlm").

Each part is checked against a plain re-implementation of its rule written below (one row at a time,
Python lists, plain forwards) on the tiny real backbone, then for its defining property: FreeCache
refreshed at every forward is no cache, a constant classifier changes nothing and one that favours a token
gets it, one EDLM candidate is the base proposal exactly and an energy that strongly prefers a candidate
picks it.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_decoders_more import commit_top, masked_canvas, proposals, row_logits, stored_kv_forward
from test_sampling import MaskLogitOff, backbone_inputs, tiny_backbone, top_by_confidence

from latent.sampling import Sampler, create_part, generate

INF = float("inf")
MASK_ID = 63


def drafter():
    return MaskLogitOff(tiny_backbone("bidirectional"))


def causal_peer(seed=1):
    return tiny_backbone("causal", seed=seed)


def answer_keys(mask, row, gen_length):
    return None if mask is None else torch.cat([mask[row], torch.ones(gen_length, dtype=torch.long)])


# =====================================================================================================
# FreeCache: frozen K/V
# =====================================================================================================
def plain_freecache(model, prompt, mask, *, gen_length, block_length, steps, refresh, window=None,
                    prefix_embeds=None, prefix_mask=None):
    """FreeCache as its reference decodes, LLaDA's schedule at temperature 0: the first forward (and every
    refresh-th) computes every K/V; any other forward takes the K/V of every slot before the current block
    from the frozen store and computes the rest (only `window` positions past the block are seen). The store
    is frozen from a full forward, and at each block start extended with the last forward's K/V of the block
    just finished."""
    batch, plen = prompt.shape
    p = 0 if prefix_embeds is None else prefix_embeds.shape[1]
    x, keep = masked_canvas(prompt, mask, gen_length, MASK_ID, prefix_embeds, prefix_mask)
    per_block, nfe, gap = steps // (gen_length // block_length), 0, 0.0
    frozen = latest = None
    frozen_to = 0
    for b in range(gen_length // block_length):
        block = range(plen + b * block_length, plen + (b + 1) * block_length)
        m_count = [sum(int(x[j, t]) == MASK_ID for t in block) for j in range(batch)]
        for i in range(per_block):
            with torch.no_grad():
                if frozen is None or (refresh and nfe % refresh == 0):
                    logits, latest = stored_kv_forward(model.backbone, x, prefix_embeds, keep, None, None)
                    frozen, frozen_to = latest, block.start
                else:
                    if block.start > frozen_to:
                        frozen, frozen_to = latest, block.start
                    reuse = torch.zeros_like(keep)
                    reuse[:, : p + block.start] = True
                    seen = keep.clone()
                    if window is not None:
                        seen[:, p + block.stop + window :] = False
                    logits, latest = stored_kv_forward(model.backbone, x, prefix_embeds, seen, frozen, reuse)
                    fresh, _ = stored_kv_forward(model.backbone, x, prefix_embeds, keep, None, None)
                    rows = x[:, block.start : block.stop] == MASK_ID
                    gap = max(gap, float((logits - fresh)[:, block.start : block.stop][rows][:, :MASK_ID].abs().max()))
            nfe += 1
            logits[..., MASK_ID] = -INF
            for j in range(batch):
                quota = m_count[j] // per_block + (1 if i < m_count[j] % per_block else 0)
                x[j] = torch.tensor(commit_top(x[j].tolist(), logits[j], quota, block, MASK_ID))
    return x, nfe, gap


@pytest.mark.parametrize("refresh, window, with_prefix", [(0, None, False), (0, 3, True), (5, None, True)])
def test_freecache_matches_plain_reimplementation(refresh, window, with_prefix):
    model = drafter()
    ids, mask, extra = backbone_inputs(with_prefix=with_prefix)
    run = dict(gen_length=16, block_length=4, steps=16)
    want, want_nfe, gap = plain_freecache(model, ids, mask, refresh=refresh, window=window, **run, **extra)
    out = generate(model, ids, mask, cache="freecache", freecache_refresh=refresh, freecache_window=window,
                   **run, **extra)
    assert torch.equal(out.sequences, want) and out.nfe == want_nfe
    assert out.forward_tokens < generate(model, ids, mask, **run, **extra).forward_tokens
    assert gap > 1e-3  # the frozen K/V really are stale: the test tells the cache apart from none


def test_freecache_refreshing_every_forward_is_no_cache():
    model = drafter()
    ids, mask, extra = backbone_inputs(with_prefix=True)
    run = dict(gen_length=16, block_length=8, **extra)
    for rule in (dict(steps=16), dict(commit="threshold", threshold=0.7), dict(steps=8, cfg_scale=1.0),
                 dict(steps=16, temperature=0.9, generator=torch.Generator().manual_seed(3))):
        g = rule.pop("generator", None)
        plain = generate(model, ids, mask, **run, **rule, generator=g and torch.Generator().manual_seed(3))
        cached = generate(model, ids, mask, cache="freecache", freecache_refresh=1, **run, **rule,
                          generator=g and torch.Generator().manual_seed(3))
        assert torch.equal(cached.sequences, plain.sequences) and cached.nfe == plain.nfe


# =====================================================================================================
# FreeCache: AR-guided unmasking
# =====================================================================================================
def plain_ar_guided(model, guide, prompt, mask, *, gen_length, block_length, top_k, ratio):
    """Guided Diffusion, one row at a time: each step drafts every masked position of the block (argmax),
    the guide reads the canvas with the drafts in place; drafts are taken in order while the guide has them
    among its top k with at least `ratio` of its top probability; if the first is refused it is taken alone.
    Returns the rows and each row's steps per block."""
    out, steps = [], []
    plen = prompt.shape[1]
    for j in range(prompt.shape[0]):
        keys = answer_keys(mask, j, gen_length)
        x = prompt[j].tolist() + [MASK_ID] * gen_length
        row_steps = []
        for b in range(gen_length // block_length):
            block = range(plen + b * block_length, plen + (b + 1) * block_length)
            n = 0
            while any(x[t] == MASK_ID for t in block):
                x0, _ = proposals(row_logits(model, x, keys), MASK_ID)
                masked = [t for t in block if x[t] == MASK_ID]
                draft = [x0[t] if t in masked else x[t] for t in range(block.stop)]
                logq = row_logits(guide, draft[: block.stop - 1], None if keys is None else keys[: block.stop - 1])
                logq = logq.float().log_softmax(-1)
                run = []
                for t in masked:
                    q = logq[t - 1]
                    if int((q > q[x0[t]]).sum()) < top_k and q[x0[t]].exp() >= ratio * q.exp().max():
                        run.append(t)
                    else:
                        break
                for t in run or masked[:1]:
                    x[t] = x0[t]
                n += 1
            row_steps.append(n)
        out.append(x)
        steps.append(row_steps)
    return torch.tensor(out), steps


@pytest.mark.parametrize("top_k, ratio", [(1, 0.0), (2, 0.5), (40, 0.0)])
def test_ar_guided_matches_plain_reimplementation(top_k, ratio):
    model, guide = drafter(), causal_peer()
    ids, mask, _ = backbone_inputs()
    run = dict(gen_length=16, block_length=8)
    want, steps = plain_ar_guided(model, guide, ids, mask, top_k=top_k, ratio=ratio, **run)
    part = create_part("commit", "ar_guided", guide_model=guide, ar_guided_top_k=top_k, ar_guided_ratio=ratio)
    out = generate(model, ids, mask, commit=part, **run)
    assert torch.equal(out.sequences, want)
    per_block = [max(s[b] for s in steps) for b in range(2)]  # rows share every forward of a block
    assert part.guide_forwards == sum(per_block) and out.nfe == 2 * sum(per_block)
    if top_k == 40:  # a generous guide takes several drafts per step
        assert sum(per_block) < 16


def test_ar_guided_guide_that_accepts_everything_commits_whole_blocks():
    model, guide = drafter(), causal_peer()
    ids, mask, _ = backbone_inputs()
    run = dict(gen_length=16, block_length=8)
    out = generate(model, ids, mask, commit="ar_guided", guide_model=guide, ar_guided_top_k=64, ar_guided_ratio=0.0,
                   **run)
    every = generate(model, ids, mask, commit="threshold", threshold=1e-12, **run)  # all candidates at once
    assert torch.equal(out.sequences, every.sequences) and out.nfe == 2 * every.nfe == 4


# =====================================================================================================
# CtrlDiff: dynamic block length
# =====================================================================================================
def plain_dynamic_block(model, prompt, mask, *, gen_length, block_length, sizes, max_entropy, threshold):
    """Sub-blocks chosen per row: when the current one holds no mask, the next starts at the first masked
    position f of the block and takes the largest size whose mean entropy over the masked positions in
    [f, f + size) is <= max_entropy (else the smallest); then Fast-dLLM's threshold rule on its masks."""
    out, history = [], []
    plen = prompt.shape[1]
    for j in range(prompt.shape[0]):
        keys = answer_keys(mask, j, gen_length)
        x = prompt[j].tolist() + [MASK_ID] * gen_length
        for b in range(gen_length // block_length):
            block = range(plen + b * block_length, plen + (b + 1) * block_length)
            end = 0
            while any(x[t] == MASK_ID for t in block):
                logits = row_logits(model, x, keys)
                masked = [t - block.start for t in block if x[t] == MASK_ID]
                if not any(t < end for t in masked):
                    f = masked[0]
                    scores = logits[block.start : block.stop].clone()
                    scores[:, MASK_ID] = -INF
                    entropy = torch.special.entr(scores.float().softmax(-1)).sum(-1)
                    size = sizes[0]
                    for s in sizes[1:]:
                        inside = [t for t in masked if f <= t < f + s]
                        if float(entropy[inside].sum()) / len(inside) <= max_entropy:
                            size = s
                    end = min(block_length, f + size)
                    history.append((j, b, f, size))
                x0, _ = proposals(logits, MASK_ID)
                conf = logits.double().softmax(-1)
                cands = [t + block.start for t in masked if t < end]
                picked = [t for t in cands if conf[t, x0[t]] >= threshold]
                picked += top_by_confidence([conf[t, x0[t]].item() for t in range(len(x))], cands, 1)
                for t in picked:
                    x[t] = x0[t]
        out.append(x)
    return torch.tensor(out), sorted(history)


@pytest.mark.parametrize("sizes, max_entropy, threshold", [((2, 4, 8), 0.75, 0.6), ((1, 3, 16), 0.6, 0.9),
                                                           ((4,), 0.0, 0.5)])
def test_dynamic_block_matches_plain_reimplementation(sizes, max_entropy, threshold):
    model = drafter()
    ids, mask, _ = backbone_inputs()
    run = dict(gen_length=16, block_length=16, commit="threshold", threshold=threshold)
    want, history = plain_dynamic_block(model, ids, mask, gen_length=16, block_length=16, sizes=sizes,
                                        max_entropy=max_entropy, threshold=threshold)
    part = create_part("stopping", "dynamic_block", dynamic_block_sizes=sizes, dynamic_block_entropy=max_entropy)
    out = generate(model, ids, mask, stopping=part, **run)
    assert torch.equal(out.sequences, want)
    assert sorted(part.history) == history
    if len(sizes) > 1:  # the rule really chose different lengths on this model
        assert len({h[3] for h in history}) > 1


def test_dynamic_block_extremes():
    model = drafter()
    ids, mask, _ = backbone_inputs()
    run = dict(gen_length=16, block_length=8, commit="threshold", threshold=0.5)
    whole = generate(model, ids, mask, stopping="dynamic_block", dynamic_block_sizes=(8,), **run)
    assert torch.equal(whole.sequences, generate(model, ids, mask, **run).sequences)  # sub-block = the block
    # sub-blocks of one position: left to right, one token per forward
    steps = []
    one = generate(model, ids, mask, stopping="dynamic_block", dynamic_block_sizes=(1,), **run,
                   callback_on_step_end=lambda s, c, info: steps.append(info["transfer"].nonzero()[:, 1].tolist()))
    assert one.nfe == 16 and all(cols == [i % 8] * 3 for i, cols in enumerate(steps))


# =====================================================================================================
# CtrlDiff: classifier guidance
# =====================================================================================================
class BigramClassifier:
    """log p(c | x_t = v) from a fixed table indexed by the canvas token left of t (mask or not)."""

    def __init__(self, vocab=64, seed=0, scale=2.0):
        self.table = (torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * scale).log_softmax(-1)

    def __call__(self, canvas, start, end):
        return self.table[canvas[:, start - 1 : end - 1]]


class GuidedModel:
    """The model whose generated positions' logits have w * classifier added: what the guidance should equal
    for a classifier that depends only on the canvas and the position."""

    def __init__(self, model, classifier, plen, scale):
        self.model, self.classifier, self.plen, self.scale = model, classifier, plen, scale
        self.config = model.config

    def __call__(self, x, **kwargs):
        out = self.model(x, **kwargs)
        out.logits[:, self.plen :] += self.scale * self.classifier(x, self.plen, x.shape[1])
        return out


@pytest.mark.parametrize("knobs", [dict(steps=16), dict(steps=8, temperature=0.8), dict(commit="threshold", threshold=0.7)],
                         ids=["schedule", "sampled", "threshold"])
def test_classifier_guidance_is_the_model_plus_the_weighted_classifier(knobs):
    model = drafter()
    ids, mask, _ = backbone_inputs()
    classifier = BigramClassifier()
    run = dict(gen_length=16, block_length=8, **knobs)
    out = generate(model, ids, mask, guidance="classifier", classifier=classifier, classifier_scale=1.5, **run,
                   generator=torch.Generator().manual_seed(0))
    want = generate(GuidedModel(model, classifier, ids.shape[1], 1.5), ids, mask, **run,
                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.sequences, want.sequences)
    assert not torch.equal(out.sequences, generate(model, ids, mask, **run, generator=torch.Generator().manual_seed(0)).sequences)


def test_classifier_guidance_constant_changes_nothing_and_a_favoured_token_wins():
    model = drafter()
    ids, mask, _ = backbone_inputs()
    run = dict(gen_length=16, block_length=8, steps=16)
    constant = lambda canvas, start, end: torch.full((64,), -0.7)  # noqa: E731 - log p(c) = log 0.5
    for knobs in (dict(), dict(cfg_scale=1.0), dict(temperature=0.9)):
        base = generate(model, ids, mask, **run, **knobs, generator=torch.Generator().manual_seed(1))
        guided = generate(model, ids, mask, guidance="classifier", classifier=constant, classifier_scale=3.0, **run,
                          **knobs, generator=torch.Generator().manual_seed(1))
        assert torch.equal(guided.sequences, base.sequences) and guided.nfe == base.nfe
    favour = torch.full((64,), -200.0)
    favour[17] = 0.0
    out = generate(model, ids, mask, guidance="classifier", classifier=lambda c, s, e: favour, **run)
    assert (out.sequences[:, ids.shape[1] :] == 17).all()


# =====================================================================================================
# EDLM: energy-reranked proposals
# =====================================================================================================
def plain_edlm(model, energy_model, prompt, mask, *, gen_length, block_length, steps, k, temperature, window,
               generator):
    """EDLM's importance sampling on LLaDA's schedule: every step draws k Gumbel-max candidates (each a full
    [B, N, V] float64 uniform draw) and one [B] uniform; a row whose answer's masked share is in the window
    keeps candidate j with probability softmax(-E)_j, E_j = sum over the block's masked t of log mu(c_t) -
    log p_AR(c_t | c_<t), by inverse CDF on its uniform; other rows keep candidate 0."""
    batch, plen = prompt.shape
    x = torch.cat([prompt, torch.full((batch, gen_length), MASK_ID)], 1)
    keys = torch.cat([mask, torch.ones(batch, gen_length, dtype=torch.long)], 1)
    per_block = steps // (gen_length // block_length)
    for b in range(gen_length // block_length):
        start, end = plen + b * block_length, plen + (b + 1) * block_length
        m_count = [int((x[j, start:end] == MASK_ID).sum()) for j in range(batch)]
        for i in range(per_block):
            with torch.no_grad():
                logits = model(x, attention_mask=keys).logits[:, start:end]
            scores = logits.clone()
            scores[..., MASK_ID] = -INF
            cands = []
            for _ in range(k):
                u = torch.rand((batch, x.shape[1], scores.shape[-1]), generator=generator, dtype=torch.float64)
                cands.append((scores.double().exp() / (-torch.log(u[:, start:end])) ** temperature).argmax(-1))
            pick = torch.rand((batch,), generator=generator, dtype=torch.float64)
            x0 = cands[0].clone()
            for j in range(batch):
                share = float((x[j, plen:] == MASK_ID).double().mean())
                if not window[0] <= share <= window[1]:
                    continue
                masked = [t for t in range(start, end) if int(x[j, t]) == MASK_ID]
                log_mu = scores[j].float().log_softmax(-1)
                energy = []
                for c in cands:
                    seq = x[j, :end].clone()
                    seq[masked] = c[j, [t - start for t in masked]]
                    logq = row_logits(energy_model, seq[: end - 1].tolist(), keys[j, : end - 1]).float().log_softmax(-1)
                    energy.append(sum(float(log_mu[t - start, seq[t]] - logq[t - 1, seq[t]]) for t in masked))
                weights = torch.tensor(energy, dtype=torch.float32).neg().softmax(-1)
                chosen = min(int((weights.cumsum(-1) < pick[j]).sum()), k - 1)
                x0[j] = cands[chosen][j]
            conf = logits.softmax(-1).gather(-1, x0[..., None]).squeeze(-1)
            for j in range(batch):
                quota = m_count[j] // per_block + (1 if i < m_count[j] % per_block else 0)
                row = conf[j].tolist()
                for t in top_by_confidence(row, [t - start for t in range(start, end) if int(x[j, t]) == MASK_ID], quota):
                    x[j, start + t] = x0[j, t]
    return x


@pytest.mark.parametrize("k, window", [(3, (0.0, 1.0)), (2, (0.4, 0.6))])
def test_edlm_matches_plain_reimplementation(k, window):
    model, energy_model = drafter(), causal_peer()
    ids, mask, _ = backbone_inputs()
    run = dict(gen_length=16, block_length=8, steps=16)
    want = plain_edlm(model, energy_model, ids, mask, k=k, temperature=1.0, window=window,
                      generator=torch.Generator().manual_seed(5), **run)
    part = create_part("proposal", "edlm", energy_model=energy_model, num_candidates=k, edlm_window=window,
                       temperature=1.0)
    out = generate(model, ids, mask, proposal=part, temperature=1.0, generator=torch.Generator().manual_seed(5), **run)
    assert torch.equal(out.sequences, want)
    assert out.nfe == 16 + part.energy_forwards and part.energy_forwards > 0


def test_edlm_one_candidate_is_the_base_proposal():
    model, energy_model = drafter(), causal_peer()
    ids, mask, _ = backbone_inputs()
    for knobs in (dict(steps=16, temperature=0.9), dict(steps=16), dict(commit="threshold", threshold=0.6, temperature=0.5)):
        base = generate(model, ids, mask, gen_length=16, block_length=8, **knobs, generator=torch.Generator().manual_seed(2))
        edlm = generate(model, ids, mask, gen_length=16, block_length=8, proposal="edlm", energy_model=energy_model,
                        num_candidates=1, **knobs, generator=torch.Generator().manual_seed(2))
        assert torch.equal(edlm.sequences, base.sequences) and edlm.nfe == base.nfe


class EvenTokenModel:
    """A causal "energy model" that puts all its mass on the even tokens at every position: a candidate with
    more even tokens at the masked positions has a far lower energy (60 nats per token)."""

    config = SimpleNamespace(vocab_size=64, attention_layout="causal")

    def __call__(self, x, attention_mask=None):
        logits = torch.full((*x.shape, 64), -60.0)
        logits[..., ::2] = 0.0
        return SimpleNamespace(logits=logits)


def test_edlm_energy_that_prefers_a_candidate_picks_it():
    model = drafter()
    ids, mask, _ = backbone_inputs()
    part = create_part("proposal", "edlm", energy_model=EvenTokenModel(), num_candidates=4,
                       edlm_window=(0.0, 1.0), temperature=3.0)
    picks = []
    seen = lambda step, canvas, info: picks.append(part.last)  # noqa: E731
    generate(model, ids, mask, gen_length=8, block_length=8, steps=8, proposal=part, temperature=3.0,
             generator=torch.Generator().manual_seed(0), callback_on_step_end=seen)
    checked = moved = 0
    for _, _, energy, chosen in picks:
        for r in range(len(chosen)):
            low = energy[r].sort().values
            if low[1] - low[0] > 20:  # one candidate holds more even tokens: it must win
                assert int(chosen[r]) == int(energy[r].argmin())
                checked += 1
                moved += int(chosen[r]) != 0
    assert checked > 5 and moved > 0  # the reranking really replaced the base proposal's own draw


# =====================================================================================================
# Selection by name, errors, the text pipeline
# =====================================================================================================
@pytest.mark.parametrize("kwargs, match", [
    (dict(commit="ar_guided"), "needs `guide_model`"),
    (dict(commit="ar_guided", guide_model=object(), ar_guided_top_k=0), "ar_guided_top_k"),
    (dict(proposal="edlm"), "needs `energy_model`"),
    (dict(proposal="edlm", energy_model=object(), num_candidates=0), "num_candidates"),
    (dict(proposal="edlm", energy_model=object(), edlm_window=(0.8, 0.2)), "edlm_window"),
    (dict(guidance="classifier"), "needs `classifier`"),
    (dict(stopping="dynamic_block"), "commit='threshold'"),
    (dict(stopping="dynamic_block", commit="threshold", dynamic_block_sizes=(0,)), "dynamic_block_sizes"),
    (dict(cache="freecache", freecache_refresh=-1), "freecache_refresh"),
    (dict(cache="freecache", verifier="freedave"), "verifier='freedave'"),
])
def test_literature_part_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampler(gen_length=8, block_length=4, **kwargs)


def test_parts_refuse_a_bidirectional_guide_or_energy_model():
    with pytest.raises(ValueError, match="`guide_model` must be a causal model"):
        create_part("commit", "ar_guided", guide_model=tiny_backbone("bidirectional"))
    with pytest.raises(ValueError, match="`energy_model` must be a causal model"):
        create_part("proposal", "edlm", energy_model=tiny_backbone("bidirectional"))


def test_text_pipeline_selects_each_part_by_name():
    from test_text_pipeline import make_pipe

    from latent import DiffusionTransformer

    pipe = make_pipe()
    cfg = pipe.model.config
    torch.manual_seed(1)
    peer = DiffusionTransformer(vocab_size=cfg.vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                                mask_token_id=cfg.mask_token_id, max_position_embeddings=64,
                                attention_layout="causal").eval()
    prompts = ["the cat", "a dog sat"]
    base = pipe(prompts, gen_length=8, steps=8, output_type="ids")
    same = {
        "freecache": dict(cache="freecache", freecache_refresh=1),
        "classifier": dict(guidance="classifier", classifier=lambda c, s, e: torch.zeros(cfg.vocab_size)),
        "edlm": dict(proposal="edlm", energy_model=peer, num_candidates=1),
    }
    for name, knobs in same.items():
        out = pipe(prompts, gen_length=8, steps=8, output_type="ids", **knobs)
        assert torch.equal(out.sequences, base.sequences), name
    ids, mask = pipe.encode_prompt(prompts)
    for knobs in (dict(commit="ar_guided", guide_model=peer), dict(commit="threshold", threshold=0.5,
                                                                   stopping="dynamic_block", dynamic_block_sizes=(2, 4))):
        out = pipe(prompts, gen_length=8, output_type="ids", **knobs)
        ref = generate(pipe.model, ids, mask, gen_length=8, block_length=4, **knobs)
        assert torch.equal(out.sequences, ref.sequences)

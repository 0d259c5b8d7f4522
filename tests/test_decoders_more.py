"""More decoders of the literature as sampler parts: the verifier slot (FreeDave, DiffuSpec), the delayed
K/V cache (dKV-Cache) and NTK rope scaling for long contexts (LongLLaDA).

Each member is checked token for token at temperature 0 against a plain re-implementation of its paper's
algorithm written below (one row at a time, Python lists), then for its defining property: FreeDave gives
the tokens of the sampler it accelerates in fewer forwards, DiffuSpec gives the verifier's greedy answer
whatever the drafter proposes, dKV-Cache reuses exactly the K/V its rule says and no other, NTK scaling
divides the slowest rotary frequency by the factor. The long-context measurement itself (a trained model
at twice its length) is experiments/long_context.py.
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from test_decoders import ScriptedModel
from test_sampling import (
    MASK,
    MaskLogitOff,
    ToyModel,
    backbone_inputs,
    prompts,
    tiny_backbone,
    top_by_confidence,
)

from latent.sampling import Sampler, autoregressive_generate, create_part, generate, list_parts
from latent.sampling.diffuspec import DiffuSpec, StartTokenVerifier, candidate_lattice, causal_path

INF = float("inf")


def row_logits(model, row, keys=None):
    """The model's logits [T, V] for one canvas row (a list), with its key padding mask."""
    with torch.no_grad():
        return model(torch.tensor([row]), attention_mask=None if keys is None else keys[None]).logits[0]


def proposals(logits, mask_id):
    """Argmax proposals (never the mask id) and their probabilities, as Python lists."""
    p = logits.clone()
    p[:, mask_id] = -INF
    x0 = p.argmax(-1).tolist()
    prob = logits.softmax(-1)
    return x0, [prob[t, x0[t]].item() for t in range(len(x0))]


# =====================================================================================================
# FreeDave
# =====================================================================================================
def commit_top(row, logits, k, block, mask_id):
    """The row with its k most confident masked positions of the block committed (LLaDA's step)."""
    x0, conf = proposals(logits, mask_id)
    row = list(row)
    for t in top_by_confidence(conf, [t for t in block if row[t] == mask_id], k):
        row[t] = x0[t]
    return row


def plain_freedave(model, prompt, mask, *, steps, gen_length, block_length, drafts, mask_id):
    """FreeDave for LLaDA's schedule at temperature 0, as its paper states it, one row at a time. Per block:
    a forward commits the first step and a forward on the result gives the logits L to draft from. Then,
    with s steps done, draft k (k = 0 .. d - 1, d = min(drafts, S - s)) commits the masked positions that rank
    in the first quota[s] + ... + quota[s + k] by L's confidence; while steps remain after the next one, one
    forward gives every draft's logits, target k = draft k + its own top quota[s + k + 1], and with m the
    leading run of target k == draft k + 1 the canvas becomes draft m (with its logits as L), s += m + 1.
    The block's last step needs no forward (draft 0 is exact)."""
    out, nfe = [], 0
    per_block = steps // (gen_length // block_length)
    for j in range(prompt.shape[0]):
        keys = None if mask is None else torch.cat([mask[j], torch.ones(gen_length, dtype=torch.long)])
        x = prompt[j].tolist() + [mask_id] * gen_length
        plen = prompt.shape[1]
        for b in range(gen_length // block_length):
            block = range(plen + b * block_length, plen + (b + 1) * block_length)
            m_count = sum(x[t] == mask_id for t in block)
            quota = [m_count // per_block + (1 if i < m_count % per_block else 0) for i in range(per_block)] + [0]

            x = commit_top(x, row_logits(model, x, keys), quota[0], block, mask_id)
            logits = row_logits(model, x, keys)
            nfe += 2
            step = 1
            while step < per_block and any(x[t] == mask_id for t in block):
                d = min(drafts, per_block - step)
                x0, conf = proposals(logits, mask_id)
                order = top_by_confidence(conf, [t for t in block if x[t] == mask_id], len(block))
                draft = []
                for k in range(d):
                    row = list(x)
                    for t in order[: sum(quota[step : step + k + 1])]:
                        row[t] = x0[t]
                    draft.append(row)
                if per_block - step > 1:
                    draft_logits = [row_logits(model, row, keys) for row in draft]
                    nfe += 1  # one forward for every draft
                    target = [commit_top(draft[k], draft_logits[k], quota[step + k + 1], block, mask_id) for k in range(d)]
                    m = 0
                    while m < d - 1 and target[m] == draft[m + 1]:
                        m += 1
                    x, logits, step = draft[m], draft_logits[m], step + m + 1
                else:
                    x, step = draft[0], step + 1
        out.append(x)
    return torch.tensor(out), nfe


def freedave_models():
    backbone = MaskLogitOff(tiny_backbone("bidirectional"))
    ids, mask, _ = backbone_inputs()
    tids, tmask = prompts()
    return [("backbone", backbone, ids, mask, 63), ("toy", ToyModel(sharpness=0.8), tids, tmask, MASK),
            ("scripted", ScriptedModel(), *prompts((4, 3, 4)), MASK)]


FREEDAVE_MODELS = freedave_models()


@pytest.mark.parametrize("which", [m[0] for m in FREEDAVE_MODELS])
@pytest.mark.parametrize("run", [dict(steps=16, block_length=8, drafts=4), dict(steps=8, block_length=16, drafts=3),
                                 dict(steps=16, block_length=16, drafts=8)], ids=["s16b8d4", "s8b16d3", "s16b16d8"])
def test_freedave_matches_plain_reimplementation_and_the_base_sampler(which, run):
    _, model, ids, mask, mask_id = next(m for m in FREEDAVE_MODELS if m[0] == which)
    knobs = dict(gen_length=16, block_length=run["block_length"], steps=run["steps"], mask_token_id=mask_id)
    want, paper_nfe = plain_freedave(model, ids, mask, drafts=run["drafts"], mask_id=mask_id,
                                     **{k: knobs[k] for k in ("gen_length", "block_length", "steps")})
    base = generate(model, ids, mask, **knobs)
    out = generate(model, ids, mask, verifier="freedave", freedave_drafts=run["drafts"], **knobs)
    assert torch.equal(want, base.sequences)  # the paper's claim, on the plain loops
    assert torch.equal(out.sequences, base.sequences)
    # the first draft of a block is checked in the forward that the paper spends on the committed canvas alone
    assert out.nfe <= paper_nfe and out.nfe <= base.nfe
    if which == "toy":  # drafts are accepted on this model: fewer forwards than one per step
        assert out.nfe < base.nfe


@pytest.mark.parametrize("knobs", [
    dict(commit="threshold", threshold=0.5),
    dict(commit="factor", factor=1.5),
    dict(steps=16, cfg_scale=1.0),
    dict(steps=16, confidence="margin"),
    dict(steps=8, stopping="prophet", prophet_thresholds=(3.0, 2.0, 1.0)),
    dict(steps=16, eos_early_stop=True, eos_token_id=1),
], ids=lambda k: "_".join(str(v) for v in k.values())[:30])
def test_freedave_is_lossless_for_other_rules(knobs):
    model = ToyModel(sharpness=0.8, eos_bias=1.5)
    ids, mask = prompts()
    run = dict(gen_length=16, block_length=8, mask_token_id=MASK, **knobs)
    base = generate(model, ids, mask, **run)
    for drafts in (1, 2, 5):
        out = generate(model, ids, mask, verifier="freedave", freedave_drafts=drafts, **run)
        assert torch.equal(out.sequences, base.sequences), drafts
        assert out.nfe <= base.nfe
        if drafts == 1:  # nothing drafted: the base loop (these runs have no zero-quota steps to skip)
            assert out.nfe == base.nfe


@pytest.mark.parametrize("layout, cache", [("prefix", "prefix_exact"), ("block_causal", "block_exact"),
                                           ("bidirectional", "dual"), ("bidirectional", "prefix")])
def test_freedave_with_caches_gives_the_cached_sampler_tokens(layout, cache):
    model = MaskLogitOff(tiny_backbone(layout))
    ids, mask, extra = backbone_inputs(with_prefix=True)
    run = dict(gen_length=16, block_length=4, steps=16, cache=cache, **extra)
    base = generate(model, ids, mask, **run)
    out = generate(model, ids, mask, verifier="freedave", freedave_drafts=3, **run)
    assert torch.equal(out.sequences, base.sequences) and out.nfe <= base.nfe


def test_freedave_trajectory_and_forwards():
    model = ToyModel(sharpness=0.8)
    ids, mask = prompts()
    seen = []
    out = generate(model, ids, mask, gen_length=16, block_length=16, steps=16, mask_token_id=MASK,
                   verifier="freedave", freedave_drafts=4, record_trajectory=True,
                   callback_on_step_end=lambda s, c, info: seen.append(int(info["transfer"].sum(1).max())))
    assert out.trajectory.events.shape[1] == out.nfe == len(seen) < 16
    assert max(seen) > 1  # a forward committed several of the schedule's one-token steps


# =====================================================================================================
# DiffuSpec
# =====================================================================================================
class OracleDrafter:
    """A drafter whose proposals are the verifier's greedy continuation: at every masked position the token
    the verifier writes after the canvas's decoded prefix (masks after the first one filled greedily)."""

    def __init__(self, verifier, mask_id):
        self.verifier, self.mask_id = verifier, mask_id
        self.config = SimpleNamespace(mask_token_id=mask_id, vocab_size=verifier.config.vocab_size)

    def __call__(self, x, attention_mask=None, **kwargs):
        logits = torch.zeros(*x.shape, self.config.vocab_size)
        for j in range(x.shape[0]):
            row = x[j].tolist()
            first = row.index(self.mask_id) if self.mask_id in row else len(row)
            filled = row[:first]
            keys = None if attention_mask is None else attention_mask[j]
            for t in range(first, len(row)):
                nxt = int(row_logits(self.verifier, filled, None if keys is None else keys[: len(filled)])[-1].argmax())
                logits[j, t, nxt] = 10.0
                filled.append(nxt)
        logits[..., self.mask_id] = -INF
        return SimpleNamespace(logits=logits)


def plain_path_search(logp, k, prev, *, candidates, mass, weight, proxy, eos):
    """CPS by enumeration: every path through the pruned lattice of the first k positions (a path ends at
    its first EOS), scored by the mean of weight * log p + (1 - weight) * log q(token | previous token);
    the best one."""
    options = []
    for j in range(k):
        p = logp[j].exp().tolist()
        order = sorted(range(len(p)), key=lambda v: -p[v])
        keep, total = [], 0.0
        for v in order:
            if total >= mass or len(keep) == candidates:
                break
            keep.append(v)
            total += p[v]
        if eos is not None and eos not in keep:
            keep.append(eos)
        options.append(keep)
    best, best_mean = None, -INF
    for length in range(1, k + 1):
        for path in itertools.product(*options[:length]):
            if (eos in path[:-1]) or (length < k and path[-1] != eos):
                continue
            score, before = 0.0, prev
            for j, v in enumerate(path):
                q = 0.0 if proxy is None else proxy.table[before, v].item()
                score += weight * logp[j, v].item() + (1 - weight) * q
                before = v
            if score / length > best_mean:
                best, best_mean = list(path), score / length
    return best


class BigramProxy:
    """A causal proxy: log q(next | previous token) from a fixed random table."""

    context_size = 1

    def __init__(self, vocab, seed=0):
        self.table = (torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 2).log_softmax(-1)

    def __call__(self, context):
        return self.table[context[:, -1]]


def plain_diffuspec(drafter, verifier, prompt, mask, *, gen_length, block_length, k_min, k_max, growth, ema,
                    candidates, mass, weight, proxy, eos, mask_id):
    """DiffuSpec as its paper states it, one row at a time: draft a window of k masked positions with one
    drafter forward, pick the path by (enumerated) CPS, run the verifier once, keep the agreeing prefix and
    the verifier's next token (inside the block), then ADL: G, A <- (1 - rho) G + rho L_gen, (1 - rho) A +
    rho L_acc, k = clip(floor(G) + delta [A >= G], k_min, k_max). Returns the rows, forwards and k per step."""
    rows, nfe, ks = [], 0, []
    plen = prompt.shape[1]
    for j in range(prompt.shape[0]):
        keys = None if mask is None else torch.cat([mask[j], torch.ones(gen_length, dtype=torch.long)])
        x = prompt[j].tolist() + [mask_id] * gen_length
        k, mean_gen, mean_acc, row_ks = k_max, 0.0, 0.0, []
        for b in range(gen_length // block_length):
            end = plen + (b + 1) * block_length
            while mask_id in x[:end]:
                first = x.index(mask_id)
                window = min(k, end - first)
                logits = row_logits(drafter, x, keys)[first : first + window].clone()
                logits[:, mask_id] = -INF
                logp = logits.log_softmax(-1)
                raw = logp.argmax(-1).tolist()
                path = plain_path_search(logp, window, x[first - 1], candidates=candidates, mass=mass,
                                         weight=weight, proxy=proxy, eos=eos)
                seq = x[:first] + path
                greedy = row_logits(verifier, seq, None if keys is None else keys[: len(seq)]).argmax(-1).tolist()
                nfe += 2
                accepted = 0
                while accepted < len(path) and path[accepted] == greedy[first - 1 + accepted]:
                    accepted += 1
                for i in range(accepted + 1):
                    if first + i < end:
                        x[first + i] = greedy[first - 1 + i]
                if eos is not None and eos in x[plen:]:
                    at = x.index(eos, plen)
                    x[at + 1 :] = [eos] * (len(x) - at - 1)
                generated = raw.index(eos) if eos in raw else window
                mean_gen = (1 - ema) * mean_gen + ema * generated
                mean_acc = (1 - ema) * mean_acc + ema * accepted
                row_ks.append(window)
                k = min(k_max, max(k_min, math.floor(mean_gen) + (growth if mean_acc >= mean_gen else 0)))
        rows.append(x)
        ks.append(row_ks)
    return torch.tensor(rows), nfe, ks


def greedy_answer(verifier, ids, mask, gen_length, eos=None):
    """The verifier's greedy answer, padded with EOS when every row stopped early."""
    new = autoregressive_generate(verifier, ids, gen_length, attention_mask=mask, eos_token_id=eos).new_tokens
    return torch.cat([new, torch.full((new.shape[0], gen_length - new.shape[1]), eos if eos is not None else -1)], 1)


DIFFUSPEC_RUNS = {  # name: (sampler knobs, plain knobs)
    "drafter_alone": dict(diffuspec_draft_lengths=(2, 4), diffuspec_growth=2, diffuspec_candidates=3,
                          diffuspec_mass=0.9, diffuspec_weight=1.0),
    "bigram_proxy": dict(diffuspec_draft_lengths=(1, 3), diffuspec_growth=1, diffuspec_candidates=2,
                         diffuspec_mass=0.5, diffuspec_weight=0.6, diffuspec_proxy=BigramProxy(64)),
    "eos_blocks": dict(diffuspec_draft_lengths=(2, 3), diffuspec_growth=3, diffuspec_candidates=2,
                       diffuspec_weight=1.0, eos_token_id="mid-answer", block_length=8),
}


@pytest.mark.parametrize("drafter_kind", ["backbone", "oracle"])
@pytest.mark.parametrize("name", list(DIFFUSPEC_RUNS))
def test_diffuspec_matches_plain_reimplementation_and_the_verifier(name, drafter_kind):
    verifier = MaskLogitOff(tiny_backbone("causal", seed=1))
    drafter = MaskLogitOff(tiny_backbone("bidirectional")) if drafter_kind == "backbone" else OracleDrafter(verifier, 63)
    ids, mask, _ = backbone_inputs()
    knobs = dict(DIFFUSPEC_RUNS[name])
    block_length = knobs.pop("block_length", 16)
    if knobs.get("eos_token_id") == "mid-answer":  # a token the verifier writes early in the first row
        knobs["eos_token_id"] = int(greedy_answer(verifier, ids, mask, 16)[0, 5])
    eos = knobs.get("eos_token_id")
    part = create_part("verifier", "diffuspec", verifier_model=verifier, diffuspec_beam=64, **knobs)
    out = generate(drafter, ids, mask, gen_length=16, block_length=block_length, mask_token_id=63, verifier=part,
                   eos_token_id=eos)
    low, high = knobs["diffuspec_draft_lengths"]
    want, want_nfe, want_ks = plain_diffuspec(
        drafter, verifier, ids, mask, gen_length=16, block_length=block_length, k_min=low, k_max=high,
        growth=knobs["diffuspec_growth"], ema=0.5, candidates=knobs["diffuspec_candidates"],
        mass=knobs.get("diffuspec_mass", 0.8), weight=knobs["diffuspec_weight"],
        proxy=knobs.get("diffuspec_proxy"), eos=eos, mask_id=63)
    assert torch.equal(out.sequences, want)
    assert torch.equal(out.sequences[:, ids.shape[1]:], greedy_answer(verifier, ids, mask, 16, eos))
    seen = [[int(k[rows.tolist().index(r)]) for rows, k, _ in part.history if r in rows.tolist()] for r in range(3)]
    assert seen == want_ks  # the adaptive draft length, step by step
    assert out.nfe == 2 * part.verifier_forwards  # one drafter and one verifier forward per step
    assert part.verifier_forwards <= want_nfe / 2  # rows share each forward (the plain loop counts them alone)
    if drafter_kind == "oracle":  # drafts are accepted: fewer verifier forwards than tokens, k reaches k_max
        assert part.verifier_forwards < 16 and all(max(s) == high for s in seen)


def test_a_start_token_verifier_decodes_as_greedy_decoding_after_its_start_token():
    """StartTokenVerifier puts the start token before the canvas: DiffuSpec's answer is then greedy decoding of
    [start | prompt] (what an AR model trained with EOS as BOS sees), not of the bare prompt."""
    causal = MaskLogitOff(tiny_backbone("causal", seed=1))
    drafter = MaskLogitOff(tiny_backbone("bidirectional"))
    ids, mask, _ = backbone_inputs()
    start = 7
    part = create_part("verifier", "diffuspec", verifier_model=StartTokenVerifier(causal, start),
                       diffuspec_draft_lengths=(2, 4), diffuspec_candidates=3, diffuspec_weight=1.0)
    out = generate(drafter, ids, mask, gen_length=16, block_length=16, mask_token_id=63, verifier=part)
    rows = [[0] * (len(r) - sum(m)) + [start] + r[len(r) - sum(m):] for r, m in zip(ids.tolist(), mask.tolist(), strict=True)]
    width = max(map(len, rows))  # left padded again, the start token right before each prompt
    with_start = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    start_mask = torch.tensor([[0] * (width - 1 - sum(m)) + [1] * (sum(m) + 1) for m in mask.tolist()])
    assert mask.min() == 0  # the batch has padding
    want = greedy_answer(causal, with_start, start_mask, 16)
    assert torch.equal(out.sequences[:, ids.shape[1]:], want)
    assert not torch.equal(want, greedy_answer(causal, ids, mask, 16))  # the start token matters


def test_diffuspec_draft_length_follows_acceptance():
    verifier = MaskLogitOff(tiny_backbone("causal", seed=1))
    ids, mask, _ = backbone_inputs()
    lengths = {}
    for kind, drafter in (("bad", MaskLogitOff(tiny_backbone("bidirectional"))), ("oracle", OracleDrafter(verifier, 63))):
        part = create_part("verifier", "diffuspec", verifier_model=verifier, diffuspec_draft_lengths=(1, 6),
                           diffuspec_growth=4)
        out = generate(drafter, ids, mask, gen_length=24, block_length=24, verifier=part)
        assert torch.equal(out.sequences[:, ids.shape[1]:], greedy_answer(verifier, ids, mask, 24))
        lengths[kind] = ([k.float().mean().item() for _, k, _ in part.history], part.verifier_forwards)
    bad, oracle = lengths["bad"], lengths["oracle"]
    assert bad[0][0] == oracle[0][0] == 6  # the first window is k_max
    # rejected drafts get no growth: the window follows the drafter's length average (6 -> 3 and stays)
    assert max(bad[0][1:]) <= 3
    # accepted ones earn the growth on top of it: the window stays at k_max, and far fewer forwards are needed
    assert min(oracle[0][:-1]) == 6 and oracle[1] * 3 < bad[1]


def test_causal_path_search_is_the_best_path_of_the_pruned_lattice():
    g = torch.Generator().manual_seed(3)
    logp = (torch.randn(4, 5, 12, generator=g) * 1.5).log_softmax(-1)
    proxy, eos = BigramProxy(12, seed=1), 2
    length = torch.tensor([5, 3, 1, 4])
    context = torch.tensor([[7], [1], [4], [0]])
    for weight, candidates, mass in ((0.5, 3, 0.9), (1.0, 2, 0.6), (0.2, 4, 1.0)):
        path, n = causal_path(logp, length, context, candidates=candidates, mass=mass, beam=200, weight=weight,
                              proxy=proxy, eos_token_id=eos)
        for r in range(4):
            want = plain_path_search(logp[r], int(length[r]), int(context[r, -1]), candidates=candidates, mass=mass,
                                     weight=weight, proxy=proxy, eos=eos)
            assert path[r, : int(n[r])].tolist() == want
    # without a proxy and beam 1, the path is each position's most probable candidate up to the first EOS
    path, n = causal_path(logp, length, context, beam=1, weight=1.0)
    assert torch.equal(path, logp.argmax(-1) * (torch.arange(5) < length[:, None])) and torch.equal(n, length)
    lattice = candidate_lattice(logp, 3, 0.9, eos)
    assert lattice[..., eos].all() and (lattice.sum(-1) <= 4).all() and lattice.gather(-1, logp.argmax(-1, True)).all()


def test_diffuspec_parts_and_errors():
    verifier = tiny_backbone("causal", seed=1)
    assert {"none", "freedave", "diffuspec"} <= set(list_parts("verifier"))
    part = create_part("verifier", "diffuspec", verifier_model=verifier, diffuspec_draft_lengths=(3, 9),
                       diffuspec_growth=2, diffuspec_ema=0.25, diffuspec_beam=5, diffuspec_weight=0.7)
    assert isinstance(part, DiffuSpec) and (part.k_min, part.k_max, part.growth, part.ema) == (3, 9, 2, 0.25)
    assert part.search["beam"] == 5 and part.search["weight"] == 0.7 and part.model is verifier
    assert create_part("verifier", "freedave", freedave_drafts=6).drafts == 6
    assert Sampler.from_config({"verifier": "freedave", "gen_length": 8, "block_length": 4}).config.verifier == "freedave"
    with pytest.raises(ValueError, match="must be causal"):
        create_part("verifier", "diffuspec", verifier_model=tiny_backbone("bidirectional"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(verifier="diffuspec"), "needs `verifier_model`"),
    (dict(verifier="freedave", temperature=0.7), "temperature=0"),
    (dict(verifier="freedave", revision="rcr"), "revision='none'"),
    (dict(verifier="freedave", confidence="random"), "confidence='random'"),
    (dict(verifier="freedave", cache="dkv"), "cache='dkv'"),
    (dict(verifier="verify"), "Known verifier names"),
    (dict(freedave_drafts=0), "freedave_drafts"),
    (dict(verifier="diffuspec", verifier_model=object(), diffuspec_draft_lengths=(4, 2)), "diffuspec_draft_lengths"),
    (dict(cache="dkv", revision="rcr"), "cache='dkv'"),
    (dict(dkv_refresh=0), "dkv_refresh"),
])
def test_verifier_and_cache_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampler(gen_length=8, block_length=4, **kwargs)


def test_pipelines_select_the_verifier_by_name():
    from test_text_pipeline import make_pipe

    pipe = make_pipe()
    base = pipe(["the cat", "a dog sat"], gen_length=8, steps=8, output_type="ids")
    fast = pipe(["the cat", "a dog sat"], gen_length=8, steps=8, output_type="ids", verifier="freedave", freedave_drafts=3)
    assert torch.equal(fast.sequences, base.sequences) and fast.nfe <= base.nfe


# =====================================================================================================
# dKV-Cache (decode variant)
# =====================================================================================================
def masked_canvas(prompt, mask, gen_length, mask_id, prefix_embeds=None, prefix_mask=None):
    """The reference loops' start: the prompt then gen_length masks, and the key mask over prefix + canvas."""
    batch = prompt.shape[0]
    p = 0 if prefix_embeds is None else prefix_embeds.shape[1]
    x = torch.cat([prompt, torch.full((batch, gen_length), mask_id)], 1)
    keep = torch.cat([torch.ones(batch, p, dtype=torch.bool) if prefix_mask is None else prefix_mask.bool(),
                      mask.bool(), torch.ones(batch, gen_length, dtype=torch.bool)], 1)
    return x, keep


def stored_kv_forward(model, ids, prefix_embeds, keep, store, reuse):
    """One plain forward of the backbone in which the K/V of slots `reuse` [B, S] are taken from `store`
    (per layer (k, v) [B, Hkv, S, d]) instead of being computed; every other slot's K/V are computed from
    this forward's input. Returns the canvas logits and the K/V every slot used."""
    from latent.attention import eager_attention
    from latent.backbone import rotate

    x = model._embed_inputs(ids, prefix_embeds, None, None)
    batch, slots, _ = x.shape
    cos, sin = model.rotary(torch.arange(slots)[None].expand(batch, -1))
    allowed = keep[:, None, None, :].expand(-1, 1, slots, -1)
    used = []
    for i, layer in enumerate(model.blocks):
        a, h = layer.attn, layer.attn_norm(x)
        q = a.q_norm(a.q(h).view(batch, slots, a.heads, a.head_dim)).transpose(1, 2)
        k, v = a.kv(h).view(batch, slots, 2, a.kv_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, cos, sin), rotate(a.k_norm(k), cos, sin)
        if store is not None:
            k = torch.where(reuse[:, None, :, None], store[i][0], k)
            v = torch.where(reuse[:, None, :, None], store[i][1], v)
        used.append((k, v))
        x = x + a.out(eager_attention(q, k, v, allowed).transpose(1, 2).reshape(batch, slots, -1))
        x = x + layer.mlp(layer.mlp_norm(x))
    p = 0 if prefix_embeds is None else prefix_embeds.shape[1]
    return (model.norm(x)[:, p:] @ model.embed.weight.T).float(), used


def plain_dkv(model, prompt, mask, *, gen_length, block_length, steps, refresh, prefix_embeds=None, prefix_mask=None):
    """dKV-Cache-Decode as its paper states it, LLaDA's schedule at temperature 0: in each block, forwards 0
    and 1 and every forward i with i % refresh == 0 compute every K/V (from forward 1 on they are stored);
    any other forward computes the K/V of the positions that were masked at the previous forward's input and
    takes every other slot's K/V from the store, then stores the new ones. Logits of the mask id are -inf."""
    mask_id = model.config.mask_token_id
    batch, plen = prompt.shape
    p = 0 if prefix_embeds is None else prefix_embeds.shape[1]
    x, keep = masked_canvas(prompt, mask, gen_length, mask_id, prefix_embeds, prefix_mask)
    per_block, nfe, gap = steps // (gen_length // block_length), 0, 0.0
    for b in range(gen_length // block_length):
        block = range(plen + b * block_length, plen + (b + 1) * block_length)
        m_count = [sum(int(x[j, t]) == mask_id for t in block) for j in range(batch)]
        store, before = None, None
        for i in range(per_block):
            masked_now = torch.cat([torch.zeros(batch, p, dtype=torch.bool), x == mask_id], 1)
            full = i < 2 or i % refresh == 0
            with torch.no_grad():
                logits, used = stored_kv_forward(model.backbone, x, prefix_embeds, keep, None if full else store,
                                                 None if full else ~before)
            nfe += 1
            if not full:  # how far the reused K/V moved the block's logits from a fresh forward's
                with torch.no_grad():
                    fresh, _ = stored_kv_forward(model.backbone, x, prefix_embeds, keep, None, None)
                rows = x[:, block.start : block.stop] == mask_id
                gap = max(gap, float((logits - fresh)[:, block.start : block.stop][rows][:, :mask_id].abs().max()))
            store = used if i >= 1 else None
            before = masked_now
            logits[..., mask_id] = -INF
            for j in range(batch):
                quota = m_count[j] // per_block + (1 if i < m_count[j] % per_block else 0)
                x0, conf = proposals(logits[j], mask_id)
                for t in top_by_confidence(conf, [t for t in block if int(x[j, t]) == mask_id], quota):
                    x[j, t] = x0[t]
    return x, nfe, gap


@pytest.mark.parametrize("refresh, with_prefix, steps", [(3, False, 16), (4, True, 16), (8, False, 8), (2, True, 16)])
def test_dkv_matches_plain_reimplementation(refresh, with_prefix, steps):
    model = MaskLogitOff(tiny_backbone("bidirectional"))
    ids, mask, extra = backbone_inputs(with_prefix=with_prefix)
    run = dict(gen_length=16, block_length=8, steps=steps)
    want, want_nfe, gap = plain_dkv(model, ids, mask, refresh=refresh, **run, **extra)
    out = generate(model, ids, mask, cache="dkv", dkv_refresh=refresh, **run, **extra)
    assert torch.equal(out.sequences, want) and out.nfe == want_nfe
    plain = generate(model, ids, mask, **run, **extra)
    assert out.forward_tokens < plain.forward_tokens
    assert gap > 1e-3  # the reused K/V really are stale: the test tells the cache apart from none


def test_dkv_refreshing_every_forward_is_no_cache():
    model = MaskLogitOff(tiny_backbone("bidirectional"))
    ids, mask, extra = backbone_inputs(with_prefix=True)
    run = dict(gen_length=16, block_length=8, **extra)
    for rule in (dict(steps=16), dict(commit="threshold", threshold=0.7), dict(steps=8, cfg_scale=1.0)):
        plain = generate(model, ids, mask, **run, **rule)
        assert torch.equal(generate(model, ids, mask, cache="dkv", dkv_refresh=1, **run, **rule).sequences,
                           plain.sequences)
    # the reference's plain forward is the backbone's
    keep = torch.cat([extra["prefix_mask"].bool(), mask.bool(), torch.ones(3, 16, dtype=torch.bool)], 1)
    x = plain.sequences
    with torch.no_grad():
        ref, _ = stored_kv_forward(model.backbone, x, extra["prefix_embeds"], keep, None, None)
        real = model(x, prefix_embeds=extra["prefix_embeds"], attention_mask=keep.long()).logits
    torch.testing.assert_close(ref[..., :63], real[..., :63], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="cache='dkv' is valid for attention layouts"):
        generate(tiny_backbone("prefix"), ids, mask, cache="dkv", steps=16, **run)


# =====================================================================================================
# Long context: NTK rope scaling (LongLLaDA)
# =====================================================================================================
@pytest.mark.parametrize("factor, theta, head_dim", [(2.0, 10000.0, 8), (4.0, 10000.0, 32), (8.0, 500000.0, 64)])
def test_ntk_frequencies_follow_the_formula(factor, theta, head_dim):
    from latent.backbone import Rotary

    plain = Rotary(head_dim, theta, None).inv_freq.double()
    ntk = Rotary(head_dim, theta, {"type": "ntk", "factor": factor}).inv_freq.double()
    base = theta * factor ** (head_dim / (head_dim - 2))
    i = torch.arange(head_dim // 2, dtype=torch.float64)
    torch.testing.assert_close(ntk, base ** (-2 * i / head_dim), rtol=1e-6, atol=0)
    torch.testing.assert_close(plain, theta ** (-2 * i / head_dim), rtol=1e-6, atol=0)
    # the slowest frequency is divided by exactly the factor, and every one is slowed, the fast ones least
    torch.testing.assert_close(ntk[-1], plain[-1] / factor, rtol=1e-6, atol=0)
    ratio = ntk / plain
    assert (ratio[1:] < 1).all() and (ratio[1:] < ratio[:-1]).all()


def test_ntk_keeps_long_positions_in_the_trained_angle_range():
    # With factor f, position f * p turns the slowest rotary pair by the angle position p turned it before,
    # so rows f times longer than the trained ones meet no slow-frequency angle that training did not.
    from latent import DiffusionTransformer

    kw = dict(vocab_size=16, hidden_size=32, num_layers=1, num_heads=2, mask_token_id=15)
    plain = DiffusionTransformer(**kw).rotary
    ntk = DiffusionTransformer(**kw, rope_scaling={"type": "ntk", "factor": 2}).rotary
    p = torch.arange(64)[None]
    half = plain.inv_freq.numel()
    cos_plain, _ = plain(p)
    cos_ntk, _ = ntk(2 * p)
    torch.testing.assert_close(cos_ntk[..., half - 1], cos_plain[..., half - 1], atol=1e-4, rtol=0)
    torch.testing.assert_close(ntk(p)[0][..., 0], plain(p)[0][..., 0])  # the fastest pair is untouched


def test_retrieval_rows_hold_their_answers():
    from pipelines.tasks.copy import passkey_batch, retrieval_batch

    g = torch.Generator().manual_seed(0)
    rows = passkey_batch(50, 20, 4, 48, 24, 16, g)  # keys 0-7, values 8-31 (6 per digit), filler 32-47
    key, digits = rows[:, 20], rows[:, 21:]
    assert (key < 8).all() and ((digits - 8) // 6 == torch.arange(4)).all()
    for row in rows.tolist():  # the needle (key, digits) stands once in the haystack, the rest is filler
        at = row[:20].index(row[20])
        assert row[at : at + 5] == row[20:] and all(t >= 32 for t in row[:at] + row[at + 5 : 20])
    rows = retrieval_batch(50, 6, 3, 30, 6, g, filler=8)  # keys 0-15, values 16-21, filler 22-29
    for row in rows.tolist():
        listing = [row[i : i + 2] for i in range(0, 12, 2)]
        asked = [pair for pair in listing if pair[0] < 16]
        assert len(asked) == 3 and sorted(row[12:15]) == sorted(p[0] for p in asked)
        assert row[15:] == [dict(asked)[k] for k in row[12:15]]

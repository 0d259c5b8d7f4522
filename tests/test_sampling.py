"""Samplers (latent/sampling): each part against a direct implementation, and the loop against plain
re-implementations of LLaDA's `generate` and Fast-dLLM's threshold/factor/caches, token for token.

The references below are written from the semantics in docs/sampling.md: plain Python loops, one row
at a time. Ties in confidence go to the lower position (Python's stable sort) in the
references and in the sampler alike.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from latent.sampling import Sampler, SamplerConfig, create_part, generate, list_parts, register_confidence
from latent.sampling.commit import confidence_rank, transfer_schedule
from latent.sampling.guidance import ClassifierFreeGuidance
from latent.sampling.proposal import top_k_filter, top_p_filter
from latent.sampling.registry import REGISTRIES
from latent.sampling.stopping import first_eos

V, MASK, EOS, EOT = 24, 23, 1, 2
INF = float("inf")


# ---- a deterministic toy model: logits depend on the token, its position and the whole context ----
class ToyModel:
    """Fixed random embeddings; logits = own token/position term + mean of the (unpadded) context.
    The mask token gets a very low logit so no reference ever proposes it. Rows are independent."""

    def __init__(self, seed=0, eos_bias=0.0, sharpness=0.5):
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(V, 16, generator=g)
        self.pos = torch.randn(64, 16, generator=g)
        self.w_own = torch.randn(16, V, generator=g) * sharpness
        self.w_ctx = torch.randn(16, V, generator=g) * sharpness
        self.bias = torch.zeros(V)
        self.bias[MASK] = -30.0
        self.eos_bias = eos_bias
        self.eos_dir = torch.randn(16, generator=g)  # EOS likelier for some contexts than for others
        self.calls = []  # batch size and length of every call

    def __call__(self, x, attention_mask=None):
        self.calls.append(tuple(x.shape))
        h = self.emb[x] + self.pos[: x.shape[1]]
        keep = torch.ones(x.shape) if attention_mask is None else attention_mask.float()
        ctx = (h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
        logits = h @ self.w_own + (ctx @ self.w_ctx)[:, None] + self.bias
        logits[..., EOS] += self.eos_bias * (1 + ctx @ self.eos_dir)[:, None]
        return SimpleNamespace(logits=logits)


def prompts(lengths=(5, 3, 4), seed=1):
    """Left-padded prompts of different lengths (pad id 0) and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, MASK, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask


def top_by_confidence(conf_row, candidates, k):
    """The k candidate positions with the highest confidence, ties to the lower position."""
    return sorted(candidates, key=lambda t: -conf_row[t])[:k]


# ---- plain LLaDA generate ---------------------------------------------------------------------------
def llada_reference(model, prompt, attention_mask=None, *, steps, gen_length, block_length, temperature=0.0,
                    cfg_scale=0.0, remasking="low_confidence", logits_eos_inf=False,
                    confidence_eos_eot_inf=False, generator=None, mask_id=MASK):
    MASK = mask_id  # noqa: N806 - the reference reads like the semantics doc
    batch, plen = prompt.shape
    x = torch.full((batch, plen + gen_length), MASK, dtype=torch.long)
    x[:, :plen] = prompt
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, torch.ones(batch, gen_length, dtype=torch.long)], 1)
    num_blocks = gen_length // block_length
    per_block = steps // num_blocks
    for b in range(num_blocks):
        start, end = plen + b * block_length, plen + (b + 1) * block_length
        masked = [int((x[j, start:end] == MASK).sum()) for j in range(batch)]
        quota = [[m // per_block + (1 if i < m % per_block else 0) for i in range(per_block)] for m in masked]
        for i in range(per_block):
            is_mask = x == MASK
            if cfg_scale > 0:
                uncond = x.clone()
                uncond[:, :plen] = MASK
                both_mask = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
                cond_l, uncond_l = model(torch.cat([x, uncond]), attention_mask=both_mask).logits.chunk(2)
                logits = uncond_l + (cfg_scale + 1) * (cond_l - uncond_l)
            else:
                logits = model(x, attention_mask=attention_mask).logits
            if logits_eos_inf:
                logits[:, :, EOS] = -INF
            if temperature > 0:
                u = torch.rand(logits.shape, dtype=torch.float64, generator=generator)
                x0 = (logits.double().exp() / (-torch.log(u)) ** temperature).argmax(-1)
            else:
                x0 = logits.argmax(-1)
            conf_logits = logits.clone()
            if confidence_eos_eot_inf:
                conf_logits[:, :, EOS] = -INF
                conf_logits[:, :, EOT] = -INF
            if remasking == "low_confidence":
                p = conf_logits.softmax(-1).gather(-1, x0[..., None]).squeeze(-1)
            else:
                p = torch.rand((batch, x.shape[1]), generator=generator)
            p[:, end:] = -INF
            conf = torch.where(is_mask, p, torch.full_like(p, -INF))
            for j in range(batch):
                row = conf[j].tolist()
                for t in top_by_confidence(row, range(x.shape[1]), quota[j][i]):
                    x[j, t] = x0[j, t]
    return x


# ---- plain Fast-dLLM threshold / factor decoding (no cache) ------------------------------------------
def fast_dllm_reference(model, prompt, attention_mask=None, *, gen_length, block_length, threshold=None,
                        factor=None, temperature=0.0, generator=None, logits_fn=None, mask_id=MASK):
    """`logits_fn(x, block, step_in_block)` replaces the plain full forward (used for the cache references)."""
    MASK = mask_id  # noqa: N806
    batch, plen = prompt.shape
    x = torch.full((batch, plen + gen_length), MASK, dtype=torch.long)
    x[:, :plen] = prompt
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, torch.ones(batch, gen_length, dtype=torch.long)], 1)
    nfe = 0
    for b in range(gen_length // block_length):
        start, end = plen + b * block_length, plen + (b + 1) * block_length
        step = 0
        while (x[:, start:end] == MASK).any():
            if logits_fn is None:
                logits = model(x, attention_mask=attention_mask).logits
            else:
                logits = logits_fn(x, b, step)
            nfe += 1
            if temperature > 0:
                u = torch.rand(logits.shape, dtype=torch.float64, generator=generator)
                x0 = (logits.double().exp() / (-torch.log(u)) ** temperature).argmax(-1)
            else:
                x0 = logits.argmax(-1)
            p = logits.double().softmax(-1).gather(-1, x0[..., None]).squeeze(-1)
            for j in range(batch):
                cands = [t for t in range(start, end) if x[j, t] == MASK]
                if not cands:
                    continue
                row = p[j].tolist()
                order = top_by_confidence(row, cands, len(cands))
                if threshold is not None:
                    chosen = [order[0]] + [t for t in order[1:] if row[t] >= threshold]
                else:
                    n = 1  # ranks are 1-based: order[n] has rank n + 1
                    while n < len(order) and (n + 2) * (1 - row[order[n]]) <= factor:
                        n += 1
                    chosen = order[:n]
                for t in chosen:
                    x[j, t] = x0[j, t]
            step += 1
    return x, nfe


# =====================================================================================================
# Parts alone
# =====================================================================================================
def test_transfer_schedule_matches_plain_rule():
    masked = torch.tensor([0, 3, 7, 8, 13])
    got = transfer_schedule(masked, 4)
    for row, m in enumerate(masked.tolist()):
        assert got[row].tolist() == [m // 4 + (1 if i < m % 4 else 0) for i in range(4)]
        assert int(got[row].sum()) == m


def test_schedule_commit_is_top_k_per_row():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(3, 8, generator=g)
    conf[0, 2] = conf[0, 5] = 0.99  # a tie: the lower position goes first
    cands = torch.rand(3, 8, generator=g) > 0.3
    conf = conf.masked_fill(~cands, -INF)
    rule = create_part("commit", "schedule", gen_length=8, block_length=8, steps=2)  # 2 steps per block
    state = SimpleNamespace(batch_size=3, rows=torch.arange(3), block_step=0)
    rule.begin_block(state, cands.sum(1))
    got = rule(conf, cands, state)
    for j in range(3):
        k = -(-int(cands[j].sum()) // 2)  # first of 2 steps gets the extra one
        want = top_by_confidence(conf[j].tolist(), [t for t in range(8) if cands[j, t]], k)
        assert sorted(got[j].nonzero().flatten().tolist()) == sorted(want)
    assert confidence_rank(torch.tensor([[0.5, 0.9, 0.9, -INF]])).tolist() == [[2, 0, 1, 3]]


def test_threshold_and_factor_commit_match_plain_rules():
    g = torch.Generator().manual_seed(1)
    conf = torch.rand(6, 10, generator=g, dtype=torch.float64) ** 0.3
    cands = torch.rand(6, 10, generator=g) > 0.2
    cands[5] = False  # a row with nothing left to commit
    conf = conf.masked_fill(~cands, -INF)
    state = SimpleNamespace(rows=torch.arange(6))
    for tau in (0.7, 0.9, 0.999):
        got = create_part("commit", "threshold", threshold=tau)(conf, cands, state)
        for j in range(6):
            c = [t for t in range(10) if cands[j, t]]
            order = top_by_confidence(conf[j].tolist(), c, len(c))
            want = (order[:1] + [t for t in order[1:] if conf[j, t] >= tau]) if c else []
            assert sorted(got[j].nonzero().flatten().tolist()) == sorted(want)
    for f in (0.2, 1.0, 3.0):
        got = create_part("commit", "factor", factor=f)(conf, cands, state)
        for j in range(6):
            c = [t for t in range(10) if cands[j, t]]
            order = top_by_confidence(conf[j].tolist(), c, len(c))
            n = 1 if c else 0
            while 0 < n < len(order) and (n + 2) * (1 - conf[j, order[n]].item()) <= f:
                n += 1
            assert sorted(got[j].nonzero().flatten().tolist()) == sorted(order[:n])


def test_confidences_match_direct_formulas():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, V, generator=g) * 3
    x0 = logits.argmax(-1)
    p = logits.softmax(-1)
    for name in ("low_confidence", "probability"):
        got = create_part("confidence", name)(logits, x0, None)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, torch.stack([p[b, t, x0[b, t]] for b in range(2) for t in range(5)]).view(2, 5))
    p64 = create_part("confidence", "probability", confidence_dtype="float64")(logits, x0, None)
    assert p64.dtype == torch.float64
    sp = p.sort(-1, descending=True).values
    torch.testing.assert_close(create_part("confidence", "margin")(logits, x0, None), sp[..., 0] - sp[..., 1])
    plogp = torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)
    torch.testing.assert_close(create_part("confidence", "neg_entropy")(logits, x0, None), plogp)


def _draw_state(batch=3, length=10, rows=None, start=4, block=3, generator=None, noise_shape="canvas"):
    from latent.sampling import DecodeState

    rows = torch.arange(batch) if rows is None else rows
    state = DecodeState(model=None, x=torch.zeros(len(rows), length, dtype=torch.long), rows=rows,
                        batch_size=batch, attn=None, prefix_embeds=None, prompt_len=start, block_length=block,
                        mask_token_id=MASK, guidance=None, generator=generator, noise_shape=noise_shape)
    return state


def test_random_confidence_and_gumbel_use_full_batch_canvas_draws():
    # LLaDA draws U of the full [B, T(, V)] shape once per step; the sampler slices rows and the block.
    state = _draw_state(rows=torch.tensor([0, 2]), generator=torch.Generator().manual_seed(3))
    got = create_part("confidence", "random")(None, None, state)
    want = torch.rand((3, 10), generator=torch.Generator().manual_seed(3))[[0, 2], 4:7]
    assert torch.equal(got, want)

    logits = torch.randn(2, 3, V, generator=torch.Generator().manual_seed(4))
    state = _draw_state(rows=torch.tensor([0, 2]), generator=torch.Generator().manual_seed(5))
    got = create_part("proposal", "gumbel", temperature=0.7)(logits, state)
    u = torch.rand((3, 10, V), dtype=torch.float64, generator=torch.Generator().manual_seed(5))[[0, 2], 4:7]
    assert torch.equal(got, (logits.double().exp() / (-u.log()) ** 0.7).argmax(-1))
    # noise_shape="block" draws only the block: [B, block_length(, V)]
    state = _draw_state(rows=torch.tensor([1]), generator=torch.Generator().manual_seed(3), noise_shape="block")
    want = torch.rand((3, 3), generator=torch.Generator().manual_seed(3))[[1]]
    assert torch.equal(create_part("confidence", "random")(None, None, state), want)
    # temperature 0 is argmax and draws nothing
    gen = torch.Generator().manual_seed(6)
    state = _draw_state(rows=torch.tensor([0, 2]), generator=gen)
    assert torch.equal(create_part("proposal", "gumbel", temperature=0.0)(logits, state), logits.argmax(-1))
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(6).get_state())


def test_gumbel_samples_softmax_over_temperature():
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    temperature = 0.8
    n = 20000
    state = _draw_state(batch=n, length=1, start=0, block=1, generator=torch.Generator().manual_seed(7))
    draws = create_part("proposal", "gumbel", temperature=temperature)(logits.expand(n, 1, 4), state)
    freq = torch.bincount(draws.flatten(), minlength=4).float() / n
    torch.testing.assert_close(freq, (logits / temperature).softmax(-1), atol=0.015, rtol=0)


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    assert torch.isinf(top_k_filter(logits, 2)[0, 2:]).all() and torch.isfinite(top_k_filter(logits, 2)[0, :2]).all()
    p = logits.softmax(-1)[0]  # about .55 .20 .12 .07 .03
    kept = torch.isfinite(top_p_filter(logits, 0.7))[0].tolist()
    # plain nucleus: keep tokens in order until the kept mass reaches top_p
    mass, want = 0.0, []
    for prob in p.tolist():
        want.append(mass <= 0.7)
        mass += prob
    assert kept == want == [True, True, False, False, False]
    assert torch.isfinite(top_p_filter(logits, 0.01))[0].tolist() == [True, False, False, False, False]
    # filtered tokens are never sampled
    state = _draw_state(batch=500, length=1, start=0, block=1, generator=torch.Generator().manual_seed(8))
    draws = create_part("proposal", "gumbel", temperature=2.0, top_k=2)(logits.expand(500, 1, 5), state)
    assert set(draws.flatten().tolist()) == {0, 1}


def test_cfg_guidance_masks_prompt_and_combines():
    cfg = ClassifierFreeGuidance(cfg_scale=1.5)
    ids = torch.tensor([[5, 6, 7, MASK, 9]])
    both = cfg.ids(ids[:, 1:], 1, 3, MASK)  # canvas positions 1..4, prompt is [0, 3)
    assert both.tolist() == [[6, 7, MASK, 9], [MASK, MASK, MASK, 9]]
    c, u = torch.randn(2, 4, V).unbind(0)
    torch.testing.assert_close(cfg.combine(torch.stack([c, u])), (u + 2.5 * (c - u))[None])
    assert cfg.rows(torch.tensor([0, 2]), 3).tolist() == [0, 2, 3, 5]


def test_eos_stopping_rule():
    gen = torch.tensor([
        [4, EOS, 5, MASK],  # EOS with everything before decoded -> done at 1
        [4, MASK, EOS, 5],  # a hole before the EOS -> not done
        [4, 5, 6, 7],  # no EOS
        [EOS, MASK, MASK, MASK],  # EOS first
    ])
    done, pos = first_eos(gen, EOS, MASK)
    assert done.tolist() == [True, False, False, True]
    assert pos[done].tolist() == [1, 0]
    state = SimpleNamespace(x=torch.cat([torch.zeros(4, 2, dtype=torch.long), gen], 1), prompt_len=2,
                            mask_token_id=MASK)
    assert create_part("stopping", "eos_early_stop", eos_token_id=EOS)(state).tolist() == [True, False, False, True]
    assert state.x[0, 2:].tolist() == [4, EOS, EOS, EOS] and state.x[3, 2:].tolist() == [EOS] * 4
    assert state.x[1, 2:].tolist() == [4, MASK, EOS, 5]


def test_registry_names_and_custom_parts():
    assert {"argmax", "gumbel"} <= set(list_parts("proposal"))
    assert {"low_confidence", "probability", "margin", "neg_entropy", "random"} <= set(list_parts("confidence"))
    assert {"schedule", "threshold", "factor"} <= set(list_parts("commit"))
    assert {"none", "prefix_exact", "block_exact", "prefix", "dual"} <= set(list_parts("cache"))
    with pytest.raises(ValueError, match="Known confidence names: .*low_confidence.*margin"):
        Sampler(confidence="sureness")
    with pytest.raises(ValueError, match="Known cache names"):
        create_part("cache", "everything")

    @register_confidence("test_position_first")
    class PositionFirst:  # commit left to right: an autoregressive order through the same loop
        def __call__(self, logits, x0, state):
            return -torch.arange(logits.shape[1], dtype=torch.float32).expand(logits.shape[:2])

    model = ToyModel()
    ids, mask = prompts()
    order = []
    try:
        out = generate(model, ids, mask, gen_length=8, block_length=8, steps=8, mask_token_id=MASK,
                       confidence="test_position_first", callback_on_step_end=lambda s, canvas, info: order.append(
                           info["transfer"].int().argmax(1).tolist()))
    finally:
        REGISTRIES["confidence"].unregister("test_position_first")
    assert order == [[i] * 3 for i in range(8)] and not (out.sequences == MASK).any()


# =====================================================================================================
# The loop against LLaDA's generate
# =====================================================================================================
LLADA_CASES = {
    "greedy_one_block": dict(gen_length=8, block_length=8, steps=8),
    "greedy_blocks_two_per_step": dict(gen_length=12, block_length=4, steps=6),
    "more_steps_than_tokens": dict(gen_length=8, block_length=4, steps=12),  # zero-quota steps still run
    "random_remasking": dict(gen_length=8, block_length=4, steps=8, remasking="random"),
    "temperature": dict(gen_length=12, block_length=4, steps=12, temperature=0.9),
    "temperature_random": dict(gen_length=8, block_length=4, steps=4, temperature=1.3, remasking="random"),
    "cfg": dict(gen_length=8, block_length=4, steps=8, cfg_scale=1.5),
    "cfg_temperature": dict(gen_length=8, block_length=4, steps=8, cfg_scale=0.5, temperature=0.7),
    "logits_eos_inf": dict(gen_length=8, block_length=4, steps=8, logits_eos_inf=True),
    "confidence_eos_eot_inf": dict(gen_length=12, block_length=4, steps=12, confidence_eos_eot_inf=True),
}


@pytest.mark.parametrize("padded", [False, True], ids=["same_length", "left_padded"])
@pytest.mark.parametrize("case", list(LLADA_CASES))
def test_loop_matches_llada_generate(case, padded):
    kw = dict(LLADA_CASES[case])
    model = ToyModel(eos_bias=2.0 if "eos" in case else 0.0)
    ids, mask = prompts() if padded else prompts((4, 4, 4))
    mask = mask if padded else None
    seed = 11
    want = llada_reference(model, ids, mask, generator=torch.Generator().manual_seed(seed), **kw)
    remasking = kw.pop("remasking", "low_confidence")
    out = generate(model, ids, mask, mask_token_id=MASK, eos_token_id=EOS, eot_token_id=EOT, confidence=remasking,
                   generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(out.sequences, want)
    assert out.nfe == kw["steps"] and (out.steps == kw["steps"]).all()
    if case == "logits_eos_inf":
        assert not (out.sequences[:, ids.shape[1]:] == EOS).any()
    if case == "confidence_eos_eot_inf":
        assert (want[:, ids.shape[1]:] == EOS).any()  # the knob had EOS proposals to act on


def test_confidence_eos_eot_inf_commits_eos_last():
    model = ToyModel(eos_bias=3.0)
    ids, mask = prompts()
    seen = []
    out = generate(model, ids, mask, gen_length=8, block_length=8, steps=8, mask_token_id=MASK, eos_token_id=EOS,
                   eot_token_id=EOT, confidence_eos_eot_inf=True,
                   callback_on_step_end=lambda s, c, info: seen.append((info["x0"], info["transfer"])))
    # once an EOS is committed in a row, every later commit of that row is an EOS/EOT too (confidence 0)
    for row in range(3):
        eos_seen = False
        for x0, transfer in seen:
            committed = x0[row][transfer[row]].tolist()
            if eos_seen:
                assert all(t in (EOS, EOT) for t in committed)
            eos_seen |= any(t in (EOS, EOT) for t in committed)
    assert (out.sequences == EOS).any()


def test_real_backbone_matches_llada_generate():
    model = MaskLogitOff(tiny_backbone("bidirectional"))
    ids, mask = prompts()
    ids = ids % 60 + 3 * (ids > 0)  # keep ids below the backbone's mask id
    with torch.no_grad():
        want = llada_reference(model, ids, mask, steps=8, gen_length=8, block_length=4, mask_id=63)
    out = generate(model, ids, mask, gen_length=8, block_length=4, steps=8)  # mask id from model.config
    assert torch.equal(out.sequences, want)


# =====================================================================================================
# Threshold and factor (Fast-dLLM) against plain versions
# =====================================================================================================
@pytest.mark.parametrize("rule", [dict(threshold=0.6), dict(threshold=0.9), dict(factor=1.0), dict(factor=2.0)])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_parallel_rules_match_fast_dllm(rule, temperature):
    model = ToyModel(sharpness=1.25)  # sure enough that several tokens pass in one step
    ids, mask = prompts()
    seed = 5
    want, want_nfe = fast_dllm_reference(model, ids, mask, gen_length=16, block_length=8, temperature=temperature,
                                         generator=torch.Generator().manual_seed(seed), **rule)
    out = generate(model, ids, mask, gen_length=16, block_length=8, mask_token_id=MASK, temperature=temperature,
                   commit="threshold" if "threshold" in rule else "factor",
                   generator=torch.Generator().manual_seed(seed), **rule)
    assert torch.equal(out.sequences, want)
    assert out.nfe == want_nfe
    assert out.nfe < 16  # fewer forwards than one token per step


# =====================================================================================================
# EOS early stop: rows leave the batch, tokens are those of a run that keeps every row
# =====================================================================================================
@pytest.mark.parametrize("kw", [
    dict(steps=16),
    dict(steps=16, temperature=0.8, confidence="random"),
    dict(commit="threshold", threshold=0.7),
])
def test_eos_early_stop_equals_plain_run_with_tail_filled(kw):
    model = ToyModel(eos_bias=1.5)
    ids, mask = prompts((5, 3, 4, 2), seed=4)
    common = dict(gen_length=16, block_length=4, mask_token_id=MASK, eos_token_id=EOS, **kw)
    plain = generate(model, ids, mask, generator=torch.Generator().manual_seed(2), **common)
    model.calls.clear()
    out = generate(model, ids, mask, eos_early_stop=True, generator=torch.Generator().manual_seed(2), **common)
    want = plain.sequences.clone()
    gen = want[:, ids.shape[1]:]
    for row in range(len(gen)):  # plain post-processing: everything after the first EOS becomes EOS
        hits = (gen[row] == EOS).nonzero()
        if len(hits):
            gen[row, int(hits[0]) + 1:] = EOS
    assert torch.equal(out.sequences, want)
    assert out.finished.tolist() == (gen == EOS).any(1).tolist()
    batch_sizes = [b for b, _ in model.calls]
    assert batch_sizes == sorted(batch_sizes, reverse=True) and batch_sizes[0] == 4
    assert any(0 < b < 4 for b in batch_sizes)  # some rows left while others went on
    assert out.forward_tokens < plain.forward_tokens
    assert (out.steps <= plain.steps).all() and out.steps.sum() < plain.steps.sum()
    first = [(int((g == EOS).nonzero()[0]) + 1) if (g == EOS).any() else 16 for g in gen]
    assert out.num_generated.tolist() == first


# =====================================================================================================
# Argument checks, hooks
# =====================================================================================================
@pytest.mark.parametrize("kwargs, match", [
    (dict(gen_length=10, block_length=4), "gen_length.*multiple of `block_length`"),
    (dict(gen_length=12, block_length=4, steps=8), "steps.*multiple of the number of blocks"),
    (dict(temperature=-1.0), "temperature"),
    (dict(threshold=1.5, commit="threshold"), "threshold"),
    (dict(commit="greedy"), "Known commit names: .*factor, .*schedule, threshold"),
    (dict(cache="kv"), "Known cache names"),
    (dict(eos_early_stop=True), "eos_token_id"),
    (dict(top_k=5), "top_k.*temperature > 0"),
    (dict(confidence_dtype="float16"), "confidence_dtype"),
])
def test_config_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampler(**{"gen_length": 8, "block_length": 4, **kwargs})


def test_input_errors_name_the_argument():
    model = ToyModel()
    ids, mask = prompts()
    run = dict(gen_length=8, block_length=4, steps=8, mask_token_id=MASK)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, ids[:, :0], **run)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, ids, mask * torch.tensor([[1], [0], [1]]), **run)
    with pytest.raises(ValueError, match="input_ids.*int64"):
        generate(model, ids.int(), **run)
    with pytest.raises(ValueError, match="input_ids.*batch"):
        generate(model, ids[0], **run)
    with pytest.raises(ValueError, match="attention_mask.*shape"):
        generate(model, ids, mask[:, 1:], **run)
    with pytest.raises(ValueError, match="left padding"):
        generate(model, ids, mask.flip(1), **run)
    with pytest.raises(ValueError, match="mask_token_id"):
        generate(model, ids, gen_length=8, block_length=4)
    with pytest.raises(ValueError, match="prefix_embeds"):
        generate(model, ids, prefix_embeds=torch.zeros(2, 3, 8), **run)
    backbone = tiny_backbone("bidirectional")
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        generate(backbone, ids, gen_length=128, block_length=32, steps=128)
    with pytest.raises(ValueError, match="cache='prefix_exact'.*attention_layout is 'bidirectional'"):
        generate(backbone, ids, gen_length=8, block_length=4, steps=8, cache="prefix_exact")
    with pytest.raises(ValueError, match="block_size=4; set `block_length`=4"):
        generate(tiny_backbone("block_causal"), ids, gen_length=16, block_length=8, steps=16)


def test_callback_and_progress_bar_hooks():
    model = ToyModel()
    ids, mask = prompts()
    calls, bars = [], []

    class Bar:
        def __init__(self, total):
            self.total, self.n, self.closed = total, 0, False
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def close(self):
            self.closed = True

    out = generate(model, ids, mask, gen_length=8, block_length=4, steps=8, mask_token_id=MASK,
                   callback_on_step_end=lambda step, canvas, info: calls.append((step, canvas.clone(), info)),
                   progress_bar=lambda total: Bar(total))
    assert [c[0] for c in calls] == list(range(8))
    assert [c[2]["block"] for c in calls] == [0] * 4 + [1] * 4 and calls[-1][2]["nfe"] == 8
    # the canvas only ever gains tokens, one per step here, and ends as the output
    filled = [int((c[1] != MASK).sum()) for c in calls]
    assert filled == [ids.numel() + 3 * (i + 1) for i in range(8)]
    assert torch.equal(calls[-1][1], out.sequences)
    assert bars[0].total == 8 and bars[0].n == 8 and bars[0].closed


def test_ready_made_parts_are_used_as_given():
    from latent.sampling.commit import ThresholdCommit

    model = ToyModel(sharpness=1.25)
    ids, mask = prompts()
    run = dict(gen_length=8, block_length=4, mask_token_id=MASK)
    by_name = generate(model, ids, mask, commit="threshold", threshold=0.6, **run)
    by_object = generate(model, ids, mask, commit=ThresholdCommit(threshold=0.6), **run)
    assert torch.equal(by_object.sequences, by_name.sequences) and by_object.nfe == by_name.nfe


def test_sampler_from_config_and_generate_agree():
    model = ToyModel()
    ids, mask = prompts()
    knobs = dict(gen_length=8, block_length=4, steps=8, mask_token_id=MASK, commit="schedule")
    sampler = Sampler.from_config({**knobs, "unrelated_key": 1})
    assert isinstance(sampler.config, SamplerConfig) and sampler.config.to_dict()["steps"] == 8
    assert torch.equal(sampler(model, ids, mask).sequences, generate(model, ids, mask, **knobs).sequences)


# =====================================================================================================
# Caches, with the real backbone (tiny: hidden 32, 2 layers)
# =====================================================================================================
def tiny_backbone(layout, seed=0):
    from latent import DiffusionTransformer

    torch.manual_seed(seed)
    model = DiffusionTransformer(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                 mask_token_id=63, max_position_embeddings=128, block_size=4,
                                 attention_layout=layout).eval()
    with torch.no_grad():  # larger weights than the init so logits are peaked and context matters
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 1.0 if "embed" in name else 0.3)
    return model


class MaskLogitOff:
    """The backbone with the mask id's logit at -inf. An untrained tied-embedding model favours the mask id
    itself; LLaDA never proposes it and neither does the sampler, so references need the same logits."""

    def __init__(self, backbone):
        self.backbone, self.config = backbone, backbone.config

    def __call__(self, *args, **kwargs):
        out = self.backbone(*args, **kwargs)
        out.logits[..., self.config.mask_token_id] = -INF
        return out


def backbone_inputs(batch=3, with_prefix=False):
    ids, mask = prompts((5, 3, 4)[:batch])
    ids = ids % 60 + 3 * (ids > 0)
    extra = {}
    if with_prefix:
        g = torch.Generator().manual_seed(9)
        extra["prefix_embeds"] = torch.randn(batch, 2, 32, generator=g)
        extra["prefix_mask"] = torch.tensor([[1, 1], [0, 1], [1, 1]])[:batch]
    return ids, mask, extra


@pytest.mark.parametrize("kw", [
    dict(steps=16),
    dict(steps=8, temperature=0.8, cfg_scale=1.0),
    dict(commit="threshold", threshold=0.8),
])
@pytest.mark.parametrize("with_prefix", [False, True], ids=["text", "prefix_embeds"])
def test_prefix_exact_cache_changes_no_token(kw, with_prefix):
    model = tiny_backbone("prefix")
    ids, mask, extra = backbone_inputs(with_prefix=with_prefix)
    run = dict(gen_length=16, block_length=4, **kw, **extra)
    full = generate(model, ids, mask, cache="none", generator=torch.Generator().manual_seed(4), **run)
    cached = generate(model, ids, mask, cache="prefix_exact", generator=torch.Generator().manual_seed(4), **run)
    assert torch.equal(cached.sequences, full.sequences)
    assert cached.nfe == full.nfe + 1  # + the one prompt forward
    assert cached.forward_tokens < full.forward_tokens


@pytest.mark.parametrize("kw", [
    dict(steps=16),
    dict(steps=8, temperature=0.8, cfg_scale=1.0),
    dict(commit="threshold", threshold=0.8, eos_early_stop=True),
])
@pytest.mark.parametrize("with_prefix", [False, True], ids=["text", "prefix_embeds"])
def test_block_exact_cache_changes_no_token(kw, with_prefix):
    model = tiny_backbone("block_causal")
    ids, mask, extra = backbone_inputs(with_prefix=with_prefix)
    run = dict(gen_length=16, block_length=4, **kw, **extra)
    if kw.get("eos_early_stop"):  # use a token this model emits mid-answer as EOS, so rows leave early
        plain = generate(model, ids, mask, **{**run, "eos_early_stop": False})
        run["eos_token_id"] = int(plain.sequences[0, ids.shape[1] + 5])
    full = generate(model, ids, mask, cache="none", generator=torch.Generator().manual_seed(4), **run)
    cached = generate(model, ids, mask, cache="block_exact", generator=torch.Generator().manual_seed(4), **run)
    assert torch.equal(cached.sequences, full.sequences)
    assert cached.nfe == full.nfe + 1
    # (the uncached run already stops at the current block's end: later blocks are never seen)
    assert cached.forward_tokens < full.forward_tokens
    if kw.get("eos_early_stop"):
        assert cached.finished.any()


@pytest.mark.parametrize("cache", ["none", "prefix_exact"])
def test_prefix_embeds_alone_without_text_prompt(cache):
    # captioning: an image prefix and no text prompt at all; the prefix is the cached part
    model = tiny_backbone("prefix")
    embeds = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(1))
    ids = torch.zeros(2, 0, dtype=torch.long)
    run = dict(gen_length=8, block_length=4, steps=8, prefix_embeds=embeds, prefix_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]))
    out = generate(model, ids, cache=cache, **run)
    assert out.sequences.shape == (2, 8) and not (out.sequences == 63).any()
    if cache != "none":
        assert torch.equal(out.sequences, generate(model, ids, cache="none", **run).sequences)
    other = generate(model, ids, cache=cache, **{**run, "prefix_embeds": embeds.flip(0)})
    assert not torch.equal(other.sequences, out.sequences)  # the prefix really conditions the answer


def stale_forward(model, x_ref, x, lo, hi, prefix_embeds, key_keep, fresh_from):
    """Fast-dLLM's cached step as one plain forward: slots [x_ref | x[:, lo:hi]]. x_ref is the canvas at
    the block's refresh; its slots attend only among themselves, so their K/V are those of the refresh
    forward. The fresh copy of [lo, hi) attends to the x_ref slots at positions < fresh_from[0] or
    >= fresh_from[1] (the stale K/V that the cache keeps) and to itself."""
    batch, n = x_ref.shape
    p = 0 if prefix_embeds is None else prefix_embeds.shape[1]
    m = hi - lo
    slots = p + n + m
    keep = torch.cat([key_keep, torch.ones(batch, m, dtype=torch.bool)], 1)  # [B, slots]
    canvas_pos = torch.arange(p + n) - p  # canvas position of each x_ref slot (prefix < 0)
    stale = (canvas_pos < fresh_from[0]) | (canvas_pos >= fresh_from[1])
    allowed = torch.zeros(slots, slots, dtype=torch.bool)
    allowed[: p + n, : p + n] = True
    allowed[p + n :, : p + n] = stale
    allowed[p + n :, p + n :] = True
    mask4d = (allowed[None] & keep[:, None, :])[:, None]
    mask4d |= torch.eye(slots, dtype=torch.bool)  # a padded query still has itself
    positions = torch.cat([torch.arange(p + n), torch.arange(p + lo, p + hi)])[None].expand(batch, -1)
    out = model(torch.cat([x_ref, x[:, lo:hi]], 1), prefix_embeds=prefix_embeds, attention_mask=mask4d,
                position_ids=positions)
    logits = torch.zeros(batch, n, out.logits.shape[-1])
    logits[:, lo:hi] = out.logits[:, n:]
    return logits


@pytest.mark.parametrize("cache, with_prefix, rule", [
    ("prefix", False, dict(threshold=0.7)),
    ("prefix", True, dict(factor=1.0)),
    ("dual", False, dict(factor=1.0)),
    ("dual", True, dict(threshold=0.7)),
])
def test_approximate_caches_match_fast_dllm_semantics(cache, with_prefix, rule):
    model = MaskLogitOff(tiny_backbone("bidirectional"))
    ids, mask, extra = backbone_inputs(with_prefix=with_prefix)
    gen_length, block_length = 16, 4
    plen = ids.shape[1]
    pe = extra.get("prefix_embeds")
    pm = extra.get("prefix_mask", torch.ones(3, 0, dtype=torch.long))
    key_keep = torch.cat([pm, mask, torch.ones(3, gen_length, dtype=torch.long)], 1).bool()
    full_mask = key_keep.long()
    refresh = {}

    def logits_fn(x, block, step):
        start, end = plen + block * block_length, plen + (block + 1) * block_length
        if step == 0:  # block start: a full forward refreshes the cache and serves step 0
            refresh["x"] = x.clone()
            logits = model(x, prefix_embeds=pe, attention_mask=full_mask).logits
        elif cache == "prefix":  # fresh: the block and everything after it
            logits = stale_forward(model, refresh["x"], x, start, x.shape[1], pe, key_keep, (start, x.shape[1]))
        else:
            logits = stale_forward(model, refresh["x"], x, start, end, pe, key_keep, (start, end))
        if step:
            fresh = model(x, prefix_embeds=pe, attention_mask=full_mask).logits[:, start:end]
            refresh["gap"] = max(refresh.get("gap", 0.0), float((logits[:, start:end] - fresh)[..., :63].abs().max()))
        return logits

    with torch.no_grad():
        want, want_nfe = fast_dllm_reference(model, ids, mask, gen_length=gen_length, block_length=block_length,
                                             logits_fn=logits_fn, mask_id=63, **rule)
    out = generate(model, ids, mask, gen_length=gen_length, block_length=block_length, cache=cache,
                   commit="threshold" if "threshold" in rule else "factor", **rule, **extra)
    assert torch.equal(out.sequences, want)
    assert out.nfe == want_nfe
    uncached = generate(model, ids, mask, gen_length=gen_length, block_length=block_length, **rule,
                        commit="threshold" if "threshold" in rule else "factor", **extra)
    assert out.forward_tokens < uncached.forward_tokens
    assert refresh["gap"] > 1e-3  # stale K/V really changed the logits: the test tells the caches apart


def test_cached_rows_leave_the_batch_with_the_cache():
    # dual cache + eos_early_stop: the cache's rows are selected with the canvas's (and CFG doubles them)
    model = tiny_backbone("bidirectional")
    ids, mask, _ = backbone_inputs()
    run = dict(gen_length=16, block_length=4, steps=16, cache="dual", cfg_scale=0.5)
    plain = generate(model, ids, mask, **run)
    eos = int(plain.sequences[1, ids.shape[1] + 2])
    out = generate(model, ids, mask, eos_token_id=eos, eos_early_stop=True, **run)
    assert out.finished.any() and not out.finished.all()
    want = plain.sequences.clone()
    gen = want[:, ids.shape[1]:]
    for row in range(3):  # rows are independent, so each equals the plain run up to its first EOS
        hits = (gen[row] == eos).nonzero()
        if len(hits):
            gen[row, int(hits[0]) + 1:] = eos
    assert torch.equal(out.sequences, want)


# =====================================================================================================
# Parts read their settings from the config; the scheduler's one step is the loop's
# =====================================================================================================
def test_parts_read_their_fields_from_the_config():
    from latent.sampling import Part
    from latent.sampling.commit import FactorCommit, ScheduleCommit, ThresholdCommit

    cfg = SamplerConfig(gen_length=16, block_length=4, steps=8, threshold=0.7, factor=2.0, temperature=0.5,
                        top_k=3, cfg_scale=1.5, eos_token_id=EOS)
    assert cfg.steps_per_block == 2 and SamplerConfig(gen_length=16, block_length=4).steps_per_block == 4
    assert create_part("commit", "schedule", cfg).steps_per_block == 2
    assert create_part("commit", "threshold", cfg).threshold == 0.7
    assert create_part("commit", "factor", cfg, factor=3.0).factor == 3.0  # overrides replace config fields
    gumbel = create_part("proposal", "gumbel", cfg)
    assert (gumbel.temperature, gumbel.top_k, gumbel.top_p) == (0.5, 3, None)
    assert create_part("guidance", "cfg", cfg).scale == 1.5
    assert create_part("stopping", "eos_early_stop", cfg).eos == EOS
    # confidence dtype "auto": the logits' dtype for the schedule rule (LLaDA), float64 otherwise (Fast-dLLM)
    assert cfg.resolved_confidence_dtype is None and create_part("confidence", "probability", cfg).dtype is None
    assert create_part("confidence", "margin", cfg, commit="threshold").dtype == torch.float64
    assert SamplerConfig(commit=ScheduleCommit(2)).resolved_confidence_dtype is None  # ready-made parts count too
    assert SamplerConfig(commit="factor", confidence_dtype="float32").resolved_confidence_dtype == "float32"
    # parts without settings inherit Part.from_config; ready-made objects pass through
    assert isinstance(create_part("cache", "none", cfg), Part)
    rule = ThresholdCommit(0.5)
    assert create_part("commit", rule, cfg) is rule
    assert FactorCommit.from_config(cfg).factor == 2.0
    with pytest.raises(ValueError, match="Unknown commit 'treshold'; did you mean threshold"):
        create_part("commit", "treshold")


def _scheduler_block(model, ids, mask, scheduler, steps, generator=None, **overrides):
    """A hand-written diffusers-style loop over one block after the prompt."""
    length = scheduler.config.block_length
    canvas = torch.cat([ids, torch.full((ids.shape[0], length), MASK)], 1)
    full_mask = torch.cat([mask, torch.ones(ids.shape[0], length, dtype=torch.long)], 1)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        logits = model(canvas, attention_mask=full_mask).logits[:, -length:]
        out = scheduler.step(logits, t, canvas[:, -length:], mask_token_id=MASK, generator=generator, **overrides)
        assert torch.equal(out.prev_sample[out.transfer_index], out.pred_original_sample[out.transfer_index])
        canvas[:, -length:] = out.prev_sample
    return canvas


@pytest.mark.parametrize("kw", [
    dict(commit="schedule"),
    dict(commit="schedule", temperature=0.9),
    dict(commit="threshold", threshold=0.6),
    dict(commit="schedule", logits_eos_inf=True, eos_token_id=EOS),
    dict(commit="schedule", confidence_eos_eot_inf=True, eos_token_id=EOS, eot_token_id=EOT),
])
def test_scheduler_step_is_the_sampler_step(kw):
    from latent.scheduler import MaskedDiffusionScheduler

    model = ToyModel(eos_bias=2.0, sharpness=1.25)
    ids, mask = prompts()
    length, steps = 8, 4 if kw["commit"] == "schedule" else 8
    scheduler = MaskedDiffusionScheduler(block_length=length, num_inference_steps=steps, commit=kw["commit"])
    overrides = {k: v for k, v in kw.items() if k != "commit"}
    got = _scheduler_block(model, ids, mask, scheduler, steps, torch.Generator().manual_seed(3), **overrides)
    want = generate(model, ids, mask, gen_length=length, block_length=length, steps=steps, mask_token_id=MASK,
                    noise_shape="block", generator=torch.Generator().manual_seed(3), **kw)
    if kw["commit"] == "schedule":
        assert torch.equal(got, want.sequences)
    else:  # threshold: the sampler stops when the block is full, the hand-written loop runs every timestep
        assert torch.equal(got[:, : want.sequences.shape[1]], want.sequences)
    if kw.get("logits_eos_inf"):
        assert not (got[:, ids.shape[1]:] == EOS).any()


def test_gumbel_max_is_llada_formula():
    from latent.sampling.proposal import gumbel_max

    logits = torch.randn(3, 5, V, generator=torch.Generator().manual_seed(0)) * 2
    u = torch.rand(3, 5, V, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(gumbel_max(logits, 0.6, u), (logits.double().exp() / (-u.log()) ** 0.6).argmax(-1))
    assert torch.equal(gumbel_max(logits, 0.0, None), logits.argmax(-1))


# =====================================================================================================
# The autoregressive decoder against plain uncached loops
# =====================================================================================================
def plain_greedy(model, ids, steps, mask=None, prefix_embeds=None, prefix_mask=None, allowed=None):
    """Recompute the whole [prefix | prompt | so far] for every token, no cache; rows as given."""
    x, probs = ids, []
    for i in range(steps):
        call = {}
        if prefix_embeds is not None:
            call["prefix_embeds"] = prefix_embeds
        if mask is not None or prefix_mask is not None:
            keys = torch.ones(x.shape, dtype=torch.long) if mask is None else torch.cat(
                [mask, torch.ones(x.shape[0], i, dtype=torch.long)], 1)
            call["attention_mask"] = keys if prefix_mask is None else torch.cat([prefix_mask, keys], 1)
        logits = model(x, **call).logits[:, -1]
        if allowed is not None:
            logits = logits.masked_fill(~allowed[i], -INF)
        p = logits.softmax(-1)
        probs.append(p.max(-1).values)
        x = torch.cat([x, p.argmax(-1, keepdim=True)], 1)
    return x, torch.stack(probs, 1)


def test_autoregressive_matches_plain_greedy_loop():
    from latent.sampling import autoregressive_generate

    model = tiny_backbone("causal")
    ids = torch.randint(3, 60, (3, 4), generator=torch.Generator().manual_seed(2))
    want, want_conf = plain_greedy(model, ids, 10)
    steps = []
    out = autoregressive_generate(model, ids, 10, callback=lambda i, seq, info: steps.append((i, seq.shape[1])))
    assert torch.equal(out.sequences, want) and torch.equal(out.new_tokens, want[:, 4:])
    torch.testing.assert_close(out.confidence, want_conf, atol=1e-5, rtol=1e-4)
    assert out.nfe == 10 and steps == [(i, 5 + i) for i in range(10)]
    uncached = autoregressive_generate(model, ids, 10, use_cache=False)
    assert torch.equal(uncached.sequences, want)


def test_autoregressive_left_padded_rows_equal_rows_alone():
    from latent.sampling import autoregressive_generate

    model = tiny_backbone("causal")
    ids, mask, _ = backbone_inputs()
    out = autoregressive_generate(model, ids, 8, attention_mask=mask)
    for row in range(3):
        real = ids[row : row + 1, mask[row].bool()]
        alone = autoregressive_generate(model, real, 8)
        assert torch.equal(out.new_tokens[row : row + 1], alone.new_tokens)
        torch.testing.assert_close(out.confidence[row : row + 1], alone.confidence, atol=1e-5, rtol=1e-4)


def test_autoregressive_prefix_embeds_and_allowed_tokens():
    from latent.sampling import autoregressive_generate

    model = tiny_backbone("causal")
    ids, mask, extra = backbone_inputs(with_prefix=True)
    allowed = torch.rand(6, 64, generator=torch.Generator().manual_seed(5)) < 0.3
    want, want_conf = plain_greedy(model, ids, 6, mask, extra["prefix_embeds"], extra["prefix_mask"], allowed)
    out = autoregressive_generate(model, ids, 6, attention_mask=mask, allowed_tokens=allowed, **extra)
    assert torch.equal(out.sequences, want)
    torch.testing.assert_close(out.confidence, want_conf, atol=1e-5, rtol=1e-4)
    assert all(bool(allowed[i, out.new_tokens[:, i]].all()) for i in range(6))
    other = autoregressive_generate(model, ids, 6, attention_mask=mask, prefix_embeds=extra["prefix_embeds"].flip(0),
                                    prefix_mask=extra["prefix_mask"])
    assert not torch.equal(other.sequences, out.sequences)  # the prefix really conditions the answer


def test_autoregressive_eos_pads_rows_and_stops_when_all_are_done():
    from latent.sampling import autoregressive_generate

    model = tiny_backbone("causal")
    ids, mask, _ = backbone_inputs()
    plain = autoregressive_generate(model, ids, 12, attention_mask=mask)
    eos = int(plain.new_tokens[0, 3])
    out = autoregressive_generate(model, ids, 12, attention_mask=mask, eos_token_id=eos)
    first = [int((row == eos).nonzero()[0]) if (row == eos).any() else None for row in plain.new_tokens]
    for row, k in enumerate(first):
        if k is None:  # never emits EOS: the plain run
            assert torch.equal(out.new_tokens[row], plain.new_tokens[row, : out.new_tokens.shape[1]])
            continue
        assert torch.equal(out.new_tokens[row, : k + 1], plain.new_tokens[row, : k + 1])
        assert (out.new_tokens[row, k:] == eos).all() and (out.confidence[row, k + 1 :] == 1).all()
    if all(k is not None for k in first):
        assert out.new_tokens.shape[1] == max(first) + 1 == out.nfe
    alone = autoregressive_generate(model, ids[:1, mask[0].bool()], 12, eos_token_id=eos)
    assert alone.nfe == alone.new_tokens.shape[1] == first[0] + 1  # one row: stops at its EOS


def test_autoregressive_sampling_is_gumbel_max_of_one_draw_per_token():
    from latent.sampling import autoregressive_generate

    model = tiny_backbone("causal")
    ids = torch.randint(3, 60, (2, 3), generator=torch.Generator().manual_seed(4))
    out = autoregressive_generate(model, ids, 6, temperature=0.8, generator=torch.Generator().manual_seed(7))
    gen, x = torch.Generator().manual_seed(7), ids
    for _ in range(6):
        logits = model(x).logits[:, -1]
        u = torch.rand(logits.shape, dtype=torch.float64, generator=gen)
        x = torch.cat([x, (logits.double().exp() / (-u.log()) ** 0.8).argmax(-1, keepdim=True)], 1)
    assert torch.equal(out.sequences, x)
    # top_k=1 leaves only the argmax to sample, however hot the temperature
    top1 = autoregressive_generate(model, ids, 6, temperature=5.0, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(top1.sequences, autoregressive_generate(model, ids, 6).sequences)


def test_autoregressive_errors_name_the_argument():
    from latent.sampling import autoregressive_generate

    ids = torch.randint(3, 60, (2, 3))
    with pytest.raises(ValueError, match="use_cache=False"):
        autoregressive_generate(tiny_backbone("bidirectional"), ids, 4)
    with pytest.raises(ValueError, match="at least one"):
        autoregressive_generate(tiny_backbone("causal"), ids[:, :0], 4, prefix_embeds=torch.zeros(2, 2, 32))
    with pytest.raises(ValueError, match="allowed_tokens"):
        autoregressive_generate(tiny_backbone("causal"), ids, 4, allowed_tokens=torch.ones(2, 64, dtype=torch.bool))

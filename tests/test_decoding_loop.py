"""The decoding loop's block geometry and its exact speed-ups (latent/sampling: sampler.py, state.py,
cache_exact.py, cache_approx.py).

- block_causal models whose blocks count from slot 0 (block_alignment="start"): the first decoding block
  is the rest of the prompt's last block, so the exact caches give the uncached tokens for every prompt
  length, and the tokens are diffusers' LLaDA2Pipeline's;
- Fast-dLLM v2's sub-blocks (`sub_block_length`) against a plain loop written here;
- logits only at the block's masked positions (`masked_logits_only`): the same tokens, fewer logits;
- the dual cache's partial refresh (`dual_refresh_every`): k = 1 is Fast-dLLM's, larger k runs fewer tokens.
"""

from __future__ import annotations

import pytest
import torch
from test_sampling import INF, MaskLogitOff, backbone_inputs, tiny_backbone

from latent import DiffusionTransformer
from latent.sampling import generate

MASK = 63


def start_aligned_backbone(seed=0):
    torch.manual_seed(seed)
    model = DiffusionTransformer(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                 mask_token_id=MASK, max_position_embeddings=128, block_size=4,
                                 attention_layout="block_causal", block_alignment="start").eval()
    with torch.no_grad():  # peaked logits, so that context matters
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 1.0 if "embed" in name else 0.3)
    return MaskLogitOff(model)


def left_padded(plen: int):
    """Three left-padded prompts of `plen` slots with 2, 1 and 0 pads (real lengths differ)."""
    ids = torch.tensor([[0, 0, 5, 7, 9, 11], [0, 3, 4, 8, 2, 6], [6, 1, 2, 3, 4, 5]])[:, -plen:]
    real = torch.tensor([plen - 2, plen - 1, plen])
    return ids, (torch.arange(plen) >= plen - real[:, None]).long()


# ---- block_alignment="start" ------------------------------------------------------------------------
@pytest.mark.parametrize("plen", [4, 5, 3], ids=["fills_blocks", "one_over", "under_one_block"])
@pytest.mark.parametrize("kw", [dict(steps=8), dict(commit="threshold", threshold=0.6)], ids=["schedule", "threshold"])
def test_start_aligned_exact_caches_give_the_uncached_tokens(plen, kw):
    model = start_aligned_backbone()
    ids, mask = left_padded(plen)
    run = dict(gen_length=8, block_length=4, **kw)
    full = generate(model, ids, mask, cache="none", **run)
    for cache in ("prefix_exact", "block_exact"):
        out = generate(model, ids, mask, cache=cache, **run)
        assert torch.equal(out.sequences, full.sequences), cache
        assert out.forward_tokens < full.forward_tokens or plen == 3 and cache == "prefix_exact"
    # decoding blocks follow the model's grid: with a partial prompt block there is one block more
    blocks = 2 + (plen % 4 != 0)
    if "steps" in kw:
        assert full.nfe == blocks * 4


@pytest.mark.parametrize("n_prefix, plen", [(2, 5), (6, 1)], ids=["cache_ends_in_prompt", "cache_ends_in_prefix"])
def test_start_aligned_prefix_embeds_that_do_not_fill_a_block(n_prefix, plen):
    # 2 + 5 slots: the prompt's whole block is cached; 6 + 1: the first decoding block starts inside the
    # prefix embeddings, so nothing is cached until it is done
    model = start_aligned_backbone()
    ids, mask = left_padded(5) if plen == 5 else (torch.tensor([[7], [8], [9]]), None)
    embeds = torch.randn(3, n_prefix, 32, generator=torch.Generator().manual_seed(2))
    prefix_mask = torch.ones(3, n_prefix, dtype=torch.long)
    prefix_mask[1, 0] = 0
    run = dict(gen_length=8, block_length=4, steps=12, prefix_embeds=embeds, prefix_mask=prefix_mask)
    full = generate(model, ids, mask, cache="none", **run)
    for cache in ("prefix_exact", "block_exact"):
        out = generate(model, ids, mask, cache=cache, **run)
        assert torch.equal(out.sequences, full.sequences), cache
    assert out.forward_tokens < full.forward_tokens


@pytest.mark.parametrize("plen", [4, 5, 3])
def test_start_aligned_decoding_is_llada2_pipeline(plen):
    # one token per step, no threshold commit: LLaDA2Pipeline's quota only (its full forwards every step)
    from diffusers import BlockRefinementScheduler, LLaDA2Pipeline

    model = start_aligned_backbone(seed=1)
    ids, mask = left_padded(plen)
    pipe = LLaDA2Pipeline(model=model, scheduler=BlockRefinementScheduler(block_length=4), tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    want = pipe(input_ids=ids, attention_mask=mask, gen_length=8, block_length=4, num_inference_steps=4, threshold=2.0,
                editing_threshold=None, eos_early_stop=False, mask_token_id=MASK, output_type="seq",
                use_chat_template=False).sequences
    for cache in ("none", "block_exact"):
        out = generate(model, ids, mask, gen_length=8, block_length=4, steps=8, cache=cache)
        assert torch.equal(out.sequences[:, plen:], want[:, :8]), cache


# ---- Fast-dLLM v2 sub-blocks ------------------------------------------------------------------------
def plain_sub_blocks(model, ids, mask, *, gen_length, block_length, sub, threshold, origin=None):
    """Fast-dLLM v2's decoding written plainly: sub-blocks of `sub` on the model's block grid, left to
    right; each runs full forwards until it is full, committing every masked position whose float64
    probability is >= threshold, and the most confident one (ties to the lower position)."""
    batch, plen = ids.shape
    x = torch.cat([ids, torch.full((batch, gen_length), MASK)], 1)
    keys = torch.cat([mask, torch.ones(batch, gen_length, dtype=torch.long)], 1)
    # blocks after the prompt: the model is told where the prompt ends
    call = dict(prefix_length=plen) if origin is None else {}
    origin = plen if origin is None else origin
    cuts = [plen] + [c for c in range(plen + 1, plen + gen_length) if (c - origin) % sub == 0] + [plen + gen_length]
    nfe = 0
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        while (x[:, lo:hi] == MASK).any():
            with torch.no_grad():
                logits = model(x, attention_mask=keys, **call).logits
            nfe += 1
            for r in range(batch):
                masked = [t for t in range(lo, hi) if x[r, t] == MASK]
                if not masked:
                    continue
                proposal = logits[r].clone()
                proposal[:, MASK] = -INF
                p = logits[r].double().softmax(-1)
                conf = {t: p[t, int(proposal[t].argmax())].item() for t in masked}
                best = max(masked, key=lambda t: (conf[t], -t))
                for t in masked:
                    if conf[t] >= threshold or t == best:
                        x[r, t] = int(proposal[t].argmax())
    return x, nfe, cuts


@pytest.mark.parametrize("aligned", ["prefix", "start"])
def test_sub_blocks_match_a_plain_fast_dllm_v2_loop(aligned):
    if aligned == "prefix":
        model = MaskLogitOff(tiny_backbone("block_causal", seed=3))  # block_size 4 after the prompt
        ids, mask, _ = backbone_inputs()
        origin = None
    else:
        model = start_aligned_backbone(seed=3)
        ids, mask = left_padded(5)
        origin = 0
    run = dict(gen_length=8, block_length=4, commit="threshold", threshold=0.6, sub_block_length=2)
    want, nfe, cuts = plain_sub_blocks(model, ids, mask, gen_length=8, block_length=4, sub=2, threshold=0.6, origin=origin)
    for cache in ("none", "block_exact"):
        out = generate(model, ids, mask, cache=cache, record_trajectory=True, **run)
        assert torch.equal(out.sequences, want), cache
        assert out.nfe == nfe + (cache == "block_exact")  # + the prompt's forward
    # sub-blocks are decoded one after the other (whole blocks would commit anywhere in the block)
    step = out.trajectory.commit_step
    plen = ids.shape[1]
    spans = list(zip(cuts[:-1], cuts[1:], strict=True))
    for (a, b), (c, d) in zip(spans[:-1], spans[1:], strict=True):
        assert (step[:, a - plen : b - plen].max(1).values < step[:, c - plen : d - plen].min(1).values).all()
    with pytest.raises(ValueError, match="sub_block_length"):
        generate(model, ids, mask, **{**run, "sub_block_length": 3})


def test_block_cache_with_sub_blocks_caches_whole_blocks():
    model = MaskLogitOff(tiny_backbone("block_causal", seed=3))
    ids, mask, _ = backbone_inputs()
    sizes = []
    hook = model.backbone.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[1]))
    generate(model, ids, mask, gen_length=8, block_length=4, steps=8, sub_block_length=2, cache="block_exact")
    hook.remove()
    # the prompt once; every step of a sub-block runs its whole model block (4), the next block's first
    # step also the finished block (8)
    assert sizes == [ids.shape[1]] + [4] * 4 + [8] + [4] * 3


# ---- logits only where they are read ----------------------------------------------------------------
@pytest.mark.parametrize("layout, cache, kw", [
    ("block_causal", "block_exact", dict(steps=8)),
    ("block_causal", "prefix_exact", dict(commit="threshold", threshold=0.7, cfg_scale=1.0)),
    ("bidirectional", "none", dict(steps=8, temperature=0.8)),
    ("bidirectional", "dual", dict(commit="factor", factor=1.0)),
])
def test_masked_logits_only_changes_no_token(layout, cache, kw):
    model = tiny_backbone(layout)
    ids, mask, extra = backbone_inputs(with_prefix=True)
    rows = []
    hook = model.register_forward_hook(lambda m, a, out: rows.append(out.logits.shape[1]))
    runs = {}
    for only in (False, None):  # None: on, since every part here reads masked positions only
        rows.clear()
        out = generate(model, ids, mask, gen_length=16, block_length=4, cache=cache, masked_logits_only=only,
                       generator=torch.Generator().manual_seed(5), **kw, **extra)
        runs[only] = (out, sum(rows))
    hook.remove()
    (plain, plain_rows), (fast, fast_rows) = runs[False], runs[None]
    assert torch.equal(fast.sequences, plain.sequences)
    assert (fast.nfe, fast.forward_tokens) == (plain.nfe, plain.forward_tokens)
    assert fast_rows <= 4 * fast.nfe < plain_rows  # at most a block's logits per forward


def test_masked_logits_only_is_off_for_parts_that_read_committed_tokens():
    model = tiny_backbone("block_causal")
    ids, mask, _ = backbone_inputs()
    rows = []
    hook = model.register_forward_hook(lambda m, a, out: rows.append(out.logits.shape[1]))
    generate(model, ids, mask, gen_length=8, block_length=4, steps=8, revision="rcr")
    hook.remove()
    assert min(rows) == ids.shape[1] + 4  # the full (visible) canvas: RCR ranks committed tokens too
    with pytest.raises(ValueError, match="masked_logits_only"):
        generate(MaskLogitOff(model), ids, mask, gen_length=8, block_length=4, masked_logits_only=True)


# ---- the dual cache's partial refresh ---------------------------------------------------------------
def test_dual_cache_partial_refresh():
    model = MaskLogitOff(tiny_backbone("bidirectional"))
    ids, mask, _ = backbone_inputs()
    run = dict(gen_length=16, block_length=4, commit="threshold", threshold=0.7, cache="dual")
    every = {k: generate(model, ids, mask, dual_refresh_every=k, **run) for k in (1, 2, 4)}
    assert all(not (out.sequences == MASK).any() for out in every.values())
    tokens = {k: out.forward_tokens for k, out in every.items()}
    assert tokens[4] < tokens[2] < tokens[1]
    canvas = ids.shape[1] + 16
    # k = 4: one full forward at the first block, then [previous | current] = 8 tokens at each block start
    starts = 3
    assert tokens[4] == 3 * canvas + 3 * 8 * starts + 3 * 4 * (every[4].nfe - 1 - starts)
    with pytest.raises(ValueError, match="dual_refresh_every"):
        generate(model, ids, mask, dual_refresh_every=0, **run)

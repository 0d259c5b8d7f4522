"""Masking schedules, time sampling and every loss, each against a direct (loop) implementation."""

import math

import pytest
import torch
import torch.nn.functional as F

from latent.backbone import DiffusionTransformer
from latent.losses import (
    annealed_attention_mask,
    block_diffusion_attention_mask,
    block_diffusion_loss,
    causal_lm_loss,
    causal_nll,
    corrupt,
    elbo_nll,
    masked_diffusion_loss,
    sft_loss,
)
from latent.schedules import available_schedules, get_schedule, sample_times, stratified_times

V, M = 64, 63


def make_model(tiny_config, layout="bidirectional", seed=0, **options):
    torch.manual_seed(seed)
    cfg = dict(tiny_config, attention_layout=layout, attention_backend="eager", **options)
    return DiffusionTransformer(**cfg).eval()


def ids(b, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, M, (b, n), generator=g)


# ---------------------------------------------------------------- schedules and times


def test_schedule_registry_and_values():
    assert {"linear", "cosine"} <= set(available_schedules())
    t = torch.linspace(0.05, 0.95, 19)
    lin = get_schedule("linear")
    assert torch.allclose(lin.mask_prob(t), t) and torch.allclose(lin.weight(t), 1 / t)
    cos = get_schedule("cosine")
    assert torch.allclose(cos.mask_prob(t), 1 - torch.cos(math.pi / 2 * t))
    # weight = -alpha'/(1-alpha), alpha' checked by autograd
    tt = t.clone().requires_grad_(True)
    (da,) = torch.autograd.grad(cos.alpha(tt).sum(), tt)
    assert torch.allclose(cos.weight(t), -da / (1 - torch.cos(math.pi / 2 * t)), rtol=1e-5)
    assert get_schedule(cos) is cos
    with pytest.raises(KeyError, match="did you mean cosine"):
        get_schedule("cosin")


def test_stratified_times_cover_every_stratum():
    for n in (1, 5, 16):
        t = stratified_times(n, 0.37)
        assert t.shape == (n,) and bool(((t >= 0) & (t < 1)).all())
        strata = torch.sort((t * n).floor().long()).values
        assert strata.tolist() == list(range(n))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(sample_times(8, g1), sample_times(8, g2))
    iid = sample_times(1000, torch.Generator().manual_seed(0), low_discrepancy=False)
    assert 0.45 < iid.mean() < 0.55


def test_corrupt_respects_maskable_and_probability():
    x = ids(4, 1000)
    maskable = torch.ones_like(x, dtype=torch.bool)
    maskable[:, :10] = False
    p = torch.tensor([0.0, 0.25, 0.5, 1.0])
    noisy, masked = corrupt(x, p, M, generator=torch.Generator().manual_seed(0), maskable=maskable)
    assert not masked[:, :10].any() and torch.equal(noisy[~masked], x[~masked])
    assert bool((noisy[masked] == M).all())
    frac = masked[:, 10:].float().mean(1)
    assert frac[0] == 0 and frac[3] == 1 and abs(frac[1] - 0.25) < 0.06 and abs(frac[2] - 0.5) < 0.06


# ---------------------------------------------------------------- masked diffusion pre-training


def direct_mdm_loss(model, x, t, noise, valid, eps, sched):
    """Literal reading of the spec: per row p = (1-eps) t + eps; mask w.p. p; sum CE * w / #tokens."""
    B, N = x.shape
    noisy = x.clone()
    masked = torch.zeros_like(x, dtype=torch.bool)
    s = (1 - eps) * t + eps
    for b in range(B):
        for i in range(N):
            if valid[b, i] and noise[b, i] < sched.mask_prob(s[b]):
                noisy[b, i], masked[b, i] = M, True
    logits = model(noisy, attention_mask=valid.long()).logits
    total = 0.0
    for b in range(B):
        for i in range(N):
            if masked[b, i]:
                total = total + F.cross_entropy(logits[b, i], x[b, i]) * sched.weight(s[b])
    return total / valid.sum()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_masked_diffusion_loss_matches_direct(tiny_config, schedule):
    model = make_model(tiny_config)
    x = ids(3, 12)
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[2, 9:] = False
    t = torch.tensor([0.1, 0.5, 0.9])
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(2))
    out = masked_diffusion_loss(model, x, M, schedule=schedule, eps=1e-3, attention_mask=valid.long(), t=t, noise=noise)
    ref = direct_mdm_loss(model, x, t, noise, valid, 1e-3, get_schedule(schedule))
    assert torch.allclose(out.loss, ref, rtol=1e-5, atol=1e-6)
    assert out.num_tokens == int(valid.sum()) and out.num_masked > 0
    out.loss.backward()
    assert model.embed.weight.grad is not None and torch.isfinite(model.embed.weight.grad).all()


def test_linear_weight_is_one_over_p(tiny_config):
    """LLaDA's formula: sum over masked CE / p, with p = (1 - eps) t + eps."""
    model = make_model(tiny_config)
    x = ids(2, 10)
    t, eps = torch.tensor([0.3, 0.7]), 0.01
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(5))
    p = (1 - eps) * t + eps
    masked = noise < p[:, None]
    logits = model(torch.where(masked, M, x)).logits
    ce = F.cross_entropy(logits.transpose(1, 2), x, reduction="none")
    ref = (ce * masked / p[:, None]).sum() / x.numel()
    out = masked_diffusion_loss(model, x, M, eps=eps, t=t, noise=noise)
    assert torch.allclose(out.loss, ref, rtol=1e-5)


def test_loss_of_a_batch_is_the_mean_of_its_halves(tiny_config):
    """What data-parallel training relies on: equal token counts -> mean of per-rank losses."""
    model = make_model(tiny_config)
    x = ids(4, 8)
    t = stratified_times(4, 0.3)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    full = masked_diffusion_loss(model, x, M, t=t, noise=noise).loss
    halves = [masked_diffusion_loss(model, x[i : i + 2], M, t=t[i : i + 2], noise=noise[i : i + 2]).loss for i in (0, 2)]
    assert torch.allclose(full, sum(halves) / 2, rtol=1e-6)


# ---------------------------------------------------------------- SFT


def test_sft_loss_matches_direct_and_never_masks_the_prompt(tiny_config):
    model = make_model(tiny_config)
    x = ids(3, 10)
    plen = torch.tensor([3, 5, 1])
    t = torch.tensor([0.2, 0.6, 0.95])
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(4))
    eps = 1e-3
    out = sft_loss(model, x, M, prompt_lengths=plen, t=t, noise=noise, eps=eps)
    # direct: per row, mask only answer positions, sum CE / p, divide by answer length, mean over rows
    p = (1 - eps) * t + eps
    noisy = x.clone()
    for b in range(3):
        for i in range(plen[b], 10):
            if noise[b, i] < p[b]:
                noisy[b, i] = M
    logits = model(noisy).logits
    rows = []
    for b in range(3):
        s = sum(
            (F.cross_entropy(logits[b, i], x[b, i]) / p[b] for i in range(plen[b], 10) if noisy[b, i] == M),
            torch.tensor(0.0),
        )
        rows.append(s / (10 - plen[b]))
    ref = sum(rows) / 3
    assert torch.allclose(out.loss, ref, rtol=1e-5)
    # prompt is untouched even at t = 1
    seen = {}

    def spy(inp, **kw):
        seen["x"] = inp
        return model(inp, **kw)

    sft_loss(spy, x, M, prompt_lengths=plen, t=torch.ones(3), noise=torch.zeros_like(x, dtype=torch.float))
    for b in range(3):
        assert torch.equal(seen["x"][b, : plen[b]], x[b, : plen[b]])
        assert bool((seen["x"][b, plen[b] :] == M).all())
    # prompt_mask form gives the same value
    pm = torch.arange(10)[None] < plen[:, None]
    out2 = sft_loss(model, x, M, prompt_mask=pm, t=t, noise=noise, eps=eps)
    assert torch.allclose(out.loss, out2.loss)
    with pytest.raises(ValueError, match="exactly one"):
        sft_loss(model, x, M)


# ---------------------------------------------------------------- block diffusion


def test_block_diffusion_mask_matches_definition():
    N, bs = 6, 2
    pad = torch.tensor([[1, 1, 1, 1, 1, 0]])
    m = block_diffusion_attention_mask(N, bs, pad)[0, 0]
    for q in range(2 * N):
        for k in range(2 * N):
            qc, kc = q >= N, k >= N
            qb, kb = (q % N) // bs, (k % N) // bs
            if not qc:
                want = (not kc and kb == qb) or (kc and kb < qb)
            else:
                want = kc and kb <= qb
            want = want and bool(pad[0, k % N])
            if q == k:
                want = True  # every row keeps itself (pad queries only differ)
            assert bool(m[q, k]) == want, (q, k)


def direct_blockwise_loss(model, x, t, noise, bs, eps):
    """The BD3-LM loss block by block: the block_causal model (its own layout mask) run on
    [clean blocks < b, noisy block b], CE / p at the masked tokens of block b."""
    p_tok = ((1 - eps) * t + eps).repeat_interleave(bs, dim=1)
    masked = noise < p_tok
    noisy = torch.where(masked, M, x)
    total = torch.tensor(0.0)
    for b in range(x.shape[1] // bs):
        ctx = torch.cat([x[:, : b * bs], noisy[:, b * bs : (b + 1) * bs]], dim=1)
        logits = model(ctx).logits[:, b * bs :]
        ce = F.cross_entropy(logits.transpose(1, 2), x[:, b * bs : (b + 1) * bs], reduction="none")
        total = total + (ce * masked[:, b * bs : (b + 1) * bs] / p_tok[:, b * bs : (b + 1) * bs]).sum()
    return total / x.numel()


def test_block_diffusion_loss_equals_blockwise_denoising(tiny_config):
    """One forward over [noisy | clean] gives, for noisy block b, exactly the logits of the block_causal
    model run on [clean blocks < b, noisy block b] -- what block-wise sampling with a cache sees."""
    bs = tiny_config["block_size"]
    model = make_model(tiny_config, layout="block_causal")
    B, N = 2, 3 * bs
    x = ids(B, N)
    t = torch.tensor([[0.2, 0.5, 0.9], [0.7, 0.1, 0.4]])
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(6))
    out = block_diffusion_loss(model, x, M, bs, t=t, noise=noise, eps=1e-3)
    assert torch.allclose(out.loss, direct_blockwise_loss(model, x, t, noise, bs, 1e-3), rtol=1e-4, atol=1e-6)
    # one time per row also works, and a padding mask keeps the loss finite
    pad = torch.ones_like(x)
    pad[1, -3:] = 0
    out2 = block_diffusion_loss(model, x, M, bs, attention_mask=pad, per_block_t=False,
                                generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out2.loss) and out2.num_tokens == int(pad.sum())


def test_block_diffusion_loss_with_logit_shift_equals_blockwise_denoising(tiny_config):
    """With the logit shift, noisy block b's first token is predicted from the last clean token of block
    b - 1: the loss equals the shifted block_causal model run on [clean blocks < b, noisy block b]."""
    bs = tiny_config["block_size"]
    model = make_model(tiny_config, layout="block_causal", logit_shift=True, block_alignment="start")
    B, N = 2, 3 * bs
    x = ids(B, N)
    t = torch.tensor([[0.3, 0.6, 0.8], [0.5, 0.2, 0.9]])
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(7))
    out = block_diffusion_loss(model, x, M, bs, t=t, noise=noise, eps=1e-3)
    assert torch.allclose(out.loss, direct_blockwise_loss(model, x, t, noise, bs, 1e-3), rtol=1e-4, atol=1e-6)
    # the ELBO's block path reads the same shifted logits
    assert torch.isfinite(torch.as_tensor(elbo_nll(model, x, M, num_samples=2, block_size=bs).bits_per_token))


def test_complementary_block_diffusion_loss_is_the_mean_of_both_copies(tiny_config):
    """Copy 2 masks exactly the tokens copy 1 keeps: it is the plain loss at noise 1 - u and level 1 - p."""
    bs = tiny_config["block_size"]
    model = make_model(tiny_config, layout="block_causal")
    x = ids(2, 2 * bs)
    t = torch.tensor([[0.2, 0.7], [0.4, 0.9]])
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(8))
    eps = 1e-3
    out = block_diffusion_loss(model, x, M, bs, t=t, noise=noise, eps=eps, complementary=True)
    s = (1 - eps) * t + eps
    t_other = (1 - s - eps) / (1 - eps)  # its level (1 - eps) t' + eps is 1 - s, its weight 1 / (1 - s)
    first = block_diffusion_loss(model, x, M, bs, t=t, noise=noise, eps=eps)
    second = block_diffusion_loss(model, x, M, bs, t=t_other, noise=1 - noise, eps=eps)
    assert torch.allclose(out.loss, (first.loss + second.loss) / 2, rtol=1e-4, atol=1e-6)
    assert out.num_masked == x.numel()  # the two masks partition every row
    with pytest.raises(ValueError, match="linear"):
        block_diffusion_loss(model, x, M, bs, schedule="cosine", complementary=True)


def test_auxiliary_ar_loss_is_the_next_token_loss_of_the_clean_sequence(tiny_config):
    """ar_weight adds the causal next-token loss; a shifted model under a causal mask is the AR model
    with the same weights (logit j + 1 of one is logit j of the other)."""
    bs = tiny_config["block_size"]
    shifted = make_model(tiny_config, layout="block_causal", logit_shift=True, block_alignment="start")
    ar = make_model(tiny_config, layout="causal")
    x = ids(2, 2 * bs)
    kw = dict(t=torch.full((2, 2), 0.5), noise=torch.rand(x.shape, generator=torch.Generator().manual_seed(9)))
    plain = block_diffusion_loss(shifted, x, M, bs, **kw)
    with_ar = block_diffusion_loss(shifted, x, M, bs, ar_weight=0.5, **kw)
    assert torch.allclose(with_ar.loss - plain.loss, 0.5 * causal_lm_loss(ar, x).loss, rtol=1e-4, atol=1e-6)


def test_certainty_term_is_the_entropy_where_the_model_is_already_right(tiny_config):
    """certainty_weight adds weight x the mean entropy of softmax(z / T) over the masked positions whose
    argmax is the data's token (block-by-block logits, entropy summed in plain Python); 0 adds nothing."""
    bs, T, w = tiny_config["block_size"], 0.5, 2.0
    model = make_model(tiny_config, layout="block_causal")
    x = ids(2, 2 * bs)
    t = torch.tensor([[0.5, 0.8], [0.6, 0.9]])
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(12))
    eps = 1e-3
    masked = noise < ((1 - eps) * t + eps).repeat_interleave(bs, dim=1)
    noisy = torch.where(masked, M, x)

    def block_logits(data):
        return [model(torch.cat([data[:, : b * bs], noisy[:, b * bs : (b + 1) * bs]], 1)).logits[:, b * bs :]
                for b in range(2)]

    with torch.no_grad():  # make the model right at every other masked position of the last block
        last = block_logits(x)[1].argmax(-1)
        right = masked[:, bs:] & (torch.arange(bs) % 2 == 0)
        x[:, bs:] = torch.where(right, last, x[:, bs:])
        logits = torch.cat(block_logits(x), 1)
    entropies = []
    for b, n in masked.nonzero().tolist():
        z = logits[b, n].double().tolist()
        if max(range(len(z)), key=z.__getitem__) == int(x[b, n]):
            zt = [v / T for v in z]
            lse = math.log(sum(math.exp(v) for v in zt))
            entropies.append(-sum(math.exp(v - lse) * (v - lse) for v in zt))
    assert len(entropies) >= int(right.sum())
    kw = dict(t=t, noise=noise, eps=eps)
    plain = block_diffusion_loss(model, x, M, bs, **kw)
    forced = block_diffusion_loss(model, x, M, bs, certainty_weight=w, certainty_temperature=T, **kw)
    assert (forced.loss - plain.loss).item() == pytest.approx(w * sum(entropies) / len(entropies), rel=1e-4)
    assert block_diffusion_loss(model, x, M, bs, certainty_weight=0.0, **kw).loss.item() == plain.loss.item()


def test_block_diffusion_sft_never_masks_the_prompt_and_scores_the_answer(tiny_config):
    """With prompt_mask, prompt tokens stay clean and out of the loss: the loss is the block-by-block
    denoising loss over the answer tokens only, averaged over them."""
    bs = tiny_config["block_size"]
    model = make_model(tiny_config, layout="block_causal")
    B, N = 2, 3 * bs
    x = ids(B, N)
    plens = torch.tensor([bs + 2, 2 * bs - 1])  # prompts end inside blocks 1 and 1
    prompt = torch.arange(N)[None] < plens[:, None]
    t = torch.tensor([[0.4, 0.6, 0.9], [0.8, 0.3, 0.5]])
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(11))
    eps = 1e-3
    out = block_diffusion_loss(model, x, M, bs, t=t, noise=noise, eps=eps, prompt_mask=prompt)
    p_tok = ((1 - eps) * t + eps).repeat_interleave(bs, dim=1)
    masked = (noise < p_tok) & ~prompt
    noisy = torch.where(masked, M, x)
    total = torch.tensor(0.0)
    for b in range(N // bs):
        ctx = torch.cat([x[:, : b * bs], noisy[:, b * bs : (b + 1) * bs]], dim=1)
        ce = F.cross_entropy(model(ctx).logits[:, b * bs :].transpose(1, 2), x[:, b * bs : (b + 1) * bs],
                             reduction="none")
        sl = slice(b * bs, (b + 1) * bs)
        total = total + (ce * masked[:, sl] / p_tok[:, sl]).sum()
    assert torch.allclose(out.loss, total / int((~prompt).sum()), rtol=1e-4, atol=1e-6)
    assert out.num_tokens == int((~prompt).sum()) and out.num_masked == int(masked.sum())


def test_causal_sft_scores_only_answer_targets(tiny_config):
    """prompt_mask removes the prompt's tokens from the targets (with and without BOS); the NLL agrees."""
    model = make_model(tiny_config, layout="causal")
    x = ids(2, 9)
    prompt = torch.arange(9)[None] < torch.tensor([3, 5])[:, None]
    bos = 5
    out = causal_lm_loss(model, x, bos_token_id=bos, prompt_mask=prompt)
    ce = [F.cross_entropy(model(torch.cat([torch.tensor([bos]), x[b, :i]])[None]).logits[0, -1], x[b, i])
          for b in range(2) for i in range(9) if not prompt[b, i]]
    assert torch.allclose(out.loss, torch.stack(ce).mean(), rtol=1e-5) and out.num_tokens == len(ce)
    out2 = causal_lm_loss(model, x, prompt_mask=prompt)
    ce2 = [F.cross_entropy(model(x[b : b + 1, :i]).logits[0, -1], x[b, i])
           for b in range(2) for i in range(1, 9) if not prompt[b, i]]
    assert torch.allclose(out2.loss, torch.stack(ce2).mean(), rtol=1e-5)
    nll = causal_nll(model, x, bos_token_id=bos, prompt_mask=prompt)
    assert int(nll.num_tokens.sum()) == len(ce)
    assert abs(nll.bits_per_token - float(out.loss.detach()) / math.log(2)) < 1e-5


def test_masked_diffusion_loss_under_a_causal_model_mask_is_the_causal_models(tiny_config):
    """model_mask replaces the layout: the bidirectional model under a causal 4D mask is the causal model."""
    x = ids(2, 12)
    kw = dict(t=torch.tensor([0.3, 0.8]), noise=torch.rand(x.shape, generator=torch.Generator().manual_seed(10)))
    causal = masked_diffusion_loss(make_model(tiny_config, layout="causal"), x, M, **kw)
    masked = masked_diffusion_loss(make_model(tiny_config), x, M, model_mask=annealed_attention_mask(12, 0.0), **kw)
    assert torch.allclose(causal.loss, masked.loss, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- autoregressive baseline


def test_causal_lm_loss_matches_prefix_by_prefix(tiny_config):
    model = make_model(tiny_config, layout="causal")
    x = ids(2, 7)
    bos = 5
    out = causal_lm_loss(model, x, bos_token_id=bos)
    ce = []
    for b in range(2):
        for i in range(7):
            ctx = torch.cat([torch.tensor([bos]), x[b, :i]])[None]
            ce.append(F.cross_entropy(model(ctx).logits[0, -1], x[b, i]))
    assert torch.allclose(out.loss, torch.stack(ce).mean(), rtol=1e-5)
    assert out.num_tokens == 14
    # without BOS: tokens 1..N-1 are scored
    out2 = causal_lm_loss(model, x)
    ce2 = [F.cross_entropy(model(x[b : b + 1, : i + 1]).logits[0, -1], x[b, i + 1]) for b in range(2) for i in range(6)]
    assert torch.allclose(out2.loss, torch.stack(ce2).mean(), rtol=1e-5)
    nll = causal_nll(model, x, bos_token_id=bos)
    assert abs(nll.bits_per_token - float(out.loss.detach()) / math.log(2)) < 1e-5
    with pytest.raises(ValueError, match="causal"):
        causal_lm_loss(make_model(tiny_config), x)


# ---------------------------------------------------------------- ELBO


class ConstantLogits(torch.nn.Module):
    """Logits that ignore the input: the ELBO then equals the sum of CE over all tokens in expectation."""

    def __init__(self, n):
        super().__init__()
        self.table = torch.randn(n, V, generator=torch.Generator().manual_seed(0))

    def forward(self, x, attention_mask=None, position_ids=None):
        reps = x.shape[1] // self.table.shape[0]  # 2 for the [noisy | clean] block-diffusion input
        return self.table.repeat(reps, 1)[None].expand(x.shape[0], -1, -1)


def test_elbo_matches_direct_and_is_unbiased():
    N = 16
    model = ConstantLogits(N)
    x = ids(3, N)
    exact = F.cross_entropy(model.table.expand(3, -1, -1).transpose(1, 2), x, reduction="none").sum(1)
    K = 8
    out = elbo_nll(model, x, M, num_samples=K, generator=torch.Generator().manual_seed(1))
    # direct: same random draws, loops
    g = torch.Generator().manual_seed(1)
    u = torch.rand((3, 1), generator=g).double()
    est = torch.zeros(3)
    for k in range(K):
        t = ((u + k) / K).float().clamp(min=1e-4)
        noise = torch.rand((3, N), generator=g)
        for b in range(3):
            for i in range(N):
                if noise[b, i] < t[b, 0]:
                    est[b] += F.cross_entropy(model.table[i], x[b, i]) / t[b, 0]
    assert torch.allclose(out.nll, est / K, rtol=1e-5)
    assert abs(out.bits_per_token - float(out.nll.sum() / (3 * N * math.log(2)))) < 1e-6
    # unbiased: many draws approach the exact value
    many = elbo_nll(model, x.repeat(50, 1), M, num_samples=16, generator=torch.Generator().manual_seed(2))
    assert abs(float(many.nll.mean()) - float(exact.mean())) / float(exact.mean()) < 0.03
    # block-diffusion bound of a constant model: same expectation
    blk = elbo_nll(model, x.repeat(50, 1), M, num_samples=16, block_size=4, generator=torch.Generator().manual_seed(3))
    assert abs(float(blk.nll.mean()) - float(exact.mean())) / float(exact.mean()) < 0.03


def test_elbo_of_real_backbone_is_finite_and_deterministic(tiny_config):
    model = make_model(tiny_config)
    x = ids(2, 12)
    a = elbo_nll(model, x, M, num_samples=4, generator=torch.Generator().manual_seed(0))
    b = elbo_nll(model, x, M, num_samples=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.nll, b.nll) and math.isfinite(a.bits_per_token)
    # an untrained model is near uniform: about log2(V) bits per token
    assert abs(a.bits_per_token - math.log2(V)) < 1.5

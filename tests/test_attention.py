"""SDPA (and xformers where it can run) against the eager reference, for every layout, with padding."""

import os
import subprocess
import sys

import pytest
import torch

from latent import DiffusionTransformer
from latent.attention import attention, eager_attention, resolve_backend, sdpa_attention, xformers_available
from latent.masks import LAYOUTS, block_diffusion_training_mask, combine_masks, layout_mask


def _qkv(b=2, h=4, hkv=2, q=9, k=9, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, q, d, generator=g), torch.randn(b, hkv, k, d, generator=g),
            torch.randn(b, hkv, k, d, generator=g))


def _plain_allowed(layout, q, k, prefix, block):
    """Direct statement of the layout rules in docs/backbone-contract.md."""
    if layout == "bidirectional":
        return True
    if layout == "causal":
        return k <= q
    if layout == "prefix":
        return k < prefix if q < prefix else True
    blk = lambda s: -1 if s < prefix else (s - prefix) // block  # noqa: E731
    return blk(k) <= blk(q)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_mask_matches_rules(layout):
    prefix = torch.tensor([3, 5])
    mask = layout_mask(layout, torch.arange(11), 11, 2, prefix, block_size=3)
    for b in range(2):
        for q in range(11):
            for k in range(11):
                want = _plain_allowed(layout, q, k, int(prefix[b]), 3)
                got = True if mask is None else bool(mask[b, 0, q, k])
                assert got == want, (layout, b, q, k)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sdpa_equals_eager_with_padding(layout):
    q, k, v = _qkv()
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, :4] = False  # left padding of row 1
    mask = combine_masks(layout_mask(layout, torch.arange(9), 9, 2, torch.tensor([2, 5]), 2), keep, torch.arange(9))
    ref = eager_attention(q, k, v, mask)
    out = sdpa_attention(q, k, v, mask)
    assert torch.allclose(out, ref, atol=1e-5)
    assert not out.isnan().any()  # padded query rows attend to themselves instead of nothing


def test_padded_query_rows_attend_only_themselves():
    keep = torch.tensor([[False, True, True]])
    mask = combine_masks(layout_mask("causal", torch.arange(3), 3, 1), keep, torch.arange(3))
    assert mask[0, 0, 0].tolist() == [True, False, False]


def test_backend_dispatch_falls_back_on_cpu():
    q = torch.randn(1, 1, 2, 4)
    assert resolve_backend("auto", q) == "sdpa"
    assert resolve_backend("xformers", q) == "sdpa"  # kernels need CUDA: same maths through SDPA
    with pytest.raises(ValueError, match="attention_backend"):
        resolve_backend("flash9", q)
    assert torch.allclose(attention(q, q, q, None, "xformers"), eager_attention(q, q, q))


def test_importing_the_packages_does_not_import_xformers():
    # xformers is imported on first use on CUDA only; a build that does not match torch warns on import
    code = "import sys, latent, pipelines, modalities, autoencoders; print(any('xformers' in m for m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    assert "xformers" not in run.stderr.lower() and run.stdout.strip() == "False"


def test_block_diffusion_training_mask_rules():
    L, bs = 6, 2
    m = block_diffusion_training_mask(L, bs)[0, 0]
    for qi in range(2 * L):
        for ki in range(2 * L):
            qn, kn = qi < L, ki < L  # noisy half first
            qb, kb = (qi % L) // bs, (ki % L) // bs
            if qn and kn:
                want = qb == kb
            elif qn:
                want = kb < qb
            elif kn:
                want = False
            else:
                want = kb <= qb
            assert bool(m[qi, ki]) == want


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers kernels need CUDA")


@needs_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_xformers_equals_eager_on_gpu(layout):
    # a CUDA machine without a working xformers would fall back to SDPA and pass for the wrong reason
    assert xformers_available(), "xformers does not import here; pip install xformers==0.0.35 (the pinned build)"
    q, k, v = (t.cuda().bfloat16() for t in _qkv(q=37, k=37, d=64))
    mask = layout_mask(layout, torch.arange(37, device="cuda"), 37, 2, 5, 8)
    ref = eager_attention(q, k, v, mask)
    out = attention(q, k, v, mask, "xformers")
    assert torch.allclose(out.float(), ref.float(), atol=2e-2)


@needs_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backbone_on_xformers_matches_sdpa_on_gpu(tiny_config, layout):
    """The whole backbone in bf16, left padding and a prefix included: xformers and SDPA give the same logits
    on every real position, and no NaN from fully masked rows of the xformers bias."""
    assert xformers_available(), "xformers does not import here; pip install xformers==0.0.35 (the pinned build)"
    torch.manual_seed(0)
    model = DiffusionTransformer(**{**tiny_config, "attention_layout": layout}).cuda().bfloat16().eval()
    x = torch.randint(0, 63, (2, 21), generator=torch.Generator().manual_seed(1)).cuda()
    keep = torch.ones_like(x)
    keep[0, :5] = 0
    prefix = torch.tensor([8, 6], device="cuda")
    with torch.no_grad():
        model.set_attention_backend("xformers")
        fast = model(x, attention_mask=keep, prefix_length=prefix).logits.float()
        model.set_attention_backend("sdpa")
        ref = model(x, attention_mask=keep, prefix_length=prefix).logits.float()
    real = keep.bool()
    assert torch.isfinite(fast[real]).all()
    assert torch.allclose(fast[real], ref[real], atol=5e-2), (fast[real] - ref[real]).abs().max()

"""The backbone: layouts, exact caches, the dual-cache write, latent stream, save/load, bad input."""

import json

import pytest
import torch
import torch.nn.functional as F

from latent import DiffusionTransformer


def _model(cfg, **over):
    torch.manual_seed(0)
    return DiffusionTransformer(**{**cfg, **over}).eval()


def _ids(b=2, n=12, seed=1, vocab=63):
    return torch.randint(0, vocab, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", ["bidirectional", "causal", "block_causal", "prefix"])
def test_sdpa_and_eager_backbones_agree(tiny_config, layout):
    a = _model(tiny_config, attention_layout=layout)
    b = _model(tiny_config, attention_layout=layout, attention_backend="eager")
    x = _ids()
    mask = torch.ones_like(x)
    mask[0, :5] = 0
    la = a(x, attention_mask=mask, prefix_length=torch.tensor([6, 4])).logits
    lb = b(x, attention_mask=mask, prefix_length=torch.tensor([6, 4])).logits
    assert torch.allclose(la, lb, atol=1e-5)


def test_llada_style_call(tiny_config):
    m = _model(tiny_config)
    x = _ids()
    out = m(x, attention_mask=torch.ones_like(x))
    assert out.logits.shape == (2, 12, 64) and out.logits.dtype == torch.float32


def test_padding_keys_are_ignored(tiny_config):
    """Changing a padded token must not change any kept position's logits."""
    m = _model(tiny_config)
    x = _ids()
    mask = torch.ones_like(x)
    mask[:, :3] = 0
    y = x.clone()
    y[:, :3] = (y[:, :3] + 7) % 63
    assert torch.allclose(m(x, attention_mask=mask).logits[:, 3:], m(y, attention_mask=mask).logits[:, 3:], atol=1e-5)


def test_prefix_layout_cache_is_exact(tiny_config):
    m = _model(tiny_config, attention_layout="prefix")
    x = _ids()
    full = m(x, prefix_length=5).logits
    cache = m(x[:, :5], use_cache=True, prefix_length=5).past_key_values
    for _ in range(2):  # the cache is read-only when use_cache=False: reusable every step
        part = m(x[:, 5:], past_key_values=cache, prefix_length=5).logits
        assert torch.allclose(part, full[:, 5:], atol=1e-5)
    assert cache.length == 5


def test_block_causal_cache_is_exact_block_by_block(tiny_config):
    m = _model(tiny_config, attention_layout="block_causal")
    x = _ids(n=13)
    full = m(x, prefix_length=5).logits  # prefix 5, then blocks of 4
    cache = m(x[:, :5], use_cache=True, prefix_length=5).past_key_values
    for start in (5, 9):
        out = m(x[:, start : start + 4], past_key_values=cache, use_cache=True, prefix_length=5)
        assert torch.allclose(out.logits, full[:, start : start + 4], atol=1e-5)
        cache = out.past_key_values
    assert cache.length == 13


def test_block_causal_ignores_later_blocks(tiny_config):
    m = _model(tiny_config, attention_layout="block_causal")
    x = _ids(n=12)
    y = x.clone()
    y[:, 8:] = 63
    assert torch.allclose(m(x).logits[:, :8], m(y).logits[:, :8], atol=1e-5)


def test_dual_cache_write_equals_fresh_forward_when_nothing_else_changed(tiny_config):
    """Rewriting a block in place with the same tokens reproduces the full forward on that block."""
    m = _model(tiny_config)
    x = _ids()
    full = m(x, use_cache=True)
    cache = full.past_key_values.clone()
    out = m(x[:, 4:8], past_key_values=cache, cache_position=4, position_ids=torch.arange(4, 8)[None].expand(2, -1))
    assert torch.allclose(out.logits, full.logits[:, 4:8], atol=1e-5)
    assert cache.length == 12


def test_dual_cache_sees_fresh_block_keys(tiny_config):
    """With a changed block, the block's own K/V are fresh: logits equal a hand-built stale-context forward."""
    m = _model(tiny_config, attention_backend="eager")
    x = _ids()
    cache = m(x, use_cache=True).past_key_values
    y = x.clone()
    y[:, 4:8] = 63
    out = m(y[:, 4:8], past_key_values=cache.clone(), cache_position=4)
    # First layer sees the same inputs as a full forward on y for those rows -> layer-1 keys fresh;
    # the outputs differ from a forward on x (stale block) ...
    stale = m(x[:, 4:8], past_key_values=cache.clone(), cache_position=4).logits
    assert not torch.allclose(out.logits, stale, atol=1e-4)


def test_prefix_embeds_and_latents(tiny_config):
    m = _model(tiny_config, latent_dim=6)
    x = _ids()
    pre = torch.randn(2, 3, 32)
    lat = torch.randn(2, 5, 6)
    out = m(x, prefix_embeds=pre, latents=lat, timestep=torch.tensor([0.2, 0.9]))
    assert out.logits.shape == (2, 12, 64)
    assert out.latent_pred.shape == (2, 5, 6)
    assert out.hidden_states.shape == (2, 20, 32)
    # the noise level matters
    other = m(x, prefix_embeds=pre, latents=lat, timestep=torch.tensor([0.5, 0.5]))
    assert not torch.allclose(out.latent_pred, other.latent_pred)


def test_save_load_round_trip(tiny_config, tmp_path):
    m = _model(tiny_config, attention_layout="block_causal")
    m.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    assert json.loads((tmp_path / "config.json").read_text())["attention_layout"] == "block_causal"
    n = DiffusionTransformer.from_pretrained(tmp_path).eval()
    x = _ids()
    assert torch.equal(m(x).logits, n(x).logits)


def test_pickled_or_corrupt_checkpoints_are_refused(tiny_config, tmp_path):
    m = _model(tiny_config)
    m.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt"):
        DiffusionTransformer.from_pretrained(tmp_path)
    weights.unlink()
    torch.save(m.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled"):
        DiffusionTransformer.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_ids=torch.zeros(2, 4)), "int64"),
        (dict(input_ids=torch.full((2, 4), 99)), "vocab_size"),
        (dict(input_ids=torch.zeros(2, 200, dtype=torch.long)), "max_position_embeddings"),
        (dict(input_ids=torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 5)), "attention_mask"),
        (dict(input_ids=torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 1, 4, 5, dtype=torch.bool)),
         "4D attention_mask"),
        (dict(input_ids=torch.zeros(2, 4, dtype=torch.long), prefix_embeds=torch.zeros(2, 3, 7)), "prefix_embeds"),
        (dict(input_ids=torch.zeros(2, 4, dtype=torch.long), latents=torch.zeros(2, 3, 7)), "latent_dim"),
        (dict(), "at least one"),
    ],
)
def test_bad_inputs_name_the_argument(tiny_config, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _model(tiny_config)(**kwargs)


def test_bad_config_is_refused(tiny_config):
    with pytest.raises(ValueError, match="attention_layout"):
        DiffusionTransformer(**{**tiny_config, "attention_layout": "sideways"})
    with pytest.raises(ValueError, match="num_heads"):
        DiffusionTransformer(**{**tiny_config, "num_heads": 5})


def test_unknown_forward_keywords_are_refused(tiny_config):
    m = _model(tiny_config)
    x = _ids()
    with pytest.raises(TypeError, match=r"\['attn_mask'\].*accepts input_ids, .*attention_mask.*return_dict"):
        m(x, attn_mask=torch.ones_like(x))
    # what diffusers' LLaDA2Pipeline passes, and the diffusers/transformers return_dict switch
    logits, *_ = m(x, attention_mask=torch.ones_like(x), position_ids=torch.arange(12)[None], return_dict=False)
    assert logits.shape == (2, 12, 64)


# ---- options for checkpoints from elsewhere (pipelines/convert) ------------------------------------
def test_block_alignment_start_counts_blocks_from_slot_zero(tiny_config):
    from latent.masks import layout_mask

    blocks = torch.arange(10) // 4
    want = blocks[:, None] >= blocks[None, :]
    got = layout_mask("block_causal", torch.arange(10), 10, 2, prefix_length=3, block_size=4, block_alignment="start")
    assert torch.equal(got, want.expand(2, 1, 10, 10))
    assert not torch.equal(layout_mask("block_causal", torch.arange(10), 10, 2, 3, 4), got)  # "prefix" differs
    m = _model(tiny_config, attention_layout="block_causal", block_alignment="start")
    x = _ids(n=12)
    full = m(x, prefix_length=5).logits  # prefix_length plays no part: blocks [0, 4), [4, 8), [8, 12)
    cache = m(x[:, :4], use_cache=True).past_key_values
    for start in (4, 8):  # the exact block cache holds when the prompt fills whole blocks
        out = m(x[:, start : start + 4], past_key_values=cache, use_cache=True)
        assert torch.allclose(out.logits, full[:, start : start + 4], atol=1e-5)
        cache = out.past_key_values
    with pytest.raises(ValueError, match="block_alignment"):
        _model(tiny_config, block_alignment="middle")


def test_head_dim_qk_norm_and_biases(tiny_config):
    m = _model(tiny_config, head_dim=16, qk_norm=True, qkv_bias=True, norm_eps=1e-5)
    names = dict(m.named_parameters())
    assert names["blocks.0.attn.q.weight"].shape == (4 * 16, 32) and names["blocks.0.attn.kv.bias"].shape == (2 * 2 * 16,)
    assert names["blocks.0.attn.q_norm.weight"].shape == (16,) and "blocks.0.attn.out.bias" not in names
    assert {mod.eps for mod in m.modules() if type(mod).__name__ == "RMSNorm"} == {1e-5}
    eager = _model(tiny_config, head_dim=16, qk_norm=True, qkv_bias=True, norm_eps=1e-5, attention_backend="eager")
    x = _ids()
    assert torch.allclose(m(x).logits, eager(x).logits, atol=1e-5)
    # biases start at zero and change nothing then; QK-norm changes the logits even with unit weights
    plain, biased = _model(tiny_config), _model(tiny_config, qkv_bias=True)
    biased.load_state_dict(plain.state_dict(), strict=False)
    assert torch.allclose(biased(x).logits, plain(x).logits, atol=1e-6)
    assert not torch.allclose(_model(tiny_config, qk_norm=True)(x).logits, _model(tiny_config)(x).logits, atol=1e-4)


def test_rope_scalings_of_hugging_face_configs():
    from latent.backbone import Rotary

    pos = torch.arange(40.0)[None]
    plain = Rotary(8, 10000.0, None)
    linear = Rotary(8, 10000.0, {"rope_type": "linear", "factor": 4.0})
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(linear(pos), plain(pos / 4), strict=True))
    llama3 = Rotary(8, 1e6, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192})
    base = Rotary(8, 1e6, None).inv_freq  # short waves kept, waves longer than 8192 positions slowed 8x
    assert llama3.inv_freq[0] == base[0] and torch.isclose(llama3.inv_freq[-1], base[-1] / 8)
    dynamic = Rotary(8, 10000.0, {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 16})
    short = torch.arange(16.0)[None]
    assert all(torch.equal(a, b) for a, b in zip(dynamic(short), plain(short), strict=True))  # within the original length
    assert not torch.allclose(dynamic(pos)[0], plain(pos)[0])  # past it, the base is stretched
    for bad, match in [({"rope_type": "yarn", "factor": 2.0}, "yarn"), ({"factor": 2.0}, "rope_type"),
                       ({"rope_type": "llama3", "factor": 8.0}, "low_freq_factor")]:
        with pytest.raises(ValueError, match=match):
            Rotary(8, 10000.0, bad)


def test_half_precision_casts_keep_rotary_frequencies_float32(tiny_config):
    fp32 = _model(tiny_config, max_position_embeddings=512)
    bf16 = _model(tiny_config, max_position_embeddings=512).to(torch.bfloat16)
    assert bf16.rotary.inv_freq.dtype == torch.float32 and torch.equal(bf16.rotary.inv_freq, fp32.rotary.inv_freq)
    assert bf16.embed.weight.dtype == torch.bfloat16  # the weights are cast
    pos = torch.arange(256)[None]
    # a bf16-rounded inv_freq puts the angles at position 255 up to 0.3 radian off: they must agree closely
    assert torch.allclose(bf16.rotary(pos)[0], fp32.rotary(pos)[0], atol=1e-5)
    assert bf16.half().rotary.inv_freq.dtype == torch.float32


def test_set_attention_backend_switches_every_layer(tiny_config):
    sdpa, eager = _model(tiny_config), _model(tiny_config, attention_backend="eager")
    sdpa.set_attention_backend("eager")
    assert {b.attn.backend for b in sdpa.blocks} == {"eager"} and sdpa.config.attention_backend == "eager"
    x = _ids()
    assert torch.equal(sdpa(x).logits, eager(x).logits)  # same weights, same kernel: identical
    with pytest.raises(ValueError, match="backend='flash'"):
        sdpa.set_attention_backend("flash")


def test_logit_shift_scores_each_position_from_the_one_before(tiny_config):
    plain, shifted = _model(tiny_config, attention_layout="causal"), _model(tiny_config, attention_layout="causal",
                                                                             logit_shift=True)
    x = _ids()
    a, b = plain(x).logits, shifted(x).logits
    assert torch.allclose(b[:, 1:], a[:, :-1]) and torch.allclose(b[:, 0], a[:, 0])  # position 0 keeps its own
    pre = torch.randn(2, 3, 32)
    first = shifted(x, prefix_embeds=pre).logits[:, 0]  # the first token is scored from the last prefix slot
    h = shifted(x, prefix_embeds=pre).hidden_states[:, 2]
    assert torch.allclose(first, F.linear(h, shifted.embed.weight), atol=1e-5)
    full = shifted(x, use_cache=True)
    cache = shifted(x[:, :5], use_cache=True).past_key_values
    assert torch.allclose(shifted(x[:, 5:], past_key_values=cache).logits, b[:, 5:], atol=1e-5)
    rewrite = shifted(x[:, 4:8], past_key_values=full.past_key_values.clone(), cache_position=4)  # dual cache
    assert torch.allclose(rewrite.logits, b[:, 4:8], atol=1e-5)


def test_new_options_round_trip_and_older_configs_load(tiny_config, tmp_path):
    m = _model(tiny_config, head_dim=16, qk_norm=True, qkv_bias=True, logit_shift=True, norm_eps=1e-5,
               attention_layout="block_causal", block_alignment="start",
               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16})
    m.save_pretrained(tmp_path / "new")
    x = _ids()
    assert torch.equal(DiffusionTransformer.from_pretrained(tmp_path / "new").eval()(x).logits, m(x).logits)
    old = _model(tiny_config)
    old.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in cfg.items()
                                if k not in ("head_dim", "qkv_bias", "qk_norm", "logit_shift", "block_alignment")}))
    assert torch.equal(DiffusionTransformer.from_pretrained(tmp_path / "old").eval()(x).logits, old(x).logits)

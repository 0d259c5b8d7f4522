"""TextCompressor (frozen MiniLM from the installed package's folder) and ThoughtVAE: shapes, losses
against direct computations, safetensors round trips, a short overfit, and clear errors."""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from autoencoders.compressor import TextCompressor, default_encoder_path
from autoencoders.thought_vae import ThoughtVAE

TEXTS = ["the cat sat on the mat", "12 + 7 = 19", "diffusion models denoise", "a b c d e f g h"]


@pytest.fixture(scope="module")
def compressor():
    torch.manual_seed(0)
    return TextCompressor(max_length=16, compression=4, latent_dim=8, hidden_size=32, num_layers=1,
                          decoder_layers=1, num_heads=2)


def test_default_encoder_is_local_minilm():
    path = default_encoder_path()
    assert os.path.isfile(os.path.join(path, "config.json"))


@pytest.mark.parametrize("c", [4, 8])
def test_compressor_shapes(compressor, c):
    m = compressor if c == 4 else TextCompressor(max_length=16, compression=8, latent_dim=8, hidden_size=32,
                                                 num_layers=1, decoder_layers=1, num_heads=2)
    b = m.tokenize(TEXTS)
    z = m.encode(b["input_ids"], b["attention_mask"])
    assert z.shape == (4, 16 // c, 8)
    # layer-normalised latents: zero mean, unit variance over channels
    torch.testing.assert_close(z.mean(-1), torch.zeros(4, 16 // c), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(-1, unbiased=False), torch.ones(4, 16 // c), atol=1e-3, rtol=0)
    assert m.decode(z).shape == (4, 16, m.tokenizer.vocab_size)


def test_compressor_loss_matches_direct(compressor):
    m = compressor
    b = m.tokenize(TEXTS)
    ids, am = b["input_ids"], b["attention_mask"]
    out = m.loss(ids, am, latent_noise=0.0, token_mask_prob=0.0, align_weight=0.7)
    states = m.encoder(input_ids=ids, attention_mask=am).last_hidden_state
    z = m.encode(ids, am)
    torch.testing.assert_close(out.latents, z)
    words = m.encoder.get_input_embeddings().weight
    logits = m.to_word(m.decoder(z)) @ words.T + m.word_bias
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))
    align = []
    for i in range(4):
        for j in range(4):
            keep = am[i, 4 * j : 4 * j + 4].bool()
            if keep.any():
                pooled = states[i, 4 * j : 4 * j + 4][keep].mean(0)
                align.append(1 - F.cosine_similarity(m.align_head(z[i, j]), pooled, dim=0))
    align = torch.stack(align).mean()
    torch.testing.assert_close(out.ce, ce, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.align, align, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.loss, ce + 0.7 * align, atol=1e-4, rtol=1e-4)
    real = am.bool() & ~torch.isin(ids, torch.tensor(m.tokenizer.all_special_ids))
    assert out.accuracy == pytest.approx(float((logits.argmax(-1) == ids)[real].float().mean()))


def test_compressor_frozen_encoder_not_saved_and_round_trip(compressor, tmp_path):
    m = compressor
    b = m.tokenize(TEXTS)
    out = m.loss(b["input_ids"], b["attention_mask"], generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert all(p.grad is None for p in m.encoder.parameters())
    assert m.queries.grad is not None and m.align_head.weight.grad is not None
    m.zero_grad()
    m.save_pretrained(tmp_path)
    keys = load_file(os.path.join(tmp_path, "diffusion_pytorch_model.safetensors")).keys()
    assert not any(k.startswith(("_encoder", "encoder.")) for k in keys)
    m2 = TextCompressor.from_pretrained(tmp_path)
    z = m.encode(b["input_ids"], b["attention_mask"])
    torch.testing.assert_close(m2.encode(b["input_ids"], b["attention_mask"]), z)
    torch.testing.assert_close(m2.decode(z), m.decode(z))
    with pytest.raises(ValueError, match="safetensors"):
        os.remove(os.path.join(tmp_path, "diffusion_pytorch_model.safetensors"))
        TextCompressor.from_pretrained(tmp_path)


def test_compressor_overfits_a_few_texts():
    texts = ["the cat sat", "12 + 7 = 19"]
    tok = TextCompressor(max_length=8, num_layers=1, decoder_layers=1, hidden_size=16, num_heads=2).tokenizer
    b = tok(texts, padding="max_length", max_length=8, return_tensors="pt")
    vocab = sorted(set(b["input_ids"].flatten().tolist()) | set(tok.all_special_ids))
    torch.manual_seed(0)
    m = TextCompressor(max_length=8, compression=4, latent_dim=16, hidden_size=48, num_layers=1,
                       decoder_layers=1, num_heads=4, token_mask_prob=0.0, output_vocab=vocab)
    states = m.encoder_states(b["input_ids"], b["attention_mask"])  # frozen: computed once
    opt = torch.optim.Adam(m.parameters(), lr=5e-3)
    for _ in range(40):
        loss = m.loss(b["input_ids"], b["attention_mask"], states=states).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    out = m.loss(b["input_ids"], b["attention_mask"], latent_noise=0.0, token_mask_prob=0.0)
    assert out.accuracy == 1.0
    assert out.logits.shape == (2, 8, len(vocab))  # a domain vocabulary: a small softmax
    assert m.decode_text(out.latents) == texts
    with pytest.raises(ValueError, match="outside config.output_vocab"):
        m.loss(m.tokenize(["zebra"])["input_ids"])


def test_compressor_bad_input(compressor):
    with pytest.raises(ValueError, match="multiple of compression"):
        TextCompressor(max_length=10, compression=4)
    with pytest.raises(ValueError, match="latent_dim=8"):
        compressor.decode(torch.zeros(1, 4, 16))
    z = torch.zeros(1, 4, 8)
    z[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="latents contains 1 NaN"):
        compressor.decode(z)
    with pytest.raises(ValueError, match="max_length=16"):
        compressor.encode(torch.zeros(1, 9, dtype=torch.long))


# ---- ThoughtVAE ---------------------------------------------------------------------------------------
def tiny_vae(**kw):
    torch.manual_seed(0)
    return ThoughtVAE(**{**dict(vocab_size=24, max_length=8, num_latents=2, latent_dim=4, hidden_size=32,
                                num_layers=1, num_heads=2), **kw})


def test_vae_loss_matches_direct():
    vae = tiny_vae(beta=0.1)
    ids = torch.randint(1, 24, (3, 8), generator=torch.Generator().manual_seed(0))
    ids[:, 6:] = 0
    out = vae.loss(ids, sample=False)
    mu, logvar = vae.encode(ids)
    assert mu.shape == (3, 2, 4)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(-1).mean()
    ce = F.cross_entropy(vae.decode(mu).reshape(-1, 24), ids.reshape(-1))
    torch.testing.assert_close(out.kl, kl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ce + 0.1 * kl, atol=1e-5, rtol=1e-5)
    # sampling uses the reparameterisation z = mu + sigma * eps
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    eps = torch.randn(mu.shape, generator=g2)
    out_s = vae.loss(ids, sample=True, generator=g1)
    ce_s = F.cross_entropy(vae.decode(mu + (0.5 * logvar).exp() * eps).reshape(-1, 24), ids.reshape(-1))
    torch.testing.assert_close(out_s.ce, ce_s, atol=1e-5, rtol=1e-5)


def test_vae_overfits_round_trips_and_scales(tmp_path):
    vae = tiny_vae(hidden_size=32, latent_dim=8)
    ids = torch.randint(1, 24, (4, 8), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(vae.parameters(), lr=5e-3)
    for _ in range(60):
        loss = vae.loss(ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.eval()
    out = vae.loss(ids)
    assert out.accuracy == 1.0 and out.exact == 1.0 and out.kl > 0
    sf = vae.fit_scaling_factor(ids)
    assert vae.config.scaling_factor == sf
    torch.testing.assert_close(vae.to_diffusion(ids).std(), torch.tensor(1.0), atol=1e-4, rtol=0)
    assert torch.equal(vae.from_diffusion(vae.to_diffusion(ids)), ids)
    vae.save_pretrained(tmp_path)
    vae2 = ThoughtVAE.from_pretrained(tmp_path)
    assert vae2.config.scaling_factor == sf
    torch.testing.assert_close(vae2.encode(ids)[0], vae.encode(ids)[0])


def test_vae_bad_input():
    vae = tiny_vae()
    with pytest.raises(ValueError, match="latent_dim=4"):
        vae.decode(torch.zeros(1, 2, 5))
    with pytest.raises(ValueError, match="max_length=8"):
        vae.encode(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size=24"):
        vae.encode(torch.full((1, 8), 30))
    with pytest.raises(ValueError, match="NaN"):
        vae.decode(torch.full((1, 2, 4), math.nan))

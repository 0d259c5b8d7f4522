"""Semantic slots that carry the backbone's token embeddings, weighted by the CTC posteriors."""

import pytest
import torch

from latent import DiffusionTransformer
from modalities.audio import AudioAdapter, SemanticAdapter

V, D = 5, 8  # CTC vocabulary (blank = 5), backbone width


def runs_of(labels, length, blank):
    """Frame runs of one non-blank label (the slots of CTC pooling), or every frame when all are blank."""
    runs, prev = [], None
    for t in range(length):
        lab = int(labels[t])
        if lab != blank and lab != prev:
            runs.append([t])
        elif lab != blank:
            runs[-1].append(t)
        prev = lab
    return runs or [list(range(length))]


def test_slots_are_posterior_weighted_embeddings_plus_the_mlp():
    torch.manual_seed(0)
    sem = SemanticAdapter(in_dim=6, hidden_size=D, pooling="ctc", vocab_size=V, token_embeddings=True).eval()
    E = torch.randn(V + 3, D)  # the backbone may have more rows (special tokens) than the CTC vocabulary
    sem.set_token_embeddings(E)
    torch.nn.init.normal_(sem.net[-1].weight)  # a trained MLP: both terms count
    h = torch.randn(3, 10, 6)
    lengths = torch.tensor([10, 7, 4])
    mask = torch.arange(10)[None] < lengths[:, None]
    out = sem(h, mask)
    logits = sem.ctc_logits(h)
    for b in range(3):
        runs = runs_of(logits[b].argmax(-1), int(lengths[b]), V)
        ref = []
        for r in runs:
            frames = [t for t in r if int(logits[b, t].argmax()) != V] or r
            post = logits[b, frames].softmax(-1)[:, :V].sum(0)
            ref.append(post / post.sum() @ E[:V] + sem.net(h[b, r].mean(0)))
        n = len(runs)
        assert out.mask[b].sum() == n
        assert torch.allclose(out.embeds[b, :n], torch.stack(ref), atol=1e-5)


def test_a_new_token_part_starts_as_the_embeddings_alone_and_a_sure_head_gives_the_best_path():
    torch.manual_seed(1)
    sem = SemanticAdapter(in_dim=6, hidden_size=D, pooling="ctc", vocab_size=V).eval()
    E = torch.randn(V, D)
    sem.set_token_embeddings(E)  # turned on after construction: the MLP restarts at zero
    assert sem.config.token_embeddings and not sem.net[-1].weight.any()
    labels = torch.tensor([[5, 2, 2, 5, 0, 0, 4, 5]])
    sem.ctc_logits = lambda h: 50.0 * torch.nn.functional.one_hot(labels, V + 1).float()
    out = sem(torch.randn(1, 8, 6), torch.ones(1, 8, dtype=torch.bool))
    assert torch.allclose(out.embeds[0], E[[2, 0, 4]], atol=1e-5)


def test_the_posteriors_carry_no_gradient_to_the_ctc_head():
    torch.manual_seed(2)
    sem = SemanticAdapter(in_dim=6, hidden_size=D, pooling="ctc", vocab_size=V, token_embeddings=True)
    sem.set_token_embeddings(torch.randn(V, D))
    h = torch.randn(2, 9, 6, requires_grad=True)
    sem(h, torch.ones(2, 9, dtype=torch.bool)).embeds.pow(2).sum().backward()
    assert all(p.grad is None for p in sem.ctc.parameters())
    assert sem.net[-1].weight.grad is not None and h.grad is not None


def test_save_load_keeps_the_embeddings_and_errors_name_the_fix(tmp_path):
    a = AudioAdapter(hidden_size=D, encoder_dim=16, encoder_layers=1, encoder_heads=2, n_mels=16, acoustic_queries=2,
                     acoustic_heads=2, max_seconds=2.0, semantic_pooling="ctc", ctc_vocab_size=V).eval()
    model = DiffusionTransformer(vocab_size=V + 2, hidden_size=D, num_layers=1, num_heads=2, mask_token_id=V + 1)
    a.set_token_embeddings(model.embed.weight)
    assert a.config.semantic_token_embeddings
    wave = torch.randn(8000) * 0.1
    ref = a(a.preprocess(wave))
    a.save_pretrained(tmp_path)
    loaded = AudioAdapter.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.semantic.token_embedding, model.embed.weight[:V].detach())
    assert torch.equal(loaded(loaded.preprocess(wave)).embeds, ref.embeds)
    with pytest.raises(ValueError, match="pooling='ctc'"):
        SemanticAdapter(in_dim=6, hidden_size=D, token_embeddings=True)
    with pytest.raises(ValueError, match="pooling='ctc'"):
        SemanticAdapter(in_dim=6, hidden_size=D).set_token_embeddings(torch.randn(V, D))
    with pytest.raises(ValueError, match="input embedding weight"):
        a.set_token_embeddings(torch.randn(V - 1, D))

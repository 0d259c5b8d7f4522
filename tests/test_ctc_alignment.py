"""CTC forced alignment, and the audio prefix whose slots follow a decoded transcript (read="aligned_prefix")."""

import itertools

import pytest
import torch

from modalities.audio import SemanticAdapter
from modalities.ctc_alignment import CTCAlignmentError, align_batch, ctc_align
from pipelines.base import join_prompt
from tests.test_ctc_decoding import collapse as collapse_path
from tests.test_semantic_token_embeddings import runs_of
from tests.test_spoken_qa import build, tokenizer, tone  # noqa: F401 (tokenizer: the module fixture)


def collapse(labels, blank):
    return list(collapse_path(labels, blank))


def path_score(lp, labels):
    return float(lp[torch.arange(len(labels)), torch.as_tensor(labels)].sum())


def test_the_alignment_is_the_best_path_that_reads_the_targets():
    """Against every one of the V^T paths of small clips: the best-scoring path that collapses to the targets."""
    g = torch.Generator().manual_seed(0)
    blank = 2
    for t_len, targets in ((5, [0, 1]), (6, [1, 1]), (6, [0, 1, 0]), (4, [1]), (5, [0, 0, 1])):
        for _ in range(4):
            lp = torch.randn(t_len, 3, generator=g).mul(2).log_softmax(-1)
            best = max((p for p in itertools.product(range(3), repeat=t_len) if collapse(p, blank) == targets),
                       key=lambda p: path_score(lp, p))
            got = ctc_align(lp, targets, blank)
            assert collapse(got.tolist(), blank) == targets
            assert got.tolist() == list(best)


def test_the_alignment_equals_torchaudio_forced_align():
    F = pytest.importorskip("torchaudio.functional")
    if not hasattr(F, "forced_align"):
        pytest.skip("this torchaudio has no forced_align")
    g = torch.Generator().manual_seed(1)
    blank = 5
    for _ in range(60):
        t_len = int(torch.randint(4, 50, (1,), generator=g))
        lp = torch.randn(t_len, 6, generator=g).mul(3).log_softmax(-1)
        targets = torch.randint(0, 3, (int(torch.randint(1, t_len // 2 + 1, (1,), generator=g)),), generator=g).tolist()
        ref, _ = F.forced_align(lp[None], torch.tensor([targets]), torch.tensor([t_len]), torch.tensor([len(targets)]),
                                blank=blank)
        assert ctc_align(lp, targets, blank).tolist() == ref[0].tolist()


def test_the_greedy_transcript_aligns_to_the_argmax_labels():
    """The greedy best path is the best path of its own transcript: aligning that transcript changes nothing."""
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        lp = torch.randn(30, 7, generator=g).mul(3).log_softmax(-1)
        greedy = lp.argmax(-1).tolist()
        assert ctc_align(lp, collapse(greedy, 6), 6).tolist() == greedy


def test_errors_padding_and_the_fallback():
    lp = torch.zeros(2, 4).log_softmax(-1)
    with pytest.raises(CTCAlignmentError, match="needs 3 frames; the clip has 2"):
        ctc_align(lp, [1, 1], blank=3)  # two equal tokens need a blank between them
    with pytest.raises(ValueError, match="other than the blank"):
        ctc_align(lp, [3], blank=3)
    assert ctc_align(lp, [], blank=3).tolist() == [3, 3]
    logits = torch.randn(2, 6, 4)
    mask = torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0]]).bool()
    fallback = torch.full((2, 6), 7)
    labels = align_batch(logits, mask, [[0, 1], [2, 2]], blank=3, fallback=fallback)
    assert collapse(labels[0].tolist(), 3) == [0, 1] and (labels[1] == 7).all()  # row 1 has 2 frames for 3
    short = align_batch(logits, mask, [[0, 1], [2]], blank=3)
    assert short[1, 2:].tolist() == [3] * 4 and collapse(short[1].tolist(), 3) == [2]
    with pytest.raises(CTCAlignmentError):
        align_batch(logits, mask, [[0, 1], [2, 2]], blank=3)
    with pytest.raises(ValueError, match="1 transcripts for 2 clips"):
        align_batch(logits, mask, [[0]], blank=3)


def test_slots_on_given_labels_are_the_aligned_tokens_embeddings_plus_the_mlp():
    torch.manual_seed(0)
    v, d = 5, 8
    sem = SemanticAdapter(in_dim=6, hidden_size=d, pooling="ctc", vocab_size=v, token_embeddings=True).eval()
    emb = torch.randn(v, d)
    sem.set_token_embeddings(emb)
    torch.nn.init.normal_(sem.net[-1].weight)
    h = torch.randn(2, 9, 6)
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3]).bool()
    labels = torch.tensor([[5, 2, 2, 5, 2, 0, 0, 5, 4], [1, 5, 3, 3, 3, 5, 5, 5, 5]])
    out = sem(h, mask, labels)
    for b in range(2):
        runs = runs_of(labels[b], int(mask[b].sum()), v)
        ref = torch.stack([emb[int(labels[b, r[0]])] + sem.net(h[b, r].mean(0)) for r in runs])
        assert out.mask[b].sum() == len(runs)
        assert torch.allclose(out.embeds[b, : len(runs)], ref, atol=1e-5)
    # the head's own argmax as labels pools the same frames as no labels (only the token part differs)
    plain = SemanticAdapter(in_dim=6, hidden_size=d, pooling="ctc", vocab_size=v).eval()
    argmax = plain.ctc_logits(h).argmax(-1)
    assert torch.equal(plain(h, mask, argmax).embeds, plain(h, mask).embeds)
    with pytest.raises(ValueError, match=r"frame labels must be \[B, T\]"):
        sem(h, mask, labels[:, :4])
    with pytest.raises(ValueError, match="pooling is 'stack'"):
        SemanticAdapter(in_dim=6, hidden_size=d)(h, mask, labels)


class FixedTranscripts:
    """A transcript decoder that hears the given token ids in every batch."""

    def __init__(self, ids):
        self.ids = ids

    def decode(self, logits, mask, blank):
        return [list(x) for x in self.ids]


@pytest.fixture(scope="module")
def ctc_pipe(tokenizer):  # noqa: F811
    pipe = build(tokenizer, semantic_pooling="ctc", ctc_vocab_size=len(tokenizer),
                 semantic_token_embeddings=True)
    pipe.audio_adapter.set_token_embeddings(pipe.model.embed.weight)
    return pipe


def test_the_aligned_prefix_reads_the_decoders_transcript(ctc_pipe):
    pipe, a, tok = ctc_pipe, ctc_pipe.audio_adapter, ctc_pipe.tokenizer
    clips = [tone(0.5, seed=1), tone(0.9, 480, seed=2)]
    heard = [tok.encode(" what is two plus two", add_special_tokens=False), tok.encode(" seven", add_special_tokens=False)]
    decoder = FixedTranscripts(heard)
    batch = a.preprocess(clips)
    states, mask = a.encode(batch)
    lp = a.semantic.ctc_logits(states[-1]).log_softmax(-1)
    labels = torch.full(mask.shape, a.semantic.blank)
    for b in range(2):
        n = int(mask[b].sum())
        labels[b, :n] = ctc_align(lp[b, :n], heard[b], a.semantic.blank)
    want = a.prefix(states, mask, ["semantic"], labels)
    got = a(batch, ["semantic"], ctc_decoder=decoder)
    assert got.mask.sum(1).tolist() == [len(x) for x in heard]  # one slot per heard token
    assert torch.allclose(got.embeds, want.embeds, atol=1e-6) and torch.equal(got.mask, want.mask)
    # the pipeline decodes from that prefix, with its prompt joined after it
    out = pipe(audio=clips, read="aligned_prefix", ctc_decoder=decoder, cache="none")
    prefix, pmask = pipe.encode_prefix(a, batch, ctc_decoder=decoder)
    ids, amask = pipe.encode_prompt([pipe.prompt_text("answer")] * 2)
    embeds, m = join_prompt(pipe.model.embed, prefix, pmask, ids, amask)
    sampler = pipe.scheduler.sampler(pipe.model, gen_length=4, mask_token_id=tok.mask_token_id,
                                     eos_token_id=tok.eos_token_id, eos_early_stop=True, block_length=4,
                                     commit="threshold", threshold=0.9, cache="none")
    ref = sampler(pipe.model, ids[:, :0], amask[:, :0], prefix_embeds=embeds, prefix_mask=m)
    assert torch.equal(out.sequences[:, ids.shape[1] :], ref.sequences) and out.nfe == ref.nfe
    # with the greedy decoder the aligned reading is the plain prefix reading
    plain = pipe(audio=clips, read="prefix")
    assert torch.equal(pipe(audio=clips, read="aligned_prefix", ctc_decoder="greedy").sequences, plain.sequences)
    assert torch.equal(pipe(audio=clips, read="aligned_prefix").sequences, plain.sequences)  # no saved decoder


def test_the_aligned_prefix_needs_a_ctc_head(tokenizer):  # noqa: F811
    pipe = build(tokenizer)
    with pytest.raises(ValueError, match="read='aligned_prefix' transcribes with the semantic adapter's CTC head"):
        pipe(audio=[tone(0.5)], read="aligned_prefix")

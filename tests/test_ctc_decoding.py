"""CTC prefix beam search and the token n-gram LM, against exhaustive enumeration, torch's CTC loss and the
Kneser-Ney formula written out (the spoken-QA cascade that reads the beam's transcript: test_spoken_qa.py)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from modalities.ctc_decoding import CTCBeamSearch, TokenNGram, ctc_prefix_beam_search


def collapse(path, blank):
    out, prev = [], None
    for label in path:
        if label != prev and label != blank:
            out.append(label)
        prev = label
    return tuple(out)


def exhaustive_best(log_probs, blank, lm=None, lm_weight=0.0, length_bonus=0.0):
    """Every alignment of T frames enumerated; each label sequence scored by its summed CTC probability, the
    weighted LM log-probability of the sequence and its end, and the length bonus."""
    t, v = log_probs.shape
    total = {}
    for path in itertools.product(range(v), repeat=t):
        y = collapse(path, blank)
        lp = sum(log_probs[i, c].item() for i, c in enumerate(path))
        total[y] = math.log(math.exp(total[y]) + math.exp(lp)) if y in total else lp
    scores = {}
    for y, lp in total.items():
        s = lp + length_bonus * len(y)
        if lm is not None:
            s += lm_weight * (sum(lm.log_prob(y[:i], y[i]) for i in range(len(y))) + lm.log_prob(y, lm.end))
        scores[y] = s
    best = max(scores, key=scores.get)
    return list(best), scores[best]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wide_beam_equals_exhaustive_search(seed):
    g = torch.Generator().manual_seed(seed)
    log_probs = torch.log_softmax(torch.randn(5, 4, generator=g) * 2, -1)  # labels 0, 1, 2 and blank 3
    lm = TokenNGram.fit([[0, 1, 2], [0, 1], [2, 2, 1], [1, 0, 1, 2]], vocab_size=3, order=2)
    for kw in (dict(), dict(lm=lm, lm_weight=0.7, length_bonus=0.4), dict(lm=lm, lm_weight=2.0, length_bonus=-0.3)):
        ids, score = ctc_prefix_beam_search(log_probs, 3, beam_width=10_000, **kw)
        ref_ids, ref_score = exhaustive_best(log_probs, 3, **kw)
        assert ids == ref_ids and score == pytest.approx(ref_score, abs=1e-6)


def test_score_without_lm_is_torch_ctc_log_likelihood():
    g = torch.Generator().manual_seed(3)
    log_probs = torch.log_softmax(torch.randn(8, 4, generator=g), -1)
    ids, score = ctc_prefix_beam_search(log_probs, 3, beam_width=10_000)  # no prefix pruned: the exact sum
    assert ids
    nll = F.ctc_loss(log_probs[:, None], torch.tensor([ids]), torch.tensor([8]), torch.tensor([len(ids)]),
                     blank=3, reduction="sum")
    assert score == pytest.approx(-nll.item(), abs=1e-4)


def test_repeats_need_a_blank_between_them_and_the_lm_overrules_a_close_call():
    def frames(*labels, v=4):
        return torch.log(F.one_hot(torch.tensor(labels), v).float() * 0.97 + 0.01)

    assert ctc_prefix_beam_search(frames(1, 1, 3, 1, 2), 3, beam_width=8)[0] == [1, 1, 2]
    assert ctc_prefix_beam_search(frames(1, 1, 1, 2, 2), 3, beam_width=8)[0] == [1, 2]
    # the middle frame is 0 or 2 at nearly even odds; the LM has only ever seen 1 2 1
    lp = frames(1, 3, 0, 3, 1)
    lp[2] = torch.log(torch.tensor([0.5, 0.01, 0.48, 0.01]))
    assert ctc_prefix_beam_search(lp, 3, beam_width=8)[0] == [1, 0, 1]
    lm = TokenNGram.fit([[1, 2, 1]] * 5, vocab_size=3, order=3)
    assert ctc_prefix_beam_search(lp, 3, beam_width=8, lm=lm, lm_weight=1.0)[0] == [1, 2, 1]


@pytest.mark.parametrize("order", [1, 2, 3])
def test_kneser_ney_sums_to_one_for_every_history(order):
    lm = TokenNGram.fit([[0, 1, 2, 1], [3, 1], [1, 1, 1, 0], [2]], vocab_size=5, order=order)
    for history in ([], [1], [0, 1], [4, 4], [2, 1, 1], [3]):
        total = sum(math.exp(lm.log_prob(history, w)) for w in [*range(5), lm.end])
        assert total == pytest.approx(1.0, abs=1e-12)


def test_kneser_ney_bigram_against_the_formula():
    # corpus "<s> 0 1 </s>", "<s> 0 2 </s>", "<s> 1 </s>"; vocab 3, so 4 outcomes with </s>
    lm = TokenNGram.fit([[0, 1], [0, 2], [1]], vocab_size=3, order=2, discount=0.5)
    d, uniform = 0.5, 1 / 4
    # continuation counts: 0 follows <s> only (1 history); 1 follows 0 and <s> (2); 2 follows 0 (1); </s> follows
    # 1 and 2 (2); 6 distinct bigrams in all, 4 distinct continuations
    unigram = {0: 1, 1: 2, 2: 1, 3: 2}
    p1 = {w: max(c - d, 0) / 6 + d * 4 / 6 * uniform for w, c in unigram.items()}
    # history 0: seen twice, followed by 1 and 2
    expected = max(1 - d, 0) / 2 + d * 2 / 2 * p1[1]
    assert math.exp(lm.log_prob([0], 1)) == pytest.approx(expected)
    assert math.exp(lm.log_prob([0], 0)) == pytest.approx(d * 2 / 2 * p1[0])
    # a bigram model reads only the last token: history 2 was seen once, followed by </s> (outcome 3)
    assert math.exp(lm.log_prob([2, 2], 3)) == pytest.approx(max(1 - d, 0) / 1 + d * 1 / 1 * p1[3])


def test_save_load_round_trip_and_decode(tmp_path):
    lm = TokenNGram.fit([[0, 1, 2], [2, 1]], vocab_size=3, order=3, discount=0.6)
    decoder = CTCBeamSearch(beam_width=5, lm=lm, lm_weight=0.5, length_bonus=0.2, token_top_k=3, warps=[0.9, 1.1])
    decoder.save_pretrained(tmp_path / "dec")
    again = CTCBeamSearch.from_pretrained(tmp_path / "dec")
    assert (again.beam_width, again.lm_weight, again.length_bonus, again.token_top_k) == (5, 0.5, 0.2, 3)
    assert again.warps == (0.9, 1.1)
    for h, w in (([], 0), ([0, 1], 2), ([2], lm.end), ([1, 1, 1], 1)):
        assert again.lm.log_prob(h, w) == lm.log_prob(h, w)
    g = torch.Generator().manual_seed(0)
    logits, mask = torch.randn(3, 12, 4, generator=g) * 3, torch.ones(3, 12, dtype=torch.bool)
    mask[1, 7:] = False
    ids = decoder.decode(logits, mask, blank=3)
    assert ids == again.decode(logits, mask, blank=3)
    scored = decoder.decode_scored(logits, mask, blank=3)
    assert [x for x, _ in scored] == ids
    assert scored[2] == ctc_prefix_beam_search(torch.log_softmax(logits[2], -1), 3, 5, lm, 0.5, 0.2, 3)
    # padded frames are not read: row 1 decodes as its first 7 frames alone
    assert ids[1] == decoder.decode(logits[1:2, :7], mask[1:2, :7], blank=3)[0]
    plain = CTCBeamSearch(beam_width=2, token_top_k=None)
    plain.save_pretrained(tmp_path / "plain")
    assert CTCBeamSearch.from_pretrained(tmp_path / "plain").lm is None


def test_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="`lm_weight` > 0 needs an `lm`"):
        CTCBeamSearch(lm_weight=0.5)
    with pytest.raises(ValueError, match="beam_width"):
        CTCBeamSearch(beam_width=0)
    with pytest.raises(ValueError, match="`warps` are frequency stretch factors"):
        CTCBeamSearch(warps=(0.9, 0.0))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 3\)"):
        TokenNGram.fit([[0, 5]], vocab_size=3)
    with pytest.raises(ValueError, match="at least one sequence"):
        TokenNGram.fit([], vocab_size=3)
    lm = TokenNGram.fit([[0, 1]], vocab_size=2)
    with pytest.raises(ValueError, match="the LM knows 2 tokens"):
        ctc_prefix_beam_search(torch.zeros(4, 5), 4, lm=lm, lm_weight=1.0)
    with pytest.raises(FileNotFoundError, match="CTCBeamSearch.save_pretrained"):
        CTCBeamSearch.from_pretrained(tmp_path)

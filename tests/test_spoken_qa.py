"""Spoken QA pipeline (batching, padding, tasks, errors, callbacks, save/load, the prompt joined to the prefix) and the task's alignment loss."""

import json

import numpy as np
import pytest
import torch

from latent import DiffusionTransformer
from latent.scheduler import MaskedDiffusionScheduler
from modalities.audio import AudioAdapter, AudioError, ctc_best_path
from modalities.data import speech
from pipelines.base import encode_prompts, join_prompt
from pipelines.spoken_qa import SpokenQAPipeline, format_prompt

SR = 16000


def tone(seconds, freq=330.0, sr=SR, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from latent.data.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    lines = ["transcribe: answer:"]
    lines += [f"{e.instruction} {e.transcript} answer: {e.answer}" for e in speech.make_split("train", 120)]
    (d / "t.txt").write_text("\n".join(lines))
    return train_tokenizer(str(d / "t.txt"), d / "tok", vocab_size=330, min_frequency=1)


def build(tokenizer, commit="threshold", **adapter_kwargs):
    torch.manual_seed(0)
    model = DiffusionTransformer(vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=4,
                                 mask_token_id=tokenizer.mask_token_id, max_position_embeddings=96,
                                 attention_layout="prefix").eval()
    adapter = AudioAdapter(hidden_size=32, encoder_dim=32, encoder_layers=1, encoder_heads=2, n_mels=16,
                           acoustic_queries=2, acoustic_heads=2, max_seconds=2.0, **adapter_kwargs).eval()
    sched = MaskedDiffusionScheduler(block_length=8, commit=commit, threshold=0.9)
    pipe = SpokenQAPipeline(adapter, model, tokenizer, sched, gen_length=4, transcribe_length=8)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(tokenizer):
    return build(tokenizer)


def test_batch_of_different_lengths_equals_clips_alone(pipe):
    clips = [tone(0.3, seed=1), tone(1.1, 500, seed=2), (tone(0.6, sr=22050, seed=3), 22050)]
    out = pipe(audio=clips, instruction=[None, "table: anna red four.", None])
    assert len(out.texts) == 3 and out.errors == [None] * 3 and out.sequences.shape[1] >= 4
    for i, clip in enumerate(clips):
        alone = pipe(audio=clip, instruction=[None, "table: anna red four.", None][i])
        assert alone.texts == [out.texts[i]]
        gen = alone.sequences[0, -4:]
        assert torch.equal(gen, out.sequences[i, -4:])
    # the prompt sits right before the generated tokens: "<instruction> answer:"
    ids = out.sequences[1, :-4].tolist()
    assert pipe.tokenizer.decode([t for t in ids if t != pipe.tokenizer.pad_token_id]).strip() == \
        "table: anna red four. answer:"


def test_transcribe_task_and_prompts(pipe):
    out = pipe(audio=tone(0.5), task="transcribe")
    assert out.sequences.shape[1] == len(pipe.tokenizer("transcribe:", add_special_tokens=False)["input_ids"]) + 8
    assert format_prompt("answer", "  ", "answer:", "transcribe:") == "answer:"
    assert format_prompt("transcribe", "say it", "answer:", "transcribe:") == "say it transcribe:"
    one_per_step = pipe(audio=tone(0.5), task="transcribe", steps=8, threshold=None, eos_early_stop=False,
                        cache="none")
    assert one_per_step.nfe == 8


def test_error_records_and_raising(pipe, tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    good = [tone(0.4, seed=5), tone(0.7, seed=6)]
    clips = [good[0], np.zeros(8000, np.float32), str(tmp_path / "bad.wav"), good[1], np.full(50, 0.2, np.float32)]
    out = pipe(audio=clips, on_error="record")
    assert [e is None for e in out.errors] == [True, False, False, True, False]
    assert "audio 1" in out.errors[1] and "silent" in out.errors[1]
    assert "bad.wav" in out.errors[2] and "shorter than one analysis frame" in out.errors[4]
    assert out.texts[1] is None and out.texts[2] is None and out.sequences.shape[0] == 5
    ref = pipe(audio=good)
    assert [out.texts[0], out.texts[3]] == ref.texts
    with pytest.raises(AudioError, match="audio 1.*silent"):
        pipe(audio=clips)
    with pytest.raises(AudioError, match="NaN"):
        pipe(audio=np.full(8000, np.nan, np.float32))
    everything_bad = pipe(audio=[np.zeros(10, np.float32)], on_error="record")
    assert everything_bad.texts == [None] and everything_bad.errors[0]
    texts, sequences, errors, nfe = pipe(audio=clips, on_error="record", batch_size=2, return_dict=False)
    assert texts == out.texts and errors == out.errors and torch.equal(sequences, out.sequences) and nfe > 0


def test_check_inputs(pipe):
    clip = tone(0.3)
    with pytest.raises(ValueError, match="exactly one"):
        pipe()
    with pytest.raises(ValueError, match="task"):
        pipe(audio=clip, task="translate")
    with pytest.raises(ValueError, match="on_error"):
        pipe(audio=clip, on_error="ignore")
    with pytest.raises(ValueError, match="gen_length"):
        pipe(audio=clip, gen_length=0)
    with pytest.raises(ValueError, match="instructions for"):
        pipe(audio=[clip, clip], instruction=["a", "b", "c"])
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(audio=clip, callback_on_step_end_tensor_inputs=["logits"])
    with pytest.raises(ValueError, match="hidden_size"):
        SpokenQAPipeline(AudioAdapter(hidden_size=16, encoder_dim=16, encoder_layers=1, n_mels=16, encoder_heads=2,
                                      acoustic_heads=2), pipe.model, pipe.tokenizer, pipe.scheduler)


def test_features_generator_callbacks_and_batch_size(pipe):
    clips = [tone(0.3, seed=7), tone(0.9, seed=8), tone(0.5, seed=9)]
    feats = pipe.audio_adapter.preprocess(clips)
    ref = pipe(audio=clips)
    assert pipe(features=feats).texts == ref.texts
    chunked = pipe(audio=clips, batch_size=2)
    assert chunked.texts == ref.texts
    a = pipe(audio=clips, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = pipe(audio=clips, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.sequences, b.sequences)
    seen = []

    def cb(p, step, block, kw):
        seen.append((step, tuple(kw)))
        assert kw["sequences"].shape[0] == 3

    out = pipe(audio=clips, steps=4, threshold=None, eos_early_stop=False, callback_on_step_end=cb,
               callback_on_step_end_tensor_inputs=["sequences", "transfer"])
    assert [s for s, _ in seen] == [0, 1, 2, 3] and seen[0][1] == ("sequences", "transfer")
    assert out.nfe == 5  # 4 steps + the forward that fills the exact prefix cache


def test_save_load_one_folder(pipe, tmp_path):
    clips = [tone(0.4, seed=10), tone(0.8, seed=11)]
    ref = pipe(audio=clips, task="transcribe")
    pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["audio_adapter"] == ["modalities.audio", "AudioAdapter"] and index["transcribe_length"] == 8
    loaded = SpokenQAPipeline.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    out = loaded(audio=clips, task="transcribe")
    assert out.texts == ref.texts and torch.equal(out.sequences, ref.sequences)
    with pytest.raises(ValueError, match="model_index.json"):
        SpokenQAPipeline.from_pretrained(tmp_path)
    import pipelines

    assert pipelines.SpokenQAPipeline is SpokenQAPipeline


# ---- read="ctc_text": the CTC head's transcript as text (a cascade)
def best_path_loop(logits, mask, blank):
    """Greedy CTC by hand: argmax per valid frame, a label repeating the previous valid frame's is one token."""
    out = []
    for row, valid in zip(logits.argmax(-1).tolist(), mask.tolist(), strict=True):
        ids, prev = [], None
        for label, ok in zip(row, valid, strict=True):
            if not ok:
                continue
            if label != prev and label != blank:
                ids.append(label)
            prev = label
        out.append(ids)
    return out


@pytest.fixture(scope="module")
def ctc_pipe(tokenizer):
    return build(tokenizer, semantic_pooling="ctc", ctc_vocab_size=len(tokenizer))


def test_ctc_best_path_against_a_loop():
    blank = 4
    labels = torch.tensor([[1, 1, 4, 1, 2, 2, 4, 4],   # a blank splits a repeat: two 1s
                           [3, 3, 0, 0, 0, 3, 4, 2],   # padding (last 3 frames) is ignored
                           [2, 4, 4, 2, 2, 4, 2, 4]])  # padded frames inside a run of 2 do not split it
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3, [1, 1, 1, 1, 0, 0, 0, 1]]).bool()
    logits = torch.nn.functional.one_hot(labels, 5).float() + 0.01 * torch.randn(3, 8, 5)
    assert ctc_best_path(logits, mask, blank) == [[1, 1, 2], [3, 0], [2, 2]]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, 5, generator=g) * 3
    mask = torch.rand(6, 40, generator=g) > 0.3
    mask[0] = False  # a clip without valid frames reads nothing
    assert ctc_best_path(logits, mask, blank) == best_path_loop(logits, mask, blank)


def ctc_prompts(pipe, clips, instructions):
    """The cascade's text prompts built by hand: the CTC best path decoded, then the answer prompt."""
    a = pipe.audio_adapter
    batch = a.preprocess(clips)
    states, mask = a.encode(batch)
    ids = best_path_loop(a.semantic.ctc_logits(states), mask, a.semantic.blank)
    texts = [pipe.tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]
    return ids, texts, [f"{t} {pipe.prompt_text('answer', i)}" for t, i in zip(texts, instructions, strict=True)]


def test_ctc_text_answers_equal_the_sampler_on_the_transcript_prompt(ctc_pipe):
    clips = [tone(0.3, seed=1), tone(0.6, 500, seed=2), tone(0.4, 700, seed=3)]
    instructions = [None, "table: anna red four.", None]
    _, texts, prompts = ctc_prompts(ctc_pipe, clips, instructions)
    assert all(texts)  # the untrained head reads some tokens in every clip, so the prompts differ from "answer:"
    tok = ctc_pipe.tokenizer
    ids, mask = ctc_pipe.encode_prompt(prompts)
    for knobs, sampler_knobs in (({}, dict(block_length=4, commit="threshold", threshold=0.9)),
                                 (dict(steps=4, threshold=None, cache="none", eos_early_stop=False),
                                  dict(block_length=4, commit="schedule", steps=4, cache="none"))):
        out = ctc_pipe(audio=clips, instruction=instructions, read="ctc_text", **knobs)
        sampler = ctc_pipe.scheduler.sampler(ctc_pipe.model, gen_length=4, mask_token_id=tok.mask_token_id,
                                             eos_token_id=tok.eos_token_id,
                                             eos_early_stop=knobs.get("eos_early_stop", True), **sampler_knobs)
        ref = sampler(ctc_pipe.model, ids, mask)
        assert torch.equal(out.sequences, ref.sequences) and out.nfe == ref.nfe
        assert out.texts == ctc_pipe.decode(ref.sequences[:, ids.shape[1] :])
    # a bad clip is recorded, the others decode as alone
    mixed = ctc_pipe(audio=[clips[0], np.zeros(8000, np.float32), clips[1]], instruction=instructions,
                     read="ctc_text", on_error="record")
    assert mixed.texts[1] is None and "silent" in mixed.errors[1] and mixed.errors[0] is None
    for row, clip, ins in ((0, clips[0], instructions[0]), (2, clips[1], instructions[2])):
        alone = ctc_pipe(audio=clip, instruction=ins, read="ctc_text")
        width = alone.sequences.shape[1]
        assert mixed.texts[row] == alone.texts[0] and torch.equal(mixed.sequences[row, -width:], alone.sequences[0])
    assert ctc_pipe(audio=clips, instruction=instructions, read="ctc_text", batch_size=2).texts == out.texts


def test_ctc_text_transcribe_returns_the_best_path_and_errors(ctc_pipe, pipe):
    clips = [tone(0.3, seed=4), tone(0.9, 450, seed=5)]
    ids, texts, _ = ctc_prompts(ctc_pipe, clips, [None, None])
    out = ctc_pipe(audio=clips, task="transcribe", read="ctc_text")
    assert out.texts == texts and out.nfe == 0
    width = max(map(len, ids))
    assert out.sequences.shape == (2, width)
    for row, x in zip(out.sequences.tolist(), ids, strict=True):
        assert row[width - len(x) :] == x and set(row[: width - len(x)]) <= {ctc_pipe.pad_token_id}
    with pytest.raises(ValueError, match="read='ctc_text'.*semantic_pooling='stack'.*read='prefix'"):
        pipe(audio=clips, read="ctc_text")
    with pytest.raises(ValueError, match="`read` must be one of"):
        ctc_pipe(audio=clips, read="ctc")
    with pytest.raises(ValueError, match="pooling='ctc'"):
        pipe.audio_adapter.ctc_best_path(pipe.audio_adapter.preprocess(clips))
    with pytest.raises(ValueError, match="trajectory=True"):
        ctc_pipe(audio=clips, task="transcribe", read="ctc_text", trajectory=True)


def test_ctc_text_reads_the_transcript_of_a_ctc_decoder(ctc_pipe):
    from modalities.ctc_decoding import CTCBeamSearch, TokenNGram

    pipe, tok = ctc_pipe, ctc_pipe.tokenizer
    clips = [tone(0.4, seed=7), tone(0.7, 520, seed=8)]
    lm = TokenNGram.fit([tok.encode(e.transcript, add_special_tokens=False) for e in speech.make_split("train", 60)],
                        vocab_size=len(tok))
    decoder = CTCBeamSearch(beam_width=4, lm=lm, lm_weight=1.0, length_bonus=0.5)
    batch = pipe.audio_adapter.preprocess(clips)
    a = pipe.audio_adapter
    states, mask = a.encode(batch)
    expected = decoder.decode(a.semantic.ctc_logits(states), mask, a.semantic.blank)
    assert a.ctc_decode(batch, decoder) == expected and a.ctc_decode(batch) == a.ctc_best_path(batch)
    out = pipe(audio=clips, task="transcribe", read="ctc_text", ctc_decoder=decoder)
    assert out.texts == [tok.decode(x, skip_special_tokens=True).strip() for x in expected]
    answers = pipe(audio=clips, read="ctc_text", ctc_decoder=decoder)
    prompts = [f"{t} {pipe.prompt_text('answer')}".strip() for t in out.texts]
    ids, pmask = pipe.encode_prompt(prompts)
    assert torch.equal(answers.sequences[:, : ids.shape[1]], ids)
    with pytest.raises(ValueError, match="Pass read='aligned_prefix'.* or read='ctc_text'"):
        pipe(audio=clips, ctc_decoder=decoder)
    with pytest.raises(ValueError, match="`ctc_decoder` must have decode"):
        pipe(audio=clips, read="ctc_text", ctc_decoder="beam")


def test_test_time_warps_keep_each_clips_best_scoring_hypothesis(ctc_pipe):
    from modalities.audio import AudioBatch, warp_frequencies
    from modalities.ctc_decoding import CTCBeamSearch

    a = ctc_pipe.audio_adapter
    batch = a.preprocess([tone(0.5, seed=11), tone(0.8, 600, seed=12), tone(0.6, 250, seed=13)])
    plain = CTCBeamSearch(beam_width=4)
    warps = (0.8, 0.9, 1.1, 1.25)
    candidates = []  # per factor: what the decoder reads in the stretched features, one (ids, score) per clip
    for factor in (1.0, *warps):
        x = torch.stack([warp_frequencies(row[None], torch.tensor([factor]))[0] for row in batch.values])
        states, mask = a.encode(AudioBatch(x, batch.lengths))
        candidates.append(plain.decode_scored(a.semantic.ctc_logits(states[-1]), mask, a.semantic.blank))
    best = [max((c[i] for c in candidates), key=lambda c: c[1])[0] for i in range(len(batch))]
    assert a.ctc_decode(batch, CTCBeamSearch(beam_width=4, warps=warps)) == best
    assert best != [c[0] for c in candidates[0]]  # some clip reads better stretched, so the selection is seen
    assert a.ctc_decode(batch, CTCBeamSearch(beam_width=4, warps=(1.0,))) == a.ctc_decode(batch, plain)
    with pytest.raises(ValueError, match=r"frequency axis \[B, T, F\]; these inputs are \[1, 800\]"):
        a.ctc_decode(AudioBatch(torch.zeros(1, 800), torch.tensor([800])), CTCBeamSearch(warps=(0.9,)))


def test_the_pipeline_ctc_decoder_is_saved_loaded_and_the_default(ctc_pipe, tmp_path):
    from modalities.ctc_decoding import CTCBeamSearch, TokenNGram

    tok = ctc_pipe.tokenizer
    lm = TokenNGram.fit([tok.encode(e.transcript, add_special_tokens=False) for e in speech.make_split("train", 40)],
                        vocab_size=len(tok), order=2)
    decoder = CTCBeamSearch(beam_width=3, lm=lm, lm_weight=2.0, length_bonus=-0.5)
    clips = [tone(0.5, seed=3), tone(0.6, 440, seed=4)]
    explicit = ctc_pipe(audio=clips, task="transcribe", read="ctc_text", ctc_decoder=decoder).sequences
    greedy = ctc_pipe(audio=clips, task="transcribe", read="ctc_text").sequences  # this pipeline has none
    assert not torch.equal(explicit, greedy)  # so the default below is not greedy by chance
    try:
        ctc_pipe.ctc_decoder = decoder
        ctc_pipe.save_pretrained(tmp_path / "p")
    finally:
        ctc_pipe.ctc_decoder = None
    loaded = SpokenQAPipeline.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.ctc_decoder.lm.counts == lm.counts and loaded.ctc_decoder.length_bonus == -0.5
    assert torch.equal(loaded(audio=clips, task="transcribe", read="ctc_text").sequences, explicit)
    assert torch.equal(loaded(audio=clips, task="transcribe", read="ctc_text", ctc_decoder="greedy").sequences, greedy)
    ctc_pipe.save_pretrained(tmp_path / "p")  # saved over by a pipeline without one: greedy again
    assert SpokenQAPipeline.from_pretrained(tmp_path / "p").ctc_decoder is None


def test_the_pipelines_default_read_is_saved_and_checked(ctc_pipe, pipe, tmp_path):
    m = ctc_pipe.components
    cascade = SpokenQAPipeline(m["audio_adapter"], m["model"], m["tokenizer"], m["scheduler"],
                               gen_length=ctc_pipe.config.gen_length, read="ctc_text")
    cascade.save_pretrained(tmp_path / "c")
    loaded = SpokenQAPipeline.from_pretrained(tmp_path / "c")
    loaded.set_progress_bar_config(disable=True)
    clips = [tone(0.5, seed=21), tone(0.4, 300, seed=22)]
    want = ctc_pipe(audio=clips, read="ctc_text")
    got = loaded(audio=clips)
    assert loaded.config.read == "ctc_text" and torch.equal(got.sequences, want.sequences) and got.texts == want.texts
    assert torch.equal(loaded(audio=clips, read="prefix").sequences, ctc_pipe(audio=clips).sequences)
    with pytest.raises(ValueError, match="`read` .* must be one of"):
        SpokenQAPipeline(m["audio_adapter"], m["model"], m["tokenizer"], m["scheduler"], read="text")
    p = pipe.components
    with pytest.raises(ValueError, match="read='ctc_text' as the default needs .*semantic_pooling='ctc'"):
        SpokenQAPipeline(p["audio_adapter"], p["model"], p["tokenizer"], p["scheduler"], read="ctc_text")


# ---- the task's alignment loss (pipelines/tasks/spoken_qa.py; its training tests: test_spoken_qa_task.py)
def test_alignment_loss_against_direct_computation():
    from modalities.base import PrefixEmbeds
    from pipelines.tasks.spoken_qa import alignment_loss

    torch.manual_seed(0)
    model = DiffusionTransformer(vocab_size=20, hidden_size=8, num_layers=1, num_heads=2, mask_token_id=19)
    emb = torch.randn(2, 4, 8, requires_grad=True)
    mask = torch.tensor([[False, True, True, True], [False, False, True, True]])
    ids = [[3, 4, 5], [6, 7, 8]]  # row 1 has 2 slots for 3 tokens: left out
    loss = alignment_loss(model, PrefixEmbeds(emb, mask), ids)
    target = model.embed.weight[[3, 4, 5]]
    ref = ((emb[0, 1:] - target) ** 2).mean() / target.pow(2).mean()
    assert torch.allclose(loss, ref)
    loss.backward()
    assert emb.grad[1].abs().sum() == 0 and model.embed.weight.grad is None


def test_frequency_warp_against_a_plain_interpolation():
    from modalities.audio import warp_frequencies
    from pipelines.tasks.spoken_qa import Augment, spec_augment

    x = torch.randn(3, 5, 8, dtype=torch.float64)
    factors = torch.tensor([1.0, 1.1, 0.85], dtype=torch.float64)
    got = warp_frequencies(x, factors)
    for b, a in enumerate(factors.tolist()):  # bin k takes the value at k / a, the top bin beyond the edge
        source = np.minimum(np.arange(8) / a, 7)
        for t in range(5):
            want = np.interp(source, np.arange(8), x[b, t].numpy())
            assert np.allclose(got[b, t].numpy(), want)
    assert torch.equal(got[0], x[0])  # a factor of 1 leaves the clip as it was
    from modalities.audio import AudioBatch

    batch = AudioBatch(x.float(), torch.tensor([5, 4, 3]))
    plain = Augment(freq_mask=0, time_mask=0, freq_warp=0.0)
    assert spec_augment(batch, plain, torch.Generator().manual_seed(0)) is batch  # everything off: untouched
    warped = spec_augment(batch, Augment(freq_mask=0, time_mask=0, freq_warp=0.2), torch.Generator().manual_seed(0))
    draw = 1 + 0.2 * (2 * torch.rand(3, generator=torch.Generator().manual_seed(0)) - 1)
    assert torch.allclose(warped.values, warp_frequencies(x.float(), draw)) and torch.equal(warped.lengths, batch.lengths)


def test_spaced_text_reads_words_as_the_ctc_head_writes_them(ctc_pipe, tmp_path):
    from pipelines.spoken_qa import text_after_audio
    from pipelines.tasks.spoken_qa import _token_ids

    assert text_after_audio("answer:") == "answer:" and text_after_audio("answer:", spaced=True) == " answer:"
    assert text_after_audio("answer:", " what is two ", True) == " what is two answer:"
    tok = ctc_pipe.tokenizer
    spaced = SpokenQAPipeline(ctc_pipe.audio_adapter, ctc_pipe.model, tok, ctc_pipe.scheduler, gen_length=4,
                              transcribe_length=8, spaced_text=True)
    spaced.set_progress_bar_config(disable=True)
    clips = [tone(0.3, seed=1), tone(0.6, 500, seed=2)]
    instructions = [None, "table: anna red four."]
    # after the audio: the prompt as it is inside a sentence ("Ġanswer"), not at the start of a text
    out = spaced(audio=clips, instruction=instructions, read="prefix")
    prompt = [t for t in out.sequences[0, :-4].tolist() if t != tok.pad_token_id]
    assert prompt == tok(" answer:", add_special_tokens=False)["input_ids"] != tok("answer:")["input_ids"]
    # in the audio's place: the transcript, then the prompt, both spaced
    _, texts, _ = ctc_prompts(spaced, clips, instructions)
    prompts = [text_after_audio(spaced.prompt_text("answer", i), t, True) for t, i in zip(texts, instructions, strict=True)]
    pids, mask = spaced.encode_prompt(prompts)
    ref = spaced.scheduler.sampler(spaced.model, gen_length=4, block_length=4, commit="threshold", threshold=0.9,
                                   mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id,
                                   eos_early_stop=True)(spaced.model, pids, mask)
    assert torch.equal(spaced(audio=clips, instruction=instructions, read="ctc_text").sequences, ref.sequences)
    # the text stages' transcripts are then the CTC targets
    assert tok(text_after_audio("answer:", "what is two", True), add_special_tokens=False)["input_ids"][:3] == \
        _token_ids(tok, ["what is two"])[0]
    spaced.save_pretrained(tmp_path)
    assert SpokenQAPipeline.from_pretrained(tmp_path).config.spaced_text is True
    assert ctc_pipe.config.spaced_text is False  # the default: the form pipelines saved before it used


# ---- the prompt after the audio prefix: joined to it with no padding between (decoding and training) ----
INSTRUCTIONS = [None, "table: anna red four. bob blue two.", "table: cid green one."]


def test_join_prompt_against_rows_put_together_by_hand():
    torch.manual_seed(0)
    embed = torch.nn.Embedding(11, 4)
    prefix = torch.randn(3, 5, 4)
    pmask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]]).bool()
    ids = torch.tensor([[0, 0, 3, 4], [0, 5, 6, 7], [8, 9, 10, 1]])
    amask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]])
    embeds, mask = join_prompt(embed, prefix, pmask, ids, amask)
    assert embeds.shape == (3, 9, 4) and mask.dtype == torch.long
    for b in range(3):
        want = torch.cat([prefix[b][pmask[b]], embed(ids[b][amask[b].bool()])])
        n = len(want)
        assert torch.allclose(embeds[b, 9 - n :], want) and not embeds[b, : 9 - n].any()
        assert mask[b].tolist() == [0] * (9 - n) + [1] * n


def first_step_confidence(pipe, clips, instructions):
    seen = []

    def keep(p, step, block, kw):
        if step == 0:
            seen.append(kw["confidence"].clone())

    pipe(audio=clips, instruction=instructions, callback_on_step_end=keep,
         callback_on_step_end_tensor_inputs=["confidence"], cache="none")
    return seen[0]


def test_a_clip_reads_the_same_beside_longer_prompts(pipe):
    """A row's probabilities do not depend on how long the other rows' prompts are; with the prompt kept apart
    from the prefix (its padding between them) they do."""
    clips = [tone(0.5, seed=1), tone(1.2, 500, seed=2), tone(0.8, 420, seed=3)]
    batch = first_step_confidence(pipe, clips, INSTRUCTIONS)
    for i, clip in enumerate(clips):
        alone = first_step_confidence(pipe, [clip], [INSTRUCTIONS[i]])
        assert torch.allclose(batch[i], alone[0], atol=1e-5), i
    # the layout this replaces, [prefix | left-padded prompt], leaves a gap in the shorter prompts' rows
    def logits(rows, join):
        a = pipe.audio_adapter
        prefix, pmask = pipe.encode_prefix(a, a.preprocess([clips[i] for i in rows]))
        ids, amask = pipe.encode_prompt([pipe.prompt_text("answer", INSTRUCTIONS[i]) for i in rows])
        masks = torch.full((len(rows), 4), pipe.tokenizer.mask_token_id)
        if join:
            embeds, m = join_prompt(pipe.model.embed, prefix, pmask, ids, amask)
            return pipe.model(masks, prefix_embeds=embeds, attention_mask=torch.cat([m, torch.ones_like(masks)], 1),
                              prefix_length=embeds.shape[1]).logits
        return pipe.model(torch.cat([ids, masks], 1), prefix_embeds=prefix,
                          attention_mask=torch.cat([pmask, amask, torch.ones_like(masks)], 1),
                          prefix_length=prefix.shape[1] + ids.shape[1]).logits[:, -4:]

    alone = logits([0], join=True)[0]
    assert torch.allclose(logits([0, 1, 2], join=True)[0], alone, atol=1e-5)
    assert torch.allclose(logits([0], join=False)[0], alone, atol=1e-5)  # alone, no padding: the same layout
    assert (logits([0, 1, 2], join=False)[0] - alone).abs().max() > 1e-4  # the untrained model's logits are flat


def test_training_loss_uses_the_decoding_layout(pipe):
    """The loss of a batch whose rows have prompts of different lengths is the mean of the rows' losses alone
    (each row's loss is normalised by its own target length), so no row sees another's padding."""
    from pipelines.tasks.spoken_qa import sequence_loss

    tok, a = pipe.tokenizer, pipe.audio_adapter
    clips = [tone(0.5, seed=4), tone(1.0, 600, seed=5), tone(0.7, 380, seed=6)]
    targets = torch.tensor([[5, 6, tok.eos_token_id, tok.eos_token_id]] * 3)
    t = torch.tensor([0.3, 0.6, 0.9])
    g = torch.Generator().manual_seed(0)
    prompts = [pipe.prompt_text("answer", s) for s in INSTRUCTIONS]
    ids, amask = encode_prompts(tok, prompts)
    noise = torch.rand(3, ids.shape[1] + 4, generator=g)
    both = sequence_loss(pipe.model, a, a.preprocess(clips), ids, amask, targets, tok.mask_token_id, t=t,
                         noise=noise).sft.loss
    alone = []
    for i in range(3):
        ids_i, mask_i = encode_prompts(tok, [prompts[i]])
        noise_i = torch.cat([torch.zeros(1, ids_i.shape[1]), noise[i : i + 1, ids.shape[1] :]], 1)
        alone.append(sequence_loss(pipe.model, a, a.preprocess(clips[i]), ids_i, mask_i, targets[i : i + 1],
                                   tok.mask_token_id, t=t[i : i + 1], noise=noise_i).sft.loss)
    assert torch.allclose(both, torch.stack(alone).mean(), atol=1e-5)

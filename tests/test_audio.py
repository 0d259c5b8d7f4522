"""Audio adapter: preprocessing against torchaudio called directly, padding masks, both adapters, local
transformers encoders, save/load, bad inputs; and the spoken-question data and its metrics."""

import json

import numpy as np
import pytest
import torch
import torchaudio

from modalities.audio import (
    AcousticAdapter,
    AudioAdapter,
    AudioBatch,
    AudioError,
    AudioPreprocessor,
    PrefixEmbeds,
    SemanticAdapter,
    left_align,
    normalize_utterance,
)
from modalities.base import ModalityAdapter, available_adapters, create_adapter
from modalities.data import metrics, speech

SR = 16000


def tone(seconds=0.5, sr=SR, freq=440.0, channels=1, seed=0):
    """A sine plus a little noise: [T] or [C, T] float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    rows = [0.4 * np.sin(2 * np.pi * freq * (c + 1) * t) + 0.01 * rng.standard_normal(t.shape) for c in range(channels)]
    x = np.stack(rows).astype(np.float32)
    return x[0] if channels == 1 else x


def small_adapter(**kw):
    torch.manual_seed(0)
    cfg = dict(hidden_size=32, encoder_dim=32, encoder_layers=2, encoder_heads=2, n_mels=24, acoustic_queries=3,
               acoustic_heads=2, max_seconds=3.0)
    cfg.update(kw)
    return AudioAdapter(**cfg).eval()


@pytest.fixture(scope="module")
def adapter():
    return small_adapter()


# ---- preprocessing ---------------------------------------------------------------------------------------
def test_resample_and_downmix_match_torchaudio():
    pre = AudioPreprocessor(n_mels=24)
    x = tone(0.4, sr=22050, channels=2)
    ref = torchaudio.functional.resample(torch.from_numpy(x).mean(0), 22050, SR)
    got = pre.waveform((x, 22050))
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-6)
    # [T, C] is read as channels last; a dict like HF datasets' Audio works too
    assert torch.allclose(pre.waveform((x.T.copy(), 22050)), ref, atol=1e-6)
    assert torch.allclose(pre.waveform({"array": torch.from_numpy(x), "sampling_rate": 22050}), ref, atol=1e-6)


def test_log_mel_and_fbank_match_direct_computation():
    x = torch.from_numpy(tone(0.5))
    pre = AudioPreprocessor(n_mels=24)
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=SR, n_fft=400, win_length=400, hop_length=160, n_mels=24)
    raw = torch.log(mel(x) + 1e-6).T
    ref = (raw - raw.mean(0)) / torch.sqrt(raw.var(0, unbiased=False) + 1e-5)
    got = pre.one(x)
    assert got.shape == (1 + len(x) // 160, 24) == (pre.num_frames(len(x)), 24)
    assert torch.allclose(got, ref, atol=1e-5)
    # per-utterance statistics: every mel bin has zero mean and unit variance over the clip
    assert got.mean(0).abs().max() < 1e-4 and (got.std(0, unbiased=False) - 1).abs().max() < 1e-3
    fb = AudioPreprocessor(feature="fbank", n_mels=24)
    kaldi = torchaudio.compliance.kaldi.fbank(x[None] * 32768, num_mel_bins=24, sample_frequency=SR, dither=0.0,
                                              energy_floor=0.0)
    assert torch.allclose(fb.one(x), normalize_utterance(kaldi), atol=1e-4)
    assert fb.one(x).shape[0] == fb.num_frames(len(x))


def test_preprocessor_pickles_for_dataloader_workers(adapter):
    import pickle

    pre = adapter.preprocessor
    x = tone(0.4)
    ref = pre.one(x)  # fills the transform cache
    clone = pickle.loads(pickle.dumps(pre))
    assert clone == pre and torch.equal(clone.one(x), ref)


def test_integer_pcm_and_files(tmp_path):
    import soundfile as sf

    pre = AudioPreprocessor(n_mels=24)
    x = tone(0.3)
    pcm = np.round(x * 32767).astype(np.int16)
    assert torch.allclose(pre.waveform(pcm), torch.from_numpy(pcm.astype(np.float32) / 32768), atol=1e-7)
    u8 = np.round(x * 127 + 128).astype(np.uint8)
    assert torch.allclose(pre.waveform(u8), torch.from_numpy((u8.astype(np.float32) - 128) / 128), atol=1e-7)
    sf.write(tmp_path / "a.wav", pcm, SR, subtype="PCM_16")
    sf.write(tmp_path / "a.flac", pcm, SR, subtype="PCM_16")
    for name in ("a.wav", "a.flac"):
        assert torch.allclose(pre.waveform(str(tmp_path / name)), pre.waveform(pcm), atol=1e-6)
    batch = pre([str(tmp_path / "a.wav"), pcm, (x, SR)])
    assert isinstance(batch, AudioBatch) and len(batch) == 3 and batch.lengths.tolist() == [pre.num_frames(len(x))] * 3


@pytest.mark.parametrize(
    "raw, match",
    [
        (np.zeros(0, np.float32), "empty"),
        (np.zeros(8000, np.float32), "silent"),
        (np.full(100, 0.5, np.float32), "shorter than one analysis frame"),
        (tone(4.0), "longer than max_seconds"),
        (np.where(np.arange(8000) == 5, np.nan, 0.1).astype(np.float32), "NaN or infinite"),
        (np.where(np.arange(8000) == 5, np.inf, 0.1).astype(np.float32), "NaN or infinite"),
        (np.arange(8000, dtype=np.int64), "dtype"),
        (np.ones(8000, dtype=bool), "dtype"),
        (tone(0.5) * 32768, "integer PCM stored as float"),
        (np.zeros((2, 3, 8000), np.float32), "shape"),
        (np.zeros((100, 8000), np.float32), "no axis"),
        (np.array(["a", "b"]), "numeric"),
        (3, "int"),
        ({"foo": 1}, "without 'array'"),
    ],
)
def test_bad_inputs_raise_naming_the_input(raw, match):
    pre = AudioPreprocessor(n_mels=24, max_seconds=3.0)
    with pytest.raises(AudioError, match=match) as err:
        pre([tone(0.3), raw])  # the second clip is bad: the error names it
    assert isinstance(err.value, ValueError) and "audio 1" in str(err.value)


def test_bad_files(tmp_path):
    import soundfile as sf

    pre = AudioPreprocessor(max_seconds=1.0)
    (tmp_path / "junk.wav").write_bytes(b"RIFF not really a wav file")
    sf.write(tmp_path / "long.wav", tone(1.5), SR)
    cases = {str(tmp_path / "junk.wav"): "not a readable sound file", str(tmp_path / "missing.flac"): "does not exist",
             str(tmp_path): "folder", str(tmp_path / "long.wav"): "longer than max_seconds"}
    for path, match in cases.items():
        with pytest.raises(AudioError, match=match) as err:
            pre(path)
        assert repr(path) in str(err.value)
    with pytest.raises(AudioError, match="empty"):
        pre([])


# ---- the adapter -----------------------------------------------------------------------------------------
def test_padded_clip_matches_clip_alone(adapter):
    short, long = tone(0.37, seed=1), tone(1.2, seed=2)
    batch = adapter.preprocess([long, short])
    assert batch.values.shape[0] == 2 and batch.lengths[1] < batch.lengths[0]
    both = adapter(batch)
    alone = adapter(adapter.preprocess(short))
    n = adapter.num_prefix_slots(batch.lengths)
    assert both.mask.sum(1).tolist() == n.tolist() and alone.mask.sum().item() == n[1].item()
    # padding is on the left, and the short clip's valid slots equal the clip alone
    assert not both.mask[1, 0] and both.mask[1, -1] and bool(alone.mask.all())
    assert torch.allclose(both.embeds[1][both.mask[1]], alone.embeds[0], atol=1e-5)
    assert torch.allclose(both.embeds[0], adapter(adapter.preprocess(long)).embeds[0], atol=1e-5)
    # prefix length: ceil(frames / 4 / downsample) semantic slots + the acoustic queries
    frames = adapter.preprocessor.num_frames(len(short))
    assert n[1] == -(-(-(-frames // 2) // 2) // 2) + 3


def test_ctc_pooling_against_a_loop():
    torch.manual_seed(0)
    sem = SemanticAdapter(in_dim=6, hidden_size=8, pooling="ctc", vocab_size=3).eval()  # blank = 3
    labels = torch.tensor([[3, 0, 0, 3, 1, 1, 1, 0, 3, 0, 2, 2],      # runs: 0 | 1 | 0 | 0 | 2
                           [1, 1, 3, 3, 1, 2, 0, 0, 0, 0, 0, 0],      # 4 valid frames: 1 | 1 (after a blank)
                           [3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0, 0]])     # all blank -> one slot, the mean
    lengths = torch.tensor([12, 5, 5])
    mask = torch.arange(12)[None] < lengths[:, None]
    sem.ctc_logits = lambda h: torch.nn.functional.one_hot(labels, 4).float()
    h = torch.randn(3, 12, 6)
    out = sem(h, mask)
    for b in range(3):
        runs, prev = [], None
        for t in range(int(lengths[b])):
            lab = int(labels[b, t])
            if lab != prev and lab != 3:
                runs.append([t])
            elif lab == prev and lab != 3:
                runs[-1].append(t)
            prev = lab
        if not runs:
            runs = [list(range(int(lengths[b])))]
        ref = sem.net(torch.stack([h[b, r].mean(0) for r in runs]))
        assert out.mask[b].sum() == len(runs) and torch.allclose(out.embeds[b, : len(runs)], ref, atol=1e-6)
    assert out.mask.sum(1).tolist() == [5, 2, 1]
    with pytest.raises(ValueError, match="vocab_size"):
        SemanticAdapter(in_dim=6, hidden_size=8, pooling="ctc")


def test_ctc_pooled_adapter_padding_and_save(tmp_path):
    a = small_adapter(semantic_pooling="ctc", ctc_vocab_size=7)
    short, long = tone(0.4, seed=1), tone(1.0, seed=2)
    both = a(a.preprocess([long, short]))
    alone = a(a.preprocess(short))
    assert torch.allclose(both.embeds[1][both.mask[1]], alone.embeds[0][alone.mask[0]], atol=1e-5)
    a.save_pretrained(tmp_path)
    assert torch.equal(AudioAdapter.from_pretrained(tmp_path).eval()(a.preprocess(short)).embeds, alone.embeds)


def test_left_align_against_a_loop():
    torch.manual_seed(0)
    emb = torch.randn(3, 6, 4)
    mask = torch.tensor([[1, 1, 0, 0, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    out = left_align(PrefixEmbeds(emb, mask))
    for b in range(3):
        valid = emb[b][mask[b]]
        n = len(valid)
        assert torch.equal(out.embeds[b, 6 - n:], valid) and not out.embeds[b, : 6 - n].any()
        assert out.mask[b].tolist() == [False] * (6 - n) + [True] * n


def test_parts_layer_weights_and_freezing(adapter):
    a = small_adapter(freeze_encoder=True, prefix_parts=["semantic"]).train()
    batch = a.preprocess([tone(0.5), tone(0.8)])
    sem = a(batch)
    assert sem.length == a.num_prefix_slots(batch.lengths).max()
    out = a(batch, parts=["semantic", "acoustic"])
    assert out.length == sem.length + 3
    out.embeds[out.mask].square().mean().backward()
    assert all(p.grad is None for p in a.speech_encoder.parameters())
    assert a.acoustic.layer_weights.grad is not None and a.acoustic.layer_weights.grad.abs().sum() > 0
    assert torch.allclose(a.acoustic.weights.sum(), torch.tensor(1.0))
    assert a.semantic.net[1].weight.grad is not None
    with pytest.raises(ValueError, match="prefix_parts"):
        small_adapter(prefix_parts=["visual"])


def test_save_load_whole_and_each_part(adapter, tmp_path):
    batch = adapter.preprocess([tone(0.6), tone(0.4, seed=3)])
    ref = adapter(batch)
    adapter.save_pretrained(tmp_path / "all")
    for loaded in (AudioAdapter.from_pretrained(tmp_path / "all"), ModalityAdapter.load(tmp_path / "all")):
        assert isinstance(loaded, AudioAdapter)
        assert torch.equal(loaded.eval()(batch).embeds, ref.embeds)
    # the two adapters save and load on their own
    adapter.semantic.save_pretrained(tmp_path / "sem")
    adapter.acoustic.save_pretrained(tmp_path / "aco")
    assert json.loads((tmp_path / "sem" / "config.json").read_text())["_class_name"] == "SemanticAdapter"
    sem = SemanticAdapter.from_pretrained(tmp_path / "sem")
    aco = AcousticAdapter.from_pretrained(tmp_path / "aco")
    states, mask = adapter.encode(batch)
    assert torch.equal(sem(states, mask).embeds, adapter.semantic(states, mask).embeds)
    assert torch.equal(aco(states, mask).embeds, adapter.acoustic(states, mask).embeds)
    fresh = small_adapter()
    fresh.speech_encoder.load_state_dict(adapter.speech_encoder.state_dict())
    fresh.load_parts(semantic=tmp_path / "sem", acoustic=tmp_path / "aco")
    assert torch.equal(fresh(batch).embeds, ref.embeds)
    with pytest.raises(ValueError, match="does not fit"):
        small_adapter(hidden_size=48).load_parts(semantic=tmp_path / "sem")


def test_registry():
    assert "audio" in available_adapters()
    a = create_adapter({"type": "audio", "hidden_size": 16, "encoder_dim": 16, "encoder_layers": 1, "n_mels": 16,
                        "encoder_heads": 2, "acoustic_heads": 2, "acoustic_queries": 2})
    assert isinstance(a, AudioAdapter) and a(a.preprocess(tone(0.3))).embeds.shape[-1] == 16
    with pytest.raises(ValueError, match="encoder"):
        AudioAdapter(hidden_size=16, encoder="conformer")
    with pytest.raises(ValueError, match="local"):
        AudioAdapter(hidden_size=16, encoder="hf", encoder_path="/nonexistent/whisper")


# ---- transformers encoders from a local folder ----------------------------------------------------------
def test_whisper_encoder_from_local_folder(tmp_path):
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(0)
    cfg = WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
                        max_source_positions=50, vocab_size=64, max_target_positions=8, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    whisper = WhisperModel(cfg).eval()
    whisper.save_pretrained(tmp_path / "whisper")
    a = AudioAdapter(hidden_size=24, encoder="hf", encoder_path=str(tmp_path / "whisper"), acoustic_queries=2,
                     acoustic_heads=2).eval()
    assert a.preprocessor.feature == "whisper" and a.preprocessor.max_seconds == 1.0
    x = tone(0.7)
    batch = a.preprocess([x, x[:3000]])
    # features equal transformers' own Whisper feature extractor
    fe = WhisperFeatureExtractor(feature_size=16, chunk_length=1)
    ref_feats = fe(x, sampling_rate=SR, return_tensors="pt").input_features
    assert torch.allclose(batch.values[0], ref_feats[0].T, atol=1e-5)
    # encoder output equals the Whisper encoder called directly
    states, mask = a.encode(batch)
    with torch.no_grad():
        direct = whisper.encoder(ref_feats).last_hidden_state
    assert torch.allclose(states[-1][0], direct[0], atol=1e-5) and len(states) == 3
    assert mask.sum(1).tolist() == [(70 - 1) // 2 + 1, (19 - 1) // 2 + 1]
    # the saved adapter carries the encoder: it loads without the folder
    a.save_pretrained(tmp_path / "adapter")
    b = AudioAdapter.from_pretrained(tmp_path / "adapter").eval()
    assert torch.equal(b(batch).embeds, a(batch).embeds)
    with pytest.raises(AudioError, match="longer than max_seconds"):
        a.preprocess(tone(1.5))


def test_wav2vec2_encoder_padding_and_direct_call(tmp_path):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=2, feat_extract_norm="layer", do_stable_layer_norm=True,
                         vocab_size=10)
    w2v = Wav2Vec2Model(cfg).eval()
    w2v.save_pretrained(tmp_path / "w2v")
    a = AudioAdapter(hidden_size=24, encoder="hf", encoder_path=str(tmp_path / "w2v"), acoustic_queries=2,
                     acoustic_heads=2, max_seconds=2.0).eval()
    assert a.preprocessor.feature == "waveform"
    x = tone(0.6)
    feats = a.preprocessor.one(x)
    assert abs(float(feats.mean())) < 1e-5 and abs(float(feats.std(unbiased=False)) - 1) < 1e-3
    states, mask = a.encode(a.preprocess(x))
    with torch.no_grad():
        direct = w2v(feats[None]).last_hidden_state
    assert torch.allclose(states[-1], direct, atol=1e-5)
    both = a(a.preprocess([tone(1.0, seed=4), x]))
    alone = a(a.preprocess(x))
    assert torch.allclose(both.embeds[1][both.mask[1]], alone.embeds[0], atol=1e-4)


# ---- data and metrics ------------------------------------------------------------------------------------
def test_examples_are_deterministic_and_voices_held_out():
    a, b = speech.make_split("train", 60), speech.make_split("train", 60)
    assert a == b and speech.make_split("train", 60, seed=1) != a
    assert {e.kind for e in a} == set(speech.KINDS)
    assert {e.voice for e in a} <= set(speech.TRAIN_VOICES)
    held = speech.make_split("test_heldout", 30)
    assert {e.voice for e in held} <= set(speech.HELD_OUT_VOICES)
    assert not set(speech.TRAIN_VOICES) & set(speech.HELD_OUT_VOICES)
    for e in a:  # answers are verifiable from the question (and the instruction)
        words = e.transcript.split()
        if e.kind == "arithmetic":
            x, y = speech.NUMBERS.index(words[2]), speech.NUMBERS.index(words[4])
            r = {"plus": x + y, "minus": x - y, "times": x * y}[words[3]]
            assert e.answer == speech.NUMBERS[r]
        elif e.kind == "counting":
            assert e.answer == speech.NUMBERS[words[4:].count(words[2][:-1])]
        else:
            rows = {r.split()[0]: r.split()[1:] for r in e.instruction[len("table: "):].split(".") if r.strip()}
            assert e.answer == rows[words[-1]][0 if "colour" in words else 1]


def test_wide_voice_set_changes_only_voices_and_keeps_held_out_voices_unheard():
    six, wide = speech.make_split("train", 200), speech.make_split("train", 200, voices="wide")
    # the same questions, answers, rates, pitches and noise: only the voice is drawn from another set
    strip = [{**vars(e), "voice": None} for e in six]
    assert strip == [{**vars(e), "voice": None} for e in wide]
    assert {e.voice for e in wide} <= set(speech.VOICE_SETS["wide"]) and len({e.voice for e in wide}) > 40
    held_accents = {v.split("+")[0] for v in speech.HELD_OUT_VOICES}
    held_variants = {v.split("+")[1] for v in speech.HELD_OUT_VOICES}
    for v in speech.VOICE_SETS["wide"]:
        accent, _, variant = v.partition("+")
        assert accent not in held_accents and variant not in held_variants, v
    # the held-out split is the same whatever the training voice set
    assert speech.make_split("test_heldout", 30, voices="wide") == speech.make_split("test_heldout", 30)
    assert speech.VOICE_SETS["six"] == speech.TRAIN_VOICES
    # the dev split: trained accents, held-out variants; no voice of any training set or of the test split
    dev = speech.make_split("dev_unseen", 60, voices="wide")
    assert {e.voice for e in dev} == set(speech.DEV_VOICES) and dev == speech.make_split("dev_unseen", 60)
    trained = set(speech.VOICE_SETS["wide"]) | set(speech.TRAIN_VOICES)
    wide_accents = {v.partition("+")[0] for v in speech.VOICE_SETS["wide"]}
    for v in speech.DEV_VOICES:
        accent, _, variant = v.partition("+")
        assert v not in trained and v not in speech.HELD_OUT_VOICES, v
        assert accent in wide_accents and variant in held_variants and accent not in held_accents, v
    # the accent dev split: held-out accents, variants the wide set trains with; no trained or test voice
    dev = speech.make_split("dev_accents", 60, voices="wide")
    assert {e.voice for e in dev} == set(speech.DEV_ACCENT_VOICES) and dev == speech.make_split("dev_accents", 60)
    wide_variants = {v.partition("+")[2] for v in speech.VOICE_SETS["wide"]}
    for v in speech.DEV_ACCENT_VOICES:
        accent, _, variant = v.partition("+")
        assert v not in trained and v not in speech.HELD_OUT_VOICES, v
        assert accent in held_accents and variant in wide_variants and variant not in held_variants, v
    with pytest.raises(ValueError, match="voices must be one of"):
        speech.make_example("train", 0, voices="many")


@pytest.mark.parametrize("name, share", [("wide_foreign", 0.25), ("wide_foreign_half", 0.5)])
def test_foreign_voice_sets_add_other_languages_to_the_wide_set_and_no_held_out_voice(name, share):
    wide, foreign = speech.make_split("train", 400, voices="wide"), speech.make_split("train", 400, voices=name)
    assert [{**vars(e), "voice": None} for e in wide] == [{**vars(e), "voice": None} for e in foreign]
    pool = speech.VOICE_SETS[name]
    assert set(speech.VOICE_SETS["wide"]) < set(pool) and len(set(pool)) == len(pool)
    assert sum(not v.startswith("en") for v in pool) / len(pool) == share
    assert abs(sum(not e.voice.startswith("en") for e in foreign) / len(foreign) - share) < 0.1
    held_variants = {v.partition("+")[2] for v in speech.HELD_OUT_VOICES}
    for v in pool:  # no held-out variant, no English accent beyond the wide set's, no Celtic language
        language, _, variant = v.partition("+")
        assert variant not in held_variants and language not in ("cy", "ga", "gd"), v
        assert not language.startswith("en") or v in speech.VOICE_SETS["wide"], v
    assert speech.make_split("test_heldout", 30, voices=name) == speech.make_split("test_heldout", 30)


@pytest.mark.skipif(not speech.espeak_available(), reason="espeak-ng not installed")
def test_every_foreign_voice_speaks_the_english_text():
    for v in sorted({v for v in speech.VOICE_SETS["wide_foreign_half"] if not v.startswith("en")}):
        x, sr = speech.synthesize("what is seven plus five", v, 160, 50)
        assert 0.8 < len(x) / sr < 4.0 and float(abs(x).max()) > 0.05, v


def test_noise_snr():
    x = tone(1.0)
    y = speech.add_noise(x, 20.0, seed=0)
    snr = 10 * np.log10(np.mean(x.astype(np.float64) ** 2) / np.mean((y - x).astype(np.float64) ** 2))
    assert abs(snr - 20.0) < 0.5 and np.array_equal(y, speech.add_noise(x, 20.0, seed=0))


def test_word_error_rate_and_accuracy():
    refs = ["what is one plus two", "how many cats", "a b c d"]
    hyps = ["what is one plus three", "how many many cats", "a c d"]
    assert metrics.word_error_rate(refs, hyps) == pytest.approx((1 + 1 + 1) / 12)
    jiwer = pytest.importorskip("jiwer")
    assert metrics.word_error_rate(refs, hyps) == pytest.approx(jiwer.wer(refs, hyps))
    assert metrics.answer_accuracy(["Seven", "two"], ["seven.", "three"]) == 0.5


@pytest.mark.skipif(not speech.espeak_available(), reason="espeak-ng is not installed")
def test_espeak_clip_through_the_adapter(adapter, tmp_path):
    index = speech.build_split(tmp_path, "test_heldout", 2, progress=False)
    rows = speech.read_split(index)
    assert len(rows) == 2 and rows[0]["voice"] in speech.HELD_OUT_VOICES
    again = speech.build_split(tmp_path / "again", "test_heldout", 2, progress=False)
    assert (tmp_path / rows[0]["path"]).read_bytes() == (again.parent / "test_heldout" / "000000.flac").read_bytes()
    clip = (tmp_path / rows[0]["path"]).read_bytes()
    with pytest.raises(FileExistsError, match="would overwrite"):  # another seed never overwrites a build
        speech.build_split(tmp_path, "test_heldout", 2, seed=1, progress=False)
    assert (tmp_path / rows[0]["path"]).read_bytes() == clip and speech.read_split(index) == rows
    batch = adapter.preprocess([r["path"] for r in rows])
    assert adapter(batch).embeds.shape[0] == 2

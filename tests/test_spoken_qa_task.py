"""The spoken-QA task on the one trainer: what each stage trains, config errors, exact resume, and stage 2
starting from a stage-1 pipeline (tiny models on a few generated clips; espeak-ng is not needed)."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file
from trainer_checks import check_exact_resume

import pipelines.tasks  # noqa: F401 - registers the built-in tasks
import train as train_cli
from latent.training.checkpoint import latest_checkpoint
from latent.training.config import ConfigError, load_config
from latent.training.trainer import Trainer, train
from pipelines.spoken_qa import SpokenQAPipeline

REPO = Path(__file__).resolve().parents[1]
SR = 16000
WORDS = ["one", "two", "three", "four"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Eight 'utterances' (a pitch per word, a little noise) with transcripts, answers and instructions."""
    d = tmp_path_factory.mktemp("clips")
    rows = []
    for i in range(8):
        rng = np.random.default_rng(i)
        t = np.arange(int((0.3 + 0.05 * i) * SR)) / SR
        wave = 0.3 * np.sin(2 * np.pi * (200 + 100 * (i % 4)) * t) + 0.01 * rng.standard_normal(t.shape)
        sf.write(d / f"{i}.wav", wave.astype(np.float32), SR)
        rows.append({"path": f"{i}.wav", "transcript": f"say {WORDS[i % 4]}", "answer": WORDS[i % 4],
                     "instruction": "table: a b." if i % 2 else "", "kind": "tone"})
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return d / "train.jsonl"


def tiny(index, out=None, steps=(1, 0, 1, 1, 1)):
    """Overrides that make configs/audio_spoken_qa.yaml (and audio_asr.yaml: the first four stages) tiny."""
    over = [
        f"data.train={index}", "data.kind=jsonl", "tokenizer.vocab_size=300",
        "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.max_position_embeddings=64",
        "adapter.encoder_dim=16", "adapter.encoder_layers=1", "adapter.encoder_heads=2", "adapter.n_mels=16",
        "adapter.acoustic_queries=2", "adapter.acoustic_heads=2", "adapter.max_seconds=2.0",
        "prompts.answer_length=2", "prompts.transcribe_length=4", "optim.warmup_steps=1", "trainer.batch_size=4",
        "trainer.progress=false", "trainer.tensorboard=false", "trainer.plot=false", "trainer.save_every=0",
        "stages.0.batch_size=4", "stages.1.batch_size=4",
    ]
    over += [f"stages.{i}.steps={n}" for i, n in enumerate(steps)]
    return over + ([f"run.output_dir={out}"] if out is not None else [])


def same(a, b) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def test_stages_train_only_their_parts_and_the_export_is_the_trained_model(clips, tmp_path):
    over = tiny(clips, tmp_path / "a") + ["stages.3.align_weight=1.0", "stages.4.train=[semantic,acoustic]",
                                         "stages.4.parts=[semantic,acoustic]"]  # DIFFA's dual adapters
    tr = Trainer(load_config(REPO / "configs/audio_spoken_qa.yaml", over))
    assert "ctc_head" not in dict(tr.modules.named_children())  # CTC pooling: the semantic adapter owns the head
    start = tr.modules.model.state_dict()
    start = {k: v.clone() for k, v in start.items()}
    seen, orig = {}, tr._begin_stage

    def spy(i, step):
        orig(i, step)
        trained = {n for n, p in tr.modules.named_parameters() if p.requires_grad}
        in_opt = {id(p) for g in tr.inner_opt.param_groups for p in g["params"]}
        assert in_opt == {id(p) for n, p in tr.modules.named_parameters() if n in trained}
        seen[tr.stages[i].name] = trained

    tr._begin_stage = spy
    res = tr.fit()
    assert res.completed and res.step == 4 and set(res.stage_dirs) == {"text", "encoder", "asr", "sqa"}
    assert list(seen) == ["text", "encoder", "asr", "sqa"]  # text2 has no steps: neither run nor exported
    assert all(n.startswith("model.") for n in seen["text"])
    assert seen["encoder"] and all(n.startswith(("adapter.speech_encoder.", "adapter.semantic.ctc."))
                                   for n in seen["encoder"])
    assert any(n.startswith("adapter.semantic.ctc.") for n in seen["encoder"])
    assert all(n.startswith("adapter.semantic.") for n in seen["asr"])
    assert all(n.startswith(("adapter.semantic.", "adapter.acoustic.")) for n in seen["sqa"])
    assert not (tmp_path / "a" / "pipelines" / "text2").exists()

    text, enc, asr, sqa = (SpokenQAPipeline.from_pretrained(res.stage_dirs[k]) for k in ("text", "encoder", "asr", "sqa"))
    assert asr.audio_adapter.config.prefix_parts == ["semantic"]
    assert sqa.audio_adapter.config.prefix_parts == ["semantic", "acoustic"]
    assert not all(torch.equal(v, text.model.state_dict()[k]) for k, v in start.items())  # the text stage trained it
    assert same(text.model, asr.model) and same(asr.model, sqa.model)  # then it stays frozen
    e = [p.audio_adapter.speech_encoder for p in (text, enc, asr, sqa)]
    assert not same(e[0], e[1]) and same(e[1], e[2]) and same(e[2], e[3])  # trained by CTC only, then frozen
    assert same(enc.audio_adapter.semantic.net, text.audio_adapter.semantic.net)  # its CTC head trains with it
    assert not same(enc.audio_adapter.semantic.ctc, text.audio_adapter.semantic.ctc)
    assert not same(enc.audio_adapter.semantic, asr.audio_adapter.semantic)
    assert same(text.audio_adapter.acoustic, asr.audio_adapter.acoustic)  # not trained in stage 1
    assert not same(asr.audio_adapter.acoustic, sqa.audio_adapter.acoustic)
    rows = (tmp_path / "a" / "train.csv").read_text().splitlines()
    assert "align_loss" in rows[0] and "ctc_loss" in rows[0]

    # the final export holds the trained modules and decodes as they do
    final = SpokenQAPipeline.from_pretrained(res.pipeline_dir)
    assert same(final.audio_adapter, tr.modules.adapter) and same(final.model, tr.modules.model)
    live = SpokenQAPipeline(tr.modules.adapter, tr.modules.model, final.tokenizer, final.scheduler,
                            gen_length=2, transcribe_length=4, spaced_text=final.config.spaced_text)
    clip = str(clips.parent / "3.wav")
    for p in (final, live):
        p.set_progress_bar_config(disable=True)
    live.ctc_decoder = final.ctc_decoder
    assert final.config.read == "ctc_text" and final.ctc_decoder.beam_width == 16  # the recipe's cascade
    for task, read in itertools.product(("answer", "transcribe"), ("prefix", "ctc_text")):
        a = final(audio=clip, instruction="table: a b.", task=task, read=read)
        b = live(audio=clip, instruction="table: a b.", task=task, read=read)
        assert torch.equal(a.sequences, b.sequences) and a.texts == b.texts and a.errors == [None]


def test_the_export_carries_a_beam_search_with_an_lm_of_the_training_transcripts(clips, tmp_path):
    from modalities.ctc_decoding import TokenNGram
    from pipelines.tasks.spoken_qa import _token_ids

    over = tiny(clips, tmp_path / "a", steps=(0, 0, 1, 0, 0)) + [
        "ctc_decoder.beam_width=4", "ctc_decoder.lm_order=2", "ctc_decoder.lm_weight=0.5",
        "ctc_decoder.length_bonus=0.25", "ctc_decoder.warps=[0.9,1.1]", "ctc_decoder.read=ctc_text"]
    res = train(load_config(REPO / "configs/audio_spoken_qa.yaml", over))
    pipe = SpokenQAPipeline.from_pretrained(res.pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    dec = pipe.ctc_decoder
    assert (dec.beam_width, dec.lm_weight, dec.length_bonus, dec.warps) == (4, 0.5, 0.25, (0.9, 1.1))
    transcripts = [json.loads(line)["transcript"] for line in clips.read_text().splitlines()]
    lm = TokenNGram.fit(_token_ids(pipe.tokenizer, transcripts), vocab_size=len(pipe.tokenizer), order=2)
    assert dec.lm.order == 2 and dec.lm.counts == lm.counts
    clip = [str(clips.parent / f"{i}.wav") for i in range(3)]
    out = pipe(audio=clip, task="transcribe")  # the cascade is this pipeline's default reading
    assert out.texts == pipe(audio=clip, task="transcribe", read="ctc_text", ctc_decoder=dec).texts
    assert out.nfe == 0 and pipe(audio=clip, task="transcribe", read="prefix").nfe > 0
    # beam_width 0 exports none: greedy
    over = tiny(clips, tmp_path / "b", steps=(0, 0, 1, 0, 0)) + ["ctc_decoder.beam_width=0", "ctc_decoder.read=prefix"]
    plain = SpokenQAPipeline.from_pretrained(train(load_config(REPO / "configs/audio_spoken_qa.yaml", over)).pipeline_dir)
    assert plain.ctc_decoder is None and plain.config.read == "prefix"


def test_config_errors_name_the_field(capsys):
    recipe = REPO / "configs/audio_spoken_qa.yaml"
    bad = {
        "trainer.epochs=3": "trainer.epochs",
        "stages.0.ctc_wieght=1": "stages.0.ctc_wieght -- did you mean ctc_weight",
        "adapter.encoder_dimm=8": "did you mean adapter.encoder_dim",
        "stages.1.train=[decoder]": r"stages.1.train \(text2\): 'decoder' is neither an alias",
        "stages.2.train=[semantic]": r"stages.2.train \(encoder\): CTC .* add 'encoder'",
        "stages.1.tasks={translate: 1}": r"stages.1.tasks \(text2\) must map",
        "stages.3.parts=[lexical]": r"stages.3.parts \(asr\)",
        "stages.3.ctc_weight=-1": r"stages.3.ctc_weight \(asr\) must be >= 0",
        "data.kind=mp3": "data.kind='mp3'",
        "prompts.answer_length=1": "prompts.answer_length must be >= 2",
        "augment.freq_warp=1.5": r"augment.freq_warp must be in \[0, 1\)",
        "ctc_decoder.beam_width=-1": "ctc_decoder.beam_width must be >= 0",
        "ctc_decoder.lm_weight=-0.5": "ctc_decoder.lm_weight must be >= 0",
        "ctc_decoder.read=text": "ctc_decoder.read must be 'prefix', 'aligned_prefix' or 'ctc_text'",
        "ctc_decoder.warps=[0.9,3]": r"ctc_decoder.warps are frequency stretch factors in \(0, 2\)",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config(recipe, [override])
    with pytest.raises(ConfigError, match=r"stages.4.align_weight \(sqa\) needs stages.4.parts: \[semantic\]"):
        load_config(recipe, ["stages.4.align_weight=1.0", "stages.4.parts=[semantic,acoustic]"])
    with pytest.raises(ConfigError, match="data.kind=jsonl needs data.train"):
        load_config(recipe, ["data.kind=jsonl"])
    # a stage with CTC may name the encoder by a glob too
    assert load_config(recipe, ["stages.2.train=[adapter.*]"]).stages[2]["train"] == ["adapter.*"]
    with pytest.raises(SystemExit) as e:
        train_cli.main([str(recipe), "stages.1.train=[decoder]"])
    assert e.value.code == 2 and "stages.1.train" in capsys.readouterr().err
    for name in ("audio_spoken_qa", "audio_asr", "audio_sqa"):
        train_cli.main([str(REPO / "configs" / f"{name}.yaml"), "--print-config"])
        out = capsys.readouterr().out
        assert "task: spoken_qa" in out and f"name: {name}" in out


def test_the_split_recipes_keep_the_combined_recipes_settings():
    """configs/audio_asr.yaml is the first four stages of configs/audio_spoken_qa.yaml and audio_sqa.yaml its
    last, with the same data, prompts, optimiser, trainer and decoders: running the two gives the same recipe."""
    full, asr, sqa = (load_config(REPO / "configs" / f"{n}.yaml") for n in ("audio_spoken_qa", "audio_asr", "audio_sqa"))
    assert asr.stages == full.stages[:4] and sqa.stages == full.stages[4:]
    for cfg in (full, asr, sqa):
        del cfg.trainer["max_steps"]  # the sum of the stages' steps
    for section in full:
        if section not in ("run", "stages"):
            assert asr[section] == full[section], section
    for section in ("data", "prompts", "augment", "optim", "trainer", "decoding", "ctc_decoder"):
        assert sqa[section] == full[section], section
    assert sqa.model.init_from == sqa.adapter.init_from == f"{asr.run.output_dir}/pipeline"


def test_exact_resume_across_a_stage_boundary(clips, tmp_path):
    """4 steps: text, then two ASR steps with a CTC head of its own (killed while checkpoint 3 is written,
    resumed mid-stage from checkpoint 2) and one SQA step after the stage boundary."""
    over = tiny(clips, steps=(1, 0, 0, 2, 1)) + ["adapter.semantic_pooling=stack", "ctc_decoder.read=prefix",
                                                 "adapter.semantic_token_embeddings=false",
                                                 "stages.3.ctc_weight=0.5",
                                                 "stages.3.train=[encoder,semantic]"]
    losses = check_exact_resume(REPO / "configs/audio_spoken_qa.yaml", over, tmp_path, n=2)
    assert all(np.isfinite(v) for _, v in losses)
    killed = tmp_path / "killed"
    weights = load_file(str(latest_checkpoint(killed / "checkpoints") / "modules.safetensors"))
    assert any(k.startswith("ctc_head.") for k in weights)  # checkpointed...
    pipe = SpokenQAPipeline.from_pretrained(killed / "pipeline")  # ...but not exported
    assert not hasattr(pipe.audio_adapter.semantic, "ctc") and "ctc_head" not in pipe.components
    assert (killed / "pipelines" / "asr" / "model_index.json").is_file()


def test_stage2_recipe_starts_from_a_stage1_pipeline(clips, tmp_path):
    joint = ["stages.3.ctc_weight=0.5", "stages.3.train=[encoder,semantic]"]  # CTC as an auxiliary loss
    stage1 = train(load_config(REPO / "configs/audio_asr.yaml", tiny(clips, tmp_path / "asr", (1, 0, 1, 1)) + joint))
    assert set(stage1.stage_dirs) == {"text", "encoder", "asr"} and all(np.isfinite(stage1.losses))
    asr = SpokenQAPipeline.from_pretrained(stage1.pipeline_dir)
    over2 = [f"data.train={clips}", "data.kind=jsonl", f"run.output_dir={tmp_path / 'sqa'}",
             f"model.init_from={stage1.pipeline_dir}", f"adapter.init_from={stage1.pipeline_dir}",
             "prompts.answer_length=2", "prompts.transcribe_length=4", "optim.warmup_steps=1", "trainer.batch_size=4",
             "trainer.progress=false", "trainer.tensorboard=false", "trainer.plot=false", "stages.0.steps=2"]
    stage2 = train(load_config(REPO / "configs/audio_sqa.yaml", over2))
    assert stage2.completed and not stage2.stage_dirs  # one stage: only <run>/pipeline
    sqa = SpokenQAPipeline.from_pretrained(stage2.pipeline_dir)
    assert sqa.tokenizer.get_vocab() == asr.tokenizer.get_vocab()
    assert same(asr.model, sqa.model) and same(asr.audio_adapter.speech_encoder, sqa.audio_adapter.speech_encoder)
    assert same(asr.audio_adapter.acoustic, sqa.audio_adapter.acoustic)  # the recipe trains the semantic side only
    assert not same(asr.audio_adapter.semantic.net, sqa.audio_adapter.semantic.net)

    # a stage's own init_from: a fresh run whose only (ASR) stage starts from the stage-1 pipeline
    over3 = tiny(clips, tmp_path / "c", (0, 0, 0, 1)) + [f"tokenizer.path={stage1.pipeline_dir}/tokenizer",
                                                          f"stages.3.init_from={stage1.pipeline_dir}"]
    tr = Trainer(load_config(REPO / "configs/audio_asr.yaml", over3))
    assert not same(tr.modules.model, asr.model)  # a fresh backbone until the stage begins
    res = tr.fit()
    c = SpokenQAPipeline.from_pretrained(res.pipeline_dir)
    assert same(c.model, asr.model) and same(c.audio_adapter.speech_encoder, asr.audio_adapter.speech_encoder)
    assert not same(c.audio_adapter.semantic, asr.audio_adapter.semantic)  # trained on from there
    # ... or from a run folder (its newest checkpoint)
    tr.task.init_from(tr.modules, str(tmp_path / "asr"), tr.stages[3])
    saved = load_file(str(latest_checkpoint(tmp_path / "asr" / "checkpoints") / "modules.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in tr.modules.state_dict().items())


def test_spaced_text_and_token_slots_reach_the_export(clips, tmp_path):
    """With prompts.spaced the text stages read each transcript as the CTC targets write it, and the exported
    pipeline reads text after the audio that way; token slots export the backbone's trained embeddings."""
    from pipelines.tasks.spoken_qa import Prompts, _token_ids, make_examples

    over = tiny(clips, tmp_path / "a", steps=(2, 0, 1, 1, 0)) + ["prompts.spaced=true",
                                                                  "adapter.semantic_token_embeddings=true"]
    tr = Trainer(load_config(REPO / "configs/audio_spoken_qa.yaml", over))
    res = tr.fit()
    pipe = SpokenQAPipeline.from_pretrained(res.pipeline_dir)
    tok, sem = pipe.tokenizer, pipe.audio_adapter.semantic
    assert pipe.config.spaced_text is True and sem.config.token_embeddings
    assert torch.equal(sem.token_embedding, pipe.model.embed.weight[: sem.config.vocab_size])
    rows = [{"transcript": "say two", "instruction": "table: a b.", "answer": "two"}]
    for spaced in (True, False):
        prompts, _, _ = make_examples("text_answer", rows, Prompts(spaced=spaced))
        ids = tok(prompts, add_special_tokens=False)["input_ids"][0]
        assert (ids[:2] == _token_ids(tok, ["say two"])[0]) is spaced
        audio_prompt, _, _ = make_examples("answer", rows, Prompts(spaced=spaced))
        assert audio_prompt[0].startswith(" ") is spaced


def test_a_data_folder_built_for_other_settings_is_a_config_error(monkeypatch):
    from modalities.data import speech
    from pipelines.tasks.spoken_qa import load_rows

    def built_elsewhere(*args, **kwargs):
        raise FileExistsError("data/x already holds a complete 'train' split built with {\"seed\": 0}")

    monkeypatch.setattr(speech, "build_dataset", built_elsewhere)
    cfg = load_config(REPO / "configs/audio_spoken_qa.yaml", ["data.dir=data/x", "run.seed=1"])
    with pytest.raises(ConfigError, match=r"data.dir='data/x' was built for other settings .*run.seed"):
        load_rows(cfg, "train", progress=False)

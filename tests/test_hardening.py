"""Inputs, settings, folders and files that cannot give a right answer are refused, never turned into one.

NaN settings and inputs, counts that are not ints, steps beyond gen_length and mask tokens in prompts
are refused at the pipeline boundary; decoded text holds whole characters only; an export stopped
halfway leaves the old folder loadable and no half folder that loads; pickled weights are never
opened; bad config values fail when the config is read, naming the field; weights that do not fit the
config are refused, not half-loaded.
"""

import json
import pickle
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch
from test_captioning import GEN, build

from latent import DiffusionTransformer
from latent.config_checks import ConfigError
from latent.folders import atomic_folder
from latent.loading import UnsafeWeightsError, WeightsMismatchError
from latent.scheduler import MaskedDiffusionScheduler
from modalities.base import ModalityAdapter
from modalities.data.scenes import make_split, render_scene
from modalities.vision import VisionAdapter
from pipelines.base import decode_texts
from pipelines.captioning import CaptioningPipeline
from pipelines.text import TextDiffusionPipeline


@pytest.fixture(scope="module")
def pipe(caption_tokenizer):
    return build(caption_tokenizer)


@pytest.fixture(scope="module")
def images():
    return [render_scene(s, 32) for s in make_split("test", 2)]


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "pipe"
    pipe.save_pretrained(folder)
    return folder


def edited_copy(saved, tmp_path, file, **changes):
    """A copy of the saved pipeline folder with some values of one of its JSON files changed."""
    folder = tmp_path / "edited"
    shutil.copytree(saved, folder)
    cfg = json.loads((folder / file).read_text())
    (folder / file).write_text(json.dumps({**cfg, **changes}))
    return folder


# ---- the pipeline boundary ------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(threshold=float("nan")), "threshold"),
    (dict(gen_length=True), "gen_length"),
    (dict(gen_length=8.0), "gen_length"),
    (dict(steps=1000), "steps.*more than `gen_length`=8.*steps <= 8"),
    (dict(prompt="<|mask|> scene"), "holds the mask token"),
])
def test_settings_that_cannot_be_right_are_refused(pipe, images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(images=images, **kwargs)


def test_nan_inputs_are_refused(pipe, caption_tokenizer, images):
    pixels = pipe.vision_adapter.preprocess(images)
    pixels[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="pixel_values"):
        pipe(pixel_values=pixels)
    text = TextDiffusionPipeline(model=pipe.model, tokenizer=caption_tokenizer, scheduler=pipe.scheduler)
    text.set_progress_bar_config(disable=True)
    embeds = torch.randn(1, 2, 32)
    assert len(text("a", prefix_embeds=embeds, gen_length=GEN).texts) == 1
    embeds[0, 1, 3] = float("nan")
    with pytest.raises(ValueError, match="prefix_embeds"):
        text("a", prefix_embeds=embeds, gen_length=GEN)


def test_numpy_counts_are_plain_counts(pipe, images):
    want = pipe(images=images, gen_length=GEN, steps=GEN).sequences
    got = pipe(images=images, gen_length=np.int64(GEN), steps=np.int32(GEN), batch_size=np.int64(1)).sequences
    assert torch.equal(got, want)


def test_decoded_text_holds_whole_characters(caption_tokenizer):
    tokenizer = caption_tokenizer
    ids = tokenizer("a red café", add_special_tokens=False)["input_ids"]
    cut = next(i for i in range(len(ids), 0, -1) if "\ufffd" in tokenizer.decode(ids[:i]))  # inside "é"
    assert decode_texts(tokenizer, [ids[:cut]]) == ["a red caf"]
    stray = ids[cut : cut + 1] + tokenizer(" red", add_special_tokens=False)["input_ids"]  # a lone continuation byte
    assert "\ufffd" in tokenizer.decode(stray) and decode_texts(tokenizer, [stray]) == ["red"]
    eos = tokenizer.eos_token_id
    assert decode_texts(tokenizer, [ids[:cut] + [eos] + ids]) == ["a red caf"]  # cut by the EOS
    assert decode_texts(tokenizer, [ids]) == ["a red café"]


# ---- folders written all at once ------------------------------------------------------------------
def test_an_interrupted_export_leaves_the_old_folder(pipe, images, tmp_path, monkeypatch):
    dst = tmp_path / "pipeline"
    with atomic_folder(dst) as tmp:
        pipe.save_pretrained(tmp)
    before = CaptioningPipeline.from_pretrained(dst)(images=images).sequences
    real, calls = safetensors.torch.save_file, []

    def dies_on_the_second_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:
            with open(filename, "wb") as f:
                f.write(b"half a file")
            with pytest.raises(ValueError, match="did not finish"):  # the half-written folder never loads
                CaptioningPipeline.from_pretrained(tmp)
            raise KeyboardInterrupt  # as a kill would stop it
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", dies_on_the_second_file)
    with pytest.raises(KeyboardInterrupt), atomic_folder(dst) as tmp:
        pipe.model.embed.weight.data.add_(1.0)  # another model than the saved one
        try:
            pipe.save_pretrained(tmp)
        finally:
            pipe.model.embed.weight.data.sub_(1.0)
    assert len(calls) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]
    again = CaptioningPipeline.from_pretrained(dst)
    again.set_progress_bar_config(disable=True)
    assert torch.equal(again(images=images).sequences, before)


# ---- pickles are never opened ---------------------------------------------------------------------
class Canary:
    """Unpickling this creates a file: the proof that a loader ran code from a weights file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def small_adapters():
    from modalities.audio import SemanticAdapter
    from modalities.driving import DrivingAdapter

    return {
        "vision": VisionAdapter(backbone="resnet10t", hidden_size=16, image_size=32, pool_size=2),
        "audio": SemanticAdapter(in_dim=8, hidden_size=16),
        "driving": DrivingAdapter(hidden_size=16, width=16, heads=4),
    }


@pytest.mark.parametrize("kind", ["vision", "audio", "driving"])
def test_a_pickle_only_adapter_folder_is_refused_unopened(tmp_path, kind):
    adapter = small_adapters()[kind]
    folder = tmp_path / kind
    adapter.save_pretrained(folder)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    canary = tmp_path / "canary"
    (folder / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"w": Canary(canary)}))
    loaders = [type(adapter).from_pretrained] + ([ModalityAdapter.load] if kind != "audio" else [])
    for load in loaders:
        with pytest.raises(UnsafeWeightsError, match="diffusion_pytorch_model.bin.*never loaded") as err:
            load(folder)
        assert "safetensors" in str(err.value) and "save_file" in str(err.value)  # and how to convert it
    assert not canary.exists()


def test_a_pickle_only_pipeline_part_is_refused(saved, tmp_path):
    folder = tmp_path / "p"
    shutil.copytree(saved, folder)
    weights = folder / "model" / "diffusion_pytorch_model.safetensors"
    weights.with_suffix(".bin").write_bytes(pickle.dumps(Canary(tmp_path / "canary")))
    weights.unlink()
    with pytest.raises(ValueError, match="pickled weights"):
        CaptioningPipeline.from_pretrained(folder)
    assert not (tmp_path / "canary").exists()


def test_autoencoders_load_safetensors_only_and_strictly(tmp_path):
    from autoencoders import ThoughtVAE

    vae = ThoughtVAE(vocab_size=16, max_length=6, num_latents=2, latent_dim=4, hidden_size=16, num_layers=1,
                     num_heads=2)
    vae.save_pretrained(tmp_path / "vae")
    assert torch.equal(ThoughtVAE.from_pretrained(tmp_path / "vae").embed.weight, vae.embed.weight)
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**cfg, "num_layers": 2}))
    with pytest.raises(WeightsMismatchError, match="missing"):
        ThoughtVAE.from_pretrained(tmp_path / "vae")
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**cfg, "beta": float("nan")}))
    with pytest.raises(ConfigError, match="`beta`"):
        ThoughtVAE.from_pretrained(tmp_path / "vae")
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").rename(tmp_path / "vae" / "model.bin")
    with pytest.raises(UnsafeWeightsError, match="model.bin"):
        ThoughtVAE.from_pretrained(tmp_path / "vae")


# ---- configs checked when read, weights that fit --------------------------------------------------
@pytest.mark.parametrize("file,changes,error,match", [
    ("model/config.json", {"num_layers": 1}, WeightsMismatchError, "7 unused .*blocks.1"),
    ("model/config.json", {"num_layers": 3}, WeightsMismatchError, "7 missing .*blocks.2"),
    ("model/config.json", {"rope_theta": -1}, ConfigError, "`rope_theta` must be finite and > 0, got -1"),
    ("model/config.json", {"hidden_size": "32"}, ConfigError, "`hidden_size` must be an int, got '32'"),
    ("scheduler/scheduler_config.json", {"block_length": 0}, ConfigError, "`block_length` must be > 0, got 0"),
    ("scheduler/scheduler_config.json", {"temperature": float("nan")}, ConfigError, "`temperature`"),
    ("vision_adapter/config.json", {"image_size": -32}, ConfigError, "`image_size` must be > 0, got -32"),
])
def test_bad_config_values_fail_when_read(saved, tmp_path, file, changes, error, match):
    folder = edited_copy(saved, tmp_path, file, **changes)
    with pytest.raises(error, match=match) as err:
        CaptioningPipeline.from_pretrained(folder)
    if file != "scheduler/scheduler_config.json":  # the module's own folder is named
        assert str(folder / file.split("/")[0]) in str(err.value)


def test_backbone_config_values_are_checked_when_built(tiny_config):
    for field, value in (("rope_theta", -1.0), ("hidden_size", "32"), ("num_layers", True), ("norm_eps", 0.0)):
        with pytest.raises(ConfigError, match=f"`{field}`"):
            DiffusionTransformer(**{**tiny_config, field: value})
    with pytest.raises(ConfigError, match="`block_length`"):
        MaskedDiffusionScheduler(block_length=0)

"""Captioning pipeline, its training stages, the batch command on a real pipeline, and the caption data."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from latent import DiffusionTransformer
from latent.scheduler import MaskedDiffusionScheduler
from modalities.data.metrics import attribute_accuracy
from modalities.data.scenes import HELD_OUT, make_split, parse_caption, render_scene
from modalities.vision import ImageError, VisionAdapter
from pipelines.captioning import CaptioningPipeline
from pipelines.cli import main as cli_main
from pipelines.text import TextDiffusionPipeline

GEN = 8


@pytest.fixture(scope="module")
def tokenizer(caption_tokenizer):
    return caption_tokenizer


def build(tokenizer, layout="prefix", commit="threshold", hidden=32):
    torch.manual_seed(0)
    model = DiffusionTransformer(vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=4,
                                 mask_token_id=tokenizer.mask_token_id, max_position_embeddings=64,
                                 attention_layout=layout).eval()
    adapter = VisionAdapter(backbone="resnet18", hidden_size=hidden, image_size=32, pool_size=2).eval()
    sched = MaskedDiffusionScheduler(block_length=GEN, commit=commit, threshold=0.9)
    pipe = CaptioningPipeline(adapter, model, tokenizer, sched, gen_length=GEN)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(tokenizer):
    return build(tokenizer)


@pytest.fixture(scope="module")
def images():
    return [render_scene(s, 40) for s in make_split("test", 3)]


def test_images_of_every_kind(pipe, images, tmp_path):
    images[0].save(tmp_path / "a.png")
    out = pipe(images=images)
    assert len(out.captions) == 3 and out.sequences.shape == (3, GEN)
    assert all(isinstance(c, str) for c in out.captions)
    one = pipe(images=images[0])
    assert one.captions == out.captions[:1]
    for raw in (str(tmp_path / "a.png"), np.asarray(images[0]), torch.from_numpy(np.asarray(images[0])).permute(2, 0, 1)):
        assert pipe(images=raw).captions == one.captions
    assert pipe(pixel_values=pipe.vision_adapter.preprocess(images)).captions == out.captions


def test_prompt_and_chunks(pipe, images):
    out = pipe(images=images, prompt="two")
    assert out.sequences.shape[1] == GEN + 1
    rows = pipe(images=images, prompt=["two", "one large", "three"])
    assert rows.sequences.shape == (3, GEN + 2)  # left padded prompts
    whole = pipe(images=images, threshold=None, steps=GEN)
    assert pipe(images=images, threshold=None, steps=GEN, batch_size=2).captions == whole.captions


def test_exact_prefix_cache_matches_no_cache(pipe, images):
    for kw in ({}, {"threshold": None, "steps": GEN}, {"prompt": "two"}):
        cached = pipe(images=images, **kw)
        plain = pipe(images=images, cache="none", **kw)
        assert torch.equal(cached.sequences, plain.sequences), kw


def test_one_token_per_step_and_callback(pipe, images):
    seen = []
    out = pipe(images=images, threshold=None, steps=GEN, eos_early_stop=False,
               callback_on_step_end=lambda p, step, block, kw: seen.append((step, kw["sequences"].shape)))
    assert len(seen) == GEN and seen[-1] == (GEN - 1, (3, GEN))
    assert out.nfe == GEN + 1  # one prefill of the image cache, then one forward per token


def test_text_and_captioning_resolve_blocks_and_rules_alike(pipe, images):
    """The same scheduler and arguments give the same blocks and commit rule in both pipelines."""
    text = TextDiffusionPipeline(model=pipe.model, tokenizer=pipe.tokenizer, scheduler=pipe.scheduler)
    text.set_progress_bar_config(disable=True)
    # the scheduler has block_length=8 and the threshold rule: gen_length 12 gets blocks of 6, and
    # asking for 4 steps selects the schedule rule (2 forwards per block)
    for p, inputs in ((text, {"prompt": "two"}), (pipe, {"images": images[:1], "prompt": "two"})):
        blocks = []
        out = p(**inputs, gen_length=12, steps=4, cache="none", eos_early_stop=False,
                callback_on_step_end=lambda pp, step, block, kw, blocks=blocks: blocks.append(block))
        assert blocks == [0, 0, 1, 1] and out.nfe == 4, type(p).__name__


def test_bad_images_are_recorded(pipe, images):
    bad = np.zeros((5, 5, 2), np.uint8)
    out = pipe(images=[images[0], bad, images[2]], on_error="record")
    assert out.captions[1] is None and "image 1 " in out.errors[1] and out.errors[0] is None
    assert [out.captions[0], out.captions[2]] == pipe(images=[images[0], images[2]]).captions
    assert (out.sequences[1] == pipe.tokenizer.pad_token_id).all() and out.sequences.shape == (3, GEN)
    chunked = pipe(images=[bad, images[0], bad], on_error="record", batch_size=1)  # a chunk of bad images only
    assert chunked.captions == [None, out.captions[0], None] and chunked.errors[1] is None
    with pytest.raises(ValueError, match="on_error"):
        pipe(images=images, on_error="skip")


def test_return_dict_false_order(pipe, images):
    out = pipe(images=images[:2])
    captions, sequences, errors, nfe = pipe(images=images[:2], return_dict=False)
    assert captions == out.captions and torch.equal(sequences, out.sequences)
    assert errors == [None, None] and nfe == out.nfe


def test_sampling_is_reproducible(pipe, images):
    a = pipe(images=images, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = pipe(images=images, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.sequences, b.sequences)


def test_save_load_round_trip(pipe, images, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["vision_adapter"] == ["modalities.vision", "VisionAdapter"] and index["gen_length"] == GEN
    again = CaptioningPipeline.from_pretrained(tmp_path / "p")
    again.set_progress_bar_config(disable=True)
    assert torch.equal(again(images=images).sequences, pipe(images=images).sequences)
    with pytest.raises(ValueError, match="not a pipeline folder"):
        CaptioningPipeline.from_pretrained(tmp_path)


def test_bad_input(pipe, tokenizer, images):
    with pytest.raises(ImageError, match="empty"):
        pipe(images=[])
    with pytest.raises(ValueError, match="exactly one of"):
        pipe()
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        pipe(images=images, prompt=["a", "b"])
    with pytest.raises(ValueError, match="gen_length"):
        pipe(images=images, gen_length=0)
    with pytest.raises(ImageError, match="image 1 "):
        pipe(images=[images[0], np.zeros((5, 5, 2), np.uint8)])
    with pytest.raises(ValueError, match="hidden_size"):
        build(tokenizer, hidden=16)


def test_batch_command_on_a_real_pipeline(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    (tmp_path / "imgs").mkdir()
    for i, s in enumerate(make_split("test", 5)):
        render_scene(s, 32).save(tmp_path / "imgs" / f"{i}.png")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"nope")
    out = tmp_path / "c.jsonl"
    rc = cli_main(["caption", "--model", str(tmp_path / "p"), "--images", str(tmp_path / "imgs"), "--out", str(out),
                   "--batch-size", "2", "--num-workers", "0", "--no-progress"])
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert rc == 0 and len(recs) == 6 and sum("error" in r for r in recs) == 1
    direct = pipe(images=sorted(str(p) for p in (tmp_path / "imgs").glob("[0-9].png"))).captions
    assert [r["caption"] for r in recs if "caption" in r] == direct


# The training tests (stages, config errors, exact resume, DDP, the export) are in test_caption_task.py.


# ---- data -----------------------------------------------------------------------------------------
def test_scenes_are_deterministic_and_hold_out_pairs():
    a, b = make_split("train", 300), make_split("train", 300)
    assert a == b and np.array_equal(np.asarray(render_scene(a[0])), np.asarray(render_scene(b[0])))
    held = set(HELD_OUT)
    assert not any((s.colour, s.shape) in held for s in a)
    assert all((s.colour, s.shape) in held for s in make_split("heldout", 50))
    s = a[0]
    assert parse_caption(s.caption) == s.attributes()
    acc = attribute_accuracy(["three small red circles at the top"],
                             [{"count": "three", "size": "large", "colour": "red", "shape": "circle",
                               "position": "at the top"}])
    assert acc["size"] == 0 and acc["colour"] == 1 and acc["all"] == 0


def test_caption_metrics():
    from modalities.data.metrics import caption_scores

    perfect = caption_scores(["a red circle on the left", "two blue squares"], ["a red circle on the left", ["two blue squares"]])
    worse = caption_scores(["a red circle", "two"], ["a red circle on the left", "two blue squares"])
    assert perfect["bleu4"] > 0.99 and worse["bleu4"] < perfect["bleu4"] and worse["cider"] < perfect["cider"]


@pytest.mark.skipif(not os.path.isdir("/usr/share/tuxpaint/stamps"), reason="tuxpaint-stamps-default not installed")
def test_real_items_and_split():
    from modalities.data.real import clean_caption, split_of, tuxpaint_items

    items = tuxpaint_items()
    assert len(items) > 500 and all(i["caption"] and "=" not in i["caption"] for i in items)
    assert clean_caption("  A  badger. ") == "a badger"
    assert split_of("a badger") == split_of("a badger") and {split_of(i["caption"]) for i in items} == {"train", "test"}


@pytest.mark.skipif(not os.path.isfile("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"), reason="no emoji font")
def test_emoji_render():
    from modalities.data.real import _draw_emoji, _emoji_font

    im = _draw_emoji("\U0001F600", _emoji_font())
    assert im.getbbox() is not None and len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 3
    assert isinstance(im, Image.Image)

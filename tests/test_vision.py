"""Vision adapter: preprocessing of every input kind, shapes, masks, freezing, save/load, local weights."""

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from modalities.base import ModalityAdapter, PrefixEmbeds, available_adapters, create_adapter
from modalities.vision import ImageError, ImagePreprocessor, VisionAdapter, load_image


def small(**kw):
    cfg = dict(backbone="resnet18", hidden_size=32, image_size=32, pool_size=2)
    cfg.update(kw)
    return VisionAdapter(**cfg)


@pytest.fixture(scope="module")
def adapter():
    torch.manual_seed(0)
    return small()


# ---- PrefixEmbeds ---------------------------------------------------------------------------------
def test_prefix_embeds_checks_and_helpers():
    p = PrefixEmbeds(torch.zeros(2, 3, 4), None)
    assert p.mask.dtype == torch.bool and p.mask.all() and p.length == 3 and len(p) == 2
    with pytest.raises(ValueError, match=r"\[B, P, D\]"):
        PrefixEmbeds(torch.zeros(2, 3), None)
    with pytest.raises(ValueError, match="mask"):
        PrefixEmbeds(torch.zeros(2, 3, 4), torch.ones(2, 4))
    q = PrefixEmbeds(torch.ones(2, 1, 4), torch.tensor([[1], [0]]))
    both = PrefixEmbeds.cat([p, q])
    assert both.embeds.shape == (2, 4, 4) and both.mask.tolist() == [[True] * 4, [True] * 3 + [False]]
    assert PrefixEmbeds.cat([p, p], dim=0).batch_size == 4
    assert both.attention_mask(num_tokens=2).shape == (2, 6)
    assert both.select(torch.tensor([1])).mask.tolist() == [[True, True, True, False]]
    assert p.repeat_interleave(3).batch_size == 6


@pytest.mark.parametrize("field,value", [("image_size", -32), ("hidden_size", "32"), ("num_queries", 0),
                                         ("projector", "linear"), ("min_image_side", 0)])
def test_bad_config_values_are_refused_when_read(tmp_path, adapter, field, value):
    with pytest.raises(ValueError, match=f"`{field}` must be"):
        small(**{field: value})
    adapter.save_pretrained(tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "config.json").read_text())
    (tmp_path / "ad" / "config.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(ValueError, match=f"config.json: VisionAdapter config `{field}` must be"):
        VisionAdapter.from_pretrained(tmp_path / "ad")


def test_registry():
    assert "vision" in available_adapters()
    a = create_adapter({"type": "vision", "backbone": "resnet18", "hidden_size": 16, "image_size": 32})
    assert isinstance(a, VisionAdapter) and a.config.hidden_size == 16
    with pytest.raises(ValueError, match="Unknown adapter 'nope'"):
        create_adapter("nope")
    with pytest.raises(ValueError, match="timm has no model named"):
        small(backbone="resnet_does_not_exist")


# ---- shapes and masks -----------------------------------------------------------------------------
def test_mlp_shapes_and_mask(adapter):
    x = adapter.preprocess([Image.new("RGB", (40, 50), "red")] * 3)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    out = adapter(x)
    assert out.embeds.shape == (3, 4, 32) and out.mask.shape == (3, 4) and out.mask.all()
    assert adapter.num_prefix_tokens == 4


def test_resampler_and_vit_tokens():
    a = VisionAdapter(
        backbone="vit_tiny_patch16_224", hidden_size=32, image_size=32, projector="resampler", num_queries=5,
        resampler_heads=4, backbone_kwargs={"depth": 1},
    )
    x = a.preprocess(np.zeros((20, 30, 3), np.uint8))
    assert x.shape == (1, 3, 32, 32)
    feats, grid = a.features(x)
    assert feats.shape == (1, 4, 192) and grid == (2, 2)  # the class token is dropped
    out = a(x)
    assert out.embeds.shape == (1, 5, 32) and a.num_prefix_tokens == 5
    # the order-blind cross-attention sees positions: permuting the patches changes the output
    m = VisionAdapter(backbone="vit_tiny_patch16_224", hidden_size=32, image_size=32, backbone_kwargs={"depth": 1})
    assert m(x).embeds.shape == (1, 4, 32)


def test_pixel_values_shape_is_checked(adapter):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        adapter(torch.zeros(1, 4, 32, 32))


# ---- preprocessing of every input kind ------------------------------------------------------------
def test_inputs_of_every_kind_agree(tmp_path, adapter):
    rgb = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(rgb).save(path)
    ref = adapter.preprocess(Image.fromarray(rgb))
    for raw in (rgb, torch.from_numpy(rgb).permute(2, 0, 1), torch.from_numpy(rgb), rgb.astype(np.float32) / 255,
                str(path), path):
        assert torch.allclose(adapter.preprocess(raw), ref, atol=1e-5), type(raw)
    batch = adapter.preprocess(np.stack([rgb, rgb]))  # [B, H, W, C] array is a batch
    assert batch.shape == (2, 3, 32, 32)
    grey = adapter.preprocess(np.full((20, 20), 128, np.uint8))
    assert torch.allclose(grey[0, 0] * 0.229 + 0.485, grey[0, 1] * 0.224 + 0.456, atol=1e-5)


def test_transparency_is_composited_on_white():
    pre = ImagePreprocessor(input_size=(16, 16), mean=(0, 0, 0), std=(1, 1, 1))
    clear = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    assert torch.allclose(pre(clear), torch.ones(1, 3, 16, 16))
    arr = np.zeros((16, 16, 4), np.uint8)  # transparent black RGBA array -> white
    assert torch.allclose(pre(arr), torch.ones(1, 3, 16, 16))


def test_every_pil_mode_is_read_at_its_depth(tmp_path):
    pre = ImagePreprocessor(input_size=(16, 64), mean=(0, 0, 0), std=(1, 1, 1))
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (16, 1))  # a left-to-right gradient
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as im:
        assert im.mode.startswith("I;16")
    want = torch.from_numpy(ramp.astype(np.float32) / 65535).expand(3, -1, -1)
    x = pre.to_float(str(tmp_path / "grey16.png"))
    assert torch.allclose(x, want, atol=1e-6)  # scaled, not clipped: convert("RGB") made it nearly all white
    assert pre(str(tmp_path / "grey16.png"))[0, 0, 0].std() > 0.25
    assert torch.allclose(pre.to_float(Image.fromarray(ramp.astype(np.int32))), want, atol=1e-6)  # mode "I"
    unit = ramp.astype(np.float32) / 65535
    assert torch.allclose(pre.to_float(Image.fromarray(unit)), want, atol=1e-6)  # mode "F"
    with pytest.raises(ImageError, match=r"must be in \[0, 1\]"):
        pre.to_float(Image.fromarray(unit * 255))
    with pytest.raises(ImageError, match="integer images are read as 16-bit"):
        pre.to_float(Image.fromarray(np.full((16, 16), 70000, np.int32)))
    # grey + alpha, and a palette with a transparent entry, are composited on white
    la = Image.fromarray(np.stack([np.zeros((16, 16), np.uint8), np.zeros((16, 16), np.uint8)], -1), "LA")
    assert torch.allclose(pre.to_float(la), torch.ones(3, 16, 16))
    p = Image.new("P", (16, 16), 0)
    p.putpalette([0, 0, 0, 255, 0, 0])
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    assert torch.allclose(pre.to_float(str(tmp_path / "p.png")), torch.ones(3, 16, 16))
    p.putpixel((0, 0), 1)
    assert pre.to_float(p)[:, 0, 0].tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "raw,match",
    [
        (np.zeros((10, 10, 2), np.uint8), "channels"),
        (np.zeros((10, 10, 3), np.int32), "dtype"),
        (np.zeros((10, 10, 3), np.complex64), "dtype"),
        (np.full((10, 10, 3), 255.0, np.float32), r"must be in \[0, 1\]"),
        (np.full((10, 10, 3), np.nan, np.float32), "NaN"),
        (np.zeros((1, 1, 3), np.uint8), "1x1"),
        (Image.new("RGB", (1, 1)), "1x1"),
        (np.zeros((2, 3, 10, 10, 3), np.uint8), "shape"),
        (12, "int"),
        ([], "empty"),
        (None, "None"),
    ],
)
def test_bad_images_raise_clear_errors(adapter, raw, match):
    with pytest.raises(ImageError, match=match):
        adapter.preprocess(raw)


def test_bad_image_in_a_list_is_named(adapter):
    good = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(ImageError, match="image 1 "):
        adapter.preprocess([good, np.zeros((10, 10, 5), np.uint8)])


def test_bad_files(tmp_path):
    pre = ImagePreprocessor(input_size=(16, 16), max_pixels=10_000)
    (tmp_path / "notes.txt").write_text("not an image")
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (200, 200)).save(tmp_path / "huge.png")
    cases = {"notes.txt": "not a readable image", "cut.png": "not a readable image", "huge.png": "max_pixels",
             "missing.png": "does not exist", "": "folder"}
    for name, match in cases.items():
        with pytest.raises(ImageError, match=match) as err:
            pre(str(tmp_path / name))
        assert str(tmp_path / name) in str(err.value)
    assert load_image(tmp_path / "full.png").size == (64, 64)


# ---- freezing -------------------------------------------------------------------------------------
def test_frozen_trunk_gets_no_gradient_and_stays_in_eval():
    a = small()
    assert a.trunk_frozen and not any(p.requires_grad for p in a.trunk_model.parameters())
    a.train()
    assert not a.trunk_model.training and a.proj.training
    a(torch.randn(2, 3, 32, 32)).embeds.sum().backward()
    assert all(p.grad is None for p in a.trunk_model.parameters())
    assert all(p.grad is not None for p in a.proj.parameters())
    a.unfreeze_trunk().train()
    assert not a.trunk_frozen and a.trunk_model.training
    a(torch.randn(2, 3, 32, 32)).embeds.sum().backward()
    assert a.trunk_model.conv1.weight.grad is not None
    b = small(freeze_trunk=False)
    assert not b.trunk_frozen


# ---- save / load and local weights ----------------------------------------------------------------
def test_save_load_round_trip(tmp_path, adapter):
    adapter.eval()
    x = torch.randn(2, 3, 32, 32)
    adapter.save_pretrained(tmp_path / "ad")
    again = VisionAdapter.from_pretrained(tmp_path / "ad").eval()
    assert torch.equal(adapter(x).embeds, again(x).embeds)
    assert again.trunk_frozen and again.preprocessor == adapter.preprocessor
    generic = ModalityAdapter.load(tmp_path / "ad")
    assert isinstance(generic, VisionAdapter)


def test_local_pretrained_weights(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    ref = timm.create_model("resnet18", pretrained=False)  # with its classifier head, as released weights are
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(sd, tmp_path / "resnet18.safetensors")
    (tmp_path / "folder").mkdir()
    save_file(sd, tmp_path / "folder" / "model.safetensors")
    for src in ("resnet18.safetensors", "folder"):
        a = small(pretrained_path=str(tmp_path / src))
        assert torch.equal(a.trunk_model.conv1.weight, ref.conv1.weight), src
        assert "pretrained_path" not in a.config
    # a pickle is refused by name, never opened; the line the error gives converts it
    torch.save(sd, tmp_path / "resnet18.pth")
    (tmp_path / "pickles").mkdir()
    torch.save(sd, tmp_path / "pickles" / "pytorch_model.bin")
    for src, name in (("resnet18.pth", "resnet18.pth"), ("pickles", "pytorch_model.bin")):
        with pytest.raises(ValueError, match="never loaded") as err:
            small(pretrained_path=str(tmp_path / src))
        assert name in str(err.value)
    line = str(err.value).split('python -c "', 1)[1].rsplit('"', 1)[0]
    exec(line)  # the user's one-off conversion, where they trust the file
    a = small(pretrained_path=str(tmp_path / "pickles"))
    assert torch.equal(a.trunk_model.conv1.weight, ref.conv1.weight)
    # saved adapters carry the trunk weights: reloading needs no pretrained file
    a.save_pretrained(tmp_path / "saved")
    assert torch.equal(VisionAdapter.from_pretrained(tmp_path / "saved").trunk_model.conv1.weight, ref.conv1.weight)
    with pytest.raises(ValueError, match="do not fit timm model"):
        small(backbone="resnet34", pretrained_path=str(tmp_path / "resnet18.safetensors"))
    with pytest.raises(ValueError, match="does not exist"):
        small(pretrained_path=str(tmp_path / "nope.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="Could not read weights"):
        small(pretrained_path=str(tmp_path / "bad.safetensors"))

"""Image augmentation of the caption task (seeded per step, identity when off) and the contrastive alignment
of the image prefix with frozen sentence embeddings (the loss against a plain loop, the embeddings against
sentence-transformers, an align-only stage that leaves the backbone alone, exact resume)."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from test_caption_task import QUICKSTART, TINY  # the tiny quickstart captioner
from trainer_checks import check_exact_resume

import pipelines.tasks  # noqa: F401 - registers the built-in tasks
from latent.training.config import ConfigError, load_config
from latent.training.task import step_generator
from latent.training.trainer import Trainer
from modalities.image_augment import ImageAugment, augment_images
from pipelines.tasks.caption_align import contrastive_alignment_loss, sentence_embeddings

AUG = ["augment.zoom_min=0.8", "augment.zoom_max=1.2", "augment.shift=0.1", "augment.flip=0.5",
       "augment.brightness=0.2", "augment.contrast=0.2"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def align_recipe(tmp_path) -> Path:
    cfg = OmegaConf.load(QUICKSTART)
    cfg.stages = [{"name": "align", "steps": 2, "lr": 1e-2, "caption_weight": 0.0, "align_weight": 1.0,
                   "train": ["projector", "trunk", "align_head"]},
                  {"name": "joint", "steps": 2, "lr": 1e-3, "align_weight": 0.5,
                   "train": ["projector", "trunk", "backbone", "align_head"]}]
    path = tmp_path / "recipe.yaml"
    OmegaConf.save(cfg, path)
    return path


# ---- augmentation ---------------------------------------------------------------------------------
def test_augment_is_the_identity_when_off_and_a_function_of_the_generator():
    x = torch.randn(6, 3, 16, 16)
    assert augment_images(x, ImageAugment(), torch.Generator().manual_seed(0), MEAN, STD) is x
    aug = ImageAugment(zoom_min=0.8, zoom_max=1.2, shift=0.1, flip=0.5, brightness=0.2, contrast=0.2)
    a = augment_images(x, aug, torch.Generator().manual_seed(1), MEAN, STD)
    b = augment_images(x, aug, torch.Generator().manual_seed(1), MEAN, STD)
    c = augment_images(x, aug, torch.Generator().manual_seed(2), MEAN, STD)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.allclose(a, c)
    assert all(not torch.allclose(a[i], x[i]) for i in range(6))


def test_augment_flip_zoom_and_brightness_do_what_they_say():
    x = torch.rand(2, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(augment_images(x, ImageAugment(flip=1.0), g, MEAN, STD), x.flip(-1), atol=1e-5)
    # zoom 2 around the centre: the output's pixel centres sample the middle half at half-pixel steps
    y = torch.arange(64.0).reshape(1, 1, 8, 8).expand(1, 3, 8, 8).contiguous()
    z = augment_images(y, ImageAugment(zoom_min=2.0, zoom_max=2.0), g, MEAN, STD)
    want = F.interpolate(y[:, :, 2:6, 2:6], scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.allclose(z[:, :, 1:-1, 1:-1], want[:, :, 1:-1, 1:-1], atol=1e-4)
    # brightness alone scales the raw pixels (in [0, 1]) by one factor per image within the range
    raw = torch.full((3, 3, 4, 4), 0.5)
    norm = (raw - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    out = augment_images(norm, ImageAugment(brightness=0.3), g, MEAN, STD)
    back = out * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
    factors = back.flatten(1) / 0.5
    assert torch.allclose(factors, factors[:, :1].expand_as(factors), atol=1e-5)
    assert ((factors >= 0.7 - 1e-5) & (factors <= 1.3 + 1e-5)).all() and factors[:, 0].std() > 0


def test_task_batches_augment_per_step_and_keep_rows_and_noise(tmp_path):
    """Augmented pixels are a function of the step; rows, captions and noise are those of the recipe without
    augmentation (the augmentation draws come after them), and off leaves the preprocessed pixels as they are."""
    plain = Trainer(load_config(QUICKSTART, [*TINY, f"run.output_dir={tmp_path / 'a'}"]))
    aug = Trainer(load_config(QUICKSTART, [*TINY, *AUG, f"run.output_dir={tmp_path / 'b'}"]))
    p, a, a2, c = (tr.task.batch(s, tr.stages[0]) for tr, s in ((plain, 3), (aug, 3), (aug, 3), (aug, 4)))
    rows = torch.randint(0, 40, (4,), generator=step_generator(0, 3))
    assert torch.equal(p["pixels"], plain.task.pixels[rows])
    assert all(torch.equal(p[k], a[k]) for k in ("captions", "prompt", "t", "noise"))
    assert torch.equal(a["pixels"], a2["pixels"]) and not torch.allclose(a["pixels"], p["pixels"])
    assert not torch.allclose(a["pixels"], c["pixels"])


def test_augment_and_align_config_errors():
    with pytest.raises(ConfigError, match="augment.zoom_min and augment.zoom_max"):
        load_config(QUICKSTART, ["augment.zoom_min=1.2"])
    with pytest.raises(ConfigError, match=r"augment.flip must be in \[0, 1\]"):
        load_config(QUICKSTART, ["augment.flip=2"])
    with pytest.raises(ConfigError, match="caption_weight=0.0 and align_weight=0.0"):
        load_config(QUICKSTART, ["stages.0.caption_weight=0"])
    with pytest.raises(ConfigError, match="align.temperature must be > 0"):
        load_config(QUICKSTART, ["align.temperature=0"])


# ---- contrastive alignment ------------------------------------------------------------------------
def test_contrastive_loss_matches_a_plain_loop():
    torch.manual_seed(0)
    img, txt = torch.randn(5, 7), torch.randn(5, 7)
    groups = torch.tensor([0, 1, 0, 2, 1])
    tau = 0.1

    def cos(u, v):
        return sum(a * b for a, b in zip(u, v, strict=True)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))

    iu, tu = img.tolist(), txt.tolist()
    total = 0.0
    for direction in ((iu, tu), (tu, iu)):
        q, k = direction
        for i in range(5):
            logits = [cos(q[i], k[j]) / tau for j in range(5)]
            lse = math.log(sum(math.exp(v) for v in logits))
            pos = [j for j in range(5) if groups[i] == groups[j]]
            total += sum(-(logits[j] - lse) for j in pos) / len(pos) / 5
    want = total / 2
    got = contrastive_alignment_loss(img, txt, groups, tau)
    assert abs(float(got) - want) < 1e-5
    # aligned pairs (image = its text) score lower than shuffled ones
    assert contrastive_alignment_loss(txt, txt, torch.arange(5), tau) < contrastive_alignment_loss(
        txt, txt.roll(1, 0), torch.arange(5), tau)


def test_sentence_embeddings_match_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    from autoencoders.compressor import default_encoder_path

    texts = ["a badger", "the sign for the letter t in american sign language", "grinning face"]
    ref = SentenceTransformer(str(default_encoder_path()), device="cpu", local_files_only=True).encode(
        texts, convert_to_tensor=True, normalize_embeddings=True)
    got = sentence_embeddings(texts)
    assert got.shape == ref.shape and torch.allclose(got, ref.float().cpu(), atol=1e-4)


def test_align_stage_trains_the_adapter_only_and_the_export_leaves_the_head_out(tmp_path):
    tr = Trainer(load_config(align_recipe(tmp_path), [*TINY, f"run.output_dir={tmp_path / 'run'}"]))
    mods = tr.modules
    assert "align_head" in dict(mods.named_children())
    start = {k: v.detach().clone() for k, v in mods.state_dict().items()}
    seen = {}
    begin = tr._begin_stage

    def spy_begin(i, step):
        seen[i] = {k: v.detach().clone() for k, v in mods.state_dict().items()}
        begin(i, step)

    tr._begin_stage = spy_begin
    res = tr.fit()
    assert res.completed and res.step == 4
    moved0 = {k.split(".")[0] for k in start if not torch.equal(start[k], seen[1][k])}
    assert moved0 == {"adapter", "align_head"}  # no backbone forward or update in the align stage
    end = {k: v.detach().clone() for k, v in mods.state_dict().items()}
    assert any(k.startswith("model.") and not torch.equal(seen[1][k], end[k]) for k in end)
    rows = (tmp_path / "run" / "train.csv").read_text().splitlines()
    head = rows[0].split(",")
    first, last = dict(zip(head, rows[1].split(","), strict=True)), dict(zip(head, rows[-1].split(","), strict=True))
    assert first["caption_loss"] == "" and float(first["align_loss"]) > 0 and float(last["caption_loss"]) > 0
    exported = {p.name for p in Path(res.pipeline_dir).iterdir()}
    assert "vision_adapter" in exported and not any("align" in n for n in exported)


def test_align_recipe_resumes_exactly(tmp_path):
    check_exact_resume(align_recipe(tmp_path), [*TINY, *AUG], tmp_path, n=2)

"""The caption task on the one trainer: what stages train and freeze (the frozen trunk's BatchNorm
included), config errors, exact resume, two gloo processes vs one, and the exported CaptioningPipeline."""

import csv
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from trainer_checks import check_exact_resume, logged_losses, run_torchrun

import pipelines.tasks  # noqa: F401 - registers the built-in tasks
from latent.training.config import ConfigError, load_config
from latent.training.task import step_generator
from latent.training.trainer import Trainer, train
from pipelines.captioning import CaptioningPipeline
from pipelines.tasks.caption import caption_loss

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "caption_quickstart.yaml"
# resnet10t at 32 px (a 1x1 feature map: one prefix token), 40 scenes, a 1-layer backbone of width 32
TINY = ["data.num_train=40", "data.image_size=32", "adapter.image_size=32", "model.hidden_size=32",
        "model.num_layers=1", "trainer.batch_size=4", "trainer.threads=1", "trainer.progress=false",
        "trainer.tensorboard=false", "trainer.plot=false", "trainer.log_every=1", "trainer.save_every=0"]


def staged_recipe(tmp_path, stages) -> Path:
    cfg = OmegaConf.load(QUICKSTART)
    cfg.stages = stages
    path = tmp_path / "recipe.yaml"
    OmegaConf.save(cfg, path)
    return path


def test_stages_train_and_freeze_their_parts_and_the_export_captions(tmp_path):
    """A projector-only stage leaves trunk (weights and BatchNorm statistics, the trunk in eval mode) and
    backbone unchanged and out of the optimizer; the next stage trains all three. The exported pipeline
    loads back with the trained weights: the same loss and the same captions as the trained modules."""
    recipe = staged_recipe(tmp_path, [{"name": "adapter", "steps": 2, "lr": 1e-2, "train": ["projector"]},
                                      {"name": "all", "steps": 2, "lr": 1e-3,
                                       "train": ["projector", "trunk", "backbone"]}])
    tr = Trainer(load_config(recipe, [*TINY, f"run.output_dir={tmp_path / 'run'}"]))
    mods = tr.modules
    snap = lambda: {k: v.detach().clone() for k, v in mods.state_dict().items()}  # noqa: E731
    start, seen, modes = snap(), {}, []
    begin, loss = tr._begin_stage, tr.task.loss

    def spy_begin(i, step):
        seen[i] = (snap(), None)
        begin(i, step)
        trained = {n for n, p in mods.named_parameters() if p.requires_grad}
        in_opt = {id(p) for g in tr.inner_opt.param_groups for p in g["params"]}
        seen[i] = (seen[i][0], trained, in_opt == {id(p) for n, p in mods.named_parameters() if n in trained})

    def spy_loss(modules, batch, stage):
        modes.append((stage.name, modules.adapter.trunk_model.training, modules.model.training))
        return loss(modules, batch, stage)

    tr._begin_stage, tr.task.loss = spy_begin, spy_loss
    res = tr.fit()
    assert res.completed and res.step == 4

    trained0, ok0 = seen[0][1], seen[0][2]
    assert ok0 and trained0 and all(n.startswith("adapter.proj.") for n in trained0)
    after0 = seen[1][0]
    changed = {k for k in start if not torch.equal(start[k], after0[k])}
    assert changed and all(k.startswith("adapter.proj.") for k in changed), sorted(changed)[:5]
    assert any("running_mean" in k for k in start if k.startswith("adapter.trunk_model."))  # BN is there
    assert {m for m in modes if m[0] == "adapter"} == {("adapter", False, False)}  # frozen parts in eval mode
    trained1, ok1 = seen[1][1], seen[1][2]
    assert ok1 and {n.split(".")[0] + "." + n.split(".")[1] for n in trained1} >= {"adapter.proj", "adapter.trunk_model"}
    assert any(n.startswith("model.") for n in trained1) and ("all", True, True) in modes
    end = snap()
    moved = {k.split(".")[0] + "." + k.split(".")[1] for k in end if not torch.equal(after0[k], end[k])}
    assert {"adapter.proj", "adapter.trunk_model"} <= moved and any(k.startswith("model.") for k in moved)
    assert (tmp_path / "run" / "pipelines" / "adapter" / "model_index.json").is_file()

    # the export: same loss on a batch, same captions, as the trained modules
    pipe = CaptioningPipeline.from_pretrained(str(res.pipeline_dir))
    pipe.set_progress_bar_config(disable=True)
    mods.eval()
    pipe.vision_adapter.eval()
    pipe.model.eval()
    batch = tr.task.batch(7, tr.stages[0])
    with torch.no_grad():
        want = caption_loss(mods.adapter, mods.model, batch["pixels"], batch["captions"], batch["prompt"],
                            tr.task.mask_id, t=batch["t"], noise=batch["noise"]).loss
        got = caption_loss(pipe.vision_adapter, pipe.model, batch["pixels"], batch["captions"], batch["prompt"],
                           tr.task.mask_id, t=batch["t"], noise=batch["noise"]).loss
    assert torch.allclose(want, got, rtol=1e-5)
    live = CaptioningPipeline(mods.adapter, mods.model, tr.task.tokenizer, tr.task.scheduler,
                              gen_length=pipe.config.gen_length)
    live.set_progress_bar_config(disable=True)
    out = pipe(pixel_values=batch["pixels"])
    assert len(out.captions) == 4 and all(isinstance(c, str) for c in out.captions)
    assert torch.equal(out.sequences, live(pixel_values=batch["pixels"]).sequences)
    assert pipe.scheduler.config.commit == "threshold" and pipe.config.gen_length == 10


def test_batches_are_functions_of_the_step(tmp_path):
    """Rows and noise come from the step's generator; the prompt is never masked, the caption is."""
    tr = Trainer(load_config(QUICKSTART, [*TINY, "caption.prompt=a picture of", f"run.output_dir={tmp_path}"]))
    task, stage = tr.task, tr.stages[0]
    a, b, c = task.batch(3, stage), task.batch(3, stage), task.batch(4, stage)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["noise"], c["noise"])
    rows = torch.randint(0, 40, (4,), generator=step_generator(0, 3))
    assert torch.equal(a["pixels"], task.pixels[rows]) and torch.equal(a["captions"], task.captions[rows])
    P = len(task.tokenizer("a picture of", add_special_tokens=False)["input_ids"])
    assert P > 0 and a["prompt"].shape == (4, P) and a["noise"].shape == (4, P + 10)
    seen = []
    model = tr.modules.model

    def spy(noisy, **kw):
        seen.append(noisy)
        return model(noisy, **kw)

    loss = caption_loss(tr.modules.adapter, spy, a["pixels"], a["captions"], a["prompt"], task.mask_id,
                        t=torch.ones(4), noise=a["noise"]).loss
    assert torch.isfinite(loss) and torch.equal(seen[0][:, :P], a["prompt"])
    assert (seen[0][:, P:] == task.mask_id).all()  # t = 1 masks every caption token


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="adapter.backbon -- did you mean adapter.backbone"):
        load_config(QUICKSTART, ["adapter.backbon=resnet18"])
    with pytest.raises(ConfigError, match="data.num_trian -- did you mean data.num_train"):
        load_config(QUICKSTART, ["data.num_trian=3"])
    with pytest.raises(ConfigError, match=r"stages.0.train \(joint\): 'projecter'.*did you mean 'projector'"):
        load_config(QUICKSTART, ["stages.0.train=[projecter]"])
    with pytest.raises(ConfigError, match="data.kind='video'"):
        load_config(QUICKSTART, ["data.kind=video"])
    with pytest.raises(ConfigError, match="model.init_from is required"):
        Trainer(load_config(REPO / "configs" / "caption_adapter.yaml", [f"run.output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="adapter.hidden_size=64 must be the backbone's width"):
        Trainer(load_config(QUICKSTART, [*TINY, "adapter.hidden_size=64", f"run.output_dir={tmp_path}"]))


def test_quickstart_resumes_exactly(tmp_path):
    check_exact_resume(QUICKSTART, [*TINY, "stages.0.steps=4"], tmp_path, n=2)


def test_two_gloo_processes_match_one_process(tmp_path):
    """An adapter-only stage (trunk and backbone frozen: BatchNorm in eval mode) under torchrun, 2 x 2 rows
    per step, logs the losses of one process with the global batch of 4."""
    over = [*TINY, "stages.0.steps=3", "stages.0.train=[projector]"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    train(load_config(QUICKSTART, [*over, f"run.output_dir={single}"]))
    proc = run_torchrun(QUICKSTART, [*over, f"run.output_dir={ddp}"], nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = logged_losses(single), logged_losses(ddp)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert x == pytest.approx(y, rel=1e-5)
    with open(ddp / "train.csv") as f:
        assert {r["stage"] for r in csv.DictReader(f)} == {"joint"}


def test_train_py_prints_and_runs_caption_recipes(tmp_path, capsys):
    import train as train_cli

    for recipe in ("caption_quickstart", "caption_real", "caption_adapter"):
        train_cli.main([str(REPO / "configs" / f"{recipe}.yaml"), "--print-config"])
        assert "task: caption" in capsys.readouterr().out
    res = train_cli.main([str(QUICKSTART), *TINY, "stages.0.steps=1", f"run.output_dir={tmp_path}"])
    assert res.completed and (tmp_path / "pipeline" / "model_index.json").is_file()

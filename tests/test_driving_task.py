"""The driving task (pipelines/tasks/driving.py) on the one trainer: the diffusion planner, its AR baseline and
the CCDD variant learn, the validation loss is the direct one, the exports plan like the trained modules,
stages freeze what they name, config errors name the key, and a recipe that records its data resumes exactly."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from trainer_checks import REPO, check_exact_resume

import pipelines.tasks  # noqa: F401 - registers the tasks
from latent.training.config import ConfigError, load_config
from latent.training.task import step_generator
from latent.training.trainer import Trainer
from modalities.data.driving import ACTIONS, DrivingDataset, PlanTokenizer, recorded_settings
from pipelines.planning import PlanningPipeline
from pipelines.tasks.common import sft_noise
from pipelines.tasks.driving import CCDDPlanner, plan_loss, planning_pipeline

torch.set_num_threads(1)  # the shared CPU is oversubscribed; one thread per process is the fastest here

TOK = PlanTokenizer(horizon=3)
RECIPE = REPO / "configs" / "driving_tiny.yaml"
TINY = ["adapter.width=32", "adapter.vehicle_tokens=2", "adapter.heads=2", "model.hidden_size=32",
        "model.num_layers=1", "model.num_heads=2", "trainer.progress=false", "trainer.tensorboard=false",
        "trainer.plot=false"]


def synthetic_dataset(n=32, seed=0):
    g = np.random.default_rng(seed)
    ego = np.stack([g.uniform(15, 30, n), np.zeros(n), g.integers(0, 3, n), np.full(n, 3), np.zeros(n)], 1)
    veh = np.zeros((n, 2, 6), np.float32)
    veh[..., 0] = g.uniform(-30, 60, (n, 2))
    veh[..., 4] = 1.0
    actions = g.integers(0, 5, (n, 3))
    # waypoints the sensors tell: forward at the ego's speed, a lane to the left from the rightmost lane
    step = np.stack([np.repeat(ego[:, :1], 3, 1), np.where(ego[:, 2:3] == 2, -4.0 / 3, 0.0).repeat(3, 1)], -1)
    way = np.cumsum(step, 1)
    z = np.zeros(n)
    return DrivingDataset(ego.astype(np.float32), veh, np.full(n, 2), actions, way.astype(np.float32),
                          z.astype(np.float32), z.astype(np.int64), z.astype(np.int64))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("driving") / "train.npz"
    return synthetic_dataset().save(path)


def config(data_file, out, *extra, recipe=RECIPE):
    return load_config(recipe, [*TINY, f"data.train={data_file}", f"data.valid={data_file}", f"run.output_dir={out}",
                                "trainer.save_every=0", *extra])


LEARN = ["trainer.max_steps=40", "trainer.batch_size=16", "optim.lr=3e-3", "optim.warmup_steps=5",
         "trainer.eval_every=20"]


@pytest.mark.parametrize("layout", ["prefix", "causal"])
def test_training_lowers_the_loss_and_the_export_plans_like_the_trained_modules(data_file, tmp_path, layout):
    share = "objective.full_mask_share=0" if layout == "causal" else "objective.full_mask_share=0.5"
    tr = Trainer(config(data_file, tmp_path / "run", *LEARN, f"model.attention_layout={layout}", share))
    res = tr.fit()
    assert res.completed and all(np.isfinite(res.losses))
    assert np.mean(res.losses[-8:]) < np.mean(res.losses[:8])
    vals = [e["val_loss"] for e in res.evals]
    assert len(vals) == 3 and vals[-1] < vals[0]
    # the validation loss is plan_loss with the fixed noise of validation batch 0, every time
    data = DrivingDataset.load(data_file)
    adapter, model = tr.modules.adapter.eval(), tr.modules.model.eval()
    t, noise = sft_noise(step_generator(0, 0, salt=1), len(data), TOK.length)
    with torch.no_grad():
        direct = plan_loss(adapter, model, data.inputs(), data.plan_ids(TOK), TOK, t=t, noise=noise).loss
        assert tr.task.evaluate(tr.modules, 7)["val_loss"] == pytest.approx(float(direct), rel=1e-5)
    assert vals[-1] == pytest.approx(float(direct), rel=1e-5)
    # the exported folder loads as a PlanningPipeline and plans as a pipeline of the trained modules
    loaded = PlanningPipeline.from_pretrained(res.pipeline_dir)
    trained = planning_pipeline(adapter, model, TOK, tr.cfg.decoding)
    # with the training labels' action shares, counted here from the recorded actions
    counts = np.bincount(data.actions.ravel(), minlength=len(ACTIONS))
    assert loaded.config.action_prior == pytest.approx((counts / counts.sum()).tolist())
    x = data.inputs([0, 1, 2, 3])
    out, want = loaded(x), trained(x)
    assert out.decoding == ("autoregressive" if layout == "causal" else "diffusion")
    assert torch.equal(out.tokens, want.tokens) and out.actions == want.actions
    torch.testing.assert_close(out.confidence, want.confidence)


def test_ccdd_learns_and_its_export_plans_like_the_trained_modules(data_file, tmp_path):
    recipe = REPO / "configs" / "driving_tiny_ccdd.yaml"
    tr = Trainer(config(data_file, tmp_path / "run", *LEARN, recipe=recipe))
    res = tr.fit()
    assert np.mean(res.losses[-8:]) < np.mean(res.losses[:8]) and res.evals[-1]["val_loss"] < res.evals[0]["val_loss"]
    import csv

    with open(res.run_dir / "train.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["loss"]) == pytest.approx(float(row["ce"]) + float(row["mse"]), rel=1e-5)  # lam = 1
    data = DrivingDataset.load(data_file)
    steps = torch.as_tensor(data.waypoints).diff(dim=1, prepend=torch.zeros(len(data), 1, 2))
    planner = CCDDPlanner.from_pretrained(res.pipeline_dir)
    torch.testing.assert_close(planner.mean, steps.mean((0, 1)))  # the training set's step statistics
    torch.testing.assert_close(planner.latents(data.waypoints) * planner.std + planner.mean, steps, atol=1e-4, rtol=0)
    trained = CCDDPlanner(tr.modules.adapter.eval(), tr.modules.model.eval(), TOK, planner.mean, planner.std)
    x = data.inputs([0, 1, 2])
    a, w = planner(x, 3, torch.Generator().manual_seed(1))
    a2, w2 = trained(x, 3, torch.Generator().manual_seed(1))
    assert a.shape == (3, 3) and ((a >= 0) & (a < 5)).all() and torch.equal(a, a2)
    torch.testing.assert_close(w, w2)


@pytest.mark.parametrize("recipe, extra", [("driving_tiny", []), ("driving_tiny", ["model.attention_layout=causal",
                                                                                   "objective.full_mask_share=0"]),
                                           ("driving_tiny_ccdd", [])])
def test_the_rows_a_process_takes_give_the_loss_of_the_whole_batch(data_file, tmp_path, recipe, extra):
    # DDP: each process takes rows of the same global batch (its noise included); the mean of their losses
    # must be the loss of the whole batch in one process
    tr = Trainer(config(data_file, tmp_path / "run", "trainer.batch_size=8", *extra,
                        recipe=REPO / "configs" / f"{recipe}.yaml"))
    task, stage = tr.task, tr.stages[0]
    batch = task.batch(3, stage)
    assert torch.equal(task.batch(3, stage)["inputs"].ego, batch["inputs"].ego)  # a function of the step
    with torch.no_grad():
        whole = task.loss(tr.modules, batch, stage).loss
        halves = [task.loss(tr.modules, task.split(batch, slice(i, i + 4)), stage).loss for i in (0, 4)]
    torch.testing.assert_close(whole, torch.stack(halves).mean(), atol=1e-5, rtol=1e-5)


def test_a_stage_trains_only_what_it_names_and_starts_from_an_export(data_file, tmp_path):
    recipe = OmegaConf.load(RECIPE)
    recipe.trainer.pop("max_steps")
    recipe.stages = [{"name": "adapter", "steps": 3, "freeze": ["backbone"]}]
    OmegaConf.save(recipe, tmp_path / "recipe.yaml")
    tr = Trainer(config(data_file, tmp_path / "run", "trainer.batch_size=8", recipe=tmp_path / "recipe.yaml"))
    before = {k: v.clone() for k, v in tr.modules.state_dict().items()}
    tr.fit()
    after = tr.modules.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(after[k], v)}
    assert changed and all(k.startswith("adapter.") for k in changed)  # the backbone is unchanged
    in_opt = {id(p) for g in tr.inner_opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in tr.modules.adapter.parameters()}
    assert all(id(p) not in in_opt for p in tr.modules.model.parameters())
    # a stage may start from an exported pipeline: at lr 0 the run keeps exactly the exported weights
    recipe.stages = [{"name": "tune", "steps": 1, "lr": 0.0, "init_from": str(tmp_path / "run" / "pipeline")}]
    OmegaConf.save(recipe, tmp_path / "tune.yaml")
    tuned = Trainer(config(data_file, tmp_path / "tuned", "trainer.batch_size=8", recipe=tmp_path / "tune.yaml"))
    tuned.fit()
    for k, v in tuned.modules.state_dict().items():
        assert torch.equal(v, after[k]), k


def test_full_mask_share_masks_whole_plans_of_that_share_and_keeps_the_rest(data_file, tmp_path):
    base = Trainer(config(data_file, tmp_path / "a", "objective.full_mask_share=0")).task
    shared = Trainer(config(data_file, tmp_path / "b", "objective.full_mask_share=0.5")).task
    stage = OmegaConf.create({"batch_size": 512})
    plain, full = base.batch(3, stage), shared.batch(3, stage)
    assert torch.equal(plain["plan"], full["plan"]) and torch.equal(plain["noise"], full["noise"])
    ones = full["t"] == 1.0
    assert 0.4 < ones.float().mean() < 0.6  # the share, up to sampling noise
    assert torch.equal(full["t"][~ones], plain["t"][~ones])  # the other rows keep their noise level
    assert not bool((plain["t"] == 1.0).any())


def test_config_errors_name_the_key(data_file, tmp_path, capsys):
    bad = {
        "trainer.steps=3": r"trainer\.steps -- did you mean trainer\.max_steps",
        "output_dir=runs/x": "output_dir",
        "adapter.widht=3": r"adapter\.widht -- did you mean adapter\.width",
        "adapter.hidden_size=3": "adapter.hidden_size",
        "plan.horizn=3": r"plan\.horizn",
        "plan.x_res=0": "plan: x_res",
        "decoding.commit=threshld": "decoding: .*threshld",
        "objective.name=tokens": "objective.name",
        "model.attention_layout=block_causal": "model.attention_layout",
        "data.train=x.npz": "data.valid",
        "data.train_episodes=0": "data.train_episodes",
        "objective.full_mask_share=1.0": "objective.full_mask_share",
    }
    for override, match in bad.items():
        with pytest.raises(ConfigError, match=match):
            load_config(RECIPE, [override])
    with pytest.raises(ConfigError, match="model.attention_layout"):
        load_config(REPO / "configs/driving_tiny_ccdd.yaml", ["model.attention_layout=causal"])
    for recipe in ("driving_tiny_ar", "driving_tiny_ccdd"):  # no masked plan to mask fully
        with pytest.raises(ConfigError, match="full_mask_share"):
            load_config(REPO / "configs" / f"{recipe}.yaml", ["objective.full_mask_share=0.5"])
    with pytest.raises(ConfigError, match="plan.horizon=2"):  # the data holds 3 decisions
        Trainer(config(data_file, tmp_path / "run", "plan.horizon=2"))
    with pytest.raises(ConfigError, match="model.max_position_embeddings"):
        Trainer(config(data_file, tmp_path / "run", "model.max_position_embeddings=4"))
    import train

    for name in ("driving_tiny", "driving_tiny_ar", "driving_tiny_ccdd"):
        train.main([str(REPO / "configs" / f"{name}.yaml"), "trainer.max_steps=7", "--print-config"])
        out = capsys.readouterr().out
        assert "task: driving" in out and "max_steps: 7" in out


def test_recipe_records_its_data_once_and_resumes_exactly(tmp_path):
    data = tmp_path / "data"
    record = [f"data.dir={data}", "data.densities=[1.0]", "data.train_episodes=1", "data.valid_episodes=1",
              "data.max_steps=6"]
    losses = check_exact_resume(RECIPE, [*TINY, *record, "trainer.max_steps=4", "trainer.batch_size=8",
                                         "trainer.eval_every=2"], tmp_path, n=2)
    assert all(np.isfinite(loss) for _, loss in losses)
    settings = recorded_settings(data / "train.npz")
    assert settings["episodes"] == 1 and settings["max_steps"] == 6 and settings["horizon"] == 3
    # other recording settings on the same folder are refused, naming the folder and the difference
    with pytest.raises(ConfigError, match=r"data\.dir=.*episodes"):
        Trainer(load_config(RECIPE, [*TINY, *record, "data.train_episodes=2", f"run.output_dir={tmp_path / 'other'}"]))

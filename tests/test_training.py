"""train.py, the one trainer (latent/training) and the text task: recipes, objectives, exact resume, atomic
checkpoints, stages, distributed runs, bad input."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from trainer_checks import check_exact_resume

import pipelines.tasks  # noqa: F401 - registers the built-in tasks
import train as train_cli
from latent.data.corpus import missing_sources
from latent.training.checkpoint import flatten, latest_checkpoint, read_state, unflatten, write_state
from latent.training.config import ConfigError, load_config
from latent.training.optim import warmup_cosine
from latent.training.trainer import Trainer, train

REPO = Path(__file__).resolve().parents[1]
needs_corpus = pytest.mark.skipif(bool(missing_sources()), reason=f"missing {missing_sources()} (.ci/run installs them)")
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_overrides(corpus, out):
    return [
        f"run.output_dir={out}", f"data.corpus_dir={corpus}", f"tokenizer.path={corpus / 'tok-320'}",
        "data.seq_len=32", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=2",
        "model.max_position_embeddings=64", "model.block_size=8",
        "trainer.batch_size=4", "trainer.max_steps=4", "trainer.progress=false", "trainer.tensorboard=false",
        "trainer.plot=false", "trainer.log_every=1", "trainer.save_every=0", "trainer.eval_every=0",
        "optim.warmup_steps=2", "optim.lr=3e-3",
        "eval.valid_sequences=4", "eval.batch_size=4", "eval.elbo_samples=2", "eval.num_samples=0",
        "eval.sample_length=8", "eval.sample_steps=8", "eval.sample_block_length=8",
    ]


def tiny(corpus, out, *extra, recipe="text_tiny.yaml"):
    """A config small enough for a few CPU steps per second."""
    return load_config(REPO / "configs" / recipe, tiny_overrides(corpus, out) + list(extra))


def losses(run_dir):
    with open(Path(run_dir) / "train.csv") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def evals(run_dir):
    with open(Path(run_dir) / "eval.csv") as f:
        return [(int(r["step"]), float(r["val_bits_per_token"])) for r in csv.DictReader(f)]


def bits(result, step):
    return next(e["val_bits_per_token"] for e in result.evals if e["step"] == step)


# ------------------------------------------------------------------------------------ config


def test_config_overrides_presets_and_near_matches(tmp_path):
    cfg = load_config(REPO / "configs/text_tiny.yaml", ["trainer.max_steps=200", "model.hidden_size=256"])
    assert cfg.trainer.max_steps == 200 and cfg.model.hidden_size == 256
    assert cfg.model.num_layers == 4 and cfg.model.name == "diffusion_transformer"  # from configs/model/tiny.yaml
    assert cfg.tokenizer.train_dir == "data/english/tokenizer-bpe4096"  # interpolation resolved
    with pytest.raises(ConfigError, match=r"trainer\.max_step\b.*did you mean trainer\.max_steps"):
        load_config(REPO / "configs/text_tiny.yaml", ["trainer.max_step=3"])
    with pytest.raises(ConfigError, match="model.hidden_size"):
        load_config(REPO / "configs/text_tiny.yaml", ["model.hiden_size=3"])
    with pytest.raises(ConfigError, match="trainer"):
        load_config(REPO / "configs/text_tiny.yaml", ["trainr.max_steps=3"])
    with pytest.raises(ConfigError, match="max_steps"):
        load_config(REPO / "configs/text_tiny.yaml", ["trainer.max_steps=many"])
    with pytest.raises(ConfigError, match="preset"):
        load_config(REPO / "configs/text_tiny.yaml", ["model.preset=tinny"])
    with pytest.raises(ConfigError, match="objective.name"):
        load_config(REPO / "configs/text_tiny.yaml", ["objective.name=diffusion"])
    # every shipped recipe loads
    for recipe in sorted((REPO / "configs").glob("text_*.yaml")):
        load_config(recipe)


def test_cli_reports_config_errors(capsys):
    with pytest.raises(SystemExit) as e:
        train_cli.main([str(REPO / "configs/text_tiny.yaml"), "trainer.max_step=3"])
    assert e.value.code == 2 and "did you mean trainer.max_steps" in capsys.readouterr().err
    train_cli.main([str(REPO / "configs/text_tiny.yaml"), "--print-config", "trainer.max_steps=9"])
    assert "max_steps: 9" in capsys.readouterr().out


def test_every_recipe_loads_with_the_same_keys(capsys):
    """Every recipe in configs/ resolves through the one schema, and --print-config works for it."""
    recipes = sorted((REPO / "configs").glob("*.yaml"))
    assert len(recipes) >= 8
    for recipe in recipes:
        cfg = load_config(recipe)
        for key in ("trainer.max_steps", "trainer.save_every", "trainer.log_every", "trainer.resume",
                    "run.output_dir", "run.seed"):
            assert OmegaConf.select(cfg, key) is not None, (recipe.name, key)
        assert cfg.trainer.max_steps == sum(s["steps"] for s in cfg.stages)
        train_cli.main([str(recipe), "--print-config"])
        assert f"task: {cfg.task}" in capsys.readouterr().out


def test_unknown_task_and_stage_keys_are_refused(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: juggling\n")
    with pytest.raises(SystemExit):
        train_cli.main([str(recipe)])
    assert "unknown task 'juggling'" in capsys.readouterr().err.lower()
    recipe.write_text("stages:\n  - {name: a, steps: 2, lr: 1.0e-3}\n  - {name: b, stepz: 2}\n")
    with pytest.raises(ConfigError, match=r"stages\.1\.stepz -- did you mean steps"):
        load_config(recipe)
    recipe.write_text("stages:\n  - {name: a, steps: 2}\n  - {name: b, steps: 3}\n")
    assert load_config(recipe).trainer.max_steps == 5
    assert load_config(recipe, ["stages.1.steps=7"]).trainer.max_steps == 9
    with pytest.raises(ConfigError, match="add up to 5"):
        load_config(recipe, ["trainer.max_steps=4"])
    with pytest.raises(ConfigError, match="unique"):
        load_config(recipe, ["stages.1.name=a"])


def test_warmup_cosine_shape():
    lr = [warmup_cosine(s, 10, 100, 0.1) for s in range(101)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert lr[100] == pytest.approx(0.1) and all(a >= b for a, b in zip(lr[10:], lr[11:], strict=False))


def test_flatten_roundtrip(tmp_path):
    obj = {"state": {3: {"step": torch.tensor(2.0), "m": torch.randn(2, 3)}}, "groups": [{"betas": (0.9, 0.95),
           "params": ["a", "b"], "lr": 1e-3, "none": None}], "py": (3, tuple(range(5)), None)}
    write_state(tmp_path, "x", obj)
    back = read_state(tmp_path, "x")
    assert back["groups"] == obj["groups"] and back["py"] == obj["py"]
    assert torch.equal(back["state"][3]["m"], obj["state"][3]["m"])
    skel, tensors = flatten(obj)
    json.dumps(skel)
    assert unflatten(skel, tensors)["groups"][0]["betas"] == (0.9, 0.95)


# ------------------------------------------------------------------------------------ training


@needs_corpus
def test_train_mdm_learns_and_writes_everything(corpus, tmp_path):
    out = tmp_path / "run"
    cfg = tiny(corpus, out, "trainer.max_steps=20", "trainer.tensorboard=true", "trainer.plot=true",
               "eval.num_samples=1", "eval.elbo_samples=4", "trainer.save_every=10", "trainer.keep_checkpoints=2", "optim.lr=1e-2")
    res = train(cfg)
    assert res.completed and res.step == 20
    ls = [v for _, v in losses(out)]
    assert len(ls) == 20 and all(math.isfinite(v) for v in ls)
    assert sum(ls[-5:]) / 5 < sum(ls[:5]) / 5  # it learns
    ev = evals(out)
    assert [s for s, _ in ev] == [0, 20] and ev[1][1] < ev[0][1]
    assert abs(ev[0][1] - math.log2(320)) < 2.0  # untrained ~ uniform over the vocabulary
    for name in ("config.yaml", "loss.png", "result.json", "samples.txt", "pipeline/model/config.json",
                 "pipeline/model_index.json", "pipeline/tokenizer/tokenizer.json", "pipeline/training.json"):
        assert (out / name).exists(), name
    assert list((out / "tb").iterdir())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000010", "step_00000020"]
    assert OmegaConf.load(out / "config.yaml").trainer.max_steps == 20
    samples = res.extra["samples"]
    assert samples and isinstance(samples[0]["text"], str)
    from pipelines.text import TextDiffusionPipeline

    pipe = TextDiffusionPipeline.from_pretrained(str(out / "pipeline"))
    assert pipe.model.config.hidden_size == 32
    # the exported weights are the trained ones: the pipeline's bound equals the final evaluation
    from latent.training.evaluate import validation_bound

    trainer_val = bits(res, 20)
    again = validation_bound(pipe.model, Trainer(tiny(corpus, tmp_path / "v", "trainer.max_steps=20")).task.val_ids,
                             "mdm", pipe.model.config.mask_token_id, None, num_samples=4, batch_size=4)
    assert again["bits_per_token"] == pytest.approx(trainer_val, rel=1e-5)


@needs_corpus
@pytest.mark.parametrize("recipe,extra", [
    ("text_tiny_ar.yaml", []),
    ("text_tiny_bd3.yaml", ["model.block_size=8"]),
    ("text_tiny_sft.yaml", []),
])
def test_other_objectives_train(corpus, tmp_path, recipe, extra):
    out = tmp_path / "run"
    res = train(tiny(corpus, out, *extra, "eval.num_samples=1", recipe=recipe))
    assert res.completed and all(math.isfinite(v) for _, v in losses(out))
    assert math.isfinite(bits(res, res.step)) and res.extra["samples"]


@needs_corpus
def test_exact_resume_and_half_written_checkpoints(corpus, tmp_path):
    """2N steps straight == N steps, stop, resume, N steps -- in every logged loss and eval."""
    n = 3
    common = ["trainer.max_steps=6", "trainer.eval_every=2", "trainer.save_every=3", "trainer.grad_accum=2"]
    straight = tmp_path / "straight"
    train(tiny(corpus, straight, *common))
    split = tmp_path / "split"
    first = train(tiny(corpus, split, *common, f"trainer.stop_at_step={n}"))
    assert not first.completed and first.step == n
    # a killed run: a half-written folder, a folder never marked complete, and log rows after the checkpoint
    (split / "checkpoints" / ".tmp-step_00000004").mkdir()
    shutil.copytree(split / "checkpoints" / "step_00000003", split / "checkpoints" / "step_00000005")
    (split / "checkpoints" / "step_00000005" / "COMPLETE").unlink()
    with open(split / "train.csv", "a") as f:
        f.write("4,main,123.0,0,0,0,0,0\n")
    assert latest_checkpoint(split / "checkpoints").name == "step_00000003"
    second = train(tiny(corpus, split, *common))
    assert second.completed and second.step == 6
    assert losses(split) == losses(straight)
    assert evals(split) == evals(straight)
    assert not (split / "checkpoints" / ".tmp-step_00000004").exists()


@needs_corpus
def test_killed_during_a_checkpoint_write_resumes_exactly(corpus, tmp_path):
    """The check every task's recipe passes: SIGKILL while checkpoint N + 1 is written, rerun, same losses."""
    check_exact_resume(REPO / "configs/text_tiny.yaml", tiny_overrides(corpus, tmp_path) + ["trainer.max_steps=4"],
                       tmp_path, n=2)


@needs_corpus
def test_stages_train_what_they_name_and_resume_across_them(corpus, tmp_path):
    """Stage 1 trains only the blocks, stage 2 everything at its own lr; frozen weights never move and are
    not in the optimizer; a run stopped at the stage boundary resumes into stage 2 exactly."""
    recipe = tmp_path / "staged.yaml"
    recipe.write_text((REPO / "configs/text_tiny.yaml").read_text().replace("max_steps: 800", "") + (
        "stages:\n"
        "  - {name: blocks, steps: 2, lr: 3.0e-3, train: [model.blocks.*]}\n"
        "  - {name: all, steps: 2, lr: 1.0e-3, warmup_steps: 0}\n"))
    over = [o for o in tiny_overrides(corpus, tmp_path / "a") if not o.startswith("trainer.max_steps")]
    tr = Trainer(load_config(recipe, over))
    embed = tr.modules.model.embed.weight.detach().clone()
    seen = {}
    orig = tr._begin_stage

    def spy(i, step):
        orig(i, step)
        names = {n for n, p in tr.modules.named_parameters() if p.requires_grad}
        seen[i] = (names, {id(p) for g in tr.inner_opt.param_groups for p in g["params"]},
                   {id(p) for n, p in tr.modules.named_parameters() if n in names}, tr.inner_opt.param_groups[0]["lr"])

    tr._begin_stage = spy
    res = tr.fit()
    assert res.completed and res.step == 4
    names0, opt0, want0, _ = seen[0]
    assert names0 and all(n.startswith("model.blocks.") for n in names0) and opt0 == want0
    assert "model.embed.weight" in seen[1][0] and seen[1][1] == seen[1][2]
    rows = list(csv.DictReader(open(tmp_path / "a" / "train.csv")))
    assert [r["stage"] for r in rows] == ["blocks", "blocks", "all", "all"]
    assert float(rows[2]["lr"]) <= 1e-3 < float(rows[0]["lr"]) * 10
    assert (tmp_path / "a" / "pipelines" / "blocks" / "model_index.json").is_file()
    # the first stage never moved the embedding, the second did
    from safetensors.torch import load_file

    first = load_file(str(tmp_path / "a" / "pipelines" / "blocks" / "model" / "diffusion_pytorch_model.safetensors"))
    assert torch.equal(first["embed.weight"], embed)
    assert not torch.equal(tr.modules.model.embed.weight, embed)
    # stop exactly at the stage boundary, resume into the second stage: the same losses
    b = tmp_path / "b"
    over_b = [o for o in tiny_overrides(corpus, b) if not o.startswith("trainer.max_steps")]
    train(load_config(recipe, over_b + ["trainer.stop_at_step=2"]))
    train(load_config(recipe, over_b))
    assert losses(b) == losses(tmp_path / "a")


@needs_corpus
def test_grad_accumulation_matches_one_big_batch(corpus, tmp_path):
    a = train(tiny(corpus, tmp_path / "a", "trainer.max_steps=3", "eval.final=false", "trainer.eval_at_start=false"))
    b = train(tiny(corpus, tmp_path / "b", "trainer.max_steps=3", "trainer.grad_accum=2", "eval.final=false",
                   "trainer.eval_at_start=false"))
    for x, y in zip(a.losses, b.losses, strict=True):
        assert x == pytest.approx(y, rel=1e-5)


@needs_corpus
def test_frozen_parameters_have_no_optimizer_state(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "f", "optim.freeze=[model.embed.*,model.blocks.0.*]", "trainer.max_steps=2",
               "trainer.eval_at_start=false", "eval.final=false")
    tr = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in tr.modules.named_parameters()}
    tr.fit()
    frozen = {n for n, p in tr.modules.named_parameters() if not p.requires_grad}
    assert "model.embed.weight" in frozen and any(n.startswith("model.blocks.0.") for n in frozen)
    state_params = {id(p) for p in tr.inner_opt.state}
    for n, p in tr.modules.named_parameters():
        if n in frozen:
            assert id(p) not in state_params and torch.equal(p, before[n])
        else:
            assert id(p) in state_params
    with pytest.raises(ValueError, match="matches no parameter"):
        Trainer(tiny(corpus, tmp_path / "g", "optim.freeze=[encoder.*]")).fit()


# ------------------------------------------------------------------------------------ bad input


@needs_corpus
def test_bad_input_fails_before_training(corpus, tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(FileNotFoundError, match="not found"):
        Trainer(tiny(corpus, out, f"data.train_files=[{tmp_path / 'nope.jsonl'}]",
                     f"data.valid_files=[{corpus / 'valid.jsonl'}]"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        Trainer(tiny(corpus, out, f"data.train_files=[{empty}]", f"data.valid_files=[{corpus / 'valid.jsonl'}]"))
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        Trainer(tiny(corpus, out, "data.seq_len=128"))
    with pytest.raises(ConfigError, match="multiple of model.block_size"):
        Trainer(tiny(corpus, out, "data.seq_len=36", "model.block_size=8", recipe="text_tiny_bd3.yaml"))
    with pytest.raises(ConfigError, match="attention_layout"):
        Trainer(tiny(corpus, out, "model.attention_layout=bidirectional", recipe="text_tiny_ar.yaml"))
    with pytest.raises(ConfigError, match="certainty_weight are for block_diffusion"):
        Trainer(tiny(corpus, out, "objective.certainty_weight=1.0"))
    with pytest.raises(ConfigError, match="objective.certainty_temperature must be > 0"):
        Trainer(tiny(corpus, out, "objective.certainty_temperature=0", recipe="text_tiny_bd3.yaml"))
    assert not (out / "train.csv").exists()
    # a checkpoint from a different model shape
    ok = tmp_path / "ok"
    train(tiny(corpus, ok, "trainer.max_steps=1", "trainer.eval_at_start=false", "eval.final=false"))
    with pytest.raises(ValueError, match=r"(?s)different model shape.*model\.hidden_size: checkpoint 32 vs now 48"):
        Trainer(tiny(corpus, ok, "model.hidden_size=48"))
    with pytest.raises(ConfigError, match=r"model.init_from fixes the architecture.*'hidden_size': \(48, 32\)"):
        Trainer(tiny(corpus, tmp_path / "x", "model.hidden_size=48", f"model.init_from={ok / 'pipeline'}"))


# ------------------------------------------------------------------------------------ distributed


@needs_corpus
def test_two_gloo_processes_match_one_process(corpus, tmp_path):
    """torchrun, 2 CPU processes (DDP over gloo), global batch 4 = 2 x 2 rows: the same logged losses
    and validation bounds as one process with the whole batch."""
    extra = ["trainer.max_steps=3", "trainer.save_every=2"]
    single = tmp_path / "single"
    train(tiny(corpus, single, *extra))
    ddp = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", str(REPO / "train.py"),
           str(REPO / "configs/text_tiny.yaml"), *tiny_overrides(corpus, ddp), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = losses(single), losses(ddp)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert x == pytest.approx(y, rel=1e-5)
    for (s1, x), (s2, y) in zip(evals(single), evals(ddp), strict=True):
        assert s1 == s2 and x == pytest.approx(y, rel=1e-5)
    assert (ddp / "checkpoints" / "step_00000002" / "rng_rank1.json").exists()


@needs_corpus
def test_tokenizer_is_trained_once_and_shared_with_sft(corpus, tmp_path):
    tok_dir = tmp_path / "tok"
    common = ["tokenizer.path=null", f"tokenizer.train_dir={tok_dir}", "tokenizer.vocab_size=300"]
    a = Trainer(tiny(corpus, tmp_path / "a", *common))
    assert (tok_dir / "tokenizer.json").is_file() and len(a.task.tokenizer) == 300
    b = Trainer(tiny(corpus, tmp_path / "b", *common, recipe="text_tiny_sft.yaml"))  # same tokenizer for SFT
    assert b.task.tokenizer.get_vocab() == a.task.tokenizer.get_vocab()
    with pytest.raises(ConfigError, match="other settings"):
        Trainer(tiny(corpus, tmp_path / "c", *common[:-1], "tokenizer.vocab_size=310"))


@needs_corpus
@pytest.mark.parametrize("objective,layout", [("block_diffusion", "block_causal"), ("causal", "causal")])
def test_sft_pairs_train_block_diffusion_and_causal_models_on_the_answer_only(corpus, tmp_path, objective, layout):
    """data.format=sft with the block diffusion and causal objectives: the task's loss is the objective's
    loss with each row's prompt (its SFT prompt length) out of the targets; mdm on pairs is refused."""
    from latent.losses import block_diffusion_loss, causal_lm_loss

    tr = Trainer(tiny(corpus, tmp_path / objective, f"objective.name={objective}",
                      f"model.attention_layout={layout}", recipe="text_tiny_sft.yaml"))
    task, model = tr.task, tr.modules.model
    b = task.batch(0, tr.stages[0])
    ids = b["ids"]
    prompt = torch.arange(ids.shape[1])[None] < b["plens"][:, None]
    assert bool(prompt.any()) and bool((~prompt).any())
    got = task.loss(tr.modules, b, None).loss
    if objective == "causal":
        want = causal_lm_loss(model, ids, bos_token_id=task.eos, prompt_mask=prompt).loss
    else:
        want = block_diffusion_loss(model, ids, task.mask_id, task.block_size, t=b["t"], noise=b["noise"],
                                    prompt_mask=prompt, per_block_t=task.cfg.objective.per_block_t,
                                    schedule=task.cfg.objective.schedule, eps=task.cfg.objective.eps).loss
        plain = block_diffusion_loss(model, ids, task.mask_id, task.block_size, t=b["t"], noise=b["noise"],
                                     per_block_t=task.cfg.objective.per_block_t).loss
        assert not torch.allclose(got, plain)  # the prompt really is out of the loss
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="data.format='sft'"):
        Trainer(tiny(corpus, tmp_path / "mdm", "objective.name=mdm", recipe="text_tiny_sft.yaml"))

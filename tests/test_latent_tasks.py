"""The latent tasks on the one trainer (compressor, thought_vae, joint, latent_reasoning) with their recipes at
tiny sizes: training lowers the loss of a fixed batch, a batch's rows give the same loss in any split (the
DDP rule), exports load back and reproduce the trained modules, frozen parameters stay put, config errors
name the key, and the joint and thought-VAE recipes resume exactly."""

from pathlib import Path

import pytest
import torch
from trainer_checks import check_exact_resume

import pipelines.tasks  # noqa: F401 - registers the built-in tasks
from latent.data.arithmetic import encode_fixed, make_tokenizer
from latent.training.config import ConfigError, load_config
from latent.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
QUIET = ["trainer.progress=false", "trainer.tensorboard=false", "trainer.plot=false", "trainer.threads=1",
         "trainer.save_every=0", "trainer.log_every=1"]
VAE_TINY = ["data.n_train=60", "data.n_test=8", "model.hidden_size=16", "model.num_layers=1", "model.num_heads=2",
            "trainer.batch_size=8", "optim.warmup_steps=1"]
COMP_TINY = ["data.n_train=24", "data.n_test=8", "model.hidden_size=32", "model.num_layers=1", "model.decoder_layers=1",
             "model.num_heads=2", "model.domain_vocab=true", "trainer.batch_size=8", "optim.warmup_steps=1"]
BACKBONE_TINY = ["data.n_train=48", "data.n_test=8", "model.hidden_size=32", "model.num_layers=1", "trainer.batch_size=8",
                 "optim.warmup_steps=1", "eval.problems=4", "eval.batch_size=4"]


def build(recipe, overrides, out) -> Trainer:
    return Trainer(load_config(CONFIGS / recipe, [*QUIET, f"run.output_dir={out}", *overrides]))


@torch.no_grad()
def fixed_loss(trainer, step=0) -> float:
    task, st = trainer.task, trainer.stages[0]
    task.train_mode(trainer.modules)  # the training loss, augmentation included (its noise is in the batch)
    return float(task.loss(trainer.modules, task.batch(step, st), st).loss)


def fit(trainer):
    """Train; returns (loss of the step-0 batch before, after, the result)."""
    before = fixed_loss(trainer)
    result = trainer.fit()
    return before, fixed_loss(trainer), result


@torch.no_grad()
def assert_rows_independent(trainer, metric=None):
    """The loss of a batch equals the mean of its halves' losses: every random draw belongs to a row."""
    task, st, mods = trainer.task, trainer.stages[0], trainer.modules
    task.train_mode(mods)
    batch = task.batch(3, st)
    B = st.batch_size or trainer.cfg.trainer.batch_size

    def value(out):
        return out.metrics[metric] if metric else float(out.loss)

    whole = value(task.loss(mods, batch, st))
    halves = [value(task.loss(mods, task.split(batch, slice(a, a + B // 2)), st)) for a in (0, B // 2)]
    assert whole == pytest.approx(sum(halves) / 2, rel=1e-5)


# ---- autoencoders -------------------------------------------------------------------------------------
def test_thought_vae_trains_exports_and_freezes(tmp_path):
    from transformers import AutoTokenizer

    from autoencoders.thought_vae import ThoughtVAE

    trainer = build("latent_thought_vae.yaml", [*VAE_TINY, "trainer.max_steps=12", "optim.lr=1e-2",
                                                'optim.freeze=["thought_vae.decoder.*"]'], tmp_path)
    assert_rows_independent(trainer)
    vae = trainer.modules.thought_vae
    frozen = {n: p.clone() for n, p in vae.named_parameters() if n.startswith("decoder.")}
    others = {n: p.clone() for n, p in vae.named_parameters() if not n.startswith("decoder.")}
    before, after, res = fit(trainer)
    assert after < before
    assert all(torch.equal(p, frozen[n]) for n, p in vae.named_parameters() if n in frozen)
    assert all(not torch.equal(p, others[n]) for n, p in vae.named_parameters() if n in others)
    in_opt = {id(p) for g in trainer.inner_opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for n, p in vae.named_parameters() if n in frozen)

    loaded = ThoughtVAE.from_pretrained(res.pipeline_dir).eval()
    ids = trainer.task.test_ids
    with torch.no_grad():
        mu = vae.encode(ids)[0]
        torch.testing.assert_close(loaded.encode(ids)[0], mu)
        torch.testing.assert_close(loaded.decode(mu), vae.decode(mu))
        want = 1.0 / float(vae.encode(trainer.task.ids)[0].std())
    assert loaded.config.scaling_factor == pytest.approx(want, rel=1e-5)
    tok = AutoTokenizer.from_pretrained(res.pipeline_dir / "tokenizer")
    assert tok.get_vocab() == make_tokenizer().get_vocab()
    assert set(res.evals[-1]) >= {"acc", "exact", "kl", "acc_sampled", "exact_sampled"}


def test_compressor_trains_and_exports(tmp_path):
    from autoencoders.compressor import TextCompressor

    trainer = build("latent_compressor.yaml", [*COMP_TINY, "trainer.max_steps=10", "optim.lr=5e-3"], tmp_path)
    assert_rows_independent(trainer, metric="ce")  # the alignment term averages over latents, not rows
    before, after, res = fit(trainer)
    assert after < before
    m = trainer.modules.compressor.eval()
    loaded = TextCompressor.from_pretrained(res.pipeline_dir).eval()
    assert loaded.config.output_vocab == m.config.output_vocab and loaded.num_latents == 16 // 4
    b = m.tokenize(trainer.task.test_texts)
    with torch.no_grad():
        z = m.encode(b["input_ids"], b["attention_mask"])
        torch.testing.assert_close(loaded.encode(b["input_ids"], b["attention_mask"]), z)
        torch.testing.assert_close(loaded.decode(z), m.decode(z))
    assert set(res.evals[-1]) >= {"acc_noise_0", "acc_noise_0.3", "acc_noise_0.6"}


def test_thought_vae_recipe_resumes_exactly(tmp_path):
    check_exact_resume(CONFIGS / "latent_thought_vae.yaml", [*VAE_TINY, "trainer.max_steps=4"], tmp_path, n=2)


# ---- joint --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["joint", "discrete"])
def test_joint_trains_and_export_reproduces(tmp_path, mode):
    from pipelines.tasks.joint import JointGenerator

    trainer = build("latent_joint.yaml", [*BACKBONE_TINY, f"objective.mode={mode}", "trainer.max_steps=12",
                                          "optim.lr=3e-3"], tmp_path)
    assert_rows_independent(trainer)
    before, after, res = fit(trainer)
    assert after < before
    assert set(res.evals[-1]) >= {"acc", "acc_d1", "acc_d4"}
    live = trainer.task.generator(trainer.modules)
    loaded = JointGenerator.from_pretrained(res.pipeline_dir)
    qs = ["4+5*2", "7-3", "12+3-5"]
    a = live(questions=qs, steps=3, generator=torch.Generator().manual_seed(0))
    b = loaded(questions=qs, steps=3, generator=torch.Generator().manual_seed(0))
    assert a.texts == b.texts and torch.equal(a.sequences, b.sequences)
    if mode == "joint":
        torch.testing.assert_close(a.latents, b.latents)
        torch.testing.assert_close(loaded.encode_latents(["4+5=9"]), live.encode_latents(["4+5=9"]))
    else:
        assert a.latents is None and loaded.scheduler is None


def test_joint_recipe_resumes_exactly(tmp_path):
    check_exact_resume(CONFIGS / "latent_joint.yaml", [*BACKBONE_TINY, "trainer.max_steps=4"], tmp_path, n=2)


# ---- latent reasoning ---------------------------------------------------------------------------------
def test_latent_reasoning_trains_its_vae_first_and_exports_a_pipeline(tmp_path):
    from pipelines.latent_reasoning import LatentReasoningPipeline

    vae_run = tmp_path / "vae"
    vae_over = '["' + '","'.join([*VAE_TINY, *QUIET, "trainer.max_steps=2", "model.latent_dim=8"]) + '"]'
    over = [*BACKBONE_TINY, "trainer.max_steps=10", "optim.lr=3e-3", "model.latent_dim=8", "data.thought_blocks=2",
            f"thought_vae.path={vae_run}", f"thought_vae.overrides={vae_over}", "eval.block_steps=2"]
    trainer = build("latent_reasoning.yaml", over, tmp_path / "run")
    assert (vae_run / "pipeline" / "config.json").is_file()  # trained by its recipe on first use
    assert_rows_independent(trainer)
    before, after, res = fit(trainer)
    assert after < before
    assert "thought_step_acc" in res.evals[-1]
    live = trainer.task.pipeline(trainer.modules)
    loaded = LatentReasoningPipeline.from_pretrained(res.pipeline_dir)
    loaded.set_progress_bar_config(disable=True)
    a = live(["4+5*2", "7-3"], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    b = loaded(["4+5*2", "7-3"], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.thought_latents, b.thought_latents)
    assert a.answers == b.answers and a.thoughts == b.thoughts

    # the backbone's latent stream must hold the VAE's thoughts
    with pytest.raises(ConfigError, match="model.latent_dim=16 but the thought VAE"):
        build("latent_reasoning.yaml", [*over, "model.latent_dim=16", "thought_vae.recipe=null"], tmp_path / "bad")


def test_reasoning_baselines_are_the_discrete_joint_model(tmp_path):
    from pipelines.tasks.joint import JointGenerator

    trainer = build("latent_reasoning.yaml", [*BACKBONE_TINY, "objective.method=cot", "trainer.max_steps=2",
                                              "eval.problems=2"], tmp_path)
    res = trainer.fit()
    gen = JointGenerator.from_pretrained(res.pipeline_dir)
    assert gen.settings["mode"] == "discrete" and gen.settings["target"] == "cot"
    assert gen.settings["target_length"] == 35 and gen.settings["question_suffix"] == ""
    assert trainer.task.ids.shape[1] == 10 + 35


# ---- config errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe, override, key", [
    ("latent_compressor.yaml", "model.hiden_size=8", "model.hidden_size"),
    ("latent_compressor.yaml", "model.compression=3", "model.compression"),
    ("latent_thought_vae.yaml", "data.n_test=2", "data.n_test"),
    ("latent_thought_vae.yaml", "data.difficulties=[0,1]", "data.difficulties"),
    ("latent_joint.yaml", "objective.mode=both", "objective.mode"),
    ("latent_joint.yaml", "objective.lam=-1", "objective.lam"),
    ("latent_joint.yaml", "objective.mode=continuous", "latents.source=compressor"),
    ("latent_joint.yaml", "eval.order=left", "eval.order"),
    ("latent_textgen.yaml", "latents.sourse=minilm", "latents.source"),
    ("latent_reasoning.yaml", "objective.method=thoughts", "objective.method"),
    ("latent_reasoning.yaml", "objective.p_uncond=1.5", "objective.p_uncond"),
    ("latent_reasoning.yaml", "thought_vae.path=null", "thought_vae.path"),
])
def test_config_errors_name_the_key(recipe, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(CONFIGS / recipe, [override])


def test_build_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.target_length=2 is too short"):
        build("latent_joint.yaml", [*BACKBONE_TINY, "objective.mode=discrete", "data.target_length=2"], tmp_path)
    with pytest.raises(FileNotFoundError, match=r"thought_vae\.path=.*holds no saved ThoughtVAE"):
        build("latent_reasoning.yaml", [*BACKBONE_TINY, f"thought_vae.path={tmp_path / 'none'}",
                                        "thought_vae.recipe=null"], tmp_path / "run")


def test_recipes_print_their_config():
    import train as train_cli

    for recipe in ("latent_compressor", "latent_thought_vae", "latent_joint", "latent_reasoning", "latent_textgen"):
        assert train_cli.main([str(CONFIGS / f"{recipe}.yaml"), "--print-config"]) is None


def test_arithmetic_encoding_pads_where_the_tasks_expect():
    tok = make_tokenizer()
    q = encode_fixed(tok, ["4+5"], 5, tok.pad_token_id, left=True)
    a = encode_fixed(tok, ["9"], 3, tok.eos_token_id, eos=True)
    assert q[0, :2].tolist() == [tok.pad_token_id] * 2 and tok.decode(q[0, 2:]) == "4+5"
    assert a[0].tolist() == tok("9", add_special_tokens=False)["input_ids"] + [tok.eos_token_id] * 2
    with pytest.raises(ValueError, match="more than length=2"):
        encode_fixed(tok, ["123"], 2, 0)


def test_joint_latent_dropout_and_shared_time_coupling(tmp_path):
    """latent_dropout puts the chosen rows' latents at pure noise and leaves every other draw as it was;
    shared coupling puts the latents at the tokens' noise level."""
    base = [*BACKBONE_TINY, "trainer.max_steps=1"]
    plain = build("latent_joint.yaml", base, tmp_path / "a").task
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    idx = torch.arange(32)
    ref = plain.draw(g(), idx)
    drop = build("latent_joint.yaml", [*base, "objective.latent_dropout=0.5"], tmp_path / "b").task.draw(g(), idx)
    for key in ("ids", "t", "noise", "latent_noise"):
        assert torch.equal(drop[key], ref[key]), key
    hit = drop["timesteps"] == 999
    assert 0 < int(hit.sum()) < 32 and torch.equal(drop["timesteps"][~hit], ref["timesteps"][~hit])
    everything = build("latent_joint.yaml", [*base, "objective.latent_dropout=1.0"], tmp_path / "c").task
    assert (everything.draw(g(), idx)["timesteps"] == 999).all()
    shared = build("latent_joint.yaml", [*base, "objective.time_coupling=shared"], tmp_path / "d").task.draw(g(), idx)
    assert torch.equal(shared["timesteps"], (ref["t"].double() * 1000).long().clamp(0, 999))
    own = build("latent_joint.yaml", [*base, "objective.self_latents=0.5"], tmp_path / "f")
    mine = own.task.draw(g(), idx)
    assert all(torch.equal(mine[key], ref[key]) for key in ref)
    assert 0 < int(mine["self_latent_rows"].sum()) < 32
    assert "self_latent_rows" not in ref
    for bad, key in (("objective.latent_dropout=1.5", "objective.latent_dropout"),
                     ("objective.self_latents=-0.1", "objective.self_latents"),
                     ("objective.time_coupling=tied", "objective.time_coupling")):
        with pytest.raises(ConfigError, match=key):
            build("latent_joint.yaml", [*base, bad], tmp_path / "e")


def test_minilm_states_cache_gives_the_same_latents(tmp_path):
    from pipelines.tasks.joint import minilm_latents

    texts = ["4+5=9", "12-3*2=6", "7=7"]
    z, basis = minilm_latents(texts, 4, 8)
    z1, b1 = minilm_latents(texts, 4, 8, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    z2, _ = minilm_latents(texts, 4, 8, cache_dir=tmp_path)  # read back
    torch.testing.assert_close(z1, z)
    torch.testing.assert_close(z2, z)
    torch.testing.assert_close(b1["components"], basis["components"])
    minilm_latents(texts[:2], 4, 8, cache_dir=tmp_path)  # other texts: another file
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_pooled_states_are_the_mean_of_each_run_of_kept_states():
    from pipelines.tasks.joint import pool_states

    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 5, generator=g)
    keep = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]]).bool()
    pooled, slots = pool_states(h, keep, 3)
    assert pooled.shape == (3, 3, 5)
    for b in range(3):
        for j in range(3):
            rows = [i for i in range(3 * j, min(3 * j + 3, 7)) if keep[b, i]]
            assert bool(slots[b, j]) == bool(rows)
            want = h[b, rows].mean(0) if rows else torch.zeros(5)
            torch.testing.assert_close(pooled[b, j], want)
    same, kept = pool_states(h, keep, 1)
    torch.testing.assert_close(same, h * keep[..., None])
    assert torch.equal(kept, keep)
    with pytest.raises(ValueError, match="pool"):
        pool_states(h, keep, 0)


def test_pooled_minilm_latents_train_export_and_encode_alike(tmp_path):
    from pipelines.tasks.joint import JointGenerator, minilm_latents, pool_states

    texts = ["4+5=9", "12-3*2=6", "7=7"]
    full, _ = minilm_latents(texts, 4, 8)
    z, basis = minilm_latents(texts, 4, 8, pool=4)
    assert z.shape == (3, 2, 4)
    # the basis is fitted on the pooled states, so projecting a plain pooling of the raw states gives the latents
    from transformers import AutoModel, AutoTokenizer

    from autoencoders.compressor import default_encoder_path

    path = default_encoder_path()
    tok, enc = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    b = tok(texts, padding="max_length", max_length=8, truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = enc(**b).last_hidden_state.float()
    ph, slots = pool_states(h, b["attention_mask"].bool(), 4)
    want = ((ph - basis["mean"]) @ basis["components"]) / basis["std"] * slots[..., None]
    torch.testing.assert_close(z, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(z, full[:, ::4])

    trainer = build("latent_joint.yaml", [*BACKBONE_TINY, "latents.pool=4", "trainer.max_steps=2"], tmp_path)
    assert trainer.task.latents.shape[1] == 4  # 16 MiniLM tokens, 4 slots
    res = trainer.fit()
    loaded = JointGenerator.from_pretrained(res.pipeline_dir)
    assert loaded.settings["latent_shape"][0] == 4 and loaded.settings["latent_pool"] == 4
    torch.testing.assert_close(loaded.encode_latents(["4+5=9"]),
                               trainer.task.generator(trainer.modules).encode_latents(["4+5=9"]))
    from latent.data.arithmetic import equation_text

    texts = [equation_text(p) for p in trainer.task.train_set[:3]]
    torch.testing.assert_close(loaded.encode_latents(texts), trainer.task.latents[:3], atol=1e-5, rtol=1e-5)
    for bad in ("latents.pool=0", "latents.pool=2 latents.source=compressor"):
        with pytest.raises(ConfigError, match="latents.pool"):
            build("latent_joint.yaml", [*BACKBONE_TINY, *bad.split()], tmp_path / "e")


def test_joint_tokens_decoded_next_to_latents_left_at_noise(tmp_path):
    """``latent_stream="noise"`` against a plain loop: the latents stay the given noise at the pure-noise level
    and, one token a step, the most confident masked position takes its argmax."""
    from latent.joint import pure_noise_timestep
    from pipelines.tasks.joint import JointGenerator

    trainer = build("latent_joint.yaml", [*BACKBONE_TINY, "objective.latent_dropout=0.5", "latents.pool=4",
                                          "eval.latent_stream=noise", "trainer.max_steps=6", "optim.lr=3e-3"], tmp_path)
    res = trainer.fit()
    gen = JointGenerator.from_pretrained(res.pipeline_dir)
    assert gen.settings["latent_stream"] == "noise"  # the recipe's eval.latent_stream is the export's default
    qs = ["4+5*2", "7-3", "12+3-5"]
    noise = torch.randn(3, *gen.settings["latent_shape"], generator=torch.Generator().manual_seed(1))
    out = gen(questions=qs, latent_stream="noise", latents=noise)
    assert out.latents is None

    d, mask = gen.diffusion, gen.tokenizer.mask_token_id
    level = torch.full((3,), pure_noise_timestep(d) / d.num_train_timesteps)
    prompt = gen.encode_questions(qs)
    L = gen.settings["target_length"]
    seq = torch.cat([prompt, torch.full((3, L), mask)], 1)
    with torch.no_grad():
        for _ in range(L):
            logits = gen.model(seq, latents=noise, timestep=level).logits[:, -L:].float()
            logits[..., mask] = -torch.inf
            p, tok = logits.softmax(-1).max(-1)
            for b in range(3):
                open_ = [i for i in range(L) if seq[b, -L + i] == mask]
                best = max(open_, key=lambda i: p[b, i])
                seq[b, -L + best] = tok[b, best]
    assert torch.equal(out.sequences, seq)
    # the same noise drawn from the generator gives the same answers, and the saved default is that reading
    drawn = gen(questions=qs, generator=torch.Generator().manual_seed(1))
    assert drawn.texts == out.texts and drawn.latents is None
    joint = gen(questions=qs, latent_stream="joint", generator=torch.Generator().manual_seed(1))
    assert joint.latents is not None
    with pytest.raises(ValueError, match="latent_stream"):
        gen(questions=qs, latent_stream="clean")
    with pytest.raises(ConfigError, match="eval.latent_stream"):
        build("latent_joint.yaml", [*BACKBONE_TINY, "eval.latent_stream=clean"], tmp_path / "e")

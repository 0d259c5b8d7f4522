"""AR-to-diffusion adaptation: the annealed attention mask, the logit shift of an adapted AR backbone,
complementary masks, the two adaptation recipes through train.py and the text pipeline on their output."""

import math
from pathlib import Path

import pytest
import torch

import pipelines.tasks  # noqa: F401 - registers the built-in tasks
import train as train_cli
from latent.backbone import DiffusionTransformer
from latent.data.corpus import missing_sources
from latent.losses import annealed_attention_mask, block_diffusion_loss
from latent.training.config import load_config
from latent.training.trainer import train

REPO = Path(__file__).resolve().parents[1]
needs_corpus = pytest.mark.skipif(bool(missing_sources()), reason=f"missing {missing_sources()}")
M = 63


def ar_model(tiny_config, tmp_path):
    """A causal backbone saved and loaded back, and the same weights switched as adaptation switches them."""
    torch.manual_seed(0)
    DiffusionTransformer(**dict(tiny_config, attention_layout="causal", attention_backend="eager")).save_pretrained(
        str(tmp_path / "ar"))
    ar = DiffusionTransformer.from_pretrained(str(tmp_path / "ar")).eval()

    def adapted(**layout):
        model = DiffusionTransformer.from_pretrained(str(tmp_path / "ar")).eval()
        model.register_to_config(logit_shift=True, **layout)
        return model

    return ar, adapted


def test_annealed_mask_goes_from_causal_to_bidirectional():
    n = 10
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    assert torch.equal(annealed_attention_mask(n, 0.0)[0, 0], k <= q)
    assert bool(annealed_attention_mask(n, 1.0).all()) and bool(annealed_attention_mask(n, 3.0).all())
    for progress in (0.05, 0.25, 0.5, 0.99):
        assert torch.equal(annealed_attention_mask(n, progress)[0, 0], k <= q + math.floor(progress * n))
    pad = torch.ones(2, n, dtype=torch.long)
    pad[1, -3:] = 0
    m = annealed_attention_mask(n, 1.0, attention_mask=pad)
    assert m.shape == (2, 1, n, n) and not bool(m[1, 0, 0, -1]) and bool(m[1, 0, -1, -1])


def test_adapted_ar_backbone_keeps_the_ar_predictions_at_step_0(tiny_config, tmp_path):
    """Before any update, the shifted model's logit i + 1 is the AR model's logit i under a causal mask: the
    annealed mask at progress 0 (mdm) and the auxiliary AR forward (block diffusion) start from the AR model."""
    ar, adapted = ar_model(tiny_config, tmp_path)
    x = torch.randint(0, M, (2, 12), generator=torch.Generator().manual_seed(1))
    want = ar(x).logits
    causal = annealed_attention_mask(12, 0.0)
    for layout in ({"attention_layout": "bidirectional"},
                   {"attention_layout": "block_causal", "block_alignment": "start"}):
        got = adapted(**layout)(x, attention_mask=causal).logits
        assert torch.allclose(got[:, 1:], want[:, :-1], atol=1e-5)


def test_complementary_masks_partition_every_row(tiny_config):
    """The two noisy copies mask disjoint sets whose union is every real token (padding in neither)."""
    seen = []

    def spy(x, attention_mask=None, position_ids=None):
        seen.append(x)
        return torch.zeros(*x.shape, 64)

    bs, n = tiny_config["block_size"], 12
    x = torch.randint(0, M, (3, n), generator=torch.Generator().manual_seed(2))
    pad = torch.ones_like(x)
    pad[2, -4:] = 0
    block_diffusion_loss(spy, x, M, bs, attention_mask=pad, complementary=True, generator=torch.Generator())
    noisy = seen[0][:, :n] == M  # [2B, N]: copy 1 rows, then copy 2 rows
    first, second = noisy[:3], noisy[3:]
    assert not bool((first & second).any())
    assert torch.equal(first | second, pad.bool())


# ---------------------------------------------------------------- recipes through train.py


def small(corpus, out):
    """Run and data overrides small enough for a few CPU steps per second (no architecture keys: an
    adaptation run takes them from model.init_from)."""
    return [
        f"run.output_dir={out}", f"data.corpus_dir={corpus}", f"tokenizer.path={corpus / 'tok-320'}",
        "data.seq_len=32", "trainer.batch_size=4", "trainer.max_steps=2", "trainer.progress=false",
        "trainer.tensorboard=false", "trainer.plot=false", "trainer.log_every=1", "trainer.save_every=0",
        "optim.warmup_steps=1", "eval.valid_sequences=4", "eval.batch_size=4", "eval.elbo_samples=2",
        "eval.num_samples=1", "eval.sample_length=8", "eval.sample_steps=8", "eval.sample_block_length=8",
    ]


@pytest.fixture(scope="module")
def ar_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ar")
    arch = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=2",
            "model.max_position_embeddings=64", "eval.num_samples=0"]
    train(load_config(REPO / "configs/text_tiny_ar.yaml", small(corpus, out) + arch))
    return out / "pipeline"


@pytest.mark.parametrize("recipe", ["text_tiny_adapt_mdm.yaml", "text_tiny_adapt_bd3.yaml"])
def test_adaptation_recipes_print_their_config(recipe, capsys):
    train_cli.main([str(REPO / "configs" / recipe), "--print-config"])
    assert "init_from: runs/text_tiny_ar/pipeline" in capsys.readouterr().out


@needs_corpus
@pytest.mark.parametrize("recipe,extra", [
    ("text_tiny_adapt_mdm.yaml", ["objective.anneal_steps=2"]),
    ("text_tiny_adapt_bd3.yaml", ["model.block_size=8", "objective.block_curriculum=[4]",
                                  "objective.curriculum_steps=1", "objective.ar_weight=0.5"]),
])
def test_adaptation_recipes_train_from_a_causal_run(corpus, ar_run, tmp_path, recipe, extra):
    out = tmp_path / "run"
    res = train(load_config(REPO / "configs" / recipe, small(corpus, out) + [f"model.init_from={ar_run}", *extra]))
    assert res.completed and all(math.isfinite(e["val_bits_per_token"]) for e in res.evals)
    from pipelines.text import TextDiffusionPipeline

    pipe = TextDiffusionPipeline.from_pretrained(str(out / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    cfg = pipe.model.config
    assert cfg.logit_shift and cfg.attention_layout in ("bidirectional", "block_causal")
    ar = DiffusionTransformer.from_pretrained(str(Path(ar_run) / "model"))
    assert ar.config.hidden_size == cfg.hidden_size  # the AR architecture, same weights' shapes
    # the exported pipeline decodes (samples were written from it too), cached and uncached alike
    out_a = pipe("The", gen_length=8, block_length=8, steps=8)
    out_b = pipe("The", gen_length=8, block_length=8, steps=8, cache="none")
    assert out_a.texts[0] is not None and torch.equal(out_a.sequences, out_b.sequences)
    assert res.extra["samples"]


@needs_corpus
def test_chat_template_is_applied_or_refused(corpus, ar_run, tmp_path):
    from latent.data.tokenizer import load_tokenizer
    from latent.scheduler import MaskedDiffusionScheduler
    from pipelines.text import TextDiffusionPipeline

    model = DiffusionTransformer.from_pretrained(str(Path(ar_run) / "model"))
    model.register_to_config(attention_layout="bidirectional", logit_shift=True)
    tok = load_tokenizer(corpus / "tok-320")
    pipe = TextDiffusionPipeline(model=model, tokenizer=tok, scheduler=MaskedDiffusionScheduler(block_length=8))
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="no chat template"):
        pipe(messages=[{"role": "user", "content": "Hi"}], gen_length=8)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    rendered = pipe._chat_prompts(None, [{"role": "user", "content": "Hi"}], None)
    assert rendered == ["user: Hi\nassistant:"]
    assert pipe._chat_prompts(["a", "b"], None, None) == ["user: a\nassistant:", "user: b\nassistant:"]
    got = pipe(messages=[{"role": "user", "content": "Hi"}], gen_length=8, steps=8)
    want = pipe("user: Hi\nassistant:", gen_length=8, steps=8)
    assert torch.equal(got.sequences, want.sequences)
    with pytest.raises(ValueError, match="not both"):
        pipe("x", messages=[{"role": "user", "content": "Hi"}])

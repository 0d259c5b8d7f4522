"""Learned decoding decisions: Learn2PD's commit filter (latent/sampling/commit_filter.py, the `learned` commit
part, task commit_filter), its end-of-text prediction (the `eotp` stopping part) and dParallel's
certainty-forcing distillation (task certainty_forcing).

The filter's loss and features are checked against direct computations; a filter whose weights make it a
threshold on probability decodes token for token like the `threshold` rule. EoTP is checked against a plain
per-row loop on a scripted model whose EOS fires, and, on a model whose logits at a position read only the
canvas before it, against the property that makes it safe: the answer up to the first EOS is the base
decoder's. The certainty-forcing loss is checked against a direct computation, and a few steps of the task
lower the student's entropy on its trajectories more than the same steps without the certainty term.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from test_decoders import ScriptedModel
from test_sampling import EOS, MASK, V, prompts

from latent.sampling import generate
from latent.sampling.commit_filter import FEATURES, CommitFilter, filter_features, load_commit_filter
from pipelines.tasks.certainty_forcing import certainty_forcing_loss
from pipelines.tasks.commit_filter import commit_filter_loss, trajectory_examples
from pipelines.tasks.trajectories import decode_trajectories

INF = float("inf")


# ---- the filter --------------------------------------------------------------------------------------
def plain_mlp(model: CommitFilter, x: list[float]) -> float:
    """The filter's logit for one feature vector, written out (float64)."""
    h = x
    layers = list(model.layers)
    for i, layer in enumerate(layers):
        w, b = layer.weight.double().tolist(), layer.bias.double().tolist()
        h = [sum(wi * hi for wi, hi in zip(row, h, strict=True)) + bi for row, bi in zip(w, b, strict=True)]
        if i < len(layers) - 1:
            h = [max(0.0, v) for v in h]
    return h[0]


def test_commit_filter_loss_is_binary_cross_entropy():
    torch.manual_seed(0)
    model = CommitFilter(hidden_size=6, num_layers=3)
    g = torch.Generator().manual_seed(1)
    features = torch.rand(40, len(FEATURES), generator=g, dtype=torch.float64)
    labels = torch.rand(40, generator=g) < 0.6
    expected = 0.0
    for x, y in zip(features.tolist(), labels.tolist(), strict=True):
        p = 1 / (1 + math.exp(-plain_mlp(model, x)))
        expected -= math.log(p) if y else math.log(1 - p)
    expected /= len(labels)
    out = commit_filter_loss(model, features, labels)
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)
    pairs = zip(features.tolist(), labels.tolist(), strict=True)
    assert out.metrics["filter_accuracy"] == pytest.approx(sum((plain_mlp(model, x) > 0) == y for x, y in pairs) / 40)


def plain_features(logits_row, candidates_row, mask_id):
    """Features of one row of a block, one position at a time."""
    length, vocab = len(logits_row), len(logits_row[0])
    progress = 1 - sum(candidates_row) / length
    out = []
    for j, z in enumerate(logits_row):
        top = max(z)
        e = [math.exp(v - top) for v in z]
        total = sum(e)
        p = [v / total for v in e]
        ranked = sorted((p[v] for v in range(vocab) if v != mask_id), reverse=True)
        entropy = -sum(q * math.log(q) for q in p if q > 0) / math.log(vocab)
        out.append([ranked[0], ranked[0] - ranked[1], entropy, j / (length - 1), progress])
    return out


def test_filter_features_equal_a_plain_computation():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, V, generator=g) * 3
    logits[0, 1, MASK] = 9.0  # a mask logit that wins: excluded from the proposal, kept in the softmax
    candidates = torch.rand(3, 5, generator=g) < 0.6
    got = filter_features(logits, candidates, MASK)
    for b in range(3):
        want = plain_features(logits[b].double().tolist(), candidates[b].tolist(), MASK)
        assert torch.allclose(got[b], torch.tensor(want, dtype=torch.float64), atol=1e-12)


def threshold_filter(tau: float) -> CommitFilter:
    """Hand-set weights: score = relu(p - tau) - relu(tau - p) = p - tau, so sigmoid(score) > 0.5 iff p > tau."""
    model = CommitFilter(hidden_size=2, num_layers=2)
    with torch.no_grad():
        for layer in model.layers:
            layer.weight.zero_()
            layer.bias.zero_()
        first, last = model.layers
        first.weight[0, 0], first.bias[0] = 1.0, -tau
        first.weight[1, 0], first.bias[1] = -1.0, tau
        last.weight[0, 0], last.weight[0, 1] = 1.0, -1.0
    return model


@pytest.mark.parametrize("tau", [0.6, 0.8, 0.95])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_learned_commit_with_a_threshold_filter_is_the_threshold_rule(tau, seed, tmp_path):
    model = ScriptedModel(seed=seed, growth=0.05)
    ids, mask = prompts((5, 3, 4), seed=seed)
    kw = dict(gen_length=16, block_length=8, mask_token_id=MASK)
    want = generate(model, ids, mask, commit="threshold", threshold=tau, **kw)
    threshold_filter(tau).save_pretrained(str(tmp_path / "filter"))
    got = generate(model, ids, mask, commit="learned", commit_filter=str(tmp_path / "filter"), **kw)
    assert torch.equal(got.sequences, want.sequences)
    assert got.nfe == want.nfe and torch.equal(got.steps, want.steps)
    assert 2 < want.nfe < 16  # several tokens per forward, yet more than one forward per block


def test_learned_commit_refuses_what_it_cannot_use(tmp_path):
    with pytest.raises(ValueError, match="commit_filter"):
        generate(ScriptedModel(), prompts()[0], gen_length=8, block_length=8, mask_token_id=MASK, commit="learned")
    with pytest.raises(ValueError, match="filter_threshold"):
        generate(ScriptedModel(), prompts()[0], gen_length=8, block_length=8, mask_token_id=MASK, commit="learned",
                 commit_filter=threshold_filter(0.5), filter_threshold=1.0)
    with pytest.raises(FileNotFoundError, match="no saved CommitFilter"):
        load_commit_filter(tmp_path)
    cfg = json.loads(json.dumps(dict(threshold_filter(0.5).config)))
    with pytest.raises(ValueError, match="retrain"):
        CommitFilter(**{**cfg, "features": ["top1_probability"]})


def test_trajectory_examples_are_the_states_the_sampler_saw():
    """The rebuilt canvases, block logits and labels equal what a recorded run of the sampler saw."""
    model = ScriptedModel(seed=3, growth=0.05)
    g = torch.Generator().manual_seed(4)
    rows = torch.randint(3, MASK, (3, 4 + 12), generator=g)
    traj = decode_trajectories(model, rows, 4, 4, MASK)
    seen = []
    generate(model, rows[:, :4], gen_length=12, block_length=4, steps=12, mask_token_id=MASK,
             callback_on_step_end=lambda step, canvas, info: seen.append(canvas.clone()))
    features, labels = trajectory_examples(model, traj)
    want_f, want_l = [], []
    canvases = [torch.cat([rows[:, :4], torch.full((3, 12), MASK)], 1), *seen[:-1]]  # before each forward
    for t, canvas in enumerate(canvases):
        assert torch.equal(traj.states(torch.arange(3), torch.full((3,), t))[0], canvas)
    for r in range(3):  # examples come row by row, forward by forward
        for t, canvas in enumerate(canvases):
            lo = 4 + (t // 4) * 4
            block = canvas[r : r + 1, lo : lo + 4]
            logits = model(canvas[r : r + 1]).logits[:, lo : lo + 4]
            cand = block == MASK
            proposal = logits.clone()
            proposal[..., MASK] = -INF
            want_f.append(filter_features(logits, cand, MASK)[cand].float())
            want_l.append((proposal.argmax(-1) == traj.final[r : r + 1, lo - 4 : lo])[cand])
    assert torch.equal(features, torch.cat(want_f)) and torch.equal(labels, torch.cat(want_l))
    assert 0 < labels.float().mean() < 1


# ---- end-of-text prediction --------------------------------------------------------------------------
def eos_prone(model, bias=2.5):
    model.script[..., EOS] += bias
    return model


def plain_eotp(model, prompt, mask, *, gen_length, block_length, rule, tau=0.9, steps=None):
    """One row at a time: the threshold or schedule rule, and after every forward the tail after the first
    committed EOS becomes EOS; the row ends when nothing is masked. Returns tokens and forwards per row."""
    plen = prompt.shape[1]
    out, forwards = [], []
    for r in range(prompt.shape[0]):
        x = prompt[r].tolist() + [MASK] * gen_length
        keys = None if mask is None else torch.cat([mask[r : r + 1], torch.ones(1, gen_length, dtype=torch.long)], 1)
        n, done = 0, False
        for b in range(gen_length // block_length):
            block = range(plen + b * block_length, plen + (b + 1) * block_length)
            per_block = None if rule == "threshold" else steps // (gen_length // block_length)
            masked0 = sum(x[t] == MASK for t in block)
            quota = None if per_block is None else [masked0 // per_block + (i < masked0 % per_block)
                                                    for i in range(per_block)]
            step = 0
            while not done and (any(x[t] == MASK for t in block) if per_block is None else step < per_block):
                with torch.no_grad():
                    logits = model(torch.tensor([x]), attention_mask=keys).logits[0]
                n += 1
                proposal = logits.clone()
                proposal[:, MASK] = -INF
                x0 = proposal.argmax(-1).tolist()
                dtype = torch.float64 if rule == "threshold" else logits.dtype
                p = logits.to(dtype).softmax(-1)
                conf = {t: p[t, x0[t]].item() for t in block if x[t] == MASK}
                ranked = sorted(conf, key=lambda t: -conf[t])
                if rule == "threshold":
                    pick = [t for t in ranked if conf[t] >= tau] or ranked[:1]
                else:
                    pick = ranked[: quota[step]]
                for t in pick:
                    x[t] = x0[t]
                gen = x[plen:]
                if EOS in gen:
                    first = gen.index(EOS)
                    x[plen + first + 1 :] = [EOS] * (gen_length - first - 1)
                    done = MASK not in x[plen:]
                step += 1
            if done:
                break
        out.append(x)
        forwards.append(n)
    return torch.tensor(out), forwards


@pytest.mark.parametrize("rule", ["threshold", "schedule"])
@pytest.mark.parametrize("seed", [0, 1])
def test_eotp_matches_a_plain_per_row_loop(rule, seed):
    model = eos_prone(ScriptedModel(seed=seed, growth=0.05))
    ids, mask = prompts((5, 3, 4, 4), seed=seed)
    kw = dict(gen_length=24, block_length=8, mask_token_id=MASK, eos_token_id=EOS, stopping="eotp")
    kw.update(commit="threshold", threshold=0.7) if rule == "threshold" else kw.update(steps=12)
    out = generate(model, ids, mask, **kw)
    want, forwards = plain_eotp(model, ids, mask, gen_length=24, block_length=8, rule=rule, tau=0.7, steps=12)
    assert torch.equal(out.sequences, want)
    assert out.steps.tolist() == forwards
    base = generate(model, ids, mask, **{**kw, "stopping": "block_full"})
    assert out.finished.any() and (out.steps < base.steps).any()  # EOS fired early somewhere


class PrefixScriptedModel(ScriptedModel):
    """Logits at position i from a page chosen by a hash of the canvas before i: a position never reads
    what comes after it (as a causal model), yet every new token before it turns its page."""

    def __call__(self, x, attention_mask=None):
        h = (x * self.weights[: x.shape[1]]).cumsum(1)
        before = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], 1)
        return SimpleNamespace(logits=self.script[before % self.script.shape[0], torch.arange(x.shape[1])])


def first_eos_cut(gen):
    rows = []
    for row in gen.tolist():
        rows.append(row[: row.index(EOS) + 1] if EOS in row else row)
    return rows


@pytest.mark.parametrize("seed", range(4))
def test_eotp_keeps_the_answer_up_to_the_first_eos(seed):
    """With one token per forward and logits that read only the canvas before a position, filling the tail
    changes nothing before the first EOS (the tokens before it are committed in the same order), while the
    forwards after it are saved."""
    model = eos_prone(PrefixScriptedModel(seed=seed, scale=2.0), bias=1.5)
    ids, mask = prompts((5, 3, 4, 4, 5), seed=seed)
    kw = dict(gen_length=24, block_length=8, steps=24, mask_token_id=MASK, eos_token_id=EOS)
    base = generate(model, ids, mask, **kw)
    eotp = generate(model, ids, mask, stopping="eotp", **kw)
    plen = ids.shape[1]
    assert first_eos_cut(eotp.sequences[:, plen:]) == first_eos_cut(base.sequences[:, plen:])
    for row in first_eos_cut(eotp.sequences[:, plen:]):
        assert len(row) == 24 or row[-1] == EOS
    tail = eotp.sequences[:, plen:]
    first = torch.where((tail == EOS).any(1), (tail == EOS).long().argmax(1), 24)
    assert all((tail[r, first[r]:] == EOS).all() for r in range(len(tail)))
    assert (eotp.steps <= base.steps).all() and (eotp.steps < base.steps).any()


def test_eotp_needs_eos_token_id():
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(ScriptedModel(), prompts()[0], gen_length=8, block_length=8, mask_token_id=MASK, stopping="eotp")


# ---- certainty forcing -------------------------------------------------------------------------------
def test_certainty_forcing_loss_equals_a_direct_computation():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 6, 7, generator=g) * 2
    targets = torch.randint(0, 7, (2, 6), generator=g)
    targets[:, ::2] = logits[:, ::2].argmax(-1)  # some positions right
    region = torch.rand(2, 6, generator=g) < 0.8
    temperature, weight = 0.5, 2.0
    ce, ent, right = [], [], 0
    for b in range(2):
        for n in range(6):
            if not region[b, n]:
                continue
            z = logits[b, n].double().tolist()
            y = int(targets[b, n])
            lse = math.log(sum(math.exp(v) for v in z))
            ce.append(lse - z[y])
            if max(range(7), key=lambda v: z[v]) == y:
                right += 1
                zt = [v / temperature for v in z]
                s = math.log(sum(math.exp(v) for v in zt))
                ent.append(-sum(math.exp(v - s) * (v - s) for v in zt))
    out = certainty_forcing_loss(logits, targets, region, temperature, weight)
    want = sum(ce) / len(ce) + weight * sum(ent) / len(ent)
    assert right > 0 and len(ent) < len(ce)
    assert out.loss.item() == pytest.approx(want, rel=1e-5)
    assert out.metrics["certainty"] == pytest.approx(sum(ent) / len(ent), rel=1e-5)


def tiny_copy_pipeline(folder, symbols=8, prompt_length=4, answer_length=8):
    """A (random, larger-weighted) bidirectional backbone saved like the copy task's export."""
    from latent import DiffusionTransformer

    torch.manual_seed(0)
    model = DiffusionTransformer(vocab_size=symbols + 1, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                 mask_token_id=symbols, max_position_embeddings=prompt_length + answer_length,
                                 block_size=4, attention_layout="bidirectional").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 1.0 if "embed" in name else 0.3)
    model.save_pretrained(str(folder / "model"))
    (folder / "task.json").write_text(json.dumps({"task": "copy", "symbols": symbols, "prompt_length": prompt_length,
                                                  "answer_length": answer_length, "kind": "copy"}))
    return folder


def run_recipe(recipe, overrides):
    import pipelines.tasks  # noqa: F401 - registers the tasks
    from latent.training.config import load_config
    from latent.training.trainer import train

    common = ["trainer.progress=false", "trainer.tensorboard=false", "trainer.plot=false", "trainer.threads=1"]
    return train(load_config(recipe, [*common, *overrides]))


def test_certainty_forcing_lowers_the_students_entropy(tmp_path):
    base = tiny_copy_pipeline(tmp_path / "base")
    result = {}
    for weight in (0.0, 2.0):
        result[weight] = run_recipe("configs/certainty_forcing_copy.yaml", [
            f"model.init_from={base}", f"run.output_dir={tmp_path / f'cf{weight}'}", f"distill.entropy_weight={weight}",
            "distill.rows=16", "trainer.max_steps=8", "trainer.batch_size=8", "trainer.eval_every=0",
            "optim.warmup_steps=0", "optim.lr=3e-3", "eval.rows=4", "eval.entropy_states=64"])
    start = result[0.0].evals[0]["val_entropy"]
    assert result[2.0].evals[0]["val_entropy"] == pytest.approx(start)  # the same teacher and states
    assert result[2.0].evals[-1]["val_entropy"] < result[0.0].evals[-1]["val_entropy"] < start
    exported = json.loads((result[2.0].pipeline_dir / "task.json").read_text())
    assert exported["task"] == "copy" and exported["certainty_forcing"]["entropy_weight"] == 2.0


def test_commit_filter_task_trains_a_filter_the_sampler_loads(tmp_path):
    base = tiny_copy_pipeline(tmp_path / "base")
    result = run_recipe("configs/commit_filter_copy.yaml", [
        f"base.pipeline={base}", f"run.output_dir={tmp_path / 'cfilter'}", "trajectories.rows=8",
        "trajectories.eval_rows=4", "trainer.max_steps=30", "trainer.batch_size=64", "optim.warmup_steps=0"])
    losses = result.losses
    assert losses[-1] < losses[0]
    filt = load_commit_filter(result.pipeline_dir)
    ids = torch.randint(0, 8, (2, 4))
    from latent import DiffusionTransformer

    model = DiffusionTransformer.from_pretrained(str(base / "model"))
    out = generate(model, ids, gen_length=8, block_length=4, commit="learned", commit_filter=result.pipeline_dir)
    assert (out.sequences[:, 4:] != 8).all() and out.nfe >= 2
    assert tuple(filt.config.features) == FEATURES

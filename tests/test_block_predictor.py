"""The learned sub-block size of `stopping="dynamic_block"` (latent/sampling/block_predictor.py, task
block_predictor): window features against a plain computation; a predictor whose one linear layer is the
entropy rule decodes token for token like the rule (the property that makes it a generalisation of it);
training labels against a plain loop over the trajectories; the task trains through train.py, resumes
exactly, and exports a predictor the sampler loads; bad settings are refused naming the field.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from test_decoders_literature import drafter
from test_learned_decoding import run_recipe, tiny_copy_pipeline
from test_sampling import backbone_inputs

from latent.sampling import create_part, generate
from latent.sampling.block_predictor import (
    WINDOW_FEATURES,
    BlockSizePredictor,
    load_block_predictor,
    window_features,
)
from latent.training.config import ConfigError
from pipelines.tasks.block_predictor import window_examples
from pipelines.tasks.trajectories import decode_trajectories, load_copy_pipeline


def read_csv(path):
    with open(path) as f:
        return [{k: v for k, v in row.items() if k not in ("samples_per_s", "elapsed_s")} for row in csv.DictReader(f)]


def train_log(run_dir, column):
    return [(int(r["step"]), float(r[column])) for r in read_csv(run_dir / "train.csv")]


def plain_window(logits_row, candidates_row, first, size):
    """Features of one row's window [first, first + size), one position at a time (Python floats)."""
    width, vocab = len(logits_row), len(logits_row[0])
    tops, entropies = [], []
    for j in range(first, min(first + size, width)):
        if not candidates_row[j]:
            continue
        z = logits_row[j]
        top = max(z)
        e = [math.exp(v - top) if v != -math.inf else 0.0 for v in z]
        p = [v / sum(e) for v in e]
        tops.append(max(p))
        entropies.append(-sum(q * math.log(q) for q in p if q > 0) / math.log(vocab))
    n = max(len(tops), 1)
    return [sum(tops) / n, min(tops, default=1.0), sum(entropies) / n, size / width,
            1 - sum(candidates_row) / width]


def test_window_features_equal_a_plain_computation():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 8, 11, generator=g) * 3
    logits[..., 10] = -math.inf  # the mask id, as in the proposal logits
    candidates = torch.rand(4, 8, generator=g) < 0.7
    candidates[3] = False  # a full block: empty windows
    first = torch.tensor([0, 2, 5, 8])
    sizes = (1, 3, 8)
    got, window = window_features(logits, candidates, first, sizes)
    assert got.shape == (4, 3, len(WINDOW_FEATURES)) and got.dtype == torch.float64
    for b in range(4):
        for i, s in enumerate(sizes):
            want = plain_window(logits[b].double().tolist(), candidates[b].tolist(), int(first[b]), s)
            assert torch.allclose(got[b, i], torch.tensor(want, dtype=torch.float64), atol=1e-12)
            cols = [j for j in range(8) if candidates[b, j] and int(first[b]) <= j < int(first[b]) + s]
            assert window[b, i].nonzero().flatten().tolist() == cols


def entropy_rule_predictor(max_entropy: float, vocab: int) -> BlockSizePredictor:
    """One linear layer: logit = (max_entropy - mean entropy in nats) / log V, > 0 iff the rule passes."""
    model = BlockSizePredictor(num_layers=1)
    with torch.no_grad():
        (layer,) = model.layers
        layer.weight.zero_()
        layer.weight[0, WINDOW_FEATURES.index("mean_normalized_entropy")] = -1.0
        layer.bias[0] = max_entropy / math.log(vocab)
    return model


@pytest.mark.parametrize("sizes, max_entropy", [((2, 4, 8), 0.75), ((1, 3, 16), 0.6), ((4, 8), 1.0)])
def test_a_predictor_that_is_the_entropy_rule_decodes_like_the_rule(sizes, max_entropy, tmp_path):
    model = drafter()
    ids, mask, _ = backbone_inputs()
    run = dict(gen_length=16, block_length=16, commit="threshold", threshold=0.6)
    rule = create_part("stopping", "dynamic_block", dynamic_block_sizes=sizes, dynamic_block_entropy=max_entropy)
    want = generate(model, ids, mask, stopping=rule, **run)
    entropy_rule_predictor(max_entropy, model.config.vocab_size).save_pretrained(str(tmp_path / "p"))
    learned = create_part("stopping", "dynamic_block", dynamic_block_sizes=sizes, block_predictor=str(tmp_path / "p"))
    got = generate(model, ids, mask, stopping=learned, **run)
    assert torch.equal(got.sequences, want.sequences) and got.nfe == want.nfe
    assert learned.history == rule.history
    assert len({h[3] for h in rule.history}) > 1  # different lengths were really chosen


def constant_predictor(logit: float) -> BlockSizePredictor:
    model = BlockSizePredictor(num_layers=1)
    with torch.no_grad():
        model.layers[0].weight.zero_()
        model.layers[0].bias.fill_(logit)
    return model


def test_an_always_safe_predictor_takes_the_largest_size_and_a_never_safe_one_the_smallest():
    model = drafter()
    ids, mask, _ = backbone_inputs()
    run = dict(gen_length=16, block_length=8, commit="threshold", threshold=0.5)
    out, chosen = {}, {}
    for name, logit in (("always", 10.0), ("never", -10.0)):
        part = create_part("stopping", "dynamic_block", dynamic_block_sizes=(2, 8),
                           block_predictor=constant_predictor(logit))
        out[name] = generate(model, ids, mask, stopping=part, **run)
        chosen[name] = {h[3] for h in part.history}
    assert chosen == {"always": {8}, "never": {2}}
    # sub-blocks as long as the block: the plain threshold decode
    assert torch.equal(out["always"].sequences, generate(model, ids, mask, **run).sequences)
    assert out["never"].nfe > out["always"].nfe


def test_training_labels_equal_a_plain_loop_over_the_trajectories(tmp_path):
    base = load_copy_pipeline(tiny_copy_pipeline(tmp_path / "base", answer_length=8))
    rows = torch.randint(0, 8, (3, 12), generator=torch.Generator().manual_seed(4))
    traj = decode_trajectories(base.model, rows, 4, 4, base.mask_id)
    sizes = (1, 2, 4)
    features, labels = window_examples(base.model, traj, sizes, batch_size=5)
    want_labels, want_first = [], []
    with torch.no_grad():
        for r in range(3):
            for t in range(traj.num_forwards):
                canvas, region = traj.states(torch.tensor([r]), torch.tensor([t]))
                logits = base.model(canvas).logits[0, 4:].tolist()
                block = [int(traj.block_of(torch.tensor(t))) * 4 + j for j in range(4)]
                masked = [j for j, p in enumerate(block) if bool(region[0, p])]
                if not masked:
                    continue
                first = masked[0]
                for s in sizes:
                    ok = True
                    for j in masked:
                        if first <= j < first + s:
                            z = logits[block[j]]
                            best = max((v for v in range(len(z)) if v != base.mask_id), key=lambda v: z[v])
                            ok &= best == int(traj.final[r, block[j]])
                    want_labels.append(ok)
                    want_first.append(s / 4)
    assert labels.tolist() == want_labels
    assert features[:, WINDOW_FEATURES.index("size_share")].tolist() == pytest.approx(want_first)
    assert 0 < sum(want_labels) < len(want_labels)  # both kinds of example are present


def test_the_task_trains_resumes_exactly_and_exports_a_predictor_the_sampler_loads(tmp_path):
    base = tiny_copy_pipeline(tmp_path / "base")
    common = [f"base.pipeline={base}", "trajectories.rows=8", "trajectories.eval_rows=4", "trainer.max_steps=20",
              "trainer.batch_size=64", "optim.warmup_steps=0", "trainer.eval_every=10", "trainer.save_every=10",
              "trainer.log_every=1",
              "predictor.sizes=[2,4]"]
    straight = run_recipe("configs/block_predictor_copy.yaml", [*common, f"run.output_dir={tmp_path / 'a'}"])
    assert straight.losses[-1] < straight.losses[0]
    split = tmp_path / "b"
    first = run_recipe("configs/block_predictor_copy.yaml", [*common, f"run.output_dir={split}", "trainer.stop_at_step=10"])
    assert not first.completed
    second = run_recipe("configs/block_predictor_copy.yaml", [*common, f"run.output_dir={split}"])
    assert second.completed
    assert train_log(split, "loss") == train_log(tmp_path / "a", "loss")  # every step's loss, resumed at 10
    assert read_csv(split / "eval.csv") == read_csv(tmp_path / "a" / "eval.csv")
    predictor = load_block_predictor(straight.pipeline_dir)
    resumed = load_block_predictor(second.pipeline_dir)
    for p, q in zip(predictor.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    task = json.loads((straight.pipeline_dir / "task.json").read_text())
    assert task["task"] == "block_predictor" and task["dynamic_block_sizes"] == [2, 4]
    from latent import DiffusionTransformer

    model = DiffusionTransformer.from_pretrained(str(base / "model"))
    ids = torch.randint(0, 8, (2, 4))
    part = create_part("stopping", "dynamic_block", dynamic_block_sizes=(2, 4), block_predictor=straight.pipeline_dir)
    out = generate(model, ids, gen_length=8, block_length=4, commit="threshold", threshold=0.9, stopping=part)
    assert (out.sequences[:, 4:] != 8).all() and {h[3] for h in part.history} <= {2, 4}


def test_bad_settings_are_refused_naming_the_field(tmp_path):
    with pytest.raises(ValueError, match="block_predictor_threshold"):
        generate(drafter(), backbone_inputs()[0], gen_length=8, block_length=8, commit="threshold",
                 stopping="dynamic_block", block_predictor=BlockSizePredictor(), block_predictor_threshold=1.0)
    with pytest.raises(FileNotFoundError, match="no saved BlockSizePredictor"):
        load_block_predictor(tmp_path)
    cfg = json.loads(json.dumps(dict(BlockSizePredictor().config)))
    with pytest.raises(ValueError, match="retrain"):
        BlockSizePredictor(**{**cfg, "features": ["mean_top1_probability"]})
    base = tiny_copy_pipeline(tmp_path / "base")
    for bad, field in (("predictor.sizes=[0,4]", "predictor.sizes"), ("predictor.threshold=1.5", "predictor.threshold"),
                       ("predictor.commit_threshold=0", "predictor.commit_threshold")):
        with pytest.raises(ConfigError, match=field):
            run_recipe("configs/block_predictor_copy.yaml", [f"base.pipeline={base}", bad,
                                                             f"run.output_dir={tmp_path / 'x'}"])

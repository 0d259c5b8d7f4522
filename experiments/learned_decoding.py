"""Learned decoding decisions on the copy task: forwards per answer and accuracy of threshold decoding, of
Learn2PD's learned commit filter, of threshold decoding after dParallel's certainty-forcing distillation, and
of threshold decoding in dynamic sub-blocks chosen by the entropy rule or by the learned size predictor.

Every model is trained by a recipe of configs/ through the one trainer (each run a few CPU minutes at most):

1. the base: configs/copy_bidirectional.yaml, shortened (16-symbol prompts, 48-token answers in blocks of 16,
   a 2-layer 64-wide backbone, each of ``--base-steps``: 250 and 150 by default), so that threshold decoding
   still has forwards to save;
2. the commit filter: configs/commit_filter_copy.yaml on the base's one-token-per-forward trajectories;
3. the student: configs/certainty_forcing_copy.yaml from the base, and the same run with
   ``distill.entropy_weight=0`` (the consistency term alone) to tell the certainty term's share;
4. the sub-block size predictor: configs/block_predictor_copy.yaml on the same trajectories, sizes (4, 8, 16).

Then ``--rows`` held-out prompts are decoded by each configuration; forwards per sequence are the forwards each
row took part in (``SamplerOutput.steps``; rows are decoded one at a time by default, so they are each row's
own), accuracy is exact match per token against the copy answer, and agreement is with the base's
one-token-per-forward answer.

    python experiments/learned_decoding.py          # writes experiments/results/learned_decoding.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from latent.training.config import load_config  # noqa: E402
from latent.training.trainer import train  # noqa: E402
from pipelines.tasks.copy import task_rows  # noqa: E402
from pipelines.tasks.trajectories import decode_scores, load_copy_pipeline  # noqa: E402

QUIET = ["trainer.progress=false", "trainer.tensorboard=false", "trainer.plot=false"]
SIZES = (4, 8, 16)  # dynamic sub-block lengths inside the 16-token blocks


def run_recipe(recipe: str, out: Path, overrides: list[str]) -> Path:
    """The recipe's pipeline folder, trained once into ``out``."""
    if (out / "pipeline").is_dir():
        return out / "pipeline"
    start = time.perf_counter()
    train(load_config(REPO / "configs" / recipe, [f"run.output_dir={out}", *QUIET, *overrides]))
    print(f"trained {recipe} -> {out} in {time.perf_counter() - start:.0f} s", flush=True)
    return out / "pipeline"


def measure(work: Path, base_steps: int, args) -> dict:
    """Train the four models of one base (cached in ``work``) and decode the held-out prompts with each
    configuration."""
    base = run_recipe("copy_bidirectional.yaml", work / "copy", [
        "data.prompt_length=16", "data.answer_length=48", "model.hidden_size=64", "model.num_layers=2",
        "model.block_size=16", f"trainer.max_steps={base_steps}", "trainer.save_every=0", "trainer.threads=1",
        "optim.lr=3e-3"])
    filt = run_recipe("commit_filter_copy.yaml", work / "filter", [
        f"base.pipeline={base}", f"trainer.max_steps={args.filter_steps}"])
    student = run_recipe("certainty_forcing_copy.yaml", work / "certainty_forcing", [
        f"model.init_from={base}", f"trainer.max_steps={args.distill_steps}"])
    consistency = run_recipe("certainty_forcing_copy.yaml", work / "consistency_only", [
        f"model.init_from={base}", f"trainer.max_steps={args.distill_steps}", "distill.entropy_weight=0"])

    predictor = run_recipe("block_predictor_copy.yaml", work / "block_predictor", [
        f"base.pipeline={base}", f"trainer.max_steps={args.predictor_steps}", f"predictor.sizes={list(SIZES)}",
        f"predictor.commit_threshold={args.low_threshold}"])

    pipes = {name: load_copy_pipeline(path) for name, path in
             (("base", base), ("certainty_forcing", student), ("consistency_only", consistency))}
    d = pipes["base"].data
    rows = task_rows(d, args.rows, torch.Generator().manual_seed(99_991))
    threshold = dict(commit="threshold", threshold=args.threshold)
    learned = dict(commit="learned", commit_filter=str(filt), filter_threshold=0.5)
    configs = [
        ("base_1_token_per_forward", "base", dict(steps=d.answer_length)),
        ("base_threshold", "base", threshold),
        ("base_learned_filter", "base", learned),
        ("certainty_forcing_threshold", "certainty_forcing", threshold),
        ("consistency_only_threshold", "consistency_only", threshold),
        ("certainty_forcing_learned_filter", "certainty_forcing", learned),
    ]
    for t in (args.threshold, args.low_threshold):  # sub-blocks only narrow the candidates: they buy accuracy
        knobs = dict(commit="threshold", threshold=t, stopping="dynamic_block", dynamic_block_sizes=SIZES)
        if t != args.threshold:
            configs.append((f"base_threshold{t}", "base", dict(commit="threshold", threshold=t)))
        configs += [(f"base_threshold{t}_dynamic_block_rule", "base", knobs),
                    (f"base_threshold{t}_dynamic_block_learned", "base", dict(**knobs, block_predictor=str(predictor)))]
    results, reference = [], None
    for name, model_name, knobs in configs:
        pipe = pipes[model_name]
        start = time.perf_counter()
        scores = decode_scores(pipe.model, rows, d.prompt_length, pipe.block_length, args.decode_batch,
                               mask_token_id=pipe.mask_id, **knobs)
        answers = scores.pop("answers")
        reference = answers if reference is None else reference
        row = dict(name=name, model=model_name, knobs={k: v for k, v in knobs.items()
                                                       if k not in ("commit_filter", "block_predictor")},
                   **scores, agreement_with_1_token_per_forward=float((answers == reference).float().mean()),
                   seconds=time.perf_counter() - start)
        results.append(row)
        print(f"base {base_steps:4d} {name:36s} forwards/seq {row['forwards_per_sequence']:6.2f}  "
              f"acc {row['accuracy']:.4f}  agree {row['agreement_with_1_token_per_forward']:.4f}", flush=True)
    training = {}
    for name, path in (("base", base), ("filter", filt), ("certainty_forcing", student),
                       ("consistency_only", consistency), ("block_predictor", predictor)):
        training[name] = {"run": str(path.parent), "eval_csv": (path.parent / "eval.csv").read_text().splitlines()}
    return dict(base_steps=base_steps, rows=results, training=training,
                task=dict(symbols=d.symbols, prompt_length=d.prompt_length, answer_length=d.answer_length,
                          block_length=pipes["base"].block_length))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/learned_decoding", help="where the trained models are kept")
    ap.add_argument("--base-steps", type=int, nargs="+", default=[250, 150],
                    help="training steps of each base (a less trained base leaves threshold decoding more to save)")
    ap.add_argument("--filter-steps", type=int, default=400)
    ap.add_argument("--distill-steps", type=int, default=200)
    ap.add_argument("--predictor-steps", type=int, default=400)
    ap.add_argument("--rows", type=int, default=64, help="held-out prompts decoded per configuration")
    ap.add_argument("--decode-batch", type=int, default=1,
                    help="rows decoded together (1: forwards per sequence are each row's own)")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--low-threshold", type=float, default=0.5,
                    help="a second threshold for the dynamic sub-block rows, where whole blocks commit too much")
    ap.add_argument("--out", default="experiments/results/learned_decoding.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import pipelines.tasks  # noqa: F401 - registers the tasks

    settings = [measure(Path(args.work) / f"base{steps}", steps, args) for steps in args.base_steps]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        command="python " + " ".join(["experiments/learned_decoding.py", *(argv if argv is not None else sys.argv[1:])]),
        machine=platform.processor() or platform.machine(), torch=torch.__version__, args=vars(args),
        settings=settings), indent=2))
    print("wrote", out)


if __name__ == "__main__":
    main()

"""Captioning experiment: train a captioner (the recipe through train.py's trainer), then report quality
and speed on held-out splits.

    python experiments/captioning.py --recipe configs/caption_quickstart.yaml --minutes 12
    python experiments/captioning.py --recipe configs/caption_real.yaml --minutes 12
    python experiments/captioning.py --recipe configs/caption_quickstart.yaml --pipeline runs/x/pipeline  # eval only

For each evaluation split (scenes: `test` = new renders of training combinations, `heldout` = colour/shape
pairs never trained on; real: `test`) it decodes every image twice: at one token per step (LLaDA
schedule, steps = gen_length) and with threshold decoding (Fast-dLLM, threshold 0.9), both with the
exact prefix cache and EOS early stop, and reports BLEU-4, CIDEr, attribute accuracy (scenes), forwards
and images/s. Then it measures the batch job (`mmdlm caption`) on the split's images written as PNG
files against the model's pure forward time: one adapter + backbone forward over prefix + canvas per
batch, with no sampler, loading or writing (the images/s the job would reach if captioning cost one
forward). Results go to experiments/results/captioning_<recipe>.json, or to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pipelines.tasks  # noqa: E402, F401 - registers the built-in tasks
from latent.training.config import load_config  # noqa: E402
from latent.training.trainer import train  # noqa: E402
from pipelines.batch import run_captioning  # noqa: E402
from pipelines.captioning import CaptioningPipeline  # noqa: E402
from pipelines.tasks.caption import eval_splits, evaluate_captioner, load_pairs  # noqa: E402


@torch.no_grad()
def pure_forward_images_per_second(pipe, pixels: torch.Tensor, gen_length: int, repeats: int = 5) -> float:
    """Images/s of one full forward (adapter + backbone over prefix + masked canvas) per batch."""
    model, adapter = pipe.model, pipe.vision_adapter
    canvas = torch.full((pixels.shape[0], gen_length), pipe.tokenizer.mask_token_id, dtype=torch.long)
    prefix = adapter(pixels)
    model(canvas, prefix_embeds=prefix.embeds)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        prefix = adapter(pixels)
        model(canvas, prefix_embeds=prefix.embeds)
        times.append(time.perf_counter() - t)
    return pixels.shape[0] / min(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="configs/caption_quickstart.yaml")
    ap.add_argument("--minutes", type=float, default=10.0, help="training time limit")
    ap.add_argument("--pipeline", default=None, help="evaluate this pipeline folder instead of training")
    ap.add_argument("--out-dir", default=None, help="run folder (default runs/<recipe name>_experiment)")
    ap.add_argument("--out", default=None, help="results file (default experiments/results/captioning_<recipe>.json)")
    ap.add_argument("--eval-n", type=int, default=400, help="images per evaluation split (at most)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    name = os.path.splitext(os.path.basename(a.recipe))[0]
    run = [f"run.output_dir={a.out_dir or f'runs/{name}_experiment'}", f"trainer.time_limit_minutes={a.minutes}",
           f"trainer.threads={a.threads}"]
    cfg = load_config(a.recipe, [*run, *a.overrides])
    if a.pipeline is None:
        res = train(cfg)
        last = res.losses[-50:]
        pipe_dir = str(res.pipeline_dir)
        train_info = {"steps": res.step, "completed": res.completed, "seconds": round(res.seconds, 1),
                      "final_loss": sum(last) / max(1, len(last))}
    else:
        pipe_dir, train_info = a.pipeline, None
    pipe = CaptioningPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    gen_length = pipe.config.gen_length
    splits = eval_splits(cfg)
    if not splits:
        raise SystemExit(f"{a.recipe} names no evaluation split (set data.eval_splits)")
    decodings = {
        "1_token_per_step": dict(threshold=None, steps=gen_length),
        "threshold_0.9": dict(threshold=0.9),
    }
    report = {"recipe": a.recipe, "pipeline": pipe_dir, "train": train_info, "threads": a.threads, "splits": {}}
    for split in splits:
        pairs = load_pairs(cfg, split)
        n = min(a.eval_n, len(pairs.images))
        pairs.images, pairs.captions = pairs.images[:n], pairs.captions[:n]
        if pairs.attributes is not None:
            pairs.attributes = pairs.attributes[:n]
        report["splits"][split] = {}
        for dname, kw in decodings.items():
            r = evaluate_captioner(pipe, pairs, batch_size=a.batch_size, **kw)
            examples = list(zip(r.pop("predictions")[:6], pairs.captions[:6], strict=True))
            r["examples"] = [{"prediction": p, "reference": c} for p, c in examples]
            r["forwards_per_batch"] = r["forwards"] / -(-n // a.batch_size)
            report["splits"][split][dname] = r
            print(split, dname, json.dumps({k: v for k, v in r.items() if k != "examples"}), flush=True)

    # batch job vs pure forward, on the last split's images as files
    pairs = load_pairs(cfg, splits[-1])
    n = min(a.eval_n, len(pairs.images))
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "images")
        os.makedirs(folder)
        for i, im in enumerate(pairs.images[:n]):
            dest = os.path.join(folder, f"{i:05d}.png")
            if isinstance(im, str):
                import shutil

                shutil.copy(im, dest)
            else:
                im.save(dest)
        jobs = {}
        for dname, kw in decodings.items():
            s = run_captioning(pipe, folder, os.path.join(tmp, f"{dname}.jsonl"), batch_size=a.batch_size,
                               num_workers=2, progress=False, caption_kwargs=kw)
            jobs[dname] = s.images_per_second
        pix = pipe.vision_adapter.preprocess(pairs.images[: a.batch_size])
        fwd = pure_forward_images_per_second(pipe, pix, gen_length)
    report["throughput"] = {
        "images": n, "batch_size": a.batch_size, "pure_forward_images_per_second": fwd,
        **{f"job_images_per_second_{k}": v for k, v in jobs.items()},
        **{f"ratio_job_to_pure_forward_{k}": v / fwd for k, v in jobs.items()},
    }
    print("throughput", json.dumps(report["throughput"]), flush=True)
    path = a.out or f"experiments/results/captioning_{name}.json"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()

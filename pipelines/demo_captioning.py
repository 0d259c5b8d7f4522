"""Captioning demo: train the quickstart captioner for a few minutes on CPU, batch-caption held-out
images with the `mmdlm caption` job, and print BLEU-4, CIDEr, attribute accuracy and a few captions.

    python -m pipelines.demo_captioning                 # ~5 minutes of training
    python -m pipelines.demo_captioning --minutes 10    # better captions
    python -m pipelines.demo_captioning --reuse         # skip training when the pipeline exists

Training is `python train.py configs/caption_quickstart.yaml` with a time limit: the trainer stops,
checkpoints and exports what it trained; running the demo again goes on from that checkpoint.

The data is generated (modalities.data.scenes): the held-out images show colour/shape pairs that never
appear in training, so the attribute accuracy measures composition, not memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="demo_captioning", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0,
                    help="training time limit (trainer.time_limit_minutes; a rerun goes on from the checkpoint)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest on a shared machine; 2 may help on an idle 2-core one)")
    ap.add_argument("--out", default="runs/demo_captioning")
    ap.add_argument("--images", type=int, default=200, help="held-out images to caption")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--reuse", action="store_true", help="reuse <out>/pipeline if it exists")
    a = ap.parse_args(argv)

    import pipelines.tasks  # noqa: F401 - registers the built-in tasks
    from latent.training.config import load_config
    from latent.training.trainer import train
    from modalities.data.metrics import attribute_accuracy, caption_scores
    from modalities.data.scenes import make_split, write_split
    from pipelines.batch import run_captioning
    from pipelines.captioning import CaptioningPipeline

    recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                          "caption_quickstart.yaml")
    import torch

    torch.set_num_threads(a.threads)
    cfg = load_config(recipe, [f"run.output_dir={a.out}", f"trainer.time_limit_minutes={a.minutes}",
                               f"trainer.threads={a.threads}"])
    pipe_dir = os.path.join(a.out, "pipeline")
    captions_file = os.path.join(a.out, "heldout_captions.jsonl")
    if not (a.reuse and os.path.isfile(os.path.join(pipe_dir, "model_index.json"))):
        print(f"== training the quickstart captioner for at most {a.minutes:g} minutes (configs/caption_quickstart.yaml)")
        train(cfg)
        if os.path.exists(captions_file):  # captions of an earlier model: the job would resume from them
            os.remove(captions_file)

    print(f"== writing {a.images} held-out images (colour/shape pairs never seen in training)")
    index = write_split(make_split("heldout", a.images, int(cfg.run.seed)), a.out, "heldout")
    with open(index) as f:
        refs = [json.loads(x) for x in f]

    print("== batch captioning them (the job behind `mmdlm caption`: threshold decoding, exact prefix cache)")
    pipe = CaptioningPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    t = time.perf_counter()
    summary = run_captioning(pipe, os.path.join(a.out, "heldout"), captions_file, batch_size=a.batch_size,
                             num_workers=a.num_workers)
    seconds = time.perf_counter() - t
    with open(captions_file) as f:
        got = {json.loads(x)["path"]: json.loads(x) for x in f}
    preds, gold, attrs = [], [], []
    for r in refs:
        rec = got.get(os.path.join(a.out, r["path"]))
        if rec is None or "caption" not in rec:
            continue
        preds.append(rec["caption"])
        gold.append(r["caption"])
        attrs.append(r["attributes"])
    scores = caption_scores(preds, gold)
    acc = attribute_accuracy(preds, attrs)
    print(f"\n== held-out results ({len(preds)} images, {summary.failed} failed, {seconds:.1f} s including model load)")
    print(f"BLEU-4 {scores['bleu4']:.3f}   CIDEr {scores['cider']:.3f}")
    print("attribute accuracy: " + "  ".join(f"{k} {v:.2f}" for k, v in acc.items()))
    print("\nexamples (prediction  |  reference):")
    for p, g in list(zip(preds, gold, strict=True))[:8]:
        print(f"  {p:<40} | {g}")
    print(f"\ncaptions: {captions_file}\npipeline: {pipe_dir}  (try: mmdlm caption --model {pipe_dir} "
          f"--images {os.path.join(a.out, 'heldout')} --out captions.jsonl)")
    return {"scores": scores, "attributes": acc, "images": len(preds)}


if __name__ == "__main__":
    main()
    sys.exit(0)

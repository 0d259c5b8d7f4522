"""`make demo`: train the tiny text diffusion model on the offline English corpus, then show what it learned.

    python -m pipelines.demo                 # 800 steps, a few minutes on one CPU core
    python -m pipelines.demo --steps 100     # shorter
    python -m pipelines.demo trainer.batch_size=32 model.hidden_size=192   # any train.py override

Steps: (1) the corpus sources are Debian packages (wordnet-base, fortunes, dict-gcide); when they are
missing and we run as root they are installed with apt-get, otherwise the command to run is printed.
(2) ``train.py``'s loop runs ``configs/text_tiny.yaml`` (corpus and BPE tokenizer are built on first use
under ``data/english``). (3) The validation bound (bits per token) of the untrained and the trained
model is printed, then samples from ``TextDiffusionPipeline.from_pretrained(<run>/pipeline)``.
Same seed, same numbers and samples.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["The meaning of", "A small dog", 'What does "river" (noun) mean?', "Love is"]


def ensure_corpus_packages(auto_install: bool = True) -> None:
    from latent.data.corpus import missing_sources

    missing = missing_sources()
    if not missing:
        return
    can_install = auto_install and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get")
    if not can_install:
        raise SystemExit(
            f"The demo corpus is built from Debian packages that are not installed: {' '.join(missing)}.\n"
            f"Install them with:  sudo apt-get install -y {' '.join(missing)}"
        )
    print(f"[demo] installing the corpus sources with apt-get: {' '.join(missing)}", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's, 800)")
    ap.add_argument("--out", default="runs/demo", help="run folder (replaced on every demo run)")
    ap.add_argument("--config", default=str(REPO / "configs" / "text_tiny.yaml"))
    ap.add_argument("--no-install", action="store_true", help="never call apt-get; fail with the command")
    ap.add_argument("overrides", nargs="*", help="train.py dot-list overrides")
    args = ap.parse_args(argv)

    ensure_corpus_packages(not args.no_install)

    import pipelines.tasks  # noqa: F401 - registers the text task
    from latent.training.config import ConfigError, load_config
    from latent.training.trainer import Trainer

    out = Path(args.out)
    over = [f"run.output_dir={out}", "run.name=demo", "trainer.resume=never", "eval.num_samples=0"]
    if args.steps is not None:
        over.append(f"trainer.max_steps={args.steps}")
    try:
        cfg = load_config(args.config, over + list(args.overrides))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if out.is_dir() and (out / "config.yaml").is_file():
        shutil.rmtree(out)  # a previous demo run: start clean, so the numbers are reproducible

    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    n_params = sum(p.numel() for p in trainer.modules.parameters())
    task = trainer.task
    print(f"[demo] corpus {', '.join(task.train_files)}; tokenizer {len(task.tokenizer)} tokens; "
          f"model {n_params / 1e6:.2f} M parameters; {cfg.trainer.max_steps} steps x {cfg.trainer.batch_size} "
          f"x {cfg.data.seq_len} tokens", flush=True)
    result = trainer.fit()
    minutes = (time.perf_counter() - t0) / 60

    import math

    print()
    print(f"trained {result.step} steps in {minutes:.1f} min -> {result.run_dir}")
    print(f"loss curve: {result.run_dir / 'loss.png'}   logs: {result.run_dir / 'train.csv'}, tensorboard --logdir "
          f"{result.run_dir / 'tb'}")
    print(f"validation bound (masked-diffusion ELBO, {cfg.eval.elbo_samples} draws, {cfg.eval.valid_sequences} "
          f"sequences), bits per token:")
    bound = {e["step"]: e["val_bits_per_token"] for e in result.evals}
    print(f"  uniform guess  {math.log2(len(task.tokenizer)):.3f}")
    print(f"  untrained      {bound[0]:.3f}")
    print(f"  trained        {bound[result.step]:.3f}")

    import torch

    from pipelines.text import TextDiffusionPipeline

    pipe = TextDiffusionPipeline.from_pretrained(str(result.run_dir / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    settings = [("greedy, low-confidence remasking (LLaDA)", {}),
                ("temperature 1.0, random remasking", {"temperature": 1.0, "remasking": "random"})]
    for title, kw in settings:
        print(f"samples (TextDiffusionPipeline: 48 tokens, 16-token blocks, 48 steps, {title}):")
        for i, prompt in enumerate(PROMPTS):
            res = pipe(prompt, gen_length=48, block_length=16, steps=48,
                       generator=torch.Generator().manual_seed(i), **kw)
            print(f"  [{prompt}] {' '.join(res.texts[0].split())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

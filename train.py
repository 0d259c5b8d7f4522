"""The one training entry point for every model and objective of mmdlm.

    python train.py configs/text_tiny.yaml trainer.max_steps=200 model.hidden_size=256
    torchrun --nproc-per-node 2 train.py configs/text_tiny.yaml          # DDP (gloo on CPU, NCCL on GPU)
    accelerate launch --config_file configs/accelerate/fsdp.yaml train.py configs/text_small.yaml

Arguments after the recipe are OmegaConf dot-list overrides. The resolved config is saved as
``<run.output_dir>/config.yaml``; ``--print-config`` shows it without training. See
``latent/training/`` for the pieces and ``docs/training.md`` for the recipes.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "TASKS"]

# Recipes with a top-level `task:` other than "text" are trained by their task's own loop, which takes
# the same command line (recipe, dot-list overrides, --print-config): "module" or "module:function".
TASKS = {
    "caption": "pipelines.caption_training:main",
    "spoken_qa": "pipelines.spoken_qa_training:main",
    "driving": "pipelines.planning:main",
}


def _task_of(config_path: str) -> str:
    from omegaconf import OmegaConf

    try:
        recipe = OmegaConf.load(config_path)
    except Exception:  # unreadable recipes are reported by load_config below
        return "text"
    return str(recipe.get("task", "text")) if hasattr(recipe, "get") else "text"


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="train.py", description="Train an mmdlm model from an OmegaConf recipe.",
        epilog="example: python train.py configs/text_tiny.yaml trainer.max_steps=200 model.hidden_size=256",
    )
    ap.add_argument("config", help="recipe YAML (configs/*.yaml)")
    ap.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. trainer.max_steps=200")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = ap.parse_intermixed_args(argv)

    task = _task_of(args.config)
    if task != "text":
        if task not in TASKS:
            known = ", ".join(["text", *TASKS])
            print(f"config error: task={task!r} is unknown; known tasks: {known}", file=sys.stderr)
            raise SystemExit(2)
        import importlib

        module, _, fn = TASKS[task].partition(":")
        argv_task = [args.config, *args.overrides] + (["--print-config"] if args.print_config else [])
        code = getattr(importlib.import_module(module), fn or "main")(argv_task)
        if code:
            raise SystemExit(code)
        return None

    from omegaconf import OmegaConf

    from latent.training.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.print_config:
        print(OmegaConf.to_yaml(cfg))
        return None

    from latent.training.trainer import Trainer

    try:  # every check on the input happens here, before the first step
        trainer = Trainer(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    result = trainer.fit()
    if result.completed and result.run_dir is not None:
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            if result.initial_bits_per_token is not None:
                print(f"validation bound at step 0: {result.initial_bits_per_token:.4f} bits/token")
            if result.final_bits_per_token is not None:
                print(f"validation bound at step {result.step}: {result.final_bits_per_token:.4f} bits/token")
            for s in result.samples:
                print(f"sample [{s['prompt']}] {s['text']}")
            print(f"run folder: {result.run_dir}")
    return result


if __name__ == "__main__":
    main()

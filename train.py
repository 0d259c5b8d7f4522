"""The one training entry point for every task of mmdlm.

    python train.py configs/text_tiny.yaml trainer.max_steps=200 model.hidden_size=256
    python train.py configs/caption_quickstart.yaml stages.0.steps=300
    torchrun --nproc-per-node 2 train.py configs/text_tiny.yaml          # DDP (gloo on CPU, NCCL on GPU)
    accelerate launch --config_file configs/accelerate/fsdp.yaml train.py configs/text_small.yaml

Arguments after the recipe are OmegaConf dot-list overrides. The recipe's ``task:`` key (``text`` when
absent) selects the task (``pipelines/tasks/``); every task runs on the same trainer (``latent/training``)
with the same config keys. The resolved config is saved as ``<run.output_dir>/config.yaml``;
``--print-config`` shows it without training. See ``docs/training.md``.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="train.py", description="Train an mmdlm model from an OmegaConf recipe (any task).",
        epilog="example: python train.py configs/text_tiny.yaml trainer.max_steps=200 model.hidden_size=256",
    )
    ap.add_argument("config", help="recipe YAML (configs/*.yaml)")
    ap.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. trainer.max_steps=200 stages.0.lr=1e-3")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = ap.parse_intermixed_args(argv)

    from omegaconf import OmegaConf

    import pipelines.tasks  # noqa: F401 - registers the built-in tasks
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
    if trainer.is_main:
        if result.pipeline_dir is not None:
            print(f"pipeline: {result.pipeline_dir}")
        for s in result.extra.get("samples", []):
            print(f"sample [{s['prompt']}] {s['text']}")
        state = "completed" if result.completed else f"stopped at step {result.step} (rerun to resume)"
        print(f"run folder: {result.run_dir} ({state})")
    return result


if __name__ == "__main__":
    main()

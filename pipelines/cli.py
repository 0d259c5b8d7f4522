"""`mmdlm <subcommand> ...`: a small dispatcher.

A subcommand is a module with `configure(parser)` (add its arguments) and `run(args) -> int`. Add one
with a line in SUBCOMMANDS (or `register_subcommand` from a plugin); modules are imported only when
their subcommand runs, so `mmdlm --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "caption": ("pipelines.batch_cli", "caption images in batches into a resumable JSONL file"),
    "convert": ("pipelines.convert", "convert a Llama/Qwen/LLaDA/Dream/Fast-dLLM v2/SDAR checkpoint, or export one"),
    "eval": ("pipelines.evaluation.lm_eval_cli", "lm-evaluation-harness with the 'mmdlm' model registered (lm_eval's arguments)"),
    "humaneval": ("pipelines.evaluation.humaneval", "HumanEval pass@k, left to right or by infilling, resumable JSONL"),
    "quantize": ("pipelines.quantize", "write a pipeline folder with int8 or int4 backbone weights (torchao)"),
    "trajectory": ("pipelines.trajectory", "draw which token each decoding step committed (PNG heatmap)"),
}


def register_subcommand(name: str, module: str, help: str) -> None:
    if name in SUBCOMMANDS and SUBCOMMANDS[name][0] != module:
        raise ValueError(f"subcommand {name!r} is already provided by {SUBCOMMANDS[name][0]}.")
    SUBCOMMANDS[name] = (module, help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmdlm", description="Multimodal and latent diffusion language models.")
    sub = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    for name, (_module, help_) in sorted(SUBCOMMANDS.items()):
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"mmdlm: error: unknown subcommand {argv[0]!r}; choose from {', '.join(sorted(SUBCOMMANDS))}.",
                  file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    if getattr(module, "TAKES_RAW_ARGS", False):  # it hands them to another tool's parser (mmdlm eval: lm-eval's)
        args = rest
    else:
        sub = argparse.ArgumentParser(prog=f"mmdlm {name}", description=SUBCOMMANDS[name][1])
        module.configure(sub)
        args = sub.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except ValueError as err:  # argument-level errors (bad paths, shapes...) without a traceback
        print(f"mmdlm {name}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

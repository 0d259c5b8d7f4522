"""Where a CCDD joint model (``configs/latent_joint.yaml``) loses its answers: the latent sampler, or the tokens.

    python -m experiments.latent_joint_diagnosis runs/latent_joint/pipeline runs/latent_joint/config.yaml

On ``--problems`` held-out problems (spread over the difficulties) it measures

- the latent sampler: MSE and cosine of the sampled latents to the true latents of the test text, per number
  of sampling steps and scheduler, with the answer accuracy of the joint sample and of the tokens decoded again
  next to the sampled latents taken as clean (``readout``);
- the tokens given the true latents noised to a fixed level ``t`` (``t=1``: pure noise, the tokens alone), and
  the MSE of the model's clean-latent estimate at that level.

Writes ``<out>/latent_joint_diagnosis.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from omegaconf import OmegaConf

from experiments.latent_tasks import markdown_table
from latent.data.arithmetic import accuracy_by_difficulty, decode_answer, equation_text
from latent.joint import joint_sample
from pipelines.tasks.autoencoders import arithmetic_split
from pipelines.tasks.joint import JointGenerator, spread


def latent_errors(sampled: torch.Tensor, clean: torch.Tensor) -> dict:
    """MSE per channel and mean cosine (per row, flattened) of sampled vs true latents."""
    s, c = sampled.flatten(1).float(), clean.flatten(1).float()
    return {"mse": float(((s - c) ** 2).mean()), "cos": float(torch.nn.functional.cosine_similarity(s, c).mean())}


def tokens_next_to(gen: JointGenerator, questions, latents: torch.Tensor, level: torch.Tensor, steps: int):
    """Answers decoded with the latent stream held fixed at ``latents`` and noise level ``level`` ``[B]``."""
    prompt = gen.encode_questions(questions).to(gen.model.device)

    def model(ids, **_):
        return gen.model(ids, latents=latents, timestep=level)

    out = joint_sample(model, prompt, gen.settings["target_length"], gen.tokenizer.mask_token_id, steps)
    P = prompt.shape[1]
    return [decode_answer(gen.tokenizer, r[P:].tolist()) for r in out.sequences]


@torch.no_grad()
def noised_oracle(gen: JointGenerator, test, clean: torch.Tensor, levels, seed: int = 0) -> dict:
    """Token accuracy next to the true latents noised to each level in ``levels`` (fractions of T), and the
    MSE of the model's clean-latent estimate there (all answer tokens masked)."""
    d, T = gen.diffusion, gen.diffusion.num_train_timesteps
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    qs, L = [p.question for p in test], gen.settings["target_length"]
    res = {}
    for lv in levels:
        k = torch.full((len(test),), min(T - 1, round(lv * T)))
        x_t = d.add_noise(clean, noise, k)
        tm = d.model_time(k)
        texts = tokens_next_to(gen, qs, x_t, tm, L)
        prompt = gen.encode_questions(qs)
        ids = torch.cat([prompt, torch.full((len(test), L), gen.tokenizer.mask_token_id)], 1)
        x0 = d.predict_x0(gen.model(ids, latents=x_t, timestep=tm).latent_pred, x_t, k)
        res[lv] = {"acc": accuracy_by_difficulty(test, texts)["all"], **latent_errors(x0, clean)}
    return res


@torch.no_grad()
def sampler_quality(gen: JointGenerator, test, clean: torch.Tensor, steps=(2, 4, 8, 16, 32),
                    schedulers=("dpm", "ddim"), **gen_kw) -> dict:
    """Per scheduler and step count: latent errors of the joint sample, its accuracy, and the readout
    accuracy (tokens decoded again next to the sampled latents taken as clean)."""
    qs, res, saved = [p.question for p in test], {}, gen.scheduler
    try:
        for kind in schedulers:
            gen.scheduler = gen.diffusion.make_scheduler(kind)
            for ns in steps:
                out = gen(questions=qs, steps=ns, generator=torch.Generator().manual_seed(0),
                          **(dict(latent_stream="joint") | gen_kw))
                lat = out.latents.float()
                read = tokens_next_to(gen, qs, lat, torch.zeros(len(qs)), gen.settings["target_length"])
                res[f"{kind}/{ns}"] = {"acc": accuracy_by_difficulty(test, out.texts)["all"],
                                       "readout_acc": accuracy_by_difficulty(test, read)["all"],
                                       **latent_errors(lat, clean)}
    finally:
        gen.scheduler = saved
    return res


def diagnose(pipeline, config, problems: int = 200, steps=(2, 4, 8, 16, 32), schedulers=("dpm", "ddim"),
             levels=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0), **gen_kw) -> dict:
    gen = JointGenerator.from_pretrained(pipeline)
    test = spread(arithmetic_split(OmegaConf.load(config))[1], problems)
    clean = gen.encode_latents([equation_text(p) for p in test]).float().cpu()
    return {"sampler": sampler_quality(gen, test, clean, steps, schedulers, **gen_kw),
            "oracle_noised": noised_oracle(gen, test, clean, levels),
            "reference": {"mse_of_zero": float((clean**2).mean()),
                          "mse_of_mean": float(((clean - clean.mean(0)) ** 2).mean())}}


def report(res: dict, title: str) -> str:
    rows = [[k.split("/")[0], int(k.split("/")[1]), v["mse"], v["cos"], v["acc"], v["readout_acc"]]
            for k, v in res["sampler"].items()]
    a = markdown_table(["scheduler", "steps", "latent MSE", "latent cos", "acc (joint sample)",
                        "acc (tokens next to sampled latents)"], rows)
    rows = [[float(k), v["acc"], v["mse"], v["cos"]] for k, v in res["oracle_noised"].items()]
    b = markdown_table(["noise level t of the true latents", "token acc", "x0-estimate MSE", "x0-estimate cos"],
                       rows)
    ref = res["reference"]
    return (f"# {title}\n\n## Latent sampler\n\n{a}\n\nReference MSE: predicting 0 {ref['mse_of_zero']:.3f}, "
            f"predicting the mean test latent {ref['mse_of_mean']:.3f}.\n\n## Tokens next to the true latents "
            f"noised to t\n\n{b}\n")


def write_report(out: str, stem: str, text: str, payload: dict) -> None:
    """``<out>/<stem>.md`` (the text, also printed) and ``<out>/<stem>.json``."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(payload, f, indent=1, default=str)
    print(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pipeline", help="a JointGenerator folder (<run>/pipeline)")
    ap.add_argument("config", help="the run's config.yaml (for the held-out problems)")
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--out", default="experiments/results")
    args = ap.parse_args(argv)
    res = diagnose(args.pipeline, args.config, args.problems)
    text = report(res, f"CCDD joint diagnosis: `{args.pipeline}`")
    write_report(args.out, "latent_joint_diagnosis", text, dict(args=vars(args), results=res))


if __name__ == "__main__":
    main()

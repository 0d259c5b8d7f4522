"""CCDD variant of the planner: meta-actions as masked tokens, waypoints as continuous latents, one backbone.

    python experiments/driving_ccdd.py                   # same data, size and steps as configs/driving_tiny.yaml
    python experiments/driving_ccdd.py --steps 30        # smoke run

The backbone (same width/depth as driving_tiny, plus `latent_dim=2`) sees [sensor prefix | K action tokens |
K waypoint latents]. The latents are the per-decision displacements (dx, dy), standardised with the training
set's mean and std. Training: `latent.joint.joint_loss` (masked-diffusion CE on the actions + lam * MSE of the
v-prediction on the latents, independent noise levels). Decoding: `latent.joint.joint_sample` (tokens on
LLaDA's linear schedule, latents with DPM-Solver++, one forward per step for both). The open-loop metrics are
the ones of experiments/driving_eval.py, so the rows compare with the token planner's there.
Writes experiments/results/driving_ccdd.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


class PrefixedJoint(torch.nn.Module):
    """The backbone called by latent.joint with the sensor prefix added, action slots restricted to actions."""

    def __init__(self, model, action_ids: torch.Tensor):
        super().__init__()
        self.model = model
        self.allowed = torch.zeros(model.config.vocab_size, dtype=torch.bool)
        self.allowed[action_ids] = True
        self.prefix = None

    def forward(self, ids, latents=None, timestep=None, attention_mask=None, **kw):
        p = self.prefix
        mask = None if bool(p.mask.all()) else p.attention_mask(num_tokens=ids.shape[1])
        out = self.model(ids, latents=latents, timestep=timestep, prefix_embeds=p.embeds, attention_mask=mask,
                         prefix_length=p.length)
        out.logits = out.logits.masked_fill(~self.allowed.to(out.logits.device), float("-inf"))
        return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", default="data/driving/train.npz")
    ap.add_argument("--valid", default="data/driving/valid.npz")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lam", type=float, default=1.0, help="weight of the latent MSE")
    ap.add_argument("--sample-steps", type=int, nargs="+", default=[3, 10])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="experiments/results/driving_ccdd.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from tqdm.auto import tqdm

    from latent.backbone import DiffusionTransformer
    from latent.continuous import GaussianDiffusion
    from latent.joint import joint_loss, joint_sample
    from modalities.driving import DrivingAdapter
    from modalities.driving_data import ACTIONS, DrivingDataset, PlanTokenizer

    train, valid = DrivingDataset.load(args.train), DrivingDataset.load(args.valid)
    k = train.actions.shape[1]
    tok = PlanTokenizer(horizon=k)
    torch.manual_seed(args.seed)
    adapter = DrivingAdapter(hidden_size=128, width=128, vehicle_tokens=4, heads=4)
    model = DiffusionTransformer(vocab_size=tok.vocab_size, hidden_size=128, num_layers=4, num_heads=4,
                                 mask_token_id=tok.mask_token_id, attention_layout="prefix", latent_dim=2,
                                 max_position_embeddings=adapter.num_prefix_tokens + 2 * k + 1)
    action_ids = torch.arange(len(ACTIONS)) + tok.action_offset
    net = PrefixedJoint(model, action_ids)
    diffusion = GaussianDiffusion("v_prediction")

    def displacements(w):
        w = torch.as_tensor(w, dtype=torch.float32)
        return torch.cat([w[:, :1], w[:, 1:] - w[:, :-1]], 1)

    d_train = displacements(train.waypoints)
    mean, std = d_train.mean((0, 1)), d_train.std((0, 1)).clamp_min(1e-3)
    z_train = (d_train - mean) / std
    ids_train = torch.as_tensor(train.actions) + tok.action_offset
    inputs_train = train.inputs()

    params = [*adapter.parameters(), *model.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.1 + 0.45 * (1 + np.cos(np.pi * (s - warm) / max(1, args.steps - warm))))
    g = torch.Generator().manual_seed(args.seed)
    losses, t0 = [], time.time()
    for step in (bar := tqdm(range(args.steps), desc="train CCDD")):
        adapter.train()
        model.train()
        rows = torch.randint(len(train), (args.batch,), generator=g)
        net.prefix = adapter(inputs_train.select(rows))
        out = joint_loss(net, ids_train[rows], z_train[rows], tok.mask_token_id, diffusion, lam=args.lam, generator=g)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append((out.ce.item(), out.mse.item()))
        if (step + 1) % 25 == 0:
            ce, mse = np.mean(losses[-25:], 0)
            bar.set_postfix(ce=f"{ce:.3f}", mse=f"{mse:.3f}")
    train_s = time.time() - t0
    adapter.eval()
    model.eval()

    scheduler = diffusion.make_scheduler("dpm")  # built once: set_timesteps resets it on every call

    @torch.no_grad()
    def plan(inputs, steps, seed):
        net.prefix = adapter(inputs)
        b = inputs.batch_size
        res = joint_sample(net, torch.zeros(b, 0, dtype=torch.long), k, tok.mask_token_id, steps, latent_shape=(k, 2),
                           diffusion=diffusion, scheduler=scheduler,
                           generator=torch.Generator().manual_seed(seed))
        actions = res.sequences - tok.action_offset
        way = (res.latents * std + mean).cumsum(1)
        return actions, way

    results = {"command": "python experiments/driving_ccdd.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "steps": args.steps, "train_seconds": train_s, "lam": args.lam, "rows": [],
               "final_ce_mse": list(map(float, np.mean(losses[-50:], 0)))}
    for ns in args.sample_steps:
        acts, ways = [], []
        for lo in range(0, len(valid), 128):
            rows = np.arange(lo, min(len(valid), lo + 128))
            a, w = plan(valid.inputs(rows), ns, lo)
            acts.append(a)
            ways.append(w)
        a, w = torch.cat(acts).numpy(), torch.cat(ways).numpy()
        l2 = np.linalg.norm(w - valid.waypoints, axis=-1)
        times = []
        for i in range(40):
            x = valid.inputs([i])
            t = time.perf_counter()
            plan(x, ns, i)
            times.append(1e3 * (time.perf_counter() - t))
        row = {"policy": f"CCDD (action tokens + waypoint latents), {ns} steps", "forwards_per_plan": ns,
               "action_acc": float((a == valid.actions).mean()), "first_action_acc": float((a[:, 0] == valid.actions[:, 0]).mean()),
               **{f"l2_{j + 1}s": float(l2[:, j].mean()) for j in range(k)},
               "latency_ms_batch1_median": float(np.median(times[5:]))}
        results["rows"].append(row)
        print(json.dumps(row))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

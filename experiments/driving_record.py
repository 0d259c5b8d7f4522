"""Record the driving demonstration set from highway-env, deterministically from seeds.

    python experiments/driving_record.py                      # data/driving/{train,valid}.npz
    python experiments/driving_record.py --train-episodes 4 --valid-episodes 2 --out /tmp/drv   # a quick one

Episode e of density index i uses seed `seed + 1000 * i + e` (train: --seed, valid: --valid-seed), so
running it again gives byte-identical arrays; the script prints a digest of each split to check that.
The demonstrator is `modalities.driving_data.RuleBasedDriver` (highway-env's IDM + MOBIL for the ego).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch


def digest(data) -> str:
    h = hashlib.sha256()
    for k, v in sorted(data.__dict__.items()):
        if isinstance(v, np.ndarray):
            h.update(k.encode())
            h.update(np.ascontiguousarray(v).tobytes())
    return h.hexdigest()[:16]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/driving")
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    ap.add_argument("--train-episodes", type=int, default=40, help="per density")
    ap.add_argument("--valid-episodes", type=int, default=10, help="per density")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--valid-seed", type=int, default=500)
    ap.add_argument("--horizon", type=int, default=3)
    ap.add_argument("--occupancy", action="store_true", help="also store ego-centred occupancy grids")
    ap.add_argument("--image", action="store_true", help="also store the top-down rendering (needs pygame)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from modalities.driving_data import record

    out = Path(args.out)
    summary = {}
    for split, episodes, seed in (("train", args.train_episodes, args.seed), ("valid", args.valid_episodes, args.valid_seed)):
        t = time.time()
        data = record(args.densities, episodes, seed, args.horizon, occupancy=args.occupancy, image=args.image)
        path = data.save(out / f"{split}.npz")
        counts = np.bincount(data.actions[:, 0], minlength=5).tolist()
        summary[split] = {"samples": len(data), "episodes": episodes * len(args.densities), "seed": seed,
                          "first_action_counts": counts, "demonstrator_crashes": data.meta["demonstrator_crashes"],
                          "digest": digest(data), "seconds": round(time.time() - t, 1), "path": str(path)}
        print(split, json.dumps(summary[split]))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

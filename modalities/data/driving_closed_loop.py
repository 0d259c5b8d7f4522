"""Closed-loop driving evaluation: a policy drives highway-env episodes under a named condition (traffic
density, lane count, road layout), and the episodes are summarised with 95 % confidence intervals.

```python
from modalities.data.driving_closed_loop import CONDITIONS, drive, summarize

rows = drive(policy, CONDITIONS["merge"], episodes=30, seed=10_000)   # policy(env, observation) -> action
summarize(rows)   # collision rate + Wilson CI, mean speed and return + bootstrap CIs
```

**Conditions.** ``highway`` is the setting of the demonstrations (highway-fast-v0, 3 lanes, 20 vehicles,
density 1.5, between the recorded 1.0 and 2.0). The others are absent from the training data: denser
traffic (``highway-dense``: density 3, the 20 vehicles packed closer), other lane counts (``highway-2lanes``,
``highway-4lanes``), and the road layouts ``merge`` (merge-v0: a ramp joins the right lane) and
``roundabout`` (roundabout-v0, its own target speeds 0 / 8 / 16 m/s; the observation is rotated into the
ego lane's frame, which on the straight demonstration roads is the frame the planner was trained in). All
use the meta-action interface and Kinematics observation of :func:`modalities.data.driving.env_config`.

**Not evaluated** (`EXCLUDED`): layouts whose observation or action cannot be mapped onto the planner's.

**Episodes** end at a crash, at the env's end (time limit; merge-v0: the ramp passed), or after
``max_decisions`` (merge-v0 has no time limit). Episode e uses seed ``seed + e``; the policies see the same
traffic.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

import numpy as np

from modalities.data.driving import ENV_ID, make_env, run_episode
from modalities.data.metrics import bootstrap_mean_interval, wilson_interval

__all__ = ["Condition", "CONDITIONS", "EXCLUDED", "drive", "summarize", "seed_ranges", "pool_outputs"]


@dataclass(frozen=True)
class Condition:
    """One evaluation setting: the env, its traffic density and other config keys, and the observation frame."""

    name: str
    env_id: str = ENV_ID
    density: float = 1.5
    config: dict = field(default_factory=dict)  # more env_config keys (vehicles_count, lanes_count, target_speeds...)
    lane_frame: bool = False
    in_distribution: bool = False
    note: str = ""


CONDITIONS = {c.name: c for c in (
    Condition("highway", in_distribution=True, note="as recorded: 3 lanes, 20 vehicles, density 1.5 (data: 1.0-2.0)"),
    Condition("highway-dense", density=3.0,
              note="denser traffic than recorded: density 3.0 (20 vehicles packed closer)"),
    Condition("highway-2lanes", config={"lanes_count": 2}, note="2 lanes (data: 3)"),
    Condition("highway-4lanes", config={"lanes_count": 4}, note="4 lanes (data: 3)"),
    Condition("merge", env_id="merge-v0", note="merge-v0: traffic joins from an on-ramp; ends past the ramp"),
    Condition("roundabout", env_id="roundabout-v0", config={"target_speeds": [0.0, 8.0, 16.0]}, lane_frame=True,
              note="roundabout-v0 with its own target speeds; observation in the ego lane's frame"),
)}

EXCLUDED = {
    "intersection-v0": "the ego must cross or turn through conflicting traffic at an unsignalled junction: its "
                       "default actions are longitudinal only (3 indices that mean other things than ours), lane "
                       "changes have no meaning there, and the IDM + MOBIL demonstrator does not yield to crossing "
                       "traffic, so neither the action mapping nor a demonstrator reference holds",
    "parking-v0, racetrack-v0, lane-keeping-v0": "continuous steering / acceleration actions, not meta-actions",
    "exit-v0, u-turn-v0, two-way-v0": "goal-directed manoeuvres (take an exit, turn, overtake against oncoming "
                                      "traffic) that the demonstrator and the planner have no notion of",
}


def drive(policy, condition: Condition, episodes: int, seed: int = 10_000, max_decisions: int = 60,
          occupancy: bool = False) -> list[dict]:
    """``episodes`` episodes of ``policy(env, observation) -> action index`` under ``condition``; one row per
    episode: crashed, completed (no crash), decisions, mean speed [m/s], return (sum of the env's rewards),
    distance [m] (path length of the ego). ``occupancy``: observations carry the ego-centred occupancy grid
    (for planners whose adapter reads one)."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}.")
    env = make_env(condition.density, env_id=condition.env_id, **condition.config)
    rows = []
    try:
        for e in range(episodes):
            ep = run_episode(env, seed + e, policy, occupancy=occupancy, max_steps=max_decisions,
                             lane_frame=condition.lane_frame)
            path = np.linalg.norm(np.diff(ep.poses[:, :2], axis=0), axis=1).sum() if len(ep.poses) > 1 else 0.0
            rows.append({"crashed": ep.crashed, "completed": not ep.crashed, "decisions": len(ep.actions),
                         "mean_speed": float(np.mean(ep.speeds)) if ep.speeds else 0.0,
                         "return": float(np.sum(ep.rewards)), "distance": float(path)})
    finally:
        env.close()
    return rows


def summarize(rows: list[dict], seed: int = 0) -> dict:
    """Collision rate with its Wilson 95 % interval; mean speed, return and distance with percentile
    bootstrap 95 % intervals (seeded)."""
    n = len(rows)
    crashes = int(sum(r["crashed"] for r in rows))
    out = {"episodes": n, "collisions": crashes, "collision_rate": crashes / n,
           "collision_rate_ci95": list(wilson_interval(crashes, n))}
    for key in ("mean_speed", "return", "distance"):
        values = [r[key] for r in rows]
        out[key] = float(np.mean(values))
        out[f"{key}_ci95"] = list(bootstrap_mean_interval(values, seed=seed))
    return out


def seed_ranges(output: dict) -> list[list[int]]:
    """The [first, last] episode seeds a closed-loop output (`experiments/driving_ood.py`'s JSON) drove; older
    outputs without a "seeds" field are read off their command line."""
    if output.get("seeds"):
        return [list(r) for r in output["seeds"]]
    words = shlex.split(output["command"])
    get = {"--seed": 10_000, "--episodes": 30}
    for i, w in enumerate(words[:-1]):
        if w in get:
            get[w] = int(words[i + 1])
    return [[get["--seed"], get["--seed"] + get["--episodes"] - 1]]


def pool_outputs(outputs: dict[str, dict]) -> tuple[list[dict], list[tuple[str, str | None]], list[str]]:
    """(cells, policies, conditions) of several closed-loop outputs (name -> output) joined per (policy,
    condition): their episodes concatenated and summarised again. Raises ValueError when two outputs drove one
    condition on overlapping seeds (those episodes would count twice)."""
    for cond in {c["condition"] for o in outputs.values() for c in o["cells"]}:
        ranges = sorted((lo, hi, name) for name, o in outputs.items()
                        if any(c["condition"] == cond for c in o["cells"]) for lo, hi in seed_ranges(o))
        for (_, hi, a), (lo, _, b) in zip(ranges[:-1], ranges[1:], strict=True):
            if lo <= hi:
                raise ValueError(f"{a} and {b} drove overlapping seeds in {cond}; pool outputs of disjoint --seed "
                                 "ranges")
    joined, policies, conditions = {}, {}, []
    for out in outputs.values():
        policies.update(out["policies"])
        for c in out["cells"]:
            joined.setdefault((c["policy"], c["condition"]), []).extend(c["per_episode"])
            if c["condition"] not in conditions:
                conditions.append(c["condition"])
    cells = [{"policy": name, "condition": cond, "prior_tau": 0.0, **summarize(rows), "per_episode": rows}
             for (name, cond), rows in joined.items()]
    return cells, list(policies.items()), conditions

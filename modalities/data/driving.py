"""Driving data from the highway-env simulator: observations, a rule-based demonstrator, plan tokens.

```python
from modalities.data.driving import PlanTokenizer, make_env, observe, RuleBasedDriver, record, build_demonstrations

tok = PlanTokenizer(horizon=3)
ids = tok.encode(actions, waypoints)          # [.., 3K] token ids: (action, dx, dy) per future decision
actions, waypoints = tok.decode(ids)
data = record(densities=(1.0, 1.5, 2.0), episodes=20, seed=0)   # deterministic from the seed
data.save("data/driving/train.npz"); data = DrivingDataset.load("data/driving/train.npz")
paths = build_demonstrations("data/driving")  # {train,valid}.npz, recorded once (what the driving recipes call)
```

    python -m modalities.data.driving --out data/driving --train-episodes 40 --valid-episodes 10

**Simulator.** ``highway-fast-v0`` (gymnasium; 3 lanes, 20 IDM/MOBIL vehicles, 1 decision per second,
meta-actions LANE_LEFT / IDLE / LANE_RIGHT / FASTER / SLOWER driving an `MDPVehicle`; its target speeds are
set to 0, 5, ..., 30 m/s instead of the default 20/25/30 so that the ego can follow slower traffic). The traffic density is the env's ``vehicles_density``.

**Observation** (`observe`): the ego state read from the simulator (speed, heading, lane index with 0 = leftmost,
number of lanes, lateral offset from the lane centre) and the Kinematics observation of up to 14 surrounding
vehicles relative to the ego (x, y, vx, vy, cos_h, sin_h), plus optionally an ego-centred occupancy grid
(`occupancy_grid`) and the simulator's top-down rendering as the camera image.

**Demonstrator** (`RuleBasedDriver`): the simulator's own IDM (longitudinal) and MOBIL (lane change) models,
the ones its traffic vehicles use (`highway_env.vehicle.behavior.IDMVehicle`), evaluated for the ego at each
decision and mapped onto the meta-actions the planner also uses: a lane change when MOBIL recommends one
(the larger own acceleration gain wins), else FASTER / SLOWER / IDLE from IDM's acceleration (thresholds
+-0.5 m/s^2), and SLOWER whenever IDM asks for hard braking. Using the same action interface makes
demonstrations, planner and closed-loop baseline directly comparable.

**Sample** at decision t: the observation at t, the demonstrator's next K meta-actions (t .. t+K-1) and the
ego positions after 1..K decisions, in the ego frame at t (x forward, y to the right, metres). Windows
that reach past the end of an episode, or contain its crash, are dropped.

**Demonstration set** (`build_demonstrations`): ``train.npz`` and ``valid.npz`` in one folder, recorded on
disjoint seeds (train from ``seed``, valid from ``valid_seed``), with a ``summary.json`` holding a digest of
each split. A split whose file exists with the same settings is left as it is; one recorded with other
settings is refused rather than overwritten.

**DAgger** (`record` with a ``policy``): the policy drives, the demonstrator acting instead with
probability ``beta`` per decision; every visited state is labelled with the demonstrator's plan from it,
read off the episode where the demonstrator's actions were executed and otherwise from a deep copy of the
simulator in which the demonstrator drives on (`demonstrator_branch`, `demonstrator_windows`).

**Plan tokens** (`PlanTokenizer`): per future decision k the triple (action, dx_k, dy_k), where
``dx_k = qx_k - qx_{k-1}`` with ``qx_k = round(x_k / x_res)`` (cumulative quantisation: the decoded waypoint is
within half a bin of the true one at every horizon, no error accumulates), clipped to the token range.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modalities.driving import EGO_FIELDS, LANE_WIDTH, VEHICLE_FEATURES, DrivingInputs

__all__ = [
    "ACTIONS",
    "FALLBACK_ACTION",
    "ENV_ID",
    "PlanTokenizer",
    "RuleBasedDriver",
    "DrivingDataset",
    "make_env",
    "observe",
    "occupancy_grid",
    "record",
    "run_episode",
    "demonstrator_branch",
    "demonstrator_windows",
    "build_demonstrations",
    "recorded_settings",
    "digest",
]

# highway-env's DiscreteMetaAction indices
ACTIONS = ("LANE_LEFT", "IDLE", "LANE_RIGHT", "FASTER", "SLOWER")
ACTION_INDEX = {a: i for i, a in enumerate(ACTIONS)}
# The documented safe action for a row whose input cannot be trusted: keep the lane, slow down.
FALLBACK_ACTION = "SLOWER"
ENV_ID = "highway-fast-v0"
MAX_OBSERVED = 15  # Kinematics rows: the ego + 14 vehicles
TARGET_SPEEDS = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0)  # m/s, what FASTER / SLOWER step between


# ------------------------------------------------------------------------------------------ tokens
@dataclass
class PlanTokenizer:
    """Meta-actions and waypoints of the next `horizon` decisions <-> a token sequence of length 3 * horizon.

    Vocabulary: 0 = mask, 1 = BOS (for the autoregressive baseline), then the 5 actions, then the dx tokens
    (forward step per decision, x_range metres at x_res), then the dy tokens (lateral step, y_range at y_res).
    `dt` is the time between decisions [s] (highway-env's policy period), so waypoint k is at k * dt seconds.
    """

    horizon: int = 3
    dt: float = 1.0
    x_res: float = 0.5
    x_range: tuple[float, float] = (0.0, 45.0)
    y_res: float = 0.25
    y_range: tuple[float, float] = (-6.0, 6.0)

    mask_token_id = 0
    bos_token_id = 1
    action_offset = 2

    def __post_init__(self):
        if not isinstance(self.horizon, int) or self.horizon < 1:
            raise ValueError(f"horizon must be a positive int, got {self.horizon!r}.")
        if self.x_res <= 0 or self.y_res <= 0:
            raise ValueError("x_res and y_res must be > 0.")
        self.x_range, self.y_range = tuple(self.x_range), tuple(self.y_range)
        self.qx = (round(self.x_range[0] / self.x_res), round(self.x_range[1] / self.x_res))
        self.qy = (round(self.y_range[0] / self.y_res), round(self.y_range[1] / self.y_res))
        if self.qx[1] <= self.qx[0] or self.qy[1] <= self.qy[0]:
            raise ValueError("x_range and y_range must be increasing intervals of at least one bin.")
        self.dx_offset = self.action_offset + len(ACTIONS)
        self.dy_offset = self.dx_offset + self.qx[1] - self.qx[0] + 1
        self.vocab_size = self.dy_offset + self.qy[1] - self.qy[0] + 1

    # ---- layout ---------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        return 3 * self.horizon

    def slot_kinds(self) -> list[str]:
        return ["action", "dx", "dy"] * self.horizon

    def allowed_tokens(self) -> torch.BoolTensor:
        """[length, vocab_size]: which ids each plan slot may hold (decoding restricts proposals to these)."""
        allowed = torch.zeros(self.length, self.vocab_size, dtype=torch.bool)
        spans = {"action": (self.action_offset, self.dx_offset), "dx": (self.dx_offset, self.dy_offset),
                 "dy": (self.dy_offset, self.vocab_size)}
        for i, kind in enumerate(self.slot_kinds()):
            lo, hi = spans[kind]
            allowed[i, lo:hi] = True
        return allowed

    def to_dict(self) -> dict:
        d = asdict(self)
        d["x_range"], d["y_range"] = list(self.x_range), list(self.y_range)
        return d

    # ---- encode / decode ------------------------------------------------------------------------
    def encode(self, actions, waypoints) -> torch.LongTensor:
        """actions [..., K] (int indices of ACTIONS, or names), waypoints [..., K, 2] metres -> ids [..., 3K]."""
        if isinstance(actions, (list, tuple)) and actions and isinstance(_first(actions), str):
            actions = _names_to_ids(actions)
        a = torch.as_tensor(np.asarray(actions), dtype=torch.long)
        w = torch.as_tensor(np.asarray(waypoints, dtype=np.float64), dtype=torch.float64)
        k = self.horizon
        if a.shape[-1:] != (k,) or w.shape[-2:] != (k, 2) or a.shape[:-1] != w.shape[:-2]:
            raise ValueError(f"actions must be [..., {k}] and waypoints [..., {k}, 2]; got {tuple(a.shape)} and "
                             f"{tuple(w.shape)}.")
        if bool(((a < 0) | (a >= len(ACTIONS))).any()):
            raise ValueError(f"actions must be indices in [0, {len(ACTIONS)}) of {ACTIONS}.")
        if not bool(torch.isfinite(w).all()):
            raise ValueError("waypoints hold NaN or inf.")
        q = torch.stack([torch.round(w[..., 0] / self.x_res), torch.round(w[..., 1] / self.y_res)], -1).long()
        prev = torch.cat([torch.zeros_like(q[..., :1, :]), q[..., :-1, :]], dim=-2)
        d = q - prev
        dx = d[..., 0].clamp(*self.qx) - self.qx[0] + self.dx_offset
        dy = d[..., 1].clamp(*self.qy) - self.qy[0] + self.dy_offset
        return torch.stack([a + self.action_offset, dx, dy], -1).flatten(-2)

    def decode(self, ids) -> tuple[torch.LongTensor, torch.Tensor]:
        """ids [..., 3K] -> (actions [..., K] (-1 where the slot holds no action token), waypoints [..., K, 2]
        (NaN from the first slot that holds no step token on))."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.shape[-1] != self.length:
            raise ValueError(f"plan ids must have {self.length} tokens (3 x horizon), got {ids.shape[-1]}.")
        t = ids.unflatten(-1, (self.horizon, 3))
        a, dx, dy = t[..., 0] - self.action_offset, t[..., 1] - self.dx_offset, t[..., 2] - self.dy_offset
        ok_a = (a >= 0) & (a < len(ACTIONS))
        ok_x = (dx >= 0) & (dx <= self.qx[1] - self.qx[0])
        ok_y = (dy >= 0) & (dy <= self.qy[1] - self.qy[0])
        steps = torch.stack([(dx + self.qx[0]).double() * self.x_res, (dy + self.qy[0]).double() * self.y_res], -1)
        good = (ok_x & ok_y).cumprod(-1).bool()  # a bad step spoils every later waypoint
        way = steps.cumsum(-2).masked_fill(~good[..., None], float("nan")).float()
        return torch.where(ok_a, a, torch.full_like(a, -1)), way

    def action_names(self, actions) -> list[list[str | None]]:
        return [[ACTIONS[int(i)] if 0 <= int(i) < len(ACTIONS) else None for i in row] for row in torch.as_tensor(actions)]


def _first(x):
    while isinstance(x, (list, tuple)) and x:
        x = x[0]
    return x


def _names_to_ids(names):
    if isinstance(names, str):
        if names not in ACTION_INDEX:
            raise ValueError(f"unknown action {names!r}; known: {ACTIONS}.")
        return ACTION_INDEX[names]
    return [_names_to_ids(n) for n in names]


# ------------------------------------------------------------------------------------------ simulator
def env_config(density: float = 1.0, duration: int | None = None, image: bool = False,
               target_speeds=TARGET_SPEEDS, **overrides) -> dict:
    """The env configured for our observation: Kinematics relative to the ego, unnormalised. ``overrides``
    are other highway-env config keys (``vehicles_count``, ``lanes_count``...), applied last."""
    cfg: dict[str, Any] = {
        "observation": {
            "type": "Kinematics", "vehicles_count": MAX_OBSERVED, "features": ["presence", *VEHICLE_FEATURES],
            "absolute": False, "normalize": False, "clip": False, "see_behind": True, "order": "sorted",
        },
        # Finer target speeds than the default 20/25/30 m/s: with those the ego cannot follow slower
        # traffic and rear-ends it whatever the policy (about 1 episode in 2 at density 1.5).
        "action": {"type": "DiscreteMetaAction", "target_speeds": [float(v) for v in target_speeds]},
        "vehicles_density": float(density),
    }
    if duration is not None:
        cfg["duration"] = int(duration)
    if image:
        cfg.update(screen_width=256, screen_height=64, scaling=3.0, offscreen_rendering=True)
    cfg.update(overrides)
    return cfg


def make_env(density: float = 1.0, duration: int | None = None, image: bool = False, env_id: str = ENV_ID,
             **config):
    """A headless highway-env environment (highway-fast-v0 unless ``env_id`` names another one, e.g.
    merge-v0) with :func:`env_config`'s observation and actions; ``config`` goes to `env_config`
    (``target_speeds``, ``vehicles_count``, ``lanes_count``...). render_mode rgb_array only for images."""
    import gymnasium as gym
    import highway_env  # noqa: F401 - registers the envs

    if image:
        # SDL's "offscreen" driver renders without a display; with "dummy" highway-env skips drawing (black frames).
        os.environ.setdefault("SDL_VIDEODRIVER", "offscreen")
        os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    return gym.make(env_id, config=env_config(density, duration, image, **config),
                    render_mode="rgb_array" if image else None)


def ego_state(env) -> dict[str, float]:
    u = env.unwrapped
    v = u.vehicle
    lane = u.road.network.get_lane(v.lane_index)
    _, lat = lane.local_coordinates(v.position)
    num_lanes = len(u.road.network.all_side_lanes(v.lane_index))
    return {"speed": float(v.speed), "heading": float(v.heading), "lane": int(v.lane_index[2]),
            "num_lanes": int(num_lanes), "lateral": float(lat)}


def occupancy_grid(vehicles: np.ndarray, ego: dict, x_range=(-20.0, 60.0), y_range=(-10.0, 10.0),
                   cell=(4.0, 2.0)) -> np.ndarray:
    """Ego-centred grid [2, H, W]: channel 0 = a vehicle covers the cell (5 x 2 m footprint), channel 1 = the
    cell is on the road (from the ego's lane, lane count and lateral offset). H along y, W along x."""
    w = int(round((x_range[1] - x_range[0]) / cell[0]))
    h = int(round((y_range[1] - y_range[0]) / cell[1]))
    grid = np.zeros((2, h, w), dtype=np.float32)
    xs = x_range[0] + (np.arange(w) + 0.5) * cell[0]
    ys = y_range[0] + (np.arange(h) + 0.5) * cell[1]
    for x, y, *_ in np.asarray(vehicles, dtype=np.float32).reshape(-1, len(VEHICLE_FEATURES)):
        cols = np.abs(xs - x) <= 2.5 + cell[0] / 2
        rows = np.abs(ys - y) <= 1.0 + cell[1] / 2
        grid[0][np.ix_(rows, cols)] = 1.0
    ego_y = ego["lane"] * LANE_WIDTH + ego.get("lateral", 0.0)
    lo, hi = -LANE_WIDTH / 2 - ego_y, ego["num_lanes"] * LANE_WIDTH - LANE_WIDTH / 2 - ego_y
    grid[1][(ys >= lo) & (ys <= hi), :] = 1.0
    return grid


def lane_heading(env) -> float:
    """Direction [rad] of the ego's lane at the ego's position (0 on every straight highway-fast road)."""
    u = env.unwrapped
    lane = u.road.network.get_lane(u.vehicle.lane_index)
    return float(lane.heading_at(lane.local_coordinates(u.vehicle.position)[0]))


def rotate_to_lane_frame(vehicles: np.ndarray, ego: dict, heading: float) -> tuple[np.ndarray, dict]:
    """Vehicle rows (x, y, vx, vy, cos_h, sin_h) and ego state rotated by ``-heading``: world-frame
    coordinates become coordinates along / across the ego's lane, the frame the straight-road data is in."""
    c, s = np.cos(heading), np.sin(heading)
    v = np.asarray(vehicles, dtype=np.float64).reshape(-1, len(VEHICLE_FEATURES)).copy()
    for i, j in ((0, 1), (2, 3), (4, 5)):  # positions, velocities, heading vectors: the same rotation
        a, b = v[:, i].copy(), v[:, j].copy()
        v[:, i], v[:, j] = c * a + s * b, -s * a + c * b
    ego = {**ego, "heading": float(np.arctan2(np.sin(ego["heading"] - heading), np.cos(ego["heading"] - heading)))}
    return v.astype(np.float32), ego


def observe(env, obs: np.ndarray | None = None, occupancy: bool = False, image: bool = False,
            image_size: tuple[int, int] | None = (32, 128), lane_frame: bool = False) -> dict:
    """The raw observation the adapter takes, from the env (and its last Kinematics observation `obs`).
    ``lane_frame``: rotate it into the ego lane's frame (:func:`rotate_to_lane_frame`) on curved roads; a
    straight lane (heading exactly 0) leaves it unchanged, bit for bit."""
    if obs is None:
        obs = env.unwrapped.observation_type.observe()
    obs = np.asarray(obs, dtype=np.float32)
    others = obs[1:]
    vehicles = others[others[:, 0] > 0.5, 1:].copy()
    out: dict[str, Any] = {"ego": ego_state(env), "vehicles": vehicles}
    heading = lane_heading(env) if lane_frame else 0.0
    if heading != 0.0:
        out["vehicles"], out["ego"] = rotate_to_lane_frame(vehicles, out["ego"], heading)
    if occupancy:
        out["occupancy"] = occupancy_grid(out["vehicles"], out["ego"])
    if image:
        frame = env.render()
        if image_size is not None:
            from PIL import Image

            frame = np.asarray(Image.fromarray(frame).resize((image_size[1], image_size[0]), Image.BILINEAR))
        out["image"] = frame
    return out


# ------------------------------------------------------------------------------------------ demonstrator
class RuleBasedDriver:
    """IDM + MOBIL from highway-env's `IDMVehicle`, applied to the ego and mapped to meta-actions.

    Per decision: IDM's acceleration `a` towards the top target speed given the vehicle ahead (and the one
    ahead in the target lane during a lane change), MOBIL for each side lane. Then, in this order:
    ``a <= hard_brake`` -> SLOWER; a lane MOBIL accepts -> LANE_LEFT / LANE_RIGHT (the larger own gain);
    ``a < brake_below`` -> SLOWER; ``a > accelerate_above`` -> FASTER (unless at the top speed); else IDLE.
    """

    def __init__(self, hard_brake: float = -3.0, brake_below: float = -0.5, accelerate_above: float = 0.5):
        self.hard_brake, self.brake_below, self.accelerate_above = hard_brake, brake_below, accelerate_above

    def __call__(self, env, observation=None) -> int:
        return self.act(env)

    def act(self, env) -> int:
        from highway_env.vehicle.behavior import IDMVehicle

        u = env.unwrapped
        ego, road = u.vehicle, u.road
        shadow = IDMVehicle.create_from(ego)  # the IDM/MOBIL driver in the ego's dynamical state
        shadow.target_speed = float(ego.target_speeds[-1])
        # The shadow stands in for the ego so that neighbour searches do not find the ego itself.
        i = road.vehicles.index(ego)
        road.vehicles[i] = shadow
        best, best_gain = None, -np.inf
        try:
            front, rear = road.neighbour_vehicles(shadow, ego.lane_index)
            acc = shadow.acceleration(shadow, front, rear)
            changing = ego.lane_index != ego.target_lane_index
            if changing:
                front2, rear2 = road.neighbour_vehicles(shadow, ego.target_lane_index)
                acc = min(acc, shadow.acceleration(shadow, front2, rear2))
            if not changing and abs(ego.speed) >= 1:
                for lane_index in road.network.side_lanes(ego.lane_index):
                    if not road.network.get_lane(lane_index).is_reachable_from(ego.position):
                        continue
                    if shadow.mobil(lane_index):
                        new_front, _ = road.neighbour_vehicles(shadow, lane_index)
                        gain = shadow.acceleration(shadow, new_front)
                        if gain > best_gain:
                            best, best_gain = lane_index, gain
        finally:
            road.vehicles[i] = ego
        if acc <= self.hard_brake:
            return ACTION_INDEX["SLOWER"]
        if best is not None:
            return ACTION_INDEX["LANE_LEFT" if best[2] < ego.lane_index[2] else "LANE_RIGHT"]
        if acc < self.brake_below:
            return ACTION_INDEX["SLOWER"]
        if acc > self.accelerate_above and ego.speed_index < len(ego.target_speeds) - 1:
            return ACTION_INDEX["FASTER"]
        return ACTION_INDEX["IDLE"]


# ------------------------------------------------------------------------------------------ dataset
@dataclass
class DrivingDataset:
    """Recorded samples as arrays (S samples, up to N vehicles, horizon K)."""

    ego: np.ndarray  # [S, 5] float32 (EGO_FIELDS)
    vehicles: np.ndarray  # [S, N, 6] float32
    vehicle_count: np.ndarray  # [S] int
    actions: np.ndarray  # [S, K] int64
    waypoints: np.ndarray  # [S, K, 2] float32
    density: np.ndarray  # [S] float32
    episode: np.ndarray  # [S] int64 (global episode number)
    step: np.ndarray  # [S] int64 (decision index in the episode)
    occupancy: np.ndarray | None = None  # [S, 2, H, W] float32
    image: np.ndarray | None = None  # [S, H, W, 3] uint8
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ego)

    def observation(self, i: int) -> dict:
        obs: dict[str, Any] = {"ego": dict(zip(EGO_FIELDS, map(float, self.ego[i]), strict=True)),
                               "vehicles": self.vehicles[i, : int(self.vehicle_count[i])]}
        obs["ego"]["lane"], obs["ego"]["num_lanes"] = int(self.ego[i, 2]), int(self.ego[i, 3])
        if self.occupancy is not None:
            obs["occupancy"] = self.occupancy[i]
        if self.image is not None:
            obs["image"] = self.image[i]
        return obs

    def inputs(self, rows=None, image_preprocess=None) -> DrivingInputs:
        """`DrivingInputs` of some rows, straight from the arrays (no per-row Python work)."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows)
        n = max(1, int(self.vehicle_count[rows].max()) if len(rows) else 1)
        veh = torch.from_numpy(self.vehicles[rows, :n]).float()
        vmask = torch.arange(n)[None] < torch.from_numpy(self.vehicle_count[rows])[:, None]
        occ = None if self.occupancy is None else torch.from_numpy(self.occupancy[rows]).float()
        img = None
        if self.image is not None:
            if image_preprocess is None:
                raise ValueError("this dataset has images: pass image_preprocess (e.g. adapter.camera_encoder.preprocess).")
            img = image_preprocess(list(self.image[rows]))
        return DrivingInputs(torch.from_numpy(self.ego[rows]).float(), veh, vmask, None, occ, None, img, None)

    def plan_ids(self, tokenizer: PlanTokenizer, rows=None) -> torch.LongTensor:
        rows = np.arange(len(self)) if rows is None else np.asarray(rows)
        return tokenizer.encode(self.actions[rows], self.waypoints[rows])

    def action_shares(self) -> list[float]:
        """Share of each meta-action (in `ACTIONS` order) among every plan slot's label: the label prior a
        planner trained on these rows learns (`PlanningPipeline.prior_correction` divides it out)."""
        counts = np.bincount(self.actions.reshape(-1), minlength=len(ACTIONS)).astype(np.float64)
        if counts.sum() == 0:
            raise ValueError("the dataset holds no plan: no action shares to compute.")
        return (counts / counts.sum()).tolist()

    def subset(self, rows) -> DrivingDataset:
        rows = np.asarray(rows)
        kw = {k: (v[rows] if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()}
        return DrivingDataset(**kw)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in self.__dict__.items() if isinstance(v, np.ndarray)}

    @classmethod
    def concat(cls, parts: list[DrivingDataset], meta: dict | None = None) -> DrivingDataset:
        """The rows of every part in order (vehicle rows padded to the widest part); the optional sensors
        are kept when every part has them."""
        if not parts:
            raise ValueError("concat needs at least one dataset.")
        n = max(p.vehicles.shape[1] for p in parts)
        kw: dict[str, Any] = {}
        for k, v in parts[0].__dict__.items():
            if k == "meta" or v is None or any(getattr(p, k) is None for p in parts):
                continue
            if k == "vehicles":
                kw[k] = np.concatenate([np.pad(p.vehicles, ((0, 0), (0, n - p.vehicles.shape[1]), (0, 0)))
                                        for p in parts])
            else:
                kw[k] = np.concatenate([getattr(p, k) for p in parts])
        return cls(**kw, meta=dict(meta if meta is not None else parts[0].meta))

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = self.arrays()
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, meta=np.array(json.dumps(self.meta)), **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> DrivingDataset:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; record it with build_demonstrations (the driving "
                                    "recipes do on first use) or python -m modalities.data.driving.")
        with np.load(path, allow_pickle=False) as z:
            kw = {k: z[k] for k in z.files if k != "meta"}
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
        return cls(**kw, meta=meta)


@dataclass
class Episode:
    """What `run_episode` returns: per decision t the observation, the executed action, the reward and the
    speed after it; ``poses`` [n + 1, 3] (x, y, heading) before each decision and after the last one."""

    records: list[dict]
    actions: list[int]
    poses: np.ndarray
    crashed: bool
    truncated: bool
    rewards: list[float] = field(default_factory=list)
    speeds: list[float] = field(default_factory=list)


def _pose(env) -> tuple[float, float, float]:
    v = env.unwrapped.vehicle
    return float(v.position[0]), float(v.position[1]), float(v.heading)


def run_episode(env, seed: int, policy, occupancy=False, image=False, max_steps: int | None = None,
                lane_frame: bool = False) -> Episode:
    """One episode under `policy(env, observation) -> action index` (at most ``max_steps`` decisions)."""
    obs, _ = env.reset(seed=seed)
    u = env.unwrapped
    ep = Episode([], [], np.zeros((0, 3)), False, False)
    poses = []
    while True:
        raw = observe(env, obs, occupancy, image, lane_frame=lane_frame)
        poses.append(_pose(env))
        if max_steps is not None and len(ep.actions) >= max_steps:
            break
        a = int(policy(env, raw))
        ep.records.append(raw)
        ep.actions.append(a)
        obs, reward, terminated, truncated, _ = env.step(a)
        ep.rewards.append(float(reward))
        ep.speeds.append(float(u.vehicle.speed))
        if terminated or truncated:
            ep.crashed, ep.truncated = bool(u.vehicle.crashed), bool(truncated) and not u.vehicle.crashed
            poses.append(_pose(env))
            break
    ep.poses = np.asarray(poses, dtype=np.float64)
    return ep


def future_waypoints(poses: np.ndarray, t: int, horizon: int) -> np.ndarray:
    """Positions after 1..horizon decisions in the ego frame at decision t: [horizon, 2] (x forward, y right)."""
    x0, y0, h0 = poses[t]
    d = poses[t + 1 : t + 1 + horizon, :2] - np.array([x0, y0])
    c, s = np.cos(h0), np.sin(h0)
    return np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1]], -1)


@dataclass
class Branch:
    """The demonstrator driving on from a copy of the simulator: its actions, the poses before the first
    and after each decision, and how many decisions are usable (a decision that crashes is not)."""

    actions: list[int]
    poses: np.ndarray  # [len(actions) + 1, 3]
    usable: int


def demonstrator_branch(env, driver, horizon: int) -> Branch:
    """`driver` drives ``horizon`` decisions from the current state of a deep copy of ``env``; the episode's
    own simulator is left untouched (the copy carries its random state, so it replays the same traffic)."""
    import copy

    sim = copy.deepcopy(env.unwrapped)
    actions, poses, usable = [], [_pose(sim)], 0
    for k in range(horizon):
        a = int(driver(sim))
        _, _, terminated, truncated, _ = sim.step(a)
        if sim.vehicle.crashed:
            break
        actions.append(a)
        poses.append(_pose(sim))
        usable = k + 1
        if terminated or truncated:
            break
    return Branch(actions, np.asarray(poses, dtype=np.float64), usable)


def demonstrator_windows(ep: Episode, demo: list[int], branches: dict[int, Branch], horizon: int):
    """The demonstrator's plan from every state of an episode: ``[(t, actions [K], waypoints [K, 2])]``.

    ``demo[t]`` is the demonstrator's action in state t, ``branches[p]`` its branch from every state p where
    the executed action differed. From state t the demonstrator's own trajectory follows the episode up to
    the first such p in the window, then branch p. Without a branch in it, a window that reaches past the
    episode's last decision or holds its crash is dropped (what the demonstration recording always did); a
    branch carries the window on, and drops it only if the demonstrator itself crashes there first."""
    n, out = len(ep.actions), []
    for t in range(n):
        p = next((j for j in range(t, min(n, t + horizon)) if ep.actions[j] != demo[j]), None)
        if p is None:
            if t + horizon > n - (1 if ep.crashed else 0):
                continue
            acts, way = demo[t : t + horizon], future_waypoints(ep.poses, t, horizon)
        else:
            b, need = branches[p], horizon - (p - t)
            if b.usable < need:
                continue
            acts = demo[t:p] + b.actions[:need]
            way = future_waypoints(np.concatenate([ep.poses[t:p], b.poses[: need + 1]]), 0, horizon)
        out.append((t, list(acts), way))
    return out


class _MixedPolicy:
    """DAgger's mixture for one episode: the demonstrator acts with probability ``beta``, ``policy``
    otherwise; it remembers the demonstrator's action in every state, and branches the demonstrator off
    wherever the executed action differs from it."""

    def __init__(self, driver, policy, beta: float, rng: np.random.Generator, horizon: int):
        self.driver, self.policy, self.beta, self.rng, self.horizon = driver, policy, beta, rng, horizon
        self.demo: list[int] = []
        self.branches: dict[int, Branch] = {}
        self.from_policy = 0

    def __call__(self, env, raw) -> int:
        d = int(self.driver(env))
        a = d
        if self.policy is not None and self.rng.random() >= self.beta:
            a = int(self.policy(env, raw))
            self.from_policy += 1
        if a != d:
            self.branches[len(self.demo)] = demonstrator_branch(env, self.driver, self.horizon)
        self.demo.append(d)
        return a


def record(densities=(1.0, 1.5, 2.0), episodes: int = 10, seed: int = 0, horizon: int = 3,
           occupancy: bool = False, image: bool = False, duration: int | None = None,
           max_steps: int | None = None, progress: bool = True, policy=None, beta: float = 1.0,
           ) -> DrivingDataset:
    """Demonstrations of `RuleBasedDriver` at each density; episode e of density d uses seed
    ``seed + 1000 * index(d) + e``, so the set is a pure function of the arguments (and of ``policy``).

    With a ``policy(env, observation) -> action`` (DAgger): in each decision the demonstrator acts with
    probability ``beta`` (drawn from a generator seeded by the episode's seed), ``policy`` otherwise; every
    visited state is labelled with the demonstrator's plan from it (`demonstrator_windows`). With
    ``beta=1`` (or no policy) that is the demonstrator's own rollout and its windows."""
    from tqdm.auto import tqdm

    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (the probability that the demonstrator acts), got {beta}.")
    driver = RuleBasedDriver()
    cols: dict[str, list] = {k: [] for k in ("ego", "vehicles", "count", "actions", "waypoints", "density",
                                              "episode", "step", "occupancy", "image")}
    crashes, total, decisions, from_policy = 0, 0, 0, 0
    bar = tqdm(total=len(densities) * episodes, desc="recording", disable=not progress)
    for di, density in enumerate(densities):
        env = make_env(density, duration, image)
        try:
            for e in range(episodes):
                ep_seed = seed + 1000 * di + e
                mixed = _MixedPolicy(driver, policy, float(beta), np.random.default_rng([ep_seed, 1]), horizon)
                ep = run_episode(env, ep_seed, mixed, occupancy, image, max_steps)
                crashes += ep.crashed
                total += 1
                decisions += len(ep.actions)
                from_policy += mixed.from_policy
                for t, acts, way in demonstrator_windows(ep, mixed.demo, mixed.branches, horizon):
                    r = ep.records[t]
                    cols["ego"].append([r["ego"][k] for k in EGO_FIELDS])
                    cols["vehicles"].append(r["vehicles"])
                    cols["count"].append(len(r["vehicles"]))
                    cols["actions"].append(acts)
                    cols["waypoints"].append(way)
                    cols["density"].append(density)
                    cols["episode"].append(di * episodes + e)
                    cols["step"].append(t)
                    if occupancy:
                        cols["occupancy"].append(r["occupancy"])
                    if image:
                        cols["image"].append(r["image"])
                bar.update(1)
        finally:
            env.close()
    bar.close()
    s = len(cols["ego"])
    nmax = max([1, *cols["count"]])
    vehicles = np.zeros((s, nmax, len(VEHICLE_FEATURES)), dtype=np.float32)
    for i, v in enumerate(cols["vehicles"]):
        vehicles[i, : len(v)] = v
    meta = {"env": ENV_ID, "densities": list(densities), "episodes": episodes, "seed": seed, "horizon": horizon,
            "duration": duration, "max_steps": max_steps, "occupancy": bool(occupancy), "image": bool(image),
            "demonstrator": "RuleBasedDriver (IDM + MOBIL)"}
    if policy is None:
        meta.update(demonstrator_crashes=crashes, demonstrator_episodes=total)
    else:  # DAgger: who drove, and how often the mixture crashed
        meta.update(beta=float(beta), episodes_driven=total, crashes=crashes, decisions=decisions,
                    policy_decisions=from_policy)
    return DrivingDataset(
        ego=np.asarray(cols["ego"], dtype=np.float32).reshape(s, len(EGO_FIELDS)), vehicles=vehicles,
        vehicle_count=np.asarray(cols["count"], dtype=np.int64),
        actions=np.asarray(cols["actions"], dtype=np.int64).reshape(s, horizon),
        waypoints=np.asarray(cols["waypoints"], dtype=np.float32).reshape(s, horizon, 2),
        density=np.asarray(cols["density"], dtype=np.float32), episode=np.asarray(cols["episode"], dtype=np.int64),
        step=np.asarray(cols["step"], dtype=np.int64),
        occupancy=np.asarray(cols["occupancy"], dtype=np.float32) if occupancy and s else None,
        image=np.asarray(cols["image"], dtype=np.uint8) if image and s else None,
        meta=meta,
    )


# ------------------------------------------------------------------------------------------ demonstration set
_SETTINGS = ("densities", "episodes", "seed", "horizon", "duration", "max_steps", "occupancy", "image")


def recorded_settings(path: str | os.PathLike) -> dict:
    """The recording settings of a saved split (what `build_demonstrations` compares), read from its meta.
    Files from before the flags were stored say whether they hold occupancy grids / images by their arrays."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
        arrays = set(z.files)
    out = {k: meta.get(k) for k in _SETTINGS}
    out["densities"] = [float(d) for d in out["densities"] or []]
    for k in ("occupancy", "image"):
        out[k] = bool(meta.get(k, k in arrays))
    return out


def digest(data: DrivingDataset) -> str:
    """A short hash of every array of a dataset (equal digests: identical recordings)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(data.__dict__.items()):
        if isinstance(v, np.ndarray):
            h.update(k.encode())
            h.update(np.ascontiguousarray(v).tobytes())
    return h.hexdigest()[:16]


def build_demonstrations(out_dir: str | os.PathLike, densities=(1.0, 1.5, 2.0), train_episodes: int = 40,
                         valid_episodes: int = 10, seed: int = 0, valid_seed: int = 500, horizon: int = 3,
                         occupancy: bool = False, image: bool = False, duration: int | None = None,
                         max_steps: int | None = None, progress: bool = True) -> dict[str, Path]:
    """``<out_dir>/train.npz`` and ``valid.npz`` recorded with `record` (episodes per density), deterministic
    from the seeds; returns their paths. A split already there with the same settings is kept (no work); one
    recorded with other settings raises ValueError naming both."""
    out = Path(out_dir)
    paths, summary = {}, {}
    for split, episodes, split_seed in (("train", train_episodes, seed), ("valid", valid_episodes, valid_seed)):
        path = paths[split] = out / f"{split}.npz"
        want = {"densities": [float(d) for d in densities], "episodes": int(episodes), "seed": int(split_seed),
                "horizon": int(horizon), "duration": duration, "max_steps": max_steps, "occupancy": bool(occupancy),
                "image": bool(image)}
        if path.is_file():
            have = recorded_settings(path)
            if have != want:
                diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
                raise ValueError(f"{path} holds demonstrations recorded with other settings (recorded, asked): {diff}; "
                                 "record elsewhere or delete the file")
            continue
        data = record(densities, episodes, split_seed, horizon, occupancy=occupancy, image=image, duration=duration,
                      max_steps=max_steps, progress=progress)
        data.save(path)
        summary[split] = {"samples": len(data), "first_action_counts": np.bincount(
            data.actions[:, 0], minlength=len(ACTIONS)).tolist(), "digest": digest(data), **want,
            "demonstrator_crashes": data.meta["demonstrator_crashes"]}
    if summary:
        index = out / "summary.json"
        old = json.loads(index.read_text()) if index.is_file() else {}
        index.write_text(json.dumps({**old, **summary}, indent=2))
    return paths


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Record the driving demonstration set (train.npz, valid.npz).")
    ap.add_argument("--out", default="data/driving")
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    ap.add_argument("--train-episodes", type=int, default=40, help="per density")
    ap.add_argument("--valid-episodes", type=int, default=10, help="per density")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--valid-seed", type=int, default=500)
    ap.add_argument("--horizon", type=int, default=3)
    ap.add_argument("--occupancy", action="store_true", help="also store ego-centred occupancy grids")
    ap.add_argument("--image", action="store_true", help="also store the top-down rendering (needs pygame)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    paths = build_demonstrations(a.out, a.densities, a.train_episodes, a.valid_episodes, a.seed, a.valid_seed,
                                 a.horizon, a.occupancy, a.image)
    print(json.dumps({k: str(v) for k, v in paths.items()}))


if __name__ == "__main__":
    main()

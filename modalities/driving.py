"""Driving-sensor adapter: ego state, surrounding vehicles, optional occupancy grid and camera -> prefix embeddings.

```python
from modalities.driving import DrivingAdapter

adapter = DrivingAdapter(hidden_size=128)
obs = {"ego": {"speed": 25.0, "heading": 0.0, "lane": 1, "num_lanes": 3},
       "vehicles": [[20.0, 0.0, -3.0, 0.0, 1.0, 0.0]]}          # x, y, vx, vy, cos_h, sin_h (relative to ego)
inputs = adapter.preprocess([obs])                              # DrivingInputs (tensors + masks)
prefix = adapter(inputs)                                        # PrefixEmbeds [B, P, D] + mask [B, P]
```

Prefix layout (fixed for a given config, so the backbone's rotary positions mean the same thing in every row):

    [ ego (1) | vehicles (vehicle_tokens) | occupancy (occupancy_tokens, if configured) | camera (if configured) ]

- **Ego state** is required in every row: speed [m/s], heading [rad], lane index (0 = leftmost, as in
  highway-env), number of lanes, and optionally the lateral offset from the lane centre [m].
- **Surrounding vehicles** form a set of any size, each row ``(x, y, vx, vy, cos_h, sin_h)`` relative to the
  ego (highway-env's Kinematics observation with ``absolute=False``). A per-vehicle MLP, masked self-attention
  (permutation equivariant) and pooling by learned queries (permutation invariant) give `vehicle_tokens`
  slots. A learned "no vehicle" element is always in the set, so a present sensor that sees no vehicle (an
  empty road) is a well-defined input, not a special case.
  With ``gap_features=True`` each row also carries what a car-following rule decides from (lane overlap,
  nearness, inverse time to collision; `vehicle_gap_features`), bounded so that denser traffic than the
  training data stays inside their trained range.
- **Occupancy grid** ``[C, H, W]`` (optional): a small CNN pooled to 2 x 2 tokens.
- **Camera / top-down image** (optional): any timm backbone through `modalities.vision.VisionAdapter`.

A sensor that is missing in a row (``None``, or absent from the observation) is *masked*: its slots get
``mask=False`` so the backbone never attends to them, and their embeddings are set to exactly zero so the
result cannot depend on whatever placeholder values filled the tensor. Nothing is zero-filled silently: the
masks are explicit in `DrivingInputs` and in the returned `PrefixEmbeds`.

Bad input raises `DrivingInputError` (a `ValueError`) naming the field, e.g. ``observation[2].ego.speed is
nan`` or ``observation[0].vehicles has 5 features per vehicle, expected 6 (x, y, vx, vy, cos_h, sin_h)``.
`check_observations` returns these messages per row instead of raising, for callers (the planning pipeline)
that replace bad rows by a safe fallback action.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 - diffusers' pipeline loader looks it up here

from latent.config_checks import FINITE_POSITIVE, POSITIVE

from .base import ModalityAdapter, PrefixEmbeds, register_adapter

__all__ = [
    "EGO_FIELDS",
    "VEHICLE_FEATURES",
    "SENSORS",
    "DrivingInputError",
    "DrivingInputs",
    "DrivingAdapter",
    "SetEncoder",
    "GAP_FEATURES",
    "vehicle_gap_features",
    "check_observation",
]

EGO_FIELDS = ("speed", "heading", "lane", "num_lanes", "lateral")  # "lateral" is optional (default 0)
EGO_REQUIRED = ("speed", "heading", "lane", "num_lanes")
VEHICLE_FEATURES = ("x", "y", "vx", "vy", "cos_h", "sin_h")
SENSORS = ("ego", "vehicles", "occupancy", "image")


class DrivingInputError(ValueError):
    """A driving observation that cannot be encoded; the message names the field."""


# ------------------------------------------------------------------------------------------ inputs
@dataclass
class DrivingInputs:
    """Batched sensor tensors with explicit presence masks (what `DrivingAdapter.forward` takes).

    ego:            [B, 5] float: speed, heading, lane, num_lanes, lateral (`EGO_FIELDS`).
    vehicles:       [B, N, 6] float (`VEHICLE_FEATURES`), or None when no row has the sensor.
    vehicles_mask:  [B, N] bool, True for real vehicles (padding rows False). Default: all True.
    has_vehicles:   [B] bool, the vehicle sensor is present in this row. Default: True where `vehicles` is given.
    occupancy:      [B, C, H, W] float or None; has_occupancy [B] bool.
    image:          [B, 3, H, W] float (the camera's preprocessed pixels) or None; has_image [B] bool.
    """

    ego: torch.Tensor
    vehicles: torch.Tensor | None = None
    vehicles_mask: torch.Tensor | None = None
    has_vehicles: torch.Tensor | None = None
    occupancy: torch.Tensor | None = None
    has_occupancy: torch.Tensor | None = None
    image: torch.Tensor | None = None
    has_image: torch.Tensor | None = None

    def __post_init__(self):
        if not isinstance(self.ego, torch.Tensor) or self.ego.ndim != 2:
            got = tuple(self.ego.shape) if isinstance(self.ego, torch.Tensor) else type(self.ego).__name__
            raise DrivingInputError(f"ego must be a [B, {len(EGO_FIELDS)}] tensor ({', '.join(EGO_FIELDS)}), got {got}.")
        b, dev = self.ego.shape[0], self.ego.device
        if self.vehicles is not None and self.vehicles_mask is None:
            self.vehicles_mask = torch.ones(self.vehicles.shape[:2], dtype=torch.bool, device=dev)
        for name in ("vehicles", "occupancy", "image"):
            flag = "has_" + name
            if getattr(self, flag) is None:
                setattr(self, flag, torch.full((b,), getattr(self, name) is not None, dtype=torch.bool, device=dev))
            else:
                setattr(self, flag, torch.as_tensor(getattr(self, flag), device=dev).bool())
        if self.vehicles_mask is not None:
            self.vehicles_mask = self.vehicles_mask.bool()

    @property
    def batch_size(self) -> int:
        return self.ego.shape[0]

    def __len__(self) -> int:
        return self.batch_size

    def _map(self, fn) -> DrivingInputs:
        return DrivingInputs(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                                for f in fields(self)})

    def to(self, device=None, dtype=None) -> DrivingInputs:
        """Move every tensor to `device`; `dtype` applies to the float tensors only."""
        return self._map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    def select(self, rows) -> DrivingInputs:
        """Keep some batch rows (index tensor, list or boolean mask)."""
        if isinstance(rows, list):
            rows = torch.as_tensor(rows, dtype=torch.long)
        return self._map(lambda t: t[rows.to(t.device) if isinstance(rows, torch.Tensor) else rows])


# ------------------------------------------------------------------------------------------ checks
def _finite_number(value, where: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise DrivingInputError(f"{where} must be a number, got {type(value).__name__} {value!r}.") from None
    if not math.isfinite(x):
        raise DrivingInputError(f"{where} is {x} (NaN or inf); sensor values must be finite.")
    return x


def _ego_values(ego, where: str, max_lanes: int) -> list[float]:
    if ego is None:
        raise DrivingInputError(
            f"{where} is missing: the ego state ({', '.join(EGO_REQUIRED)}[, lateral]) is required in every observation."
        )
    if isinstance(ego, dict):
        missing = [k for k in EGO_REQUIRED if k not in ego or ego[k] is None]
        if missing:
            raise DrivingInputError(f"{where} lacks {missing}; the ego state needs {list(EGO_REQUIRED)}.")
        unknown = sorted(set(ego) - set(EGO_FIELDS))
        if unknown:
            raise DrivingInputError(f"{where} has unknown field(s) {unknown}; known: {list(EGO_FIELDS)}.")
        vals = [_finite_number(ego[k], f"{where}.{k}") for k in EGO_REQUIRED]
        vals.append(_finite_number(ego.get("lateral", 0.0), f"{where}.lateral"))
    else:
        arr = np.asarray(ego, dtype=np.float64) if not isinstance(ego, torch.Tensor) else ego.detach().double().cpu().numpy()
        if arr.ndim != 1 or arr.shape[0] not in (len(EGO_REQUIRED), len(EGO_FIELDS)):
            raise DrivingInputError(
                f"{where} must be a dict or a vector of {len(EGO_FIELDS)} values ({', '.join(EGO_FIELDS)}), "
                f"got shape {tuple(arr.shape)}."
            )
        vals = [_finite_number(v, f"{where}.{k}") for k, v in zip(EGO_FIELDS, arr.tolist(), strict=False)]
        if len(vals) == len(EGO_REQUIRED):
            vals.append(0.0)
    speed, _, lane, lanes, _ = vals
    if lanes != int(lanes) or not 1 <= lanes <= max_lanes:
        raise DrivingInputError(f"{where}.num_lanes must be an integer in [1, {max_lanes}], got {lanes}.")
    if lane != int(lane) or not 0 <= lane < lanes:
        raise DrivingInputError(f"{where}.lane must be an integer in [0, num_lanes={int(lanes)}), got {lane}.")
    if speed < -1.0:
        raise DrivingInputError(f"{where}.speed is {speed} m/s; highway driving needs speed >= 0.")
    return vals


def _array(value, where: str, ndim: int, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise DrivingInputError(f"{where} must be {what}, got {type(value).__name__}.") from None
    if arr.ndim != ndim:
        raise DrivingInputError(f"{where} must be {what}, got shape {tuple(arr.shape)}.")
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DrivingInputError(f"{where}{list(idx)} is {arr[idx]} (NaN or inf); sensor values must be finite.")
    return arr


def _vehicles_array(value, where: str) -> np.ndarray:
    """[N, 6] float32; zero vehicles (an empty road seen by a working sensor) is valid."""
    f = len(VEHICLE_FEATURES)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        shape = np.shape(value)
    except ValueError:  # ragged nested lists
        raise DrivingInputError(f"{where} must be an [N, {f}] array ({', '.join(VEHICLE_FEATURES)}); rows differ in length.") from None
    if shape in ((0,), (0, f)):
        return np.zeros((0, f), dtype=np.float32)
    arr = _array(value, where, 2, f"an [N, {f}] array ({', '.join(VEHICLE_FEATURES)})")
    if arr.shape[1] != f:
        raise DrivingInputError(
            f"{where} has {arr.shape[1]} features per vehicle, expected {f} ({', '.join(VEHICLE_FEATURES)}, "
            "relative to the ego)."
        )
    return arr


def check_observation(obs, index: int = 0, max_lanes: int = 8, occupancy_channels: int | None = None) -> dict:
    """Validate one raw observation; returns it normalised (ego list, float32 arrays) or raises
    `DrivingInputError` naming the field."""
    where = f"observation[{index}]"
    if not isinstance(obs, dict):
        raise DrivingInputError(
            f"{where} must be a dict with 'ego' and optional 'vehicles', 'occupancy', 'image'; got {type(obs).__name__}."
        )
    if not obs:
        raise DrivingInputError(f"{where} is an empty scene (no sensor at all); 'ego' is required.")
    unknown = sorted(set(obs) - set(SENSORS))
    if unknown:
        raise DrivingInputError(f"{where} has unknown sensor(s) {unknown}; known: {list(SENSORS)}.")
    out = {"ego": _ego_values(obs.get("ego"), f"{where}.ego", max_lanes)}
    if obs.get("vehicles") is not None:
        out["vehicles"] = _vehicles_array(obs["vehicles"], f"{where}.vehicles")
    if obs.get("occupancy") is not None:
        grid = obs["occupancy"]
        grid = _array(grid, f"{where}.occupancy", 3, "a [C, H, W] grid")
        if occupancy_channels is not None and grid.shape[0] != occupancy_channels:
            raise DrivingInputError(
                f"{where}.occupancy has {grid.shape[0]} channels, the adapter expects {occupancy_channels}."
            )
        out["occupancy"] = grid
    if obs.get("image") is not None:
        img = obs["image"]
        if isinstance(img, (np.ndarray, torch.Tensor)):
            arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else img
            if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
                raise DrivingInputError(f"{where}.image holds NaN or inf.")
        out["image"] = img
    return out


# ------------------------------------------------------------------------------------------ encoders
GAP_FEATURES = ("lane_overlap", "nearness", "closing_rate")
LANE_WIDTH = 4.0  # metres, highway-env's StraightLane.DEFAULT_WIDTH


def vehicle_gap_features(vehicles: torch.Tensor, near: float = 5.0, max_rate: float = 2.0) -> torch.Tensor:
    """[..., 6] relative vehicle rows (`VEHICLE_FEATURES`) -> [..., 3] (`GAP_FEATURES`), each bounded:

    - lane_overlap = max(0, 1 - |y| / lane width): 1 in the ego's lane, 0 one lane over;
    - nearness = sign(x) * min(1, near / |x|): +-1 within ``near`` metres ahead / behind, 0 far away;
    - closing_rate = min(max_rate, closing speed / |x|) [1/s], the inverse time to collision, where the
      closing speed is -vx for a vehicle ahead and vx for one behind (0 when they draw apart).
    """
    x, y, vx = vehicles[..., 0], vehicles[..., 1], vehicles[..., 2]
    dist = x.abs().clamp_min(1e-3)
    overlap = (1 - y.abs() / LANE_WIDTH).clamp_min(0)
    nearness = torch.sign(x) * (near / dist).clamp(max=1.0)
    closing = torch.where(x >= 0, -vx, vx).clamp_min(0)
    rate = (closing / dist).clamp(max=max_rate)
    return torch.stack([overlap, nearness, rate], -1)


class SetEncoder(nn.Module):
    """Permutation-invariant encoder of a variable-size set into `num_tokens` vectors.

    Each element goes through an MLP, then `layers` masked self-attention blocks (permutation equivariant),
    then `num_tokens` learned queries attend over the set (invariant: attention pooling is a weighted sum).
    A learned "null" element is always part of the set, so an empty set has a defined encoding.
    """

    def __init__(self, in_dim: int, dim: int, num_tokens: int, layers: int = 1, heads: int = 4):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.null = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.queries = nn.Parameter(torch.randn(1, num_tokens, dim) * 0.02)
        self.pool = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, N, in_dim], mask [B, N] (True = element) -> [B, num_tokens, dim]."""
        b = x.shape[0]
        h = torch.cat([self.null.expand(b, -1, -1), self.embed(x)], dim=1)
        keep = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=mask.device), mask.bool()], dim=1)
        pad = ~keep
        for block in self.blocks:
            # the fast path of TransformerEncoderLayer may return nested tensors; keep the plain math path
            h = block(h, src_key_padding_mask=pad)
            h = h.masked_fill(pad[..., None], 0.0)
        out, _ = self.pool(self.queries.expand(b, -1, -1), h, h, key_padding_mask=pad, need_weights=False)
        return self.norm(out)


class OccupancyEncoder(nn.Module):
    """[B, C, H, W] grid -> [B, 4, dim] (a small CNN pooled to 2 x 2 cells)."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, dim, 3, stride=2, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(2),
        )

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.net(grid).flatten(2).transpose(1, 2)


@register_adapter("driving")
class DrivingAdapter(ModalityAdapter):
    """Driving sensors -> `PrefixEmbeds` [B, P, hidden_size] (see the module docstring for the layout).

    hidden_size: the backbone width. width: the encoders' internal width (default hidden_size).
    vehicle_tokens / vehicle_layers / heads: the set encoder. max_vehicles: at most this many vehicles per
    row are kept, the nearest first (any count is accepted). max_lanes: largest lane count accepted.
    occupancy_channels: enables the occupancy encoder (None = no grid sensor). camera: None, or the
    `VisionAdapter` config for a camera/top-down image, e.g. ``{"backbone": "resnet18", "image_size": 64,
    "pool_size": 2}`` (any timm model; weights only from a local `pretrained_path`).
    speed_scale, position_scale, velocity_scale: divisors that bring features to order 1.
    gap_features: each vehicle also gets the three quantities a car-following rule (IDM) decides from, bounded
    so that closer traffic than the data holds maps into their trained range instead of past it (see
    `vehicle_gap_features`).
    """

    trunk_attr = None
    _SCALES = ("two finite numbers > 0", lambda v: len(v) == 2 and all(FINITE_POSITIVE[1](x) for x in v))
    config_rules = {
        **{k: POSITIVE for k in ("hidden_size", "width", "vehicle_tokens", "vehicle_layers", "heads", "max_vehicles",
                                 "max_lanes", "occupancy_channels")},
        "speed_scale": FINITE_POSITIVE, "position_scale": _SCALES, "velocity_scale": _SCALES,
    }

    @register_to_config
    def __init__(
        self,
        hidden_size: int = 256,
        width: int | None = None,
        vehicle_tokens: int = 4,
        vehicle_layers: int = 1,
        heads: int = 4,
        max_vehicles: int = 32,
        max_lanes: int = 8,
        occupancy_channels: int | None = None,
        camera: dict | None = None,
        speed_scale: float = 30.0,
        position_scale: tuple[float, float] = (50.0, 4.0),
        velocity_scale: tuple[float, float] = (10.0, 5.0),
        gap_features: bool = False,
    ):
        super().__init__()  # checks the config against config_rules first
        width = width or hidden_size
        if width % heads:
            raise ValueError(f"width={width} must be divisible by heads={heads}.")
        self.ego_mlp = nn.Sequential(nn.Linear(4, width), nn.GELU(), nn.Linear(width, width))
        self.lane_embed = nn.Embedding(max_lanes, width)  # lane index from the left
        self.right_embed = nn.Embedding(max_lanes, width)  # lanes to the right of the ego
        self.ego_proj = nn.Linear(width, hidden_size)
        in_dim = len(VEHICLE_FEATURES) + (len(GAP_FEATURES) if gap_features else 0)
        self.vehicle_encoder = SetEncoder(in_dim, width, vehicle_tokens, vehicle_layers, heads)
        self.vehicle_proj = nn.Linear(width, hidden_size)
        self.occupancy_encoder = None
        if occupancy_channels is not None:
            self.occupancy_encoder = OccupancyEncoder(occupancy_channels, width)
            self.occupancy_proj = nn.Linear(width, hidden_size)
        self.camera_encoder = None
        if camera is not None:
            from .vision import VisionAdapter

            cam = dict(camera)
            cam.setdefault("pool_size", 2)
            self.camera_encoder = VisionAdapter(hidden_size=hidden_size, **cam)
        self.sensor_embed = nn.Embedding(len(SENSORS), hidden_size)
        scale = [position_scale[0], position_scale[1], velocity_scale[0], velocity_scale[1], 1.0, 1.0]
        self.register_buffer("vehicle_scale", torch.tensor(scale), persistent=False)

    # ---- layout ---------------------------------------------------------------------------------
    @property
    def sensor_slots(self) -> dict[str, tuple[int, int]]:
        """Prefix slots [start, end) of each configured sensor."""
        sizes = {"ego": 1, "vehicles": self.config.vehicle_tokens}
        if self.occupancy_encoder is not None:
            sizes["occupancy"] = 4
        if self.camera_encoder is not None:
            sizes["image"] = self.camera_encoder.num_prefix_tokens
        slots, start = {}, 0
        for name, n in sizes.items():
            slots[name] = (start, start + n)
            start += n
        return slots

    @property
    def num_prefix_tokens(self) -> int:
        return max(end for _, end in self.sensor_slots.values())

    # ---- data side ------------------------------------------------------------------------------
    def check_observations(self, observations) -> list[str | None]:
        """One message per row (None = fine) instead of raising: what `preprocess` would complain about."""
        errors = []
        for i, obs in enumerate(_as_list(observations)):
            try:
                self._check_one(obs, i)
                errors.append(None)
            except DrivingInputError as err:
                errors.append(str(err))
        return errors

    def _check_one(self, obs, i) -> dict:
        obs = check_observation(obs, i, self.config.max_lanes, self.config.occupancy_channels)
        if "occupancy" in obs and self.occupancy_encoder is None:
            raise DrivingInputError(
                f"observation[{i}].occupancy was given but the adapter has no occupancy encoder "
                "(set occupancy_channels), or drop the field."
            )
        if "image" in obs and self.camera_encoder is None:
            raise DrivingInputError(
                f"observation[{i}].image was given but the adapter has no camera encoder (set camera=...), "
                "or drop the field."
            )
        return obs

    @torch.no_grad()
    def preprocess(self, observations) -> DrivingInputs:
        """One observation dict or a list -> `DrivingInputs` (padded tensors + presence masks).

        Each observation: ``{"ego": {speed, heading, lane, num_lanes[, lateral]}, "vehicles": [N, 6] or None,
        "occupancy": [C, H, W] or None, "image": image or None}``. Raises `DrivingInputError` naming the field.
        """
        obs_list = _as_list(observations)
        rows = [self._check_one(o, i) for i, o in enumerate(obs_list)]
        b = len(rows)
        ego = torch.tensor([r["ego"] for r in rows], dtype=torch.float32)
        vehicles = vmask = has_v = None
        if any("vehicles" in r for r in rows):
            sets = [_nearest(r.get("vehicles"), self.config.max_vehicles) for r in rows]
            n = max(1, max(len(s) for s in sets))
            vehicles = torch.zeros(b, n, len(VEHICLE_FEATURES))
            vmask = torch.zeros(b, n, dtype=torch.bool)
            for i, s in enumerate(sets):
                vehicles[i, : len(s)] = torch.from_numpy(s)
                vmask[i, : len(s)] = True
            has_v = torch.tensor(["vehicles" in r for r in rows])
        occ = has_o = None
        if any("occupancy" in r for r in rows):
            shapes = {r["occupancy"].shape for r in rows if "occupancy" in r}
            if len(shapes) > 1:
                raise DrivingInputError(f"occupancy grids of one batch must share a shape, got {sorted(shapes)}.")
            shape = shapes.pop()
            occ = torch.zeros(b, *shape)
            for i, r in enumerate(rows):
                if "occupancy" in r:
                    occ[i] = torch.from_numpy(r["occupancy"])
            has_o = torch.tensor(["occupancy" in r for r in rows])
        img = has_i = None
        if any("image" in r for r in rows):
            idx = [i for i, r in enumerate(rows) if "image" in r]
            pix = self.camera_encoder.preprocess([rows[i]["image"] for i in idx])
            img = torch.zeros(b, *pix.shape[1:])
            img[idx] = pix
            has_i = torch.zeros(b, dtype=torch.bool)
            has_i[idx] = True
        return DrivingInputs(ego, vehicles, vmask, has_v, occ, has_o, img, has_i)

    # ---- model side -----------------------------------------------------------------------------
    def check_inputs(self, inputs: DrivingInputs) -> None:
        """The tensor-level checks of `forward`: raises `DrivingInputError` naming the field."""
        first = next((e for e in self.row_errors(inputs) if e is not None), None)
        if first is not None:
            raise DrivingInputError(first)

    def row_errors(self, inputs: DrivingInputs) -> list[str | None]:
        """Value problems per row (None = fine): non-finite sensor values, lane out of range. Structural
        problems that no row can escape (wrong feature width, shapes, a sensor without its encoder) raise."""
        self._check_structure(inputs)
        b = inputs.batch_size
        errors: list[str | None] = [None] * b

        def note(bad: torch.Tensor, message) -> None:  # bad: [B, ...] bool; message(row, index) -> str
            flat = bad.reshape(b, -1)
            for r in flat.any(1).nonzero()[:, 0].tolist():
                if errors[r] is None:
                    idx = int(flat[r].nonzero()[0, 0])
                    errors[r] = message(r, np.unravel_index(idx, tuple(bad.shape[1:])) if bad.ndim > 1 else ())

        ego = inputs.ego
        note(~torch.isfinite(ego), lambda r, i: f"ego[{r}].{EGO_FIELDS[i[0]]} is {ego[r, i[0]].item()} (NaN or inf); "
                                                "sensor values must be finite.")
        lane, lanes = ego[:, 2], ego[:, 3]
        bad = (lanes < 1) | (lanes > self.config.max_lanes) | (lane < 0) | (lane >= lanes) | (lane != lane.round())
        note(bad, lambda r, i: f"ego[{r}].lane={lane[r].item()} / num_lanes={lanes[r].item()} out of range "
                               f"(0 <= lane < num_lanes <= {self.config.max_lanes}).")
        if inputs.vehicles is not None:
            v = inputs.vehicles
            used = (inputs.vehicles_mask & inputs.has_vehicles[:, None])[..., None]
            note(~torch.isfinite(v) & used,
                 lambda r, i: f"vehicles[{r}][{i[0]}].{VEHICLE_FEATURES[i[1]]} is {v[r, i[0], i[1]].item()} "
                              "(NaN or inf); sensor values must be finite.")
        for name in ("occupancy", "image"):
            t = getattr(inputs, name)
            if t is not None:
                has = getattr(inputs, "has_" + name)[:, None, None, None]
                note(~torch.isfinite(t) & has, lambda r, i, name=name: f"{name}[{r}] holds NaN or inf at {list(map(int, i))}.")
        return errors

    def _check_structure(self, inputs: DrivingInputs) -> None:
        if not isinstance(inputs, DrivingInputs):
            raise DrivingInputError(
                f"the adapter takes DrivingInputs (from adapter.preprocess(observations)), got {type(inputs).__name__}."
            )
        b = inputs.batch_size
        if b == 0:
            raise DrivingInputError("the batch is empty: give at least one observation.")
        if inputs.ego.shape[1] != len(EGO_FIELDS):
            raise DrivingInputError(f"ego has {inputs.ego.shape[1]} values per row, expected {len(EGO_FIELDS)} "
                                    f"({', '.join(EGO_FIELDS)}).")
        if inputs.vehicles is not None:
            v = inputs.vehicles
            if v.ndim != 3 or v.shape[0] != b:
                raise DrivingInputError(f"vehicles must be [B={b}, N, {len(VEHICLE_FEATURES)}], got {tuple(v.shape)}.")
            if v.shape[2] != len(VEHICLE_FEATURES):
                raise DrivingInputError(
                    f"vehicles has {v.shape[2]} features per vehicle, expected {len(VEHICLE_FEATURES)} "
                    f"({', '.join(VEHICLE_FEATURES)})."
                )
            if inputs.vehicles_mask.shape != v.shape[:2]:
                raise DrivingInputError(f"vehicles_mask must be {tuple(v.shape[:2])}, got {tuple(inputs.vehicles_mask.shape)}.")
        elif bool(inputs.has_vehicles.any()):
            raise DrivingInputError("has_vehicles is True for some rows but vehicles is None.")
        for name, enc in (("occupancy", self.occupancy_encoder), ("image", self.camera_encoder)):
            t, has = getattr(inputs, name), getattr(inputs, "has_" + name)
            if t is None:
                if bool(has.any()):
                    raise DrivingInputError(f"has_{name} is True for some rows but {name} is None.")
                continue
            if enc is None and bool(has.any()):
                raise DrivingInputError(f"{name} was given but the adapter has no {name} encoder.")
            if t.ndim != 4 or t.shape[0] != b:
                raise DrivingInputError(f"{name} must be [B={b}, C, H, W], got {tuple(t.shape)}.")
            if name == "occupancy" and t.shape[1] != self.config.occupancy_channels:
                raise DrivingInputError(f"occupancy has {t.shape[1]} channels, expected {self.config.occupancy_channels}.")

    def forward(self, inputs: DrivingInputs) -> PrefixEmbeds:
        self.check_inputs(inputs)
        p = self.ego_proj.weight
        inputs = inputs.to(p.device, p.dtype)
        b = inputs.batch_size
        ones = torch.ones(b, dtype=torch.bool, device=p.device)
        cfg = self.config

        ego = inputs.ego
        speed, heading, lane, lanes, lateral = ego.unbind(-1)
        feats = torch.stack([speed / cfg.speed_scale, heading.cos(), heading.sin(), lateral / cfg.position_scale[1]], -1)
        lane_i = lane.long().clamp(0, cfg.max_lanes - 1)
        right_i = (lanes - 1 - lane).long().clamp(0, cfg.max_lanes - 1)
        h = self.ego_mlp(feats) + self.lane_embed(lane_i) + self.right_embed(right_i)
        parts = [(self.ego_proj(h)[:, None], ones, 0)]

        n_v = cfg.vehicle_tokens
        if inputs.vehicles is not None and bool(inputs.has_vehicles.any()):
            vmask = inputs.vehicles_mask & inputs.has_vehicles[:, None]
            # masked vehicle rows are replaced by zeros before anything sees them (their values cannot matter)
            vals = torch.where(vmask[..., None], inputs.vehicles, torch.zeros_like(inputs.vehicles))
            x = vals / self.vehicle_scale.to(vals.dtype)
            if cfg.gap_features:
                x = torch.cat([x, vehicle_gap_features(vals)], -1)
            tok = self.vehicle_proj(self.vehicle_encoder(x, vmask))
        else:
            tok = torch.zeros(b, n_v, cfg.hidden_size, device=p.device, dtype=p.dtype)
        parts.append((tok, inputs.has_vehicles, 1))

        if self.occupancy_encoder is not None:
            tok = torch.zeros(b, 4, cfg.hidden_size, device=p.device, dtype=p.dtype)
            has = inputs.has_occupancy
            if inputs.occupancy is not None and bool(has.any()):
                tok = tok.index_put((has.nonzero()[:, 0],), self.occupancy_proj(self.occupancy_encoder(inputs.occupancy[has])))
            parts.append((tok, has, 2))
        if self.camera_encoder is not None:
            n_c = self.camera_encoder.num_prefix_tokens
            tok = torch.zeros(b, n_c, cfg.hidden_size, device=p.device, dtype=p.dtype)
            has = inputs.has_image
            if inputs.image is not None and bool(has.any()):
                tok = tok.index_put((has.nonzero()[:, 0],), self.camera_encoder(inputs.image[has]).embeds.to(p.dtype))
            parts.append((tok, has, 3))

        embeds, masks = [], []
        for tok, has, sensor in parts:
            tok = tok + self.sensor_embed.weight[sensor]
            m = has[:, None].expand(-1, tok.shape[1])
            embeds.append(tok * m[..., None].to(tok.dtype))  # missing sensors: exactly zero AND masked
            masks.append(m)
        return PrefixEmbeds(torch.cat(embeds, 1), torch.cat(masks, 1))


# ------------------------------------------------------------------------------------------ helpers
def _as_list(observations) -> list:
    if isinstance(observations, dict):
        return [observations]
    if not isinstance(observations, (list, tuple)):
        raise DrivingInputError(
            f"observations must be a dict or a list of dicts, got {type(observations).__name__}."
        )
    if len(observations) == 0:
        raise DrivingInputError("observations is empty: give at least one observation.")
    return list(observations)


def _nearest(vehicles: np.ndarray | None, limit: int) -> np.ndarray:
    if vehicles is None:
        return np.zeros((0, len(VEHICLE_FEATURES)), dtype=np.float32)
    if len(vehicles) > limit:
        order = np.argsort(np.hypot(vehicles[:, 0], vehicles[:, 1]), kind="stable")[:limit]
        vehicles = vehicles[np.sort(order)]
    return vehicles


def observations_from_inputs(inputs: DrivingInputs) -> list[dict[str, Any]]:  # pragma: no cover - debugging aid
    """The raw observations a `DrivingInputs` batch stands for (images excluded)."""
    out = []
    for i in range(inputs.batch_size):
        e = inputs.ego[i].tolist()
        obs: dict[str, Any] = {"ego": dict(zip(EGO_FIELDS, e, strict=True))}
        if inputs.vehicles is not None and bool(inputs.has_vehicles[i]):
            obs["vehicles"] = inputs.vehicles[i][inputs.vehicles_mask[i]].numpy()
        if inputs.occupancy is not None and bool(inputs.has_occupancy[i]):
            obs["occupancy"] = inputs.occupancy[i].numpy()
        out.append(obs)
    return out

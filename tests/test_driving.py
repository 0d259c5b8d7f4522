"""Driving adapter (modalities/driving.py) and driving data (modalities/data/driving.py)."""

import json
import math

import numpy as np
import pytest
import torch

from latent import DiffusionTransformer
from modalities.base import ModalityAdapter, create_adapter
from modalities.data.driving import (
    ACTIONS,
    DrivingDataset,
    PlanTokenizer,
    RuleBasedDriver,
    build_demonstrations,
    digest,
    future_waypoints,
    make_env,
    observe,
    occupancy_grid,
    record,
)
from modalities.driving import GAP_FEATURES, DrivingAdapter, DrivingInputs, SetEncoder, vehicle_gap_features

torch.set_num_threads(1)  # the shared CPU is oversubscribed; one thread per process is the fastest here

EGO = {"speed": 24.0, "heading": 0.01, "lane": 1, "num_lanes": 3, "lateral": 0.2}


def vehicles(n, seed=0):
    g = np.random.default_rng(seed)
    v = np.zeros((n, 6), dtype=np.float32)
    v[:, 0] = g.uniform(-40, 60, n)
    v[:, 1] = g.choice([-4.0, 0.0, 4.0], n)
    v[:, 2] = g.normal(0, 3, n)
    v[:, 4] = 1.0
    return v


def adapter(**kw):
    torch.manual_seed(0)
    return DrivingAdapter(hidden_size=32, width=32, heads=2, **kw).eval()


# ------------------------------------------------------------------------------------------ set encoder
@pytest.mark.parametrize("gap", [False, True])
def test_vehicle_set_encoder_is_permutation_invariant_and_ignores_padding(gap):
    a = adapter(gap_features=gap)
    v = vehicles(7)
    base = a(a.preprocess({"ego": EGO, "vehicles": v})).embeds
    perm = a(a.preprocess({"ego": EGO, "vehicles": v[np.random.default_rng(1).permutation(7)]})).embeds
    torch.testing.assert_close(perm, base, atol=1e-5, rtol=1e-5)
    # padding rows with garbage (mask False) change nothing, nor does their position in the padded tensor
    x = a.preprocess({"ego": EGO, "vehicles": v})
    pad = torch.cat([x.vehicles, torch.full((1, 3, 6), 1e4)], 1)
    mask = torch.cat([x.vehicles_mask, torch.zeros(1, 3, dtype=torch.bool)], 1)
    padded = a(DrivingInputs(x.ego, pad, mask)).embeds
    torch.testing.assert_close(padded, base, atol=1e-5, rtol=1e-5)
    # a different set gives a different encoding
    assert not torch.allclose(a(a.preprocess({"ego": EGO, "vehicles": v[:3]})).embeds, base)


def test_gap_features_against_a_per_vehicle_loop():
    v = vehicles(40, seed=3)
    v[0, :3] = [0.0, 0.0, -5.0]   # level with the ego: nearest, the distance floor keeps it finite
    v[1, :3] = [2.0, 1.0, -10.0]  # closing fast within 5 m: every feature at its bound but the overlap
    v[2, :3] = [-8.0, 0.0, 3.0]   # behind and closing in
    got = vehicle_gap_features(torch.from_numpy(v)).numpy()
    for i, (x, y, vx, *_ ) in enumerate(v.tolist()):
        d = max(abs(x), 1e-3)
        closing = max(0.0, -vx if x >= 0 else vx)
        want = [max(0.0, 1 - abs(y) / 4.0), math.copysign(min(1.0, 5.0 / d), x) if x else 0.0, min(2.0, closing / d)]
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)
    assert got[1].tolist() == pytest.approx([0.75, 1.0, 2.0])
    assert (np.abs(got) <= 2).all()
    # the adapter's vehicle encoder reads them: the same raw rows give a different prefix with them on
    plain, gap = adapter(), adapter(gap_features=True)
    assert gap.vehicle_encoder.embed[0].in_features == 6 + len(GAP_FEATURES)
    x = plain.preprocess({"ego": EGO, "vehicles": v[:5]})
    assert gap(x).embeds.shape == plain(x).embeds.shape


def test_set_pooling_matches_direct_attention():
    torch.manual_seed(0)
    enc = SetEncoder(6, 8, num_tokens=2, layers=0, heads=1).eval()
    x = torch.randn(1, 4, 6)
    mask = torch.tensor([[True, True, False, True]])
    out = enc(x, mask)
    # direct: null element + embedded real elements, one softmax-attention head per learned query
    h = torch.cat([enc.null[0], enc.embed(x[0][mask[0]])], 0)
    wq, wk, wv = enc.pool.in_proj_weight.chunk(3)
    bq, bk, bv = enc.pool.in_proj_bias.chunk(3)
    q, k, v = enc.queries[0] @ wq.T + bq, h @ wk.T + bk, h @ wv.T + bv
    att = torch.softmax(q @ k.T / math.sqrt(8), -1) @ v
    ref = torch.nn.functional.layer_norm(enc.pool.out_proj(att), (8,), enc.norm.weight, enc.norm.bias)
    torch.testing.assert_close(out[0], ref, atol=1e-5, rtol=1e-5)


def test_nearest_vehicles_are_kept_beyond_max_vehicles():
    a = adapter(max_vehicles=3)
    v = vehicles(6)
    x = a.preprocess({"ego": EGO, "vehicles": v})
    kept = x.vehicles[0][x.vehicles_mask[0]].numpy()
    nearest = v[np.sort(np.argsort(np.hypot(v[:, 0], v[:, 1]))[:3])]
    np.testing.assert_allclose(kept, nearest)


# ------------------------------------------------------------------------------------------ masking
def test_missing_sensors_are_masked_and_their_values_cannot_matter():
    a = adapter(occupancy_channels=2)
    x = a.preprocess([
        {"ego": EGO, "vehicles": vehicles(4), "occupancy": np.ones((2, 10, 20), np.float32)},
        {"ego": EGO},  # only the ego state
    ])
    slots = a.sensor_slots
    p = a(x)
    assert p.mask[0].all()
    assert p.mask[1].tolist() == [i < 1 for i in range(a.num_prefix_tokens)]
    assert (p.embeds[1, slots["ego"][1]:] == 0).all()  # masked slots are exactly zero
    # change every value the masks hide: the embeddings (and so everything downstream) are identical
    y = DrivingInputs(x.ego, x.vehicles.clone(), x.vehicles_mask, x.has_vehicles, x.occupancy.clone(), x.has_occupancy)
    y.vehicles[1] = 77.0
    y.occupancy[1] = -5.0
    q = a(y)
    torch.testing.assert_close(q.embeds, p.embeds, atol=0, rtol=0)
    # and through a prefix-layout backbone: logits of the plan canvas unchanged
    model = DiffusionTransformer(vocab_size=16, hidden_size=32, num_layers=1, num_heads=2, mask_token_id=0,
                                 max_position_embeddings=32, attention_layout="prefix").eval()
    ids = torch.zeros(2, 4, dtype=torch.long)
    logit = [model(ids, prefix_embeds=o.embeds, attention_mask=o.attention_mask(num_tokens=4)).logits for o in (p, q)]
    torch.testing.assert_close(logit[0], logit[1])
    # presence matters: the same values with the sensor present give a different prefix
    z = DrivingInputs(x.ego, x.vehicles, x.vehicles_mask, torch.tensor([True, True]))
    assert a(z).mask[1, slots["vehicles"][0]]


def test_empty_road_is_a_present_sensor_with_a_defined_encoding():
    a = adapter()
    p = a(a.preprocess([{"ego": EGO, "vehicles": np.zeros((0, 6))}, {"ego": EGO, "vehicles": []}]))
    s, e = a.sensor_slots["vehicles"]
    assert p.mask[:, s:e].all() and torch.isfinite(p.embeds).all()
    torch.testing.assert_close(p.embeds[0], p.embeds[1])


def test_camera_sensor_through_timm_and_its_mask():
    a = adapter(camera={"backbone": "test_resnet", "image_size": 32, "pool_size": 1})
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    x = a.preprocess([{"ego": EGO, "image": img}, {"ego": EGO}])
    assert x.has_image.tolist() == [True, False]
    p = a(x)
    s, e = a.sensor_slots["image"]
    assert p.mask[:, s:e].tolist() == [[True] * (e - s), [False] * (e - s)]
    x.image[1] = 3.0  # the missing row's placeholder pixels
    torch.testing.assert_close(a(x).embeds, p.embeds, atol=0, rtol=0)


def test_adapter_save_load_and_registry(tmp_path):
    a = adapter(occupancy_channels=2, gap_features=True)
    x = a.preprocess([{"ego": EGO, "vehicles": vehicles(3), "occupancy": np.zeros((2, 10, 20), np.float32)}])
    a.save_pretrained(tmp_path)
    b = ModalityAdapter.load(tmp_path).eval()
    assert isinstance(b, DrivingAdapter)
    torch.testing.assert_close(b(x).embeds, a(x).embeds)
    c = create_adapter({"type": "driving", "hidden_size": 16, "width": 16, "heads": 2})
    assert c(c.preprocess({"ego": EGO})).embeds.shape == (1, c.num_prefix_tokens, 16)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "obs, field",
    [
        ({"vehicles": vehicles(2)}, "ego"),
        ({}, "empty scene"),
        ({"ego": {**EGO, "speed": float("nan")}}, "ego.speed"),
        ({"ego": {**EGO, "heading": float("inf")}}, "ego.heading"),
        ({"ego": {"speed": 1.0, "heading": 0.0, "lane": 1}}, "num_lanes"),
        ({"ego": {**EGO, "lane": 3}}, "ego.lane"),
        ({"ego": EGO, "vehicles": np.ones((2, 5))}, "vehicles has 5 features per vehicle, expected 6"),
        ({"ego": EGO, "vehicles": np.full((2, 6), np.nan)}, "vehicles[0, 0]"),
        ({"ego": EGO, "vehicles": [[1, 2, 3, 4, 5, 6], [1, 2]]}, "vehicles"),
        ({"ego": EGO, "occupancy": np.zeros((2, 4, 4))}, "occupancy"),  # no occupancy encoder configured
        ({"ego": EGO, "lidar": 1}, "lidar"),
    ],
)
def test_bad_observations_raise_naming_the_field(obs, field):
    a = adapter()
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        a.preprocess([{"ego": EGO}, obs])
    errors = a.check_observations([{"ego": EGO}, obs])
    assert errors[0] is None and field in errors[1] and "observation[1]" in errors[1]


def test_bad_batches_and_tensors_raise_naming_the_field():
    a = adapter()
    with pytest.raises(ValueError, match="empty"):
        a.preprocess([])
    x = a.preprocess({"ego": EGO, "vehicles": vehicles(2)})
    with pytest.raises(ValueError, match="vehicles has 5 features"):
        a(DrivingInputs(x.ego, x.vehicles[..., :5], x.vehicles_mask))
    bad = x.ego.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"ego\[0\]\.speed is nan"):
        a(DrivingInputs(bad))
    with pytest.raises(ValueError, match="ego must be"):
        DrivingInputs(torch.zeros(3))
    v = x.vehicles.clone()
    v[0, 1, 2] = float("inf")
    assert a.row_errors(DrivingInputs(torch.cat([x.ego, x.ego]), torch.cat([x.vehicles, v]))) == [
        None, "vehicles[1][1].vx is inf (NaN or inf); sensor values must be finite."]


# ------------------------------------------------------------------------------------------ plan tokens
def test_plan_tokenisation_round_trip():
    tok = PlanTokenizer(horizon=3)
    g = np.random.default_rng(0)
    actions = g.integers(0, len(ACTIONS), (50, 3))
    steps = np.stack([g.uniform(0, 40, (50, 3)), g.uniform(-5, 5, (50, 3))], -1)
    way = steps.cumsum(1)
    ids = tok.encode(actions, way)
    assert ids.shape == (50, 9) and tok.allowed_tokens()[torch.arange(9), ids].all()
    a, w = tok.decode(ids)
    assert (a.numpy() == actions).all()
    err = np.abs(w.numpy() - way)  # cumulative quantisation: half a bin at every horizon, no accumulation
    assert (err[..., 0] <= tok.x_res / 2 + 1e-4).all() and (err[..., 1] <= tok.y_res / 2 + 1e-4).all()
    assert torch.equal(tok.encode(a, w), ids)
    # names work as well as indices; a slot holding the wrong kind of token decodes to -1 / NaN
    assert torch.equal(tok.encode([["IDLE", "FASTER", "SLOWER"]], way[:1]), tok.encode([[1, 3, 4]], way[:1]))
    broken = ids[:1].clone()
    broken[0, 3] = tok.mask_token_id
    broken[0, 4] = tok.action_offset
    a2, w2 = tok.decode(broken)
    assert a2[0, 1] == -1 and torch.isfinite(w2[0, 0]).all() and torch.isnan(w2[0, 1:]).all()
    with pytest.raises(ValueError, match="waypoints"):
        tok.encode(actions[:1], np.full((1, 3, 2), np.nan))


def test_allowed_tokens_partition_the_plan_vocabulary():
    tok = PlanTokenizer(horizon=2)
    allowed = tok.allowed_tokens()
    kinds = tok.slot_kinds()
    assert allowed.shape == (6, tok.vocab_size) and not allowed[:, : tok.action_offset].any()
    assert allowed[kinds.index("action")].sum() == len(ACTIONS)
    assert (allowed[0] & allowed[1]).sum() == 0 and (allowed[1] & allowed[2]).sum() == 0
    assert (allowed[0] | allowed[1] | allowed[2])[tok.action_offset :].all()


# ------------------------------------------------------------------------------------------ simulator data
def test_future_waypoints_in_the_ego_frame():
    h = math.pi / 2  # heading along +y: forward is +y in the world, right is -x
    poses = np.array([[0.0, 0.0, h], [0.0, 10.0, h], [-2.0, 20.0, h]])
    np.testing.assert_allclose(future_waypoints(poses, 0, 2), [[10.0, 0.0], [20.0, 2.0]], atol=1e-9)


def test_occupancy_grid_against_direct_cells():
    ego = {"lane": 0, "num_lanes": 2, "lateral": 0.0}
    grid = occupancy_grid(np.array([[10.0, 4.0, 0, 0, 1, 0]]), ego)
    assert grid.shape == (2, 10, 20)
    ys = -10 + (np.arange(10) + 0.5) * 2
    xs = -20 + (np.arange(20) + 0.5) * 4
    rows, cols = np.nonzero(grid[0])
    assert set(rows) == {r for r in range(10) if abs(ys[r] - 4) <= 2}
    assert set(cols) == {c for c in range(20) if abs(xs[c] - 10) <= 4.5}
    on_road = np.nonzero(grid[1][:, 0])[0]
    assert set(on_road) == {r for r in range(10) if -2 <= ys[r] <= 6}


def test_observation_matches_the_simulator_state():
    env = make_env(1.0)
    try:
        obs, _ = env.reset(seed=3)
        raw = observe(env, obs)
        u = env.unwrapped
        ego = u.vehicle
        assert raw["ego"]["lane"] == ego.lane_index[2] and raw["ego"]["speed"] == pytest.approx(ego.speed)
        rel = {(round(v.position[0] - ego.position[0], 2), round(v.position[1] - ego.position[1], 2))
               for v in u.road.vehicles if v is not ego}
        assert len(raw["vehicles"]) > 0
        for x, y, *_ in raw["vehicles"]:
            assert (round(float(x), 2), round(float(y), 2)) in rel
        action = RuleBasedDriver()(env, raw)
        assert 0 <= action < len(ACTIONS)
        assert DrivingAdapter(hidden_size=16, width=16, heads=2).check_observations(raw) == [None]
    finally:
        env.close()


def test_recording_is_deterministic_from_seeds_and_built_once(tmp_path):
    kw = dict(densities=(1.5,), horizon=2, max_steps=4, progress=False)
    paths = build_demonstrations(tmp_path, train_episodes=1, valid_episodes=1, seed=7, valid_seed=8, **kw)
    c = DrivingDataset.load(paths["train"])
    a = record(episodes=1, seed=7, **kw)  # the same seed gives the same arrays
    assert len(a) == 3  # 4 decisions, horizon 2 -> windows starting at 0, 1, 2
    for k, v in a.__dict__.items():
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(v, getattr(c, k), err_msg=k)
    assert c.meta["seed"] == 7 and c.meta["densities"] == [1.5]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["train"]["digest"] == digest(a) and summary["train"]["samples"] == 3
    assert not np.array_equal(DrivingDataset.load(paths["valid"]).vehicles, a.vehicles)  # another seed
    # the same settings again: nothing is recorded; other settings: refused, the files stay
    stamp = {p: p.stat().st_mtime_ns for p in paths.values()}
    assert build_demonstrations(tmp_path, train_episodes=1, valid_episodes=1, seed=7, valid_seed=8, **kw) == paths
    assert {p: p.stat().st_mtime_ns for p in paths.values()} == stamp
    with pytest.raises(ValueError, match="other settings.*seed"):
        build_demonstrations(tmp_path, train_episodes=1, valid_episodes=1, seed=9, valid_seed=8, **kw)
    assert {p: p.stat().st_mtime_ns for p in paths.values()} == stamp
    # dataset rows become adapter inputs without per-row work, and raw observations with it
    x = a.inputs([0, 2])
    assert x.vehicles.shape[0] == 2 and x.vehicles_mask.sum(1).tolist() == a.vehicle_count[[0, 2]].tolist()
    assert DrivingAdapter(hidden_size=16, width=16, heads=2).check_observations([a.observation(0)]) == [None]


def test_recorded_camera_frames_show_the_road():
    d = record(densities=(1.0,), episodes=1, horizon=1, max_steps=1, image=True, progress=False)
    assert d.image.shape == (1, 32, 128, 3) and d.image.dtype == np.uint8
    assert d.image.std() > 10  # a drawn road with vehicles, not a blank frame

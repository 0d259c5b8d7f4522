"""DAgger for the driving planner: the aggregation rule of modalities.data.driving.record with a policy
(states visited by the mixture, labels from the demonstrator, computed here by replaying the simulator), the
task's rounds on the one trainer with exact resume, and the confidence intervals of the closed-loop table (and its
pooling of outputs on other seeds)."""

import copy

import numpy as np
import pytest
import torch
from test_driving_task import config, data_file  # noqa: F401 - data_file is a fixture

from latent.training.trainer import Trainer
from modalities.data.driving import (
    EGO_FIELDS,
    RuleBasedDriver,
    digest,
    future_waypoints,
    make_env,
    observe,
    record,
)
from modalities.data.metrics import bootstrap_mean_interval, rate_ratio_interval, wilson_interval

torch.set_num_threads(1)

SEED, STEPS, K = 7, 5, 3


def scripted(env, raw):
    """A deterministic stand-in for the planner that often disagrees with the demonstrator."""
    return [0, 4, 3, 2, 4][int(env.unwrapped.steps) % 5]


def pose(env):
    v = env.unwrapped.vehicle
    return [float(v.position[0]), float(v.position[1]), float(v.heading)]


def test_beta_one_collects_exactly_the_demonstrators_rollout():
    def never(env, raw):
        raise AssertionError("with beta = 1 the planner never acts")

    demo = record(densities=(1.0,), episodes=1, seed=SEED, max_steps=STEPS, progress=False)
    mixed = record(densities=(1.0,), episodes=1, seed=SEED, max_steps=STEPS, progress=False, policy=never, beta=1.0)
    assert len(mixed) == len(demo) > 0 and digest(mixed) == digest(demo)
    assert mixed.meta["policy_decisions"] == 0 and mixed.meta["decisions"] == STEPS


def test_every_visited_state_is_labelled_by_the_demonstrator():
    beta = 0.5
    data = record(densities=(1.0,), episodes=1, seed=SEED, max_steps=STEPS, progress=False, policy=scripted,
                  beta=beta)
    driver, rng = RuleBasedDriver(), np.random.default_rng([SEED, 1])  # the mixture's documented generator
    env = make_env(1.0)
    env.reset(seed=SEED)
    executed, demo, states = [], [], []
    for _ in range(STEPS):  # the mixture's episode, one decision at a time
        states.append(observe(env))
        demo.append(driver(env))
        executed.append(scripted(env, None) if rng.random() >= beta else demo[-1])
        env.step(executed[-1])
    differ = [a != d for a, d in zip(executed, demo, strict=True)]
    assert any(differ) and not all(differ)
    expected = []
    for t in range(STEPS):  # the demonstrator's plan from state t: replay the episode to t, then let it drive
        if t + K > STEPS and not any(differ[t:]):
            continue  # the demonstrator's own window runs past the recorded decisions: dropped, as when recording
        sim = make_env(1.0)
        sim.reset(seed=SEED)
        for a in executed[:t]:
            sim.step(a)
        poses, acts, ok = [pose(sim)], [], True
        for _ in range(K):
            a = driver(sim)
            _, _, term, trunc, _ = sim.step(a)
            if sim.unwrapped.vehicle.crashed or ((term or trunc) and len(acts) < K - 1):
                ok = False
                break
            acts.append(a)
            poses.append(pose(sim))
        if ok:
            expected.append((t, acts, future_waypoints(np.asarray(poses), 0, K)))
    assert len(data) == len(expected) >= STEPS - K + 1  # the dataset grows by the visited states
    for i, (t, acts, way) in enumerate(expected):
        assert data.step[i] == t and data.actions[i].tolist() == acts
        np.testing.assert_allclose(data.waypoints[i], way, atol=1e-4)
        want_ego = [states[t]["ego"][k] for k in EGO_FIELDS]
        np.testing.assert_allclose(data.ego[i], want_ego, rtol=1e-6)
        np.testing.assert_allclose(data.vehicles[i, : data.vehicle_count[i]], states[t]["vehicles"], rtol=1e-6)


def test_a_branch_leaves_the_episode_untouched():
    from modalities.data.driving import demonstrator_branch

    env = make_env(1.0)
    env.reset(seed=SEED)
    before = copy.deepcopy(env.unwrapped.vehicle.position)
    branch = demonstrator_branch(env, RuleBasedDriver(), K)
    assert branch.usable == K and len(branch.actions) == K and branch.poses[-1][0] > before[0]
    np.testing.assert_array_equal(env.unwrapped.vehicle.position, before)


DAGGER = ["data.dagger.rounds=2", "data.dagger.every=1", "data.dagger.episodes_per_round=1", "data.densities=[1.0]",
          "data.max_steps=3", "trainer.batch_size=8", "trainer.max_steps=4", "trainer.log_every=1",
          "trainer.eval_every=0"]


def test_dagger_rounds_grow_the_training_set_and_resume_exactly(data_file, tmp_path):  # noqa: F811
    straight = Trainer(config(data_file, tmp_path / "straight", *DAGGER))
    base = len(straight.task.training_set())
    res = straight.fit()
    log = straight.task.dagger_log
    assert [r["round"] for r in log] == [1, 2] and [r["step"] for r in log] == [1, 2]
    assert [r["beta"] for r in log] == [0.5, 0.25]
    parts = straight.task.dagger_parts
    assert len(straight.task.training_set()) == base + sum(len(p) for p in parts) == base + sum(r["states"] for r in log)
    assert straight.task.train_rows["plan"].shape[0] == len(straight.task.training_set())
    # interrupted after step 2 (round 1 in the checkpoint, round 2 due after it), then resumed
    first = Trainer(config(data_file, tmp_path / "resumed", *DAGGER, "trainer.stop_at_step=2"))
    part = first.fit()
    resumed = Trainer(config(data_file, tmp_path / "resumed", *DAGGER))
    assert resumed.start_step == 2 and len(resumed.task.dagger_parts) == 1
    assert digest(resumed.task.dagger_parts[0]) == digest(parts[0])  # from the checkpoint, not recollected
    rest = resumed.fit()
    assert [digest(p) for p in resumed.task.dagger_parts] == [digest(p) for p in parts]
    assert part.losses + rest.losses == res.losses


def test_wilson_interval_against_known_values():
    lo, hi = wilson_interval(1, 10)  # the textbook example: 1 of 10 -> [0.0179, 0.4042]
    assert lo == pytest.approx(0.01788, abs=1e-4) and hi == pytest.approx(0.40415, abs=1e-4)
    z = 1.959963984540054
    assert wilson_interval(0, 20) == (0.0, pytest.approx(z * z / (20 + z * z)))  # closed form at 0 successes
    assert wilson_interval(20, 20)[1] == 1.0
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(3, 2)


def test_bootstrap_interval_brackets_the_mean_and_is_seeded():
    x = np.random.default_rng(0).normal(5.0, 2.0, 400)
    lo, hi = bootstrap_mean_interval(x, seed=1)
    se = x.std(ddof=1) / np.sqrt(len(x))  # the normal-theory interval it must approach
    assert lo == pytest.approx(x.mean() - 1.96 * se, abs=0.25 * se)
    assert hi == pytest.approx(x.mean() + 1.96 * se, abs=0.25 * se)
    assert bootstrap_mean_interval(x, seed=1) == (lo, hi)
    assert bootstrap_mean_interval([3.0, 3.0], seed=0) == (3.0, 3.0)


def test_rate_ratio_interval_against_scipy_and_the_zero_count_rule():
    contingency = pytest.importorskip("scipy.stats.contingency")
    for events, n, ref, ref_n in ((35, 100, 28, 100), (12, 30, 7, 30), (3, 80, 9, 50)):
        want = contingency.relative_risk(events, n, ref, ref_n)
        lo, hi = want.confidence_interval(0.95)
        assert rate_ratio_interval(events, n, ref, ref_n) == pytest.approx((want.relative_risk, lo, hi), rel=1e-9)
    # a zero count: 0.5 added to every cell of the 2 x 2 table (1 crash of 30 against none of 30)
    ratio, lo, hi = rate_ratio_interval(1, 30, 0, 30)
    half = 1.959963984540054 * np.sqrt(1 / 1.5 - 1 / 31 + 1 / 0.5 - 1 / 31)
    assert ratio == pytest.approx(3.0) and (lo, hi) == pytest.approx((3 * np.exp(-half), 3 * np.exp(half)))
    with pytest.raises(ValueError, match="ref_events"):
        rate_ratio_interval(1, 10, 11, 10)


def _output(seed, episodes, cells):
    """A closed-loop output (as experiments/driving_ood.py writes it) with the given (policy, condition) -> crash
    flags, and its rows."""
    from modalities.data.driving_closed_loop import summarize

    rows = {key: [{"crashed": bool(c), "completed": not c, "decisions": 30, "mean_speed": 15.0 + i % 3,
                   "return": 20.0 - 5 * c, "distance": 400.0} for i, c in enumerate(flags)]
            for key, flags in cells.items()}
    out = {"command": f"python experiments/driving_ood.py --seed {seed} --episodes {episodes}",
           "policies": {p: None for p, _ in cells},
           "cells": [{"policy": p, "condition": c, "prior_tau": 0.0, **summarize(r), "per_episode": r}
                     for (p, c), r in rows.items()]}
    return out, rows


def test_pooling_outputs_joins_their_episodes_and_refuses_overlapping_seeds():
    from modalities.data.driving_closed_loop import pool_outputs, seed_ranges, summarize

    demo, planner = "demonstrator (IDM+MOBIL)", "planner"
    a, rows_a = _output(10_000, 4, {(demo, "highway-dense"): [1, 0, 0, 0], (planner, "highway-dense"): [1, 1, 0, 0]})
    b, rows_b = _output(20_000, 6, {(demo, "highway-dense"): [0, 1, 1, 0, 0, 0],
                                    (planner, "highway-dense"): [0, 0, 1, 0, 0, 0]})
    assert seed_ranges(a) == [[10_000, 10_003]] and seed_ranges({"seeds": [[5, 9]]}) == [[5, 9]]
    cells, policies, conditions = pool_outputs({"a": a, "b": b})
    assert conditions == ["highway-dense"] and dict(policies) == {demo: None, planner: None}
    by = {c["policy"]: c for c in cells}
    for name in (demo, planner):
        rows = rows_a[(name, "highway-dense")] + rows_b[(name, "highway-dense")]
        assert by[name]["per_episode"] == rows
        assert all(by[name][k] == pytest.approx(v) for k, v in summarize(rows).items())
    assert by[planner]["collisions"] == by[demo]["collisions"] == 3 and by[planner]["episodes"] == 10
    c, _ = _output(20_003, 4, {(demo, "highway-dense"): [0, 0, 0, 0]})
    with pytest.raises(ValueError, match="b and c drove overlapping seeds in highway-dense"):
        pool_outputs({"b": b, "c": c})
    d, _ = _output(20_003, 4, {(demo, "roundabout"): [0, 0, 0, 0]})  # another condition: no overlap
    assert len(pool_outputs({"b": b, "d": d})[0]) == 3

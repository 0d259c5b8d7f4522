"""PlanningPipeline (pipelines/planning.py): decoding, caches, the AR baseline, fallback, save/load."""

import numpy as np
import pytest
import torch

from modalities.data.driving import ACTIONS, FALLBACK_ACTION, PlanTokenizer, make_env, observe
from modalities.driving import DrivingInputs
from pipelines.planning import PlanningPipeline
from pipelines.tasks.driving import build_planner

torch.set_num_threads(1)  # the shared CPU is oversubscribed; one thread per process is the fastest here

TOK = PlanTokenizer(horizon=3)
ADAPTER = {"width": 32, "vehicle_tokens": 2, "heads": 2}


def model_cfg(layout):
    return {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "attention_layout": layout}


def pipe_for(layout="prefix", seed=0, **dec):
    pipe = build_planner(ADAPTER, model_cfg(layout), TOK, dec or None, seed=seed)
    pipe.driving_adapter.eval()
    pipe.model.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def observations(n=3, seed=0):
    g = np.random.default_rng(seed)
    out = []
    for i in range(n):
        v = np.zeros((i + 1, 6), np.float32)
        v[:, 0] = g.uniform(-30, 60, i + 1)
        v[:, 1] = g.choice([-4.0, 0.0, 4.0], i + 1)
        v[:, 4] = 1.0
        out.append({"ego": {"speed": float(g.uniform(15, 30)), "heading": 0.0, "lane": i % 3, "num_lanes": 3},
                    "vehicles": v})
    return out


@pytest.fixture(scope="module")
def pipe():
    return pipe_for()


def test_plan_output_shapes_kinds_and_confidence(pipe):
    out = pipe(observations(3))
    assert out.decoding == "diffusion" and out.action_ids.shape == (3, 3) and out.waypoints.shape == (3, 3, 2)
    assert all(a in ACTIONS for row in out.actions for a in row)
    allowed = TOK.allowed_tokens()
    assert allowed[torch.arange(TOK.length), out.tokens].all()  # every slot holds a token of its kind
    assert torch.isfinite(out.waypoints).all() and not out.fallback.any()
    assert ((out.confidence > 0) & (out.confidence <= 1)).all()
    assert pipe(observations(1)[0]).action_ids.shape == (1, 3)  # one observation dict


def _masked_canvas_logits(pipe, obs, restrict=True):
    """The backbone's logits on the fully masked plan, restricted to each slot's kind (no pipeline code)."""
    inputs = pipe.driving_adapter.preprocess(obs)
    prefix = pipe.driving_adapter(inputs)
    ids = torch.full((len(obs), TOK.length), TOK.mask_token_id)
    logits = pipe.model(ids, prefix_embeds=prefix.embeds, attention_mask=prefix.attention_mask(num_tokens=TOK.length),
                        prefix_length=prefix.length).logits
    return logits.masked_fill(~TOK.allowed_tokens(), float("-inf")) if restrict else logits


def test_confidence_is_the_committed_tokens_probability(pipe):
    # steps=1 commits all tokens at the first forward: confidence = softmax over the slot's allowed tokens
    obs = observations(2)
    out = pipe(obs, steps=1, cache="none")
    probs = _masked_canvas_logits(pipe, obs).softmax(-1)
    torch.testing.assert_close(out.tokens, probs.argmax(-1))
    torch.testing.assert_close(out.confidence, probs.max(-1).values, atol=1e-5, rtol=1e-5)


def test_action_bias_offsets_the_action_slots_logits_before_the_commit():
    pipe = pipe_for()
    obs = observations(3)
    logits = _masked_canvas_logits(pipe, obs)
    bias = {"SLOWER": 2.5, "LANE_LEFT": -1.0}
    out = pipe(obs, steps=1, cache="none", action_bias=bias)
    offset = torch.zeros(TOK.vocab_size)
    for name, v in bias.items():
        offset[TOK.action_offset + ACTIONS.index(name)] = v
    action_slot = torch.tensor([k == "action" for k in TOK.slot_kinds()])
    probs = (logits + offset * action_slot[:, None]).softmax(-1)
    torch.testing.assert_close(out.tokens, probs.argmax(-1))
    torch.testing.assert_close(out.confidence, probs.max(-1).values, atol=1e-5, rtol=1e-5)
    # the dx / dy slots are untouched; a large offset forces the action everywhere, also with the prefix cache
    plain = pipe(obs, steps=1, cache="none")
    torch.testing.assert_close(out.tokens[:, ~action_slot], plain.tokens[:, ~action_slot])
    forced = pipe(obs, action_bias=[0.0, 0.0, 0.0, 0.0, 1e4])
    assert (forced.action_ids == ACTIONS.index("SLOWER")).all()
    torch.testing.assert_close(pipe(obs, action_bias={}).tokens, pipe(obs).tokens)
    with pytest.raises(ValueError, match="unknown actions"):
        pipe(obs, action_bias={"BRAKE": 1.0})
    with pytest.raises(ValueError, match="5 offsets"):
        pipe(obs, action_bias=[1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        pipe(obs, action_bias={"SLOWER": float("inf")})
    with pytest.raises(ValueError, match="causal"):
        pipe_for("causal")(obs, action_bias={"SLOWER": 1.0})


def test_prior_correction_divides_out_the_saved_label_shares(tmp_path):
    from modalities.data.driving import DrivingDataset

    pipe = pipe_for()
    with pytest.raises(ValueError, match="action_prior"):
        pipe.prior_correction(1.0)
    actions = np.array([[1, 1, 4], [1, 3, 1], [0, 1, 1], [1, 1, 1]])
    data = DrivingDataset(ego=np.zeros((4, 5), np.float32), vehicles=np.zeros((4, 1, 6), np.float32),
                          vehicle_count=np.ones(4, np.int64), actions=actions, waypoints=np.zeros((4, 3, 2), np.float32),
                          density=np.ones(4, np.float32), episode=np.zeros(4, np.int64), step=np.arange(4))
    shares = data.action_shares()
    assert shares == pytest.approx([1 / 12, 9 / 12, 0.0, 1 / 12, 1 / 12])
    with_prior = PlanningPipeline(pipe.driving_adapter, pipe.model, pipe.scheduler, plan=TOK.to_dict(),
                                  action_prior=shares)
    with_prior.save_pretrained(tmp_path)
    loaded = PlanningPipeline.from_pretrained(tmp_path)
    assert loaded.config.action_prior == pytest.approx(shares)
    bias = loaded.prior_correction(0.5)
    # -tau * log(share); the unseen action gets the rarest seen action's offset instead of infinity
    assert bias == pytest.approx({"LANE_LEFT": 0.5 * np.log(12), "IDLE": -0.5 * np.log(0.75),
                                  "LANE_RIGHT": 0.5 * np.log(12), "FASTER": 0.5 * np.log(12),
                                  "SLOWER": 0.5 * np.log(12)})
    assert set(loaded.prior_correction(0.0).values()) == {0.0}
    with pytest.raises(ValueError, match="tau"):
        loaded.prior_correction(-1.0)
    with pytest.raises(ValueError, match="action_prior"):
        PlanningPipeline(pipe.driving_adapter, pipe.model, pipe.scheduler, action_prior=[0.5, 0.6, 0, 0, 0])


def test_steps_threshold_and_exact_prefix_cache(pipe):
    obs = observations(3)
    one_per_step = pipe(obs, steps=TOK.length, cache="none")
    assert one_per_step.nfe == TOK.length
    cached = pipe(obs, steps=TOK.length)  # "auto": the exact prefix cache; +1 forward for the sensor prefix
    assert cached.nfe == TOK.length + 1
    torch.testing.assert_close(cached.tokens, one_per_step.tokens)
    torch.testing.assert_close(cached.confidence, one_per_step.confidence, atol=1e-5, rtol=1e-4)
    assert pipe(obs, steps=1, cache="none").nfe == 1
    low = pipe(obs, threshold=1e-6, cache="none")  # everything clears the threshold at the first forward
    assert low.nfe == 1 and low.row_steps.tolist() == [1, 1, 1]
    assert cached.row_steps.tolist() == [TOK.length] * 3
    with pytest.raises(ValueError, match="steps"):
        pipe(obs, steps=TOK.length + 1)
    with pytest.raises(ValueError, match="threshold"):
        pipe(obs, threshold=1.5)


def test_callback_sees_every_forward(pipe):
    seen = []
    pipe(observations(2), steps=3, callback_on_step_end=lambda p, step, block, kw: seen.append((step, kw["x0"].shape)),
         callback_on_step_end_tensor_inputs=["x0"])
    assert [s for s, _ in seen] == [0, 1, 2] and seen[0][1] == (2, TOK.length)


def test_callback_can_force_plan_tokens_and_tuple_order(pipe):
    obs = observations(2)
    plain = pipe(obs, steps=3)
    # an action the slot may take that the model did not choose for row 0
    action_ids = [i for i in torch.nonzero(TOK.allowed_tokens()[0]).flatten().tolist() if i != plain.tokens[0, 0]]

    def force(p, step, block, kw):
        seq = kw["sequences"].clone()
        seq[:, 0] = action_ids[0]
        return {"sequences": seq}

    out = pipe(obs, steps=3, callback_on_step_end=force)
    assert (out.tokens[:, 0] == action_ids[0]).all()
    assert out.actions[0][0] == ACTIONS[int(out.action_ids[0, 0])]
    fields = pipe(obs, steps=3, return_dict=False)
    assert fields[0] == plain.actions and torch.equal(fields[1], plain.tokens)  # actions, then the plan tokens
    assert len(fields) == 10 and fields[-1] == "diffusion"


def test_autoregressive_baseline_matches_uncached_greedy_decoding():
    ar = pipe_for("causal")
    obs = observations(3)
    out = ar(obs)
    assert out.decoding == "autoregressive" and out.nfe == TOK.length
    # direct: recompute the whole [prefix | BOS | plan so far] every token, no cache
    prefix = ar.driving_adapter(ar.driving_adapter.preprocess(obs))
    allowed = TOK.allowed_tokens()
    seq = torch.full((3, 1), TOK.bos_token_id)
    probs = []
    for i in range(TOK.length):
        logits = ar.model(seq, prefix_embeds=prefix.embeds,
                          attention_mask=prefix.attention_mask(num_tokens=seq.shape[1])).logits[:, -1]
        p = logits.masked_fill(~allowed[i], float("-inf")).softmax(-1)
        probs.append(p.max(-1).values)
        seq = torch.cat([seq, p.argmax(-1, keepdim=True)], 1)
    torch.testing.assert_close(out.tokens, seq[:, 1:])
    torch.testing.assert_close(out.confidence, torch.stack(probs, 1), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="diffusion controls"):
        ar(obs, steps=3)


@pytest.mark.parametrize("layout", ["prefix", "causal"])
def test_save_load_gives_equal_plans(tmp_path, layout):
    p = pipe_for(layout)
    obs = observations(3)
    before = p(obs)
    p.save_pretrained(tmp_path)
    q = PlanningPipeline.from_pretrained(tmp_path)
    q.set_progress_bar_config(disable=True)
    after = q(obs)
    assert q.plan_tokenizer == TOK and q.decoding == before.decoding
    torch.testing.assert_close(after.tokens, before.tokens)
    torch.testing.assert_close(after.confidence, before.confidence)
    with pytest.raises(ValueError, match="model_index.json"):
        PlanningPipeline.from_pretrained(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "bad, field",
    [
        ({"vehicles": np.zeros((1, 6))}, "ego"),
        ({"ego": {"speed": float("nan"), "heading": 0.0, "lane": 0, "num_lanes": 3}}, "ego.speed"),
        ({"ego": {"speed": 20.0, "heading": 0.0, "lane": 0, "num_lanes": 3}, "vehicles": np.full((1, 6), np.inf)},
         "vehicles"),
        ({"ego": {"speed": 20.0, "heading": 0.0, "lane": 0, "num_lanes": 3}, "vehicles": np.zeros((2, 4))},
         "expected 6"),
        ({}, "empty scene"),
    ],
)
def test_bad_rows_raise_or_get_the_fallback_plan(pipe, bad, field):
    obs = observations(3)
    with pytest.raises(ValueError, match=field):
        pipe([obs[0], bad, obs[2]])
    out = pipe([obs[0], bad, obs[2]], on_error="record")
    assert out.fallback.tolist() == [False, True, False]
    assert out.actions[1] == [FALLBACK_ACTION] * TOK.horizon and torch.isnan(out.waypoints[1]).all()
    assert (out.confidence[1] == 0).all() and field in out.errors[1] and out.errors[0] is None
    good = pipe([obs[0], obs[2]])  # the other rows are planned as if alone
    torch.testing.assert_close(out.tokens[[0, 2]], good.tokens)
    assert pipe.plan_action(bad) == ACTIONS.index(FALLBACK_ACTION)


def test_fallback_on_tensor_batches_and_batch_level_errors(pipe):
    x = pipe.driving_adapter.preprocess(observations(2))
    ego = x.ego.clone()
    ego[1, 0] = float("inf")
    out = pipe(DrivingInputs(ego, x.vehicles, x.vehicles_mask), on_error="record")
    assert out.fallback.tolist() == [False, True] and "ego" in out.errors[1]
    with pytest.raises(ValueError, match="vehicles has 5 features"):  # no row can be saved: always raise
        pipe(DrivingInputs(x.ego, x.vehicles[..., :5], x.vehicles_mask), on_error="record")
    with pytest.raises(ValueError, match="empty"):
        pipe([])
    with pytest.raises(ValueError, match="on_error"):
        pipe(observations(1), on_error="fallback")


# ------------------------------------------------------------------------------------------ closed loop
def test_drives_the_simulator_in_closed_loop(pipe):
    env = make_env(1.0, duration=3)
    try:
        obs, _ = env.reset(seed=11)
        steps = 0
        done = False
        while not done:
            action = pipe.plan_action(observe(env, obs))
            assert 0 <= action < len(ACTIONS)
            obs, _, terminated, truncated, _ = env.step(action)
            done = terminated or truncated
            steps += 1
        assert steps <= 3
    finally:
        env.close()


def test_closed_loop_gives_the_occupancy_grid_only_to_planners_that_read_it():
    from modalities.data.driving_closed_loop import CONDITIONS, drive

    seen = []

    def spy(env, raw):
        seen.append(raw.get("occupancy"))
        return ACTIONS.index("IDLE")

    rows = drive(spy, CONDITIONS["highway"], episodes=1, max_decisions=2)
    assert rows[0]["decisions"] == 2 and all(o is None for o in seen)
    seen.clear()
    drive(spy, CONDITIONS["highway"], episodes=1, max_decisions=2, occupancy=True)
    assert len(seen) == 2 and all(o is not None and o.ndim == 3 and o.shape[0] == 2 for o in seen)
    # a planner built for the grid plans from such an observation
    planner = build_planner({**ADAPTER, "occupancy_channels": 2}, model_cfg("prefix"), TOK, None, seed=0)
    planner.set_progress_bar_config(disable=True)
    grid_rows = drive(lambda env, raw: planner.plan_action(raw, on_error="raise"), CONDITIONS["highway"],
                      episodes=1, max_decisions=2, occupancy=True)
    assert grid_rows[0]["decisions"] == 2


def test_ensemble_of_one_planner_is_that_planner(pipe):
    from pipelines.planning_ensemble import ensemble_planner

    alone = ensemble_planner([pipe])
    obs = observations(3)
    for kw in (dict(threshold=0.5), dict(steps=3, cache="none")):
        a, b = alone(obs, **kw), pipe(obs, **kw)
        assert torch.equal(a.tokens, b.tokens) and a.nfe == b.nfe
        torch.testing.assert_close(a.confidence, b.confidence, atol=1e-6, rtol=1e-6)


def test_ensemble_commits_from_the_members_mean_probabilities():
    from pipelines.planning_ensemble import ensemble_planner

    members = [pipe_for(seed=s) for s in (0, 1, 2)]
    obs = observations(3)
    # steps=1 commits every slot at the first forward: the mean of the members' softmax, renormalised over
    # the slot's allowed tokens, then argmax
    mean = torch.stack([_masked_canvas_logits(m, obs, restrict=False).softmax(-1) for m in members]).mean(0)
    mean = mean * TOK.allowed_tokens()
    mean = mean / mean.sum(-1, keepdim=True)
    out = ensemble_planner(members)(obs, steps=1, cache="none")
    torch.testing.assert_close(out.tokens, mean.argmax(-1))
    torch.testing.assert_close(out.confidence, mean.max(-1).values, atol=1e-5, rtol=1e-5)
    assert not torch.equal(out.tokens, members[0](obs, steps=1, cache="none").tokens)  # the others count


def test_ensemble_prefix_cache_is_exact_and_plans_drive():
    from pipelines.planning_ensemble import ensemble_planner

    ens = ensemble_planner([pipe_for(seed=s) for s in (0, 1)])
    obs = observations(4, seed=3)
    cached, plain = ens(obs, threshold=0.3, cache="prefix_exact"), ens(obs, threshold=0.3, cache="none")
    assert torch.equal(cached.tokens, plain.tokens)
    torch.testing.assert_close(cached.confidence, plain.confidence, atol=1e-5, rtol=1e-5)
    assert ens.plan_action(obs[0]) in range(len(ACTIONS))


def test_ensemble_refuses_members_that_do_not_fit():
    from pipelines.planning_ensemble import ensemble_planner

    with pytest.raises(ValueError, match="non-empty list"):
        ensemble_planner([])
    with pytest.raises(ValueError, match="causal"):
        ensemble_planner([pipe_for(), pipe_for("causal")])
    other = build_planner(ADAPTER, model_cfg("prefix"), PlanTokenizer(horizon=2), None, seed=0)
    with pytest.raises(ValueError, match="plan tokenizer"):
        ensemble_planner([pipe_for(), other])
    wide = build_planner({**ADAPTER, "gap_features": True}, model_cfg("prefix"), TOK, None, seed=0)
    with pytest.raises(ValueError, match="adapter config"):
        ensemble_planner([pipe_for(), wide])
    with pytest.raises(ValueError, match="not saved"):
        ensemble_planner([pipe_for()]).save_pretrained("unused")

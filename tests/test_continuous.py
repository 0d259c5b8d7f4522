"""Gaussian diffusion / flow matching on latents, checked against formulae written out here and against
diffusers' own schedulers driven by models whose output is known exactly (Gaussian data)."""

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from latent.backbone import DiffusionTransformer
from latent.continuous import (
    GaussianDiffusion,
    check_scheduler,
    make_alphas_cumprod,
    normalize_prediction_type,
    sample_latents,
    scheduler_prediction_type,
)

MU, STD = 1.5, 0.5  # data distribution N(MU, STD^2) per coordinate


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_match_diffusers(schedule):
    ours = make_alphas_cumprod(schedule, 1000, 1e-4, 2e-2)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule, beta_start=1e-4, beta_end=2e-2).alphas_cumprod
    torch.testing.assert_close(ours.float(), ref.float(), atol=1e-6, rtol=1e-5)


def test_aliases():
    assert [normalize_prediction_type(n) for n in ("eps", "x0", "v", "flow_prediction")] == [
        "epsilon", "sample", "v_prediction", "flow"]
    with pytest.raises(ValueError, match="prediction_type"):
        normalize_prediction_type("score")


def test_add_noise_formula_and_diffusers():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    d = GaussianDiffusion("epsilon", beta_schedule="linear")
    abar = make_alphas_cumprod("linear")[t].float()[:, None, None]
    want = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    torch.testing.assert_close(d.add_noise(x0, eps, t), want)
    ref = DDPMScheduler(beta_schedule="linear").add_noise(x0, eps, t)
    torch.testing.assert_close(d.add_noise(x0, eps, t), ref, atol=1e-6, rtol=1e-5)
    # one timestep per latent ([B, M]) is the same formula per position
    tm = torch.randint(0, 1000, (3, 5), generator=g)
    abar_m = make_alphas_cumprod("linear")[tm].float()[..., None]
    torch.testing.assert_close(d.add_noise(x0, eps, tm), abar_m.sqrt() * x0 + (1 - abar_m).sqrt() * eps)
    # flow matching: (1 - sigma) x0 + sigma eps, as FlowMatchEulerDiscreteScheduler.scale_noise
    f = GaussianDiffusion("flow")
    fs = FlowMatchEulerDiscreteScheduler()
    fs.set_timesteps(10)
    tf = fs.timesteps[3]
    sigma = float(tf) / 1000
    torch.testing.assert_close(f.add_noise(x0, eps, tf.expand(3)), (1 - sigma) * x0 + sigma * eps)
    torch.testing.assert_close(f.add_noise(x0, eps, tf.expand(3)), fs.scale_noise(x0, tf[None], eps), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pt", ["epsilon", "sample", "v_prediction", "flow"])
def test_targets_and_inversions(pt):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 6, 3, generator=g), torch.randn(4, 6, 3, generator=g)
    d = GaussianDiffusion(pt)
    t = d.sample_timesteps(4, generator=g)
    a = (1 - t / 1000) if pt == "flow" else d.alphas_cumprod[t.long()].float().sqrt()
    b = (t / 1000) if pt == "flow" else (1 - d.alphas_cumprod[t.long()].float()).sqrt()
    a, b = a[:, None, None].float(), b[:, None, None].float()
    want = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - b * x0, "flow": eps - x0}[pt]
    target = d.target(x0, eps, t)
    torch.testing.assert_close(target, want)
    x_t = d.add_noise(x0, eps, t)
    torch.testing.assert_close(d.predict_x0(target, x_t, t), x0, atol=2e-4, rtol=1e-4)
    if pt != "sample":  # x0-prediction cannot recover eps where b ~ 0 ... but it is exact here too
        torch.testing.assert_close(d.predict_noise(target, x_t, t), eps, atol=2e-4, rtol=1e-4)
    if pt == "v_prediction":  # v-target identities: v = a eps - b x0, x0 = a x_t - b v, eps = b x_t + a v
        torch.testing.assert_close(a * x_t - b * target, x0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b * x_t + a * target, eps, atol=1e-5, rtol=1e-5)


def test_loss_is_mse_to_target_and_trains_backbone(tiny_config):
    torch.manual_seed(0)
    model = DiffusionTransformer(**tiny_config, latent_dim=6)
    d = GaussianDiffusion("v_prediction")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 6, generator=g)
    ids = torch.randint(0, 60, (2, 5), generator=g)
    out = d.loss(model, x0, generator=g, input_ids=ids)
    torch.testing.assert_close(out.loss, ((out.pred - out.target) ** 2).mean())
    out.loss.backward()
    assert model.latent_in.weight.grad is not None and model.time_mlp[0].weight.grad.abs().sum() > 0
    # per-latent timesteps and a mask over scored latents
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    out = d.loss(model, x0, generator=g, input_ids=ids, latent_mask=mask, per_latent_timesteps=True)
    assert out.timesteps.shape == (2, 3)
    per = ((out.pred - out.target) ** 2).mean(-1)
    torch.testing.assert_close(out.loss, per[mask].mean())


def test_timestep_conditions_latent_slots_only(tiny_config):
    """Under a causal layout tokens precede latents, so token logits ignore the latent noise level."""
    torch.manual_seed(0)
    model = DiffusionTransformer(**{**tiny_config, "attention_layout": "causal"}, latent_dim=4).eval()
    ids = torch.randint(0, 60, (2, 5))
    z = torch.randn(2, 3, 4)
    o1 = model(ids, latents=z, timestep=torch.tensor([0.1, 0.2]))
    o2 = model(ids, latents=z, timestep=torch.tensor([0.9, 0.7]))
    torch.testing.assert_close(o1.logits, o2.logits)
    assert not torch.allclose(o1.latent_pred, o2.latent_pred)


# ---- exact Gaussian models ------------------------------------------------------------------------
def exact_output(d: GaussianDiffusion, x, t_model):
    """Model output of the Bayes-optimal denoiser for data N(MU, STD^2), any prediction type."""
    timestep = t_model * d.num_train_timesteps
    if d.is_flow:
        sigma = t_model.double()
        a, b = 1 - sigma, sigma
    else:
        abar = d.alphas_cumprod[timestep.round().long().clamp(0, 999)]
        a, b = abar.sqrt(), (1 - abar).sqrt()
    x = x.double()
    var = a**2 * STD**2 + b**2
    x0 = MU + a * STD**2 / var * (x - a * MU)
    eps = b / var * (x - a * MU)
    out = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - b * x0, "flow": eps - x0}[d.prediction_type]
    return out.float()


def test_ddim_step_by_hand():
    d = GaussianDiffusion("epsilon")
    sched = d.make_scheduler("ddim")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 4, generator=g)
    seen = []

    def fn(x, t):
        seen.append(float(t))
        return exact_output(d, x, t)

    out = sample_latents(fn, sched, latents=z, num_inference_steps=2, diffusion=d)
    # trailing spacing with 2 steps: timesteps 999, 499; then abar_prev = 1 (set_alpha_to_one)
    assert seen == pytest.approx([0.999, 0.499])
    ac = d.alphas_cumprod.float()
    x = z
    for k, k_prev in ((999, 499), (499, None)):
        eps = exact_output(d, x, torch.tensor(k / 1000))
        x0 = (x - (1 - ac[k]).sqrt() * eps) / ac[k].sqrt()
        ap = torch.tensor(1.0) if k_prev is None else ac[k_prev]
        x = ap.sqrt() * x0 + (1 - ap).sqrt() * eps
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "pt,kind,steps,tol",  # first-order DDIM/Euler error ~ 1/steps; DPM-Solver++ (2nd order) is tighter
    [("epsilon", "ddim", 50, 0.08), ("sample", "ddim", 50, 0.08), ("v_prediction", "ddim", 50, 0.08),
     ("epsilon", "dpm", 20, 0.015), ("v_prediction", "dpm", 20, 0.015), ("flow", "flow_euler", 200, 0.025)],
)
def test_sampler_transports_noise_to_gaussian_data(pt, kind, steps, tol):
    """With the exact model, the deterministic sampler maps z to ~ MU + STD z (the ODE map is affine)."""
    d = GaussianDiffusion(pt)
    sched = d.make_scheduler(kind)
    z = torch.randn(64, 4, 2, generator=torch.Generator().manual_seed(0))
    out = sample_latents(lambda x, t: exact_output(d, x, t), sched, latents=z, num_inference_steps=steps,
                         prediction_type=pt)
    torch.testing.assert_close(out, MU + STD * z, atol=tol, rtol=0)
    assert abs(out.mean().item() - MU) < 0.1 and abs(out.std().item() - STD) < 0.05


def test_flow_matching_euler_by_hand():
    d = GaussianDiffusion("flow")
    sched = FlowMatchEulerDiscreteScheduler()
    z = torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(3))
    out = sample_latents(lambda x, t: exact_output(d, x, t), sched, latents=z, num_inference_steps=4,
                         prediction_type="flow")
    # shift=1: sigmas evenly spaced from 1 down to 1/T, then 0; Euler steps dx = (s' - s) u
    sigmas = torch.cat([torch.linspace(1000, 1, 4) / 1000, torch.zeros(1)])
    x = z
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=False):
        x = x + (s_next - s) * exact_output(d, x, s)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-5)


def test_callback_sees_and_replaces_latents():
    d = GaussianDiffusion("epsilon")
    calls = []

    def cb(i, t, lat):
        calls.append((i, int(t), lat.clone()))
        return lat * 0 if i == 2 else None

    out = sample_latents(lambda x, t: torch.zeros_like(x), d.make_scheduler("ddim"), shape=(1, 2, 3),
                         num_inference_steps=3, diffusion=d, callback_on_step_end=cb,
                         generator=torch.Generator().manual_seed(0))
    assert [c[0] for c in calls] == [0, 1, 2] and torch.equal(out, torch.zeros(1, 2, 3))


# ---- bad input --------------------------------------------------------------------------------------
def test_scheduler_prediction_type_mismatch():
    with pytest.raises(ValueError, match="prediction_type='v_prediction'.*expects prediction_type='epsilon'"):
        check_scheduler(DDIMScheduler(), "v_prediction")
    with pytest.raises(ValueError, match="prediction_type='epsilon'.*expects prediction_type='flow'"):
        sample_latents(lambda x, t: x, FlowMatchEulerDiscreteScheduler(), shape=(1, 1, 1), prediction_type="eps")
    assert scheduler_prediction_type(DPMSolverMultistepScheduler(prediction_type="sample")) == "sample"
    assert scheduler_prediction_type(EulerDiscreteScheduler(prediction_type="v_prediction")) == "v_prediction"

    class NoType:
        config = {}

    with pytest.raises(ValueError, match="no config.prediction_type"):
        scheduler_prediction_type(NoType())


def test_schedule_and_clip_warnings():
    d = GaussianDiffusion("epsilon", beta_schedule="squaredcos_cap_v2")
    with pytest.warns(UserWarning, match="beta_schedule"):
        d.check_scheduler(DDIMScheduler(beta_schedule="linear", clip_sample=False))
    with pytest.warns(UserWarning, match="clip_sample"):
        d.check_scheduler(DDIMScheduler(beta_schedule="squaredcos_cap_v2"))


def test_nan_latents_and_outputs_are_named():
    d = GaussianDiffusion("epsilon")
    bad = torch.zeros(1, 2, 3)
    bad[0, 1, 2] = math.nan
    with pytest.raises(ValueError, match="latents contains 1 NaN"):
        sample_latents(lambda x, t: x, d.make_scheduler("ddim"), latents=bad, diffusion=d)
    with pytest.raises(ValueError, match="latent_pred .*step 0"):
        sample_latents(lambda x, t: x * math.nan, d.make_scheduler("ddim"), shape=(1, 2, 3), diffusion=d)
    with pytest.raises(ValueError, match="x0"):
        d.loss(lambda **kw: kw["latents"], bad)


# ---- CCDD joint mode --------------------------------------------------------------------------------
from latent.joint import joint_loss, joint_sample  # noqa: E402
from latent.schedules import get_schedule  # noqa: E402


def test_joint_loss_matches_direct_computation(tiny_config):
    torch.manual_seed(0)
    model = DiffusionTransformer(**tiny_config, latent_dim=4)
    d = GaussianDiffusion("epsilon")
    g = torch.Generator().manual_seed(0)
    B, N, M, C = 3, 6, 2, 4
    ids = torch.randint(0, 60, (B, N), generator=g)
    z0 = torch.randn(B, M, C, generator=g)
    prompt = torch.zeros(B, N, dtype=torch.bool)
    prompt[:, :2] = True
    t = torch.tensor([0.2, 0.5, 0.9])
    u = torch.rand(B, N, generator=g)
    k = torch.tensor([10, 400, 900])
    e = torch.randn(B, M, C, generator=g)
    out = joint_loss(model, ids, z0, 63, d, lam=0.5, schedule="cosine", prompt_mask=prompt, t=t, noise=u,
                     timesteps=k, latent_noise=e)
    # by hand
    sched = get_schedule("cosine")
    s = (1 - 1e-3) * t + 1e-3
    masked = (u < sched.mask_prob(s)[:, None]) & ~prompt
    noisy = torch.where(masked, torch.full_like(ids, 63), ids)
    abar = d.alphas_cumprod[k].float()[:, None, None]
    x_t = abar.sqrt() * z0 + (1 - abar).sqrt() * e
    ref = model(noisy, latents=x_t, timestep=k / 1000)
    ce = torch.nn.functional.cross_entropy(ref.logits.transpose(1, 2), ids, reduction="none")
    ce = (ce * masked * sched.weight(s)[:, None]).sum() / (~prompt).sum()
    mse = ((ref.latent_pred - e) ** 2).mean()
    torch.testing.assert_close(out.ce, ce)
    torch.testing.assert_close(out.mse, mse)
    torch.testing.assert_close(out.loss, ce + 0.5 * mse)
    assert out.num_masked == int(masked.sum())
    out.loss.backward()
    assert model.embed.weight.grad is not None and model.latent_out.weight.grad is not None


def test_joint_loss_bad_input(tiny_config):
    model = DiffusionTransformer(**tiny_config, latent_dim=4)
    ids = torch.randint(0, 60, (2, 5))
    with pytest.raises(ValueError, match="latent_dim is 4"):
        joint_loss(model, ids, torch.randn(2, 3, 8), 63, GaussianDiffusion())
    z = torch.randn(2, 3, 4)
    z[1, 0, 0] = math.nan
    with pytest.raises(ValueError, match="latents contains 1 NaN"):
        joint_loss(model, ids, z, 63, GaussianDiffusion())


class OracleJoint:
    """Puts all probability on `target` tokens (more confident on the left) and returns the exact
    Gaussian-data model output for the latents; records what each step saw."""

    def __init__(self, target, d):
        self.target, self.d, self.seen = target, d, []

    def __call__(self, ids, latents=None, timestep=None, **kw):
        from latent.backbone import BackboneOutput

        self.seen.append(ids.clone())
        B, N = ids.shape
        logits = torch.full((B, N, 64), -10.0)
        logits.scatter_(-1, self.target[..., None], (10.0 - torch.arange(N).float() * 0.1).expand(B, N)[..., None])
        pred = None if latents is None else exact_output(self.d, latents, timestep[0])
        return BackboneOutput(logits=logits, latent_pred=pred)


def test_joint_sample_evolves_both_streams():
    d = GaussianDiffusion("v_prediction")
    target = torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    prompt = target[:, :3]
    model = OracleJoint(target, d)
    z = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(1))
    seen = []
    out = joint_sample(model, prompt, 6, 63, num_steps=20, diffusion=d, scheduler=d.make_scheduler("dpm"),
                       latents=z, callback_on_step_end=lambda i, t, kw: seen.append(int((kw["sequences"] == 63).sum())))
    assert torch.equal(out.sequences, target) and out.nfe == 20
    torch.testing.assert_close(out.latents, MU + STD * z, atol=0.015, rtol=0)
    # LLaDA quota: 6 tokens over 20 steps -> one per step for the first 6 steps, left to right
    assert seen[:7] == [10, 8, 6, 4, 2, 0, 0]
    with pytest.raises(ValueError, match="prediction_type='v_prediction'"):
        joint_sample(model, prompt, 6, 63, 4, latent_shape=(3, 2), diffusion=d, scheduler=DDIMScheduler())


def test_discrete_only_sample_with_backbone(tiny_config):
    torch.manual_seed(0)
    model = DiffusionTransformer(**tiny_config, latent_dim=4).eval()
    prompt = torch.randint(0, 60, (2, 3))
    out = joint_sample(model, prompt, 8, 63, num_steps=4)
    assert out.latents is None and not (out.sequences == 63).any()
    d = GaussianDiffusion("flow")
    out = joint_sample(model, prompt, 8, 63, num_steps=4, latent_shape=(2, 4), diffusion=d,
                       scheduler=FlowMatchEulerDiscreteScheduler(), generator=torch.Generator().manual_seed(0))
    assert out.latents.shape == (2, 2, 4) and not (out.sequences == 63).any()


@pytest.mark.parametrize("name,pt", [("euler", "epsilon"), ("euler", "v_prediction"), ("unipc", "epsilon")])
def test_other_diffusers_schedulers_work(name, pt):
    """Schedulers with init_noise_sigma != 1 and scale_model_input (Euler) or higher order (UniPC)."""
    from diffusers import UniPCMultistepScheduler

    d = GaussianDiffusion(pt)
    sched = {"euler": lambda: EulerDiscreteScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=pt,
                                                     timestep_spacing="trailing"),
             "unipc": lambda: UniPCMultistepScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=pt)}[name]()
    out = sample_latents(lambda x, t: exact_output(d, x, t), sched, shape=(64, 4, 2), num_inference_steps=30,
                         diffusion=d, generator=torch.Generator().manual_seed(0))
    assert abs(out.mean().item() - MU) < 0.1 and abs(out.std().item() - STD) < 0.05


def test_joint_sample_random_order_commits_the_quota():
    d = GaussianDiffusion("epsilon")
    target = torch.randint(0, 60, (2, 8), generator=torch.Generator().manual_seed(0))
    model = OracleJoint(target, d)
    seen = []
    out = joint_sample(model, target[:, :0], 8, 63, num_steps=4, order="random", temperature=1.0,
                       generator=torch.Generator().manual_seed(0),
                       callback_on_step_end=lambda i, t, kw: seen.append(int((kw["sequences"] == 63).sum())))
    assert seen == [12, 8, 4, 0] and torch.equal(out.sequences, target)  # 2 per row per step, oracle tokens
    with pytest.raises(ValueError, match="order="):
        joint_sample(model, target[:, :0], 8, 63, num_steps=4, order="left")


def test_aligned_token_schedule_follows_the_latent_noise_levels():
    """With more steps than tokens the linear quota finishes the tokens in the first steps; the aligned one
    keeps the masked fraction at the latents' next noise level, so the last token comes at the last step."""
    d = GaussianDiffusion("v_prediction")
    target = torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    model = OracleJoint(target, d)
    sched = d.make_scheduler("dpm")
    seen = []
    out = joint_sample(model, target[:, :3], 6, 63, num_steps=20, diffusion=d, scheduler=sched,
                       latents=torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(1)),
                       token_schedule="aligned",
                       callback_on_step_end=lambda i, t, kw: seen.append(int((kw["sequences"] == 63).sum())))
    assert torch.equal(out.sequences, target)
    ts = sched.timesteps.tolist()  # set by the sampler for 20 steps
    want = [2 * round(6 * (ts[i + 1] / 1000)) for i in range(19)] + [0]  # 2 rows
    assert seen == want and seen.index(0) >= 18  # the linear quota is done after step 6
    with pytest.raises(ValueError, match="token_schedule="):
        joint_sample(model, target[:, :3], 6, 63, 4, latent_shape=(3, 2), diffusion=d, scheduler=sched,
                     token_schedule="cosine")


def test_shared_and_pure_noise_timesteps():
    from latent.joint import pure_noise_timestep, shared_timesteps

    t = torch.tensor([0.0, 0.5, 0.9999])
    d = GaussianDiffusion("v_prediction")
    assert shared_timesteps(d, t).tolist() == [0, 500, 999]
    k = pure_noise_timestep(d)
    assert k == 999 and d._coeffs(torch.tensor([k]), torch.zeros(1, 1, 1))[0].item() < 0.01  # ~no signal left
    f = GaussianDiffusion("flow")
    torch.testing.assert_close(shared_timesteps(f, t), torch.tensor([1.0, 500.0, 999.9], dtype=torch.float64))
    assert pure_noise_timestep(f) == 1000  # sigma = 1


def test_joint_loss_self_latent_rows_match_direct_computation(tiny_config):
    """Chosen rows see the model's own x0 estimate from pure noise, re-noised to their timestep with the
    same noise, and leave the MSE; the other rows are the plain loss."""
    torch.manual_seed(0)
    model = DiffusionTransformer(**tiny_config, latent_dim=4).eval()
    d = GaussianDiffusion("v_prediction")
    g = torch.Generator().manual_seed(0)
    B, N, M, C = 3, 6, 2, 4
    ids = torch.randint(0, 60, (B, N), generator=g)
    z0 = torch.randn(B, M, C, generator=g)
    t, u = torch.tensor([0.2, 0.5, 0.9]), torch.rand(B, N, generator=g)
    k, e = torch.tensor([10, 400, 900]), torch.randn(B, M, C, generator=g)
    rows = torch.tensor([True, False, True])
    out = joint_loss(model, ids, z0, 63, d, t=t, noise=u, timesteps=k, latent_noise=e, self_latent_rows=rows)
    plain = joint_loss(model, ids, z0, 63, d, t=t, noise=u, timesteps=k, latent_noise=e)
    # by hand
    s = (1 - 1e-3) * t + 1e-3
    masked = u < s[:, None]
    noisy = torch.where(masked, torch.full_like(ids, 63), ids)
    abar = d.alphas_cumprod.float()
    a, b = abar[k].sqrt()[:, None, None], (1 - abar[k]).sqrt()[:, None, None]
    a9, b9 = abar[999].sqrt(), (1 - abar[999]).sqrt()
    x_max = a9 * z0 + b9 * e
    x0_hat = a9 * x_max - b9 * model(noisy, latents=x_max, timestep=torch.full((B,), 0.999)).latent_pred
    x_t = torch.where(rows[:, None, None], a * x0_hat + b * e, a * z0 + b * e)
    ref = model(noisy, latents=x_t, timestep=k / 1000)
    ce = torch.nn.functional.cross_entropy(ref.logits.transpose(1, 2), ids, reduction="none")
    torch.testing.assert_close(out.ce, (ce * masked / s[:, None]).sum() / (B * N))
    mse = ((ref.latent_pred - (a * e - b * z0)) ** 2).mean(-1)[~rows].mean()
    torch.testing.assert_close(out.mse, mse)
    assert not torch.allclose(out.ce, plain.ce)  # the chosen rows' tokens saw other latents

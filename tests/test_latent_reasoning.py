"""LatentReasoningPipeline with tiny random modules: the attention layout, the training loss, block-wise
generation with several diffusers schedulers, callbacks, save/load and clear errors."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.callbacks import PipelineCallback

from autoencoders.thought_vae import ThoughtVAE
from latent.backbone import DiffusionTransformer
from latent.continuous import GaussianDiffusion
from latent.data.arithmetic import make_tokenizer
from pipelines.latent_reasoning import LatentReasoningPipeline, latent_reasoning_loss, reasoning_layout

Q, A, K, k, C = 6, 3, 2, 2, 4


@pytest.fixture(scope="module")
def parts():
    tok = make_tokenizer()
    torch.manual_seed(0)
    model = DiffusionTransformer(vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=4,
                                 mask_token_id=tok.mask_token_id, max_position_embeddings=64, latent_dim=C).eval()
    vae = ThoughtVAE(vocab_size=len(tok), max_length=6, num_latents=k, latent_dim=C, hidden_size=32, num_layers=1,
                     num_heads=2, pad_token_id=tok.pad_token_id).eval()
    sched = GaussianDiffusion("v_prediction").make_scheduler("ddim")
    return model, vae, tok, sched


def make_pipe(parts, **kw):
    model, vae, tok, sched = parts
    return LatentReasoningPipeline(model, vae, tok, sched, question_length=Q, answer_length=A,
                                   num_thought_blocks=K, prediction_type="v_prediction", **kw)


def test_layout_matches_rules():
    # slots: q0 q1 | a0 | c0 c0 c1 c1 | n0 n0 n1 n1   (k = 2)
    mask, pos = reasoning_layout(1, 2, 1, 2, 2, 2, [0, 1])
    kind = ["q", "q", "a", "c", "c", "c", "c", "n", "n", "n", "n"]
    blk = [-1, -1, -1, 0, 0, 1, 1, 0, 0, 1, 1]
    want = torch.zeros(11, 11, dtype=torch.bool)
    for i in range(11):
        for j in range(11):
            if kind[j] == "q":
                want[i, j] = True
            elif kind[i] == "a":
                want[i, j] = kind[j] in ("c", "a")
            elif kind[i] == "c":
                want[i, j] = kind[j] == "c" and blk[j] <= blk[i]
            elif kind[i] == "n":
                want[i, j] = (kind[j] == "c" and blk[j] < blk[i]) or (kind[j] == "n" and blk[j] == blk[i])
    assert torch.equal(mask[0, 0], want)
    assert pos[0].tolist() == [0, 1, 6, 2, 3, 4, 5, 2, 3, 4, 5]


def test_loss_respects_block_causality(parts):
    model = parts[0]
    g = torch.Generator().manual_seed(0)
    qi = torch.randint(5, 23, (2, Q), generator=g)
    ai = torch.randint(5, 23, (2, A), generator=g)
    z = torch.randn(2, K, k, C, generator=g)
    d = GaussianDiffusion("v_prediction")
    out = latent_reasoning_loss(model, qi, ai, z, parts[2].mask_token_id, d, lam=0.5, generator=g)
    torch.testing.assert_close(out.loss, out.ce + 0.5 * out.mse)
    # the forward it uses: a noisy block-0 prediction ignores clean block 1 and the noisy block 1
    mask, pos = reasoning_layout(2, Q, A, k, K, K, range(K))
    ids = torch.cat([qi, ai], 1)
    t = torch.cat([torch.zeros(2, K * k), torch.full((2, K * k), 0.5)], 1)
    lat = torch.cat([z.reshape(2, -1, C), torch.randn(2, K * k, C, generator=g)], 1)
    o1 = model(ids, latents=lat, timestep=t, attention_mask=mask, position_ids=pos)
    lat2 = lat.clone()
    lat2[:, k : 2 * k] += 1.0  # clean block 1
    lat2[:, K * k + k :] += 1.0  # noisy block 1
    o2 = model(ids, latents=lat2, timestep=t, attention_mask=mask, position_ids=pos)
    torch.testing.assert_close(o1.latent_pred[:, K * k : K * k + k], o2.latent_pred[:, K * k : K * k + k])
    assert not torch.allclose(o1.latent_pred[:, -k:], o2.latent_pred[:, -k:])
    # the question never sees thoughts or answer
    lat3 = lat + 1.0
    o3 = model(ids, latents=lat3, timestep=t, attention_mask=mask, position_ids=pos)
    torch.testing.assert_close(o1.hidden_states[:, :Q], o3.hidden_states[:, :Q])


def random_rows(seed: int):
    """A generator and two rows of random question ids, answer ids and thought latents drawn from it."""
    g = torch.Generator().manual_seed(seed)
    qi = torch.randint(5, 23, (2, Q), generator=g)
    ai = torch.randint(5, 23, (2, A), generator=g)
    return g, qi, ai, torch.randn(2, K, k, C, generator=g)


def test_decoded_thought_ce_matches_a_plain_computation(parts):
    model, vae, tok, _ = parts
    g, qi, ai, z = random_rows(3)
    steps = torch.randint(5, 23, (2, K, vae.config.max_length), generator=g)
    d = GaussianDiffusion("v_prediction")
    ts, t = torch.randint(0, 1000, (2, K), generator=g), torch.rand(2, generator=g)
    noise, eps = torch.rand(2, Q + A, generator=g), torch.randn(2, K, k, C, generator=g)
    kw = dict(lam=0.5, timesteps=ts, t=t, noise=noise, latent_noise=eps)

    def decoder(lat):
        return vae.decode(lat / 2.0)

    base = latent_reasoning_loss(model, qi, ai, z, tok.mask_token_id, d, **kw)
    out = latent_reasoning_loss(model, qi, ai, z, tok.mask_token_id, d, thought_decoder=decoder,
                                thought_ids=steps, thought_ce=0.3, **kw)
    # the plain computation: the noisy copies' forward, v -> x0 = a x_t - b v, decode, CE on the steps
    mask, pos = reasoning_layout(2, Q, A, k, K, K, range(K))
    tk = ts.repeat_interleave(k, dim=1)
    abar = d.alphas_cumprod[tk][..., None].float()
    x_t = abar.sqrt() * z.reshape(2, K * k, C) + (1 - abar).sqrt() * eps.reshape(2, K * k, C)
    noisy_ids = torch.cat([qi, torch.where(noise[:, Q:] < (1 - 1e-3) * t[:, None] + 1e-3,
                                           torch.full_like(ai, tok.mask_token_id), ai)], 1)
    time = torch.cat([torch.zeros(2, K * k), tk.float() / 1000], 1)
    v = model(noisy_ids, latents=torch.cat([z.reshape(2, K * k, C), x_t], 1), timestep=time,
              attention_mask=mask, position_ids=pos).latent_pred[:, K * k :]
    x0 = abar.sqrt() * x_t - (1 - abar).sqrt() * v
    want = torch.nn.functional.cross_entropy(decoder(x0.reshape(2 * K, k, C)).transpose(1, 2), steps.reshape(2 * K, -1))
    torch.testing.assert_close(out.thought_ce, want)
    torch.testing.assert_close(out.loss, base.loss + 0.3 * want)
    torch.testing.assert_close(out.mse, base.mse)
    assert float(base.thought_ce) == 0.0
    # it trains the backbone through the implied latents, never the frozen decoder
    vae.requires_grad_(False)
    model.zero_grad()
    out.thought_ce.backward()
    assert model.latent_out.weight.grad is not None and model.latent_out.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="thought_ce > 0 needs thought_decoder"):
        latent_reasoning_loss(model, qi, ai, z, tok.mask_token_id, d, thought_ce=1.0, **kw)
    with pytest.raises(ValueError, match="thought_ids must be"):
        latent_reasoning_loss(model, qi, ai, z, tok.mask_token_id, d, thought_ce=1.0, thought_decoder=decoder,
                              thought_ids=steps[:, :1], **kw)


def test_self_thought_rows_read_the_models_own_one_step_thoughts(parts):
    model, _, tok, _ = parts
    g, qi, ai, z = random_rows(6)
    d = GaussianDiffusion("v_prediction")
    kw = dict(lam=0.5, timesteps=torch.randint(0, 1000, (2, K), generator=g), t=torch.full((2,), 0.9),
              noise=torch.rand(2, Q + A, generator=g), latent_noise=torch.randn(2, K, k, C, generator=g))
    base = latent_reasoning_loss(model, qi, ai, z, tok.mask_token_id, d, **kw)
    assert base.num_masked > 0
    none = latent_reasoning_loss(model, qi, ai, z, tok.mask_token_id, d, self_thought_rows=torch.zeros(2, dtype=torch.bool), **kw)
    torch.testing.assert_close(none.loss, base.loss)
    # the plain computation: every block's x0 from pure noise (x_T = a_T z + b_T eps, beside the data's
    # earlier blocks), then the same loss with those estimates where the data's clean thoughts were read
    mask, pos = reasoning_layout(2, Q, A, k, K, K, range(K))
    abar = d.alphas_cumprod[-1].float()
    eps = kw["latent_noise"].reshape(2, K * k, C)
    x_max = abar.sqrt() * z.reshape(2, K * k, C) + (1 - abar).sqrt() * eps
    with torch.no_grad():
        v = model(torch.cat([qi, torch.full_like(ai, tok.mask_token_id)], 1),
                  latents=torch.cat([z.reshape(2, K * k, C), x_max], 1),
                  timestep=torch.cat([torch.zeros(2, K * k), torch.full((2, K * k), 0.999)], 1),
                  attention_mask=mask, position_ids=pos).latent_pred[:, K * k :]
    own = abar.sqrt() * x_max - (1 - abar).sqrt() * v

    def reads_own(ids, latents, **m):
        return model(ids, latents=torch.cat([own, latents[:, K * k :]], 1), **m)

    want = latent_reasoning_loss(reads_own, qi, ai, z, tok.mask_token_id, d, **kw)
    out = latent_reasoning_loss(model, qi, ai, z, tok.mask_token_id, d, self_thought_rows=torch.ones(2, dtype=torch.bool), **kw)
    torch.testing.assert_close(out.loss, want.loss)
    assert not torch.allclose(out.ce, base.ce)  # the answer read other thoughts ...
    assert not torch.allclose(out.mse, base.mse)  # ... and so did the later blocks


def test_given_thoughts_are_kept_and_the_rest_generated_as_without_them(parts):
    pipe = make_pipe(parts)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, K, k, C, generator=torch.Generator().manual_seed(4))
    full = pipe(["7+8", "2*3"], num_inference_steps=2, latents=noise)
    # giving the first block the run produced reproduces the run exactly, with that block's forwards saved
    part = pipe(["7+8", "2*3"], num_inference_steps=2, latents=noise, thought_latents=full.thought_latents[:, :1])
    torch.testing.assert_close(part.thought_latents, full.thought_latents)
    assert part.answers == full.answers and part.nfe == full.nfe - 2
    # all blocks given: only the answer runs, on exactly these thoughts
    mine = torch.randn(2, K, k, C, generator=torch.Generator().manual_seed(5))
    given = pipe(["7+8", "2*3"], thought_latents=mine)
    torch.testing.assert_close(given.thought_latents, mine)
    assert given.nfe == A
    with pytest.raises(ValueError, match=r"thought_latents \(the given first blocks\) must be"):
        pipe(["7+8", "2*3"], thought_latents=mine[:1])
    with pytest.raises(ValueError, match=r"thought_latents \(the given first blocks\) must be"):
        pipe(["7+8", "2*3"], num_thought_blocks=1, thought_latents=mine)


def test_pipeline_loads_in_a_fresh_interpreter(parts, tmp_path):
    """Loading must not rely on the caller having imported the project's component modules."""
    import subprocess
    import sys

    make_pipe(parts).save_pretrained(tmp_path)
    code = ("from pipelines.latent_reasoning import LatentReasoningPipeline as P; import sys; "
            f"p = P.from_pretrained({str(tmp_path)!r}); "
            "assert 'autoencoders.thought_vae' in sys.modules; print(type(p.thought_vae).__name__)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("ThoughtVAE")


@pytest.mark.parametrize("sched", ["ddim", "dpm"])
def test_pipeline_runs_with_schedulers_and_callback(parts, sched):
    pipe = make_pipe(parts)
    pipe.set_progress_bar_config(disable=True)
    scheduler = {"ddim": DDIMScheduler(prediction_type="v_prediction", clip_sample=False,
                                       beta_schedule="squaredcos_cap_v2"),
                 "dpm": DPMSolverMultistepScheduler(prediction_type="v_prediction",
                                                    beta_schedule="squaredcos_cap_v2")}[sched]
    seen = []

    def cb(p, step, t, kw):
        seen.append((step, kw["block"], tuple(kw["latents"].shape)))
        return {}

    out = pipe(["12+3", "4*5-1"], num_thought_blocks=2, num_inference_steps=3, scheduler=scheduler,
               generator=torch.Generator().manual_seed(0), callback_on_step_end=cb)
    assert out.thought_latents.shape == (2, 2, k, C)
    assert len(out.answers) == 2 and all(len(t) == 2 for t in out.thoughts)
    assert isinstance(out.thoughts[0][0], str)
    assert [s[0] for s in seen] == list(range(6)) and [s[1] for s in seen] == [0, 0, 0, 1, 1, 1]
    assert seen[0][2] == (2, k, C)
    assert out.nfe == 2 * 3 + A


def test_first_block_does_not_depend_on_later_blocks_and_guidance(parts):
    pipe = make_pipe(parts)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 3, k, C, generator=torch.Generator().manual_seed(1))
    o1 = pipe("7+8", num_thought_blocks=1, num_inference_steps=2, latents=noise[:, :1])
    o3 = pipe("7+8", num_thought_blocks=3, num_inference_steps=2, latents=noise)
    torch.testing.assert_close(o1.thought_latents[:, 0], o3.thought_latents[:, 0])
    og = pipe("7+8", num_thought_blocks=1, num_inference_steps=2, latents=noise[:, :1], guidance_scale=3.0)
    assert not torch.allclose(og.thought_latents, o1.thought_latents)


def test_callback_replaces_latents(parts):
    pipe = make_pipe(parts)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("1+1", num_thought_blocks=1, num_inference_steps=2,
               callback_on_step_end=lambda p, s, t, kw: {"latents": torch.zeros_like(kw["latents"])})
    assert torch.equal(out.thought_latents, torch.zeros(1, 1, k, C))


class ZeroLatents(PipelineCallback):
    tensor_inputs = ["latents", "thought_latents"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        assert set(callback_kwargs) == {"latents", "thought_latents", "block"}
        return {"latents": torch.zeros_like(callback_kwargs["latents"])}


def test_pipeline_callback_objects_and_tuple_order(parts):
    pipe = make_pipe(parts)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("1+1", num_thought_blocks=1, num_inference_steps=2, callback_on_step_end=ZeroLatents())
    assert torch.equal(out.thought_latents, torch.zeros(1, 1, k, C))
    answers, answer_ids, thoughts, thought_latents, nfe = pipe(
        "1+1", num_thought_blocks=1, num_inference_steps=2, callback_on_step_end=ZeroLatents(), return_dict=False)
    assert answers == out.answers and torch.equal(answer_ids, out.answer_ids) and thoughts == out.thoughts
    assert torch.equal(thought_latents, out.thought_latents) and nfe == out.nfe
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe("1+1", callback_on_step_end_tensor_inputs=["answer_ids"])  # the answer has no step callback


def test_save_load_round_trip(parts, tmp_path):
    pipe = make_pipe(parts)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    pipe2 = LatentReasoningPipeline.from_pretrained(tmp_path)
    pipe2.set_progress_bar_config(disable=True)
    assert pipe2.config.question_length == Q and pipe2.config.prediction_type == "v_prediction"
    a = pipe("3*3", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    b = pipe2("3*3", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.thought_latents, b.thought_latents)
    assert a.answers == b.answers and a.thoughts == b.thoughts
    with pytest.raises(ValueError, match="model_index.json"):
        LatentReasoningPipeline.from_pretrained(tmp_path / "nowhere")  # never looked up on a hub
    # a saved default guidance scale is what a call without one uses
    guided = make_pipe(parts, guidance_scale=2.0)
    guided.save_pretrained(tmp_path / "guided")
    loaded = LatentReasoningPipeline.from_pretrained(tmp_path / "guided")
    loaded.set_progress_bar_config(disable=True)
    noise = torch.randn(1, K, k, C, generator=torch.Generator().manual_seed(2))
    want = pipe("3*3", num_inference_steps=2, latents=noise, guidance_scale=2.0)
    torch.testing.assert_close(loaded("3*3", num_inference_steps=2, latents=noise).thought_latents, want.thought_latents)
    assert not torch.allclose(pipe("3*3", num_inference_steps=2, latents=noise).thought_latents, want.thought_latents)


def test_bad_input(parts):
    model, vae, tok, sched = parts
    pipe = make_pipe(parts)
    with pytest.raises(ValueError, match="num_thought_blocks must be an int >= 1"):
        pipe("1+1", num_thought_blocks=0)
    with pytest.raises(ValueError, match="prediction_type='v_prediction'.*expects prediction_type='flow'"):
        pipe("1+1", scheduler=FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match="prediction_type='v_prediction'.*expects prediction_type='epsilon'"):
        pipe("1+1", scheduler=DDIMScheduler())
    bad = torch.zeros(1, K, k, C)
    bad[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="latents contains 1 NaN"):
        pipe("1+1", latents=bad)
    with pytest.raises(ValueError, match=r"latents \(initial noise\) must be"):
        pipe("1+1", latents=torch.zeros(1, K, k, C + 1))
    other = ThoughtVAE(vocab_size=len(tok), max_length=6, num_latents=k, latent_dim=C + 2, hidden_size=32,
                       num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match="model.config.latent_dim=4 but thought_vae.config.latent_dim=6"):
        LatentReasoningPipeline(model, other, tok, sched)
    with pytest.raises(ValueError, match="question_length is 6"):
        pipe("1+2+3+4+5+6")


# ---- experiment plumbing: the task is verifiable and recipes load -------------------------------------
def test_task_is_verifiable_and_split_holds_out_chains():
    from latent.data.arithmetic import is_true_equation, split

    train, test = split(400, 80, (1, 2, 3, 4), seed=0)
    for p in train + test:
        assert len(p.steps) == p.difficulty and p.steps[-1].endswith("=" + p.answer)
        assert is_true_equation(p.question + "=" + p.answer)
    assert not is_true_equation("3+4=8") and not is_true_equation("3+=7")
    seen = {p.question for p in train}
    assert all(p.question not in seen for p in test if p.difficulty > 1)
    assert sorted({p.difficulty for p in test}) == [1, 2, 3, 4]

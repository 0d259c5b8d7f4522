"""The rl task (pipelines/tasks/rl.py, latent/rl.py, rewards): one update's loss and gradient equal a direct
computation of advantages, likelihoods (ELBO and trajectory), ratio, clip and KL written out here; a reward
for one token raises that token's probability; exact resume, in the middle of a generation reused by
several inner steps; rewards, countdown problems and config errors."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from trainer_checks import logged_losses

import pipelines.tasks  # noqa: F401 - registers the built-in tasks
from latent.data.arithmetic import make_tokenizer
from latent.data.countdown import countdown_dataset, is_solution
from latent.rl import choose_steps, group_advantages
from latent.training.config import ConfigError, load_config
from latent.training.models import build_model
from latent.training.trainer import Trainer
from pipelines.tasks.joint import JointGenerator
from pipelines.tasks.rewards import is_well_formed, score_completions

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "rl_arithmetic.yaml"
P, L = 8, 3  # prompt and completion lengths of the tiny policy


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    """An untrained tiny policy saved as the joint task exports one."""
    torch.manual_seed(0)
    tok = make_tokenizer()
    model = build_model({"hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_position_embeddings": 16}, tok)
    folder = tmp_path_factory.mktemp("policy") / "pipeline"
    settings = {"mode": "discrete", "target": "answer", "question_length": P, "target_length": L,
                "question_suffix": "="}
    JointGenerator(model, tok, settings).save_pretrained(folder)
    return folder


def overrides(policy_dir, out, *extra):
    return [f"model.init_from={policy_dir}", f"run.output_dir={out}", "data.n_train=200", "data.n_test=8",
            "eval.problems=8", "eval.batch_size=8", "trainer.batch_size=8", "rollout.group_size=4",
            "trainer.max_steps=4", "trainer.progress=false", "trainer.tensorboard=false", "trainer.plot=false",
            "trainer.log_every=1", "trainer.save_every=0", "trainer.threads=1", *extra]


def build(policy_dir, out, *extra) -> Trainer:
    return Trainer(load_config(RECIPE, overrides(policy_dir, out, *extra)))


def perturb(module, scale, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# ---- direct computations, one row and one canvas at a time --------------------------------------------------
def plain_advantages(rewards, G, eps):
    out = []
    for g in range(0, len(rewards), G):
        r = [float(x) for x in rewards[g : g + G]]
        mean = sum(r) / G
        std = (sum((x - mean) ** 2 for x in r) / (G - 1)) ** 0.5
        out += [(x - mean) / (std + eps) for x in r]
    return torch.tensor(out)


def token_logprobs(model, canvas):
    return F.log_softmax(model(canvas[None]).logits[0].float(), -1)


def plain_elbo(model, seq, t, noise, mask_id, eps):
    """mean over draws of 0.5 * (masked-set estimate + complement estimate), each sum_i log p(y_i) / level."""
    rows = []
    for b in range(len(seq)):
        total = 0.0
        for k in range(t.shape[1]):
            p = (1 - eps) * float(t[b, k]) + eps
            for masked, level in ((noise[b, k] < p, p), (~(noise[b, k] < p), max(1 - p, eps))):
                canvas = seq[b].clone()
                canvas[P:][masked] = mask_id
                lp = token_logprobs(model, canvas)
                est = sum(lp[P + i, seq[b, P + i]] for i in range(L) if masked[i]) / level
                total = total + 0.5 * est
        rows.append(total / t.shape[1])
    return torch.stack([torch.as_tensor(r) for r in rows])


def plain_trajectory(model, seq, commit, steps, weights, mask_id):
    rows = []
    for b in range(len(seq)):
        total = torch.zeros(())
        for s in steps[b].tolist():
            if s < 0:
                continue
            canvas = seq[b].clone()
            for i in range(L):
                if commit[b, i] >= s:
                    canvas[P + i] = mask_id  # not yet committed before step s
            lp = token_logprobs(model, canvas)
            total = total + sum(lp[P + i, seq[b, P + i]] for i in range(L) if commit[b, i] == s)
        rows.append(total * weights[b])
    return torch.stack(rows)


def plain_loss(logp, old, ref, adv, clip, beta):
    terms = []
    for lp, o, r, a in zip(logp, old, ref, adv, strict=True):
        ratio = torch.exp(lp - o.detach())
        surrogate = torch.min(ratio * a, torch.clamp(ratio, 1 - clip, 1 + clip) * a)
        kl = torch.exp(r - lp) - (r - lp) - 1
        terms.append(-surrogate + beta * kl)
    return sum(terms) / len(terms)


@pytest.mark.parametrize("likelihood", ["elbo", "trajectory"])
@pytest.mark.parametrize("inner", [1, 2])
def test_update_equals_direct_computation(policy_dir, tmp_path, likelihood, inner):
    clip, beta = 0.05, 0.3
    trainer = build(policy_dir, tmp_path, f"objective.likelihood={likelihood}", f"objective.inner_steps={inner}",
                    f"objective.clip_eps={clip}", f"objective.beta={beta}", "objective.trajectory_steps=2",
                    "reward.format_weight=0.5", "rollout.temperature=2.0")
    task, st, model = trainer.task, trainer.stages[0], trainer.modules.model
    perturb(task.ref, 0.05, 1)  # reference != policy, so the KL term and its gradient are tested
    batch = task.batch(0, st)
    if inner > 1:  # the update runs against the old policy's log-likelihoods: move the policy first
        perturb(model, 0.05, 2)
    seq, rewards = batch["sequences"], batch["reward"]
    mask_id = task.mask_id
    adv = plain_advantages(rewards, 4, 1e-4)
    assert torch.allclose(batch["advantages"], adv, atol=1e-5)

    model.zero_grad()
    out = task.loss(trainer.modules, batch, st)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    if likelihood == "elbo":
        def logp_of(m):
            return plain_elbo(m, seq, batch["t"], batch["noise"], mask_id, 1e-3)
    else:
        commit = batch["commit_step"]
        assert sorted(commit[0].tolist()) == list(range(L))  # one token a step
        steps, weights = batch["score_steps"], batch["step_weights"]
        assert torch.equal(weights, torch.full((len(seq),), L / 2))  # L steps with a commit, 2 scored

        def logp_of(m):
            return plain_trajectory(m, seq, commit, steps, weights, mask_id)
    logp = logp_of(model) / L
    with torch.no_grad():
        ref = logp_of(task.ref) / L
    old = batch["old_logp"] / L if inner > 1 else logp.detach()
    want = plain_loss(logp, old, ref, adv, clip, beta)
    want.backward()
    assert float(out.loss.detach()) == pytest.approx(float(want.detach()), rel=1e-4, abs=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, rtol=1e-3, atol=1e-6), n
    assert out.metrics["kl"] > 0
    if inner > 1:
        assert out.metrics["ratio"] != pytest.approx(1.0, abs=1e-4)
    else:
        assert out.metrics["ratio"] == pytest.approx(1.0) and out.metrics["clip_frac"] == 0.0
    assert out.metrics["reward"] == pytest.approx(float(rewards.mean()))


def test_rewarding_a_token_raises_its_probability(policy_dir, tmp_path):
    trainer = build(policy_dir, tmp_path, "reward.correct=contains", "reward.contains=7", "reward.format_weight=0",
                    "trainer.batch_size=32", "rollout.group_size=8", "optim.lr=1e-2", "objective.beta=0",
                    "trainer.max_steps=12", "trainer.eval_at_start=false", "eval.problems=2", "eval.batch_size=2")
    task, model = trainer.task, trainer.modules.model
    seven = task.tokenizer.convert_tokens_to_ids("7")

    @torch.no_grad()
    def prob_seven():
        canvas = torch.cat([task.eval_prompts, torch.full((len(task.eval_prompts), L), task.mask_id)], 1)
        return float(model(canvas).logits[:, P:].softmax(-1)[..., seven].mean())

    before = prob_seven()
    trainer.fit()
    assert prob_seven() > 2 * before


def test_exact_resume_in_the_middle_of_a_generation(policy_dir, tmp_path):
    """6 steps straight log the losses of 3 steps, then a resumed run of 3 more (in-process: the SIGKILL
    variant of tests/trainer_checks.py costs three interpreter starts). inner_steps=2: generations at steps
    0, 2 and 4, so the resumed step 3 needs the generation of step 2 from the checkpoint."""
    common = ["objective.inner_steps=2", "trainer.max_steps=6", "trainer.eval_at_start=false", "optim.lr=1e-2",
              "trainer.save_every=1", "eval.problems=2", "eval.batch_size=2", "reward.correct=contains",
              "reward.contains=7", "trainer.batch_size=16"]
    straight = build(policy_dir, tmp_path / "straight", *common).fit()
    first = build(policy_dir, tmp_path / "resumed", *common, "trainer.stop_at_step=3").fit()
    assert first.step == 3 and not first.completed
    resumed = build(policy_dir, tmp_path / "resumed", *common)
    assert resumed.start_step == 3 and resumed.task.rollout["step"] == 2
    second = resumed.fit()
    assert first.losses + second.losses == straight.losses
    assert len(set(straight.losses)) == 6  # the steps differ (the policy moves)
    assert logged_losses(tmp_path / "resumed") == logged_losses(tmp_path / "straight")


def test_choose_steps_is_uniform_and_unbiased():
    commit = torch.tensor([[0, 2, 2, 5]])  # steps 0, 2 and 5 committed tokens
    counts = torch.zeros(6)
    g = torch.Generator().manual_seed(0)
    for _ in range(600):
        steps, w = choose_steps(commit, 2, g)
        assert w.tolist() == [1.5] and len(set(steps[0].tolist())) == 2
        counts[steps[0]] += 1
    assert counts[[1, 3, 4]].sum() == 0
    assert torch.allclose(counts[[0, 2, 5]] / 1200, torch.full((3,), 1 / 3), atol=0.05)
    steps, w = choose_steps(commit, 8, g)  # fewer steps than asked: all of them, weight 1, -1 padding
    assert sorted(steps[0].tolist()) == [-1, -1, -1, 0, 2, 5] and w.tolist() == [1.0]


def test_rewards_and_advantages():
    tok = make_tokenizer()
    eos = tok.eos_token_id

    def ids(text, pad=3):
        x = tok(text, add_special_tokens=False)["input_ids"]
        return x + [eos] * (pad - len(x))

    assert is_well_formed(tok, ids("13"), "exact_match") and not is_well_formed(tok, ids("1+"), "exact_match")
    assert not is_well_formed(tok, ids("13", pad=2), "exact_match")  # no EOS
    assert not is_well_formed(tok, ids("1") + tok("2", add_special_tokens=False)["input_ids"], "exact_match")
    problems = countdown_dataset(50, (1, 2, 3), seed=3)
    assert all(is_solution(p.answer, p.question) for p in problems)
    assert not is_solution("4+5", "4 5 2?9") and is_solution("4+5", "5 4?9") and not is_solution("9", "9 0?9")
    from latent.data.arithmetic import make_dataset

    arith = make_dataset(2, (1,), seed=0)
    comp = torch.tensor([ids(arith[0].answer), ids("1+")])
    s = score_completions(tok, comp, arith, "exact_match", format_weight=0.25)
    assert s.correct.tolist() == [1.0, 0.0] and s.reward.tolist() == [1.25, 0.0]
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    assert torch.allclose(group_advantages(r, 4, "drgrpo"), torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    assert torch.allclose(group_advantages(r, 4, "grpo", 0.0)[:4], torch.tensor([1.5, -0.5, -0.5, -0.5]))
    assert torch.equal(group_advantages(r, 4, "grpo")[4:], torch.zeros(4))


def test_config_errors_name_the_key(policy_dir, tmp_path):
    with pytest.raises(ConfigError, match="model.init_from"):
        load_config(RECIPE, ["model.init_from=null"])
    with pytest.raises(ConfigError, match="rollout.group_size"):
        load_config(RECIPE, ["trainer.batch_size=12", "rollout.group_size=8"])
    with pytest.raises(ConfigError, match="rollout.temperature"):
        load_config(RECIPE, ["rollout.temperature=0"])
    with pytest.raises(ConfigError, match="model.hidden_size"):
        load_config(RECIPE, ["model.hidden_size=8"])
    with pytest.raises(ConfigError, match="data.question_length"):
        build(policy_dir, tmp_path, "data.question_length=9")

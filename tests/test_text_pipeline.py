"""TextDiffusionPipeline: equals the sampler it wraps, save/load round trip, diffusers' LLaDA2Pipeline
on the same backbone, tokenizer checks and bad input; the shared pipeline glue (pipelines.base): decoding
settings, tuple outputs, bad rows, callbacks that return tensors."""

import pytest
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from latent import DiffusionTransformer
from latent.losses import masked_diffusion_loss
from latent.sampling import generate
from latent.scheduler import MaskedDiffusionScheduler
from pipelines import TextDiffusionPipeline
from pipelines.base import resolve_decoding

WORDS = "the a cat dog sat on mat ran to house big small red blue and with".split()


def make_tokenizer(mask=True):
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS, "<mask>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = dict(pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    if mask:
        special["mask_token"] = "<mask>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def briefly_train(model, steps=40):
    """A few masked-diffusion steps on word salad: enough that the mask token is never the argmax
    (it is never a target), as in any trained model."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        ids = torch.randint(3, 3 + len(WORDS), (8, 16), generator=g)
        loss = masked_diffusion_loss(model, ids, model.config.mask_token_id, generator=g).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def make_pipe(layout="bidirectional", block_size=4, train=False, **sched):
    tok = make_tokenizer()
    torch.manual_seed(0)
    model = DiffusionTransformer(
        vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=4, mask_token_id=tok.mask_token_id,
        max_position_embeddings=64, attention_layout=layout, block_size=block_size,
    ).eval()
    if train:
        briefly_train(model)
    pipe = TextDiffusionPipeline(model=model, tokenizer=tok, scheduler=MaskedDiffusionScheduler(block_length=4, **sched))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_equals_sampler_with_left_padding():
    pipe = make_pipe()
    out = pipe(["the cat sat", "a dog"], gen_length=8, block_length=4, steps=8, output_type="ids")
    ids, mask = pipe.encode_prompt(["the cat sat", "a dog"])
    assert mask[1, 0] == 0  # left padded
    ref = generate(pipe.model, ids, mask, gen_length=8, block_length=4, steps=8)
    assert torch.equal(out.sequences, ref.sequences)
    assert out.sequences.shape == (2, 3 + 8)
    assert torch.equal(out.sequences[:, :3], ids)  # the canvas keeps the prompt, like LLaDA


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    pipe = make_pipe()
    runs = [pipe("the cat", gen_length=8, steps=8, temperature=1.0, generator=torch.Generator().manual_seed(s),
                 output_type="ids").sequences for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_threshold_uses_fewer_forwards_and_texts_are_decoded():
    pipe = make_pipe()
    slow = pipe("the cat", gen_length=8, steps=8)
    fast = pipe("the cat", gen_length=8, threshold=1e-9)  # tiny threshold: the whole block in one step
    assert slow.nfe == 8 and fast.nfe == 2
    assert isinstance(slow.texts[0], str)
    gen = slow.sequences[0, 2:].tolist()
    eos = pipe.tokenizer.eos_token_id
    want = pipe.tokenizer.decode(gen[: gen.index(eos)] if eos in gen else gen, skip_special_tokens=True)
    assert slow.texts[0] == want


def test_exact_cache_by_default_gives_same_tokens(tmp_path):
    pipe = make_pipe(layout="prefix")
    auto = pipe("the cat sat on", gen_length=8, steps=8, output_type="ids")
    none = pipe("the cat sat on", gen_length=8, steps=8, cache="none", output_type="ids")
    assert torch.equal(auto.sequences, none.sequences)


def test_callback_sees_every_step():
    pipe = make_pipe()
    seen = []
    pipe("the cat", gen_length=8, steps=8, callback_on_step_end=lambda p, s, b, kw: seen.append((s, b, kw["sequences"].clone())))
    assert [s for s, _, _ in seen] == list(range(8))
    assert [b for _, b, _ in seen] == [0] * 4 + [1] * 4
    masks = [int((c == pipe.tokenizer.mask_token_id).sum()) for _, _, c in seen]
    assert masks == sorted(masks, reverse=True) and masks[-1] == 0


def test_callback_timestep_is_each_rows_block_with_independent_rows():
    pipe = make_pipe(train=True)
    prompts = ["the cat sat", "a dog"]
    seen, raw = [], []
    out = pipe(prompts, gen_length=8, threshold=0.9, row_blocks="independent", output_type="ids",
               callback_on_step_end_tensor_inputs=["x0"], callback_on_step_end=lambda p, s, b, kw: seen.append((b.clone(), kw["x0"].shape[0])))
    ids, mask = pipe.encode_prompt(prompts)
    ref = generate(pipe.model, ids, mask, gen_length=8, block_length=4, commit="threshold", threshold=0.9,
                   row_blocks="independent", callback_on_step_end=lambda s, c, info: raw.append(info["block"].clone()))
    assert torch.equal(out.sequences, ref.sequences)
    assert len(seen) == len(raw) > 0
    for (block, rows), want in zip(seen, raw, strict=True):
        assert block.dtype == torch.long and torch.equal(block, want)  # one block index per row still decoding
        assert rows == block.numel()  # the per-row tensors cover the same rows

def test_save_load_round_trip(tmp_path):
    pipe = make_pipe(layout="block_causal", commit="threshold", threshold=0.5)
    pipe.save_pretrained(tmp_path)
    index = (tmp_path / "model_index.json").read_text()
    assert '"latent.backbone"' in index and "MaskedDiffusionScheduler" in index
    loaded = TextDiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.scheduler.config.commit == "threshold"
    a = pipe("the big dog", gen_length=8, output_type="ids").sequences
    b = loaded("the big dog", gen_length=8, output_type="ids").sequences
    assert torch.equal(a, b)


def test_tokenizer_without_mask_token_is_refused():
    with pytest.raises(ValueError, match="mask token"):
        TextDiffusionPipeline(model=make_pipe().model, tokenizer=make_tokenizer(mask=False),
                              scheduler=MaskedDiffusionScheduler())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt="the cat", gen_length=10, block_length=4), "gen_length"),
        (dict(prompt="the cat", gen_length=8, block_length=4, steps=3), "steps"),
        (dict(prompt=""), "empty"),
        (dict(prompt="the cat", gen_length=80), "max_position_embeddings"),
        (dict(input_ids=torch.zeros(1, 3)), "input_ids"),
        (dict(prompt="the", output_type="pil"), "output_type"),
        (dict(), "exactly one"),
        (dict(prompt="the", remasking="loudest"), "Known confidence"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_pipe()(**kwargs)


def test_llada2_pipeline_runs_our_backbone_with_equal_tokens():
    """diffusers' LLaDA2Pipeline + BlockRefinementScheduler drive the backbone unchanged; with matching
    settings (block_causal model, prompt of one block, pure top-k schedule, no editing, argmax) they
    give our pipeline's tokens."""
    from diffusers import BlockRefinementScheduler, LLaDA2Pipeline

    ours = make_pipe(layout="block_causal", block_size=4, train=True)
    prompt = "the cat sat on"  # 4 tokens = one block
    ids, _ = ours.encode_prompt(prompt)
    assert ids.shape[1] == 4
    theirs = LLaDA2Pipeline(model=ours.model, scheduler=BlockRefinementScheduler(block_length=4), tokenizer=ours.tokenizer)
    theirs.set_progress_bar_config(disable=True)
    ref = theirs(input_ids=ids, gen_length=12, block_length=4, num_inference_steps=2, threshold=2.0,
                 editing_threshold=None, eos_early_stop=False, temperature=0.0, output_type="seq",
                 use_chat_template=False)
    out = ours(input_ids=ids, gen_length=12, block_length=4, steps=6, output_type="ids")
    assert torch.equal(out.sequences[:, 4:], ref.sequences)
    assert not (ref.sequences == ours.tokenizer.mask_token_id).any()


# ---- the shared glue (pipelines.base) --------------------------------------------------------------
def test_decoding_settings_rule():
    sched = MaskedDiffusionScheduler(block_length=8)
    bidir, causal = make_pipe().model, make_pipe(layout="block_causal", block_size=4).model
    assert resolve_decoding(bidir, sched, 24)["block_length"] == 8
    assert resolve_decoding(bidir, sched, 12)["block_length"] == 6  # the largest divisor up to 8
    assert resolve_decoding(bidir, sched, 5)["block_length"] == 5
    assert resolve_decoding(causal, sched, 24)["block_length"] == 4  # the model's block_size
    assert resolve_decoding(bidir, sched, 24, block_length=12)["block_length"] == 12
    assert resolve_decoding(bidir, sched, 8)["commit"] is None  # the scheduler's rule
    assert resolve_decoding(bidir, sched, 8, steps=8)["commit"] == "schedule"
    assert resolve_decoding(bidir, sched, 8, steps=8, threshold=0.5)["commit"] == "threshold"
    assert resolve_decoding(bidir, sched, 8, factor=1.0)["commit"] == "factor"
    assert resolve_decoding(bidir, sched, 8, steps=8, commit="factor")["commit"] == "factor"


def test_steps_select_the_schedule_rule_over_a_threshold_scheduler():
    pipe = make_pipe(commit="threshold", threshold=1e-9)  # the scheduler's rule: everything in one step
    assert pipe("the cat", gen_length=8).nfe == 2
    assert pipe("the cat", gen_length=8, steps=8).nfe == 8  # asking for steps means the LLaDA schedule


def test_return_dict_false_is_the_output_fields_in_order():
    pipe = make_pipe()
    out = pipe(["the cat", "a dog"], gen_length=8, steps=8)
    texts, sequences, errors, nfe = pipe(["the cat", "a dog"], gen_length=8, steps=8, return_dict=False)
    assert texts == out.texts and torch.equal(sequences, out.sequences) and errors == [None, None] and nfe == 8
    ids_only = pipe("the cat", gen_length=8, steps=8, output_type="ids", return_dict=False)
    assert len(ids_only) == 4 and ids_only[0] is None and ids_only[1].shape == (1, 10)  # positions never shift


def test_empty_prompt_rows_raise_or_are_recorded():
    pipe = make_pipe()
    with pytest.raises(ValueError, match="`prompt` 1 is an empty string"):
        pipe(["the cat", " ", "a dog"], gen_length=8, steps=8)
    out = pipe(["the cat", " ", "a dog"], gen_length=8, steps=8, on_error="record")
    assert out.texts[1] is None and "empty" in out.errors[1] and out.errors[0] is None and out.errors[2] is None
    alone = pipe(["the cat", "a dog"], gen_length=8, steps=8)
    assert [out.texts[0], out.texts[2]] == alone.texts
    assert (out.sequences[1] == pipe.tokenizer.pad_token_id).all()
    with pytest.raises(ValueError, match="on_error"):
        pipe("the cat", on_error="ignore")


def unused_token(pipe, seq):
    """A word the pipeline did not write in `seq`, so that forcing it is visible."""
    return next(i for i in pipe.tokenizer.convert_tokens_to_ids(WORDS) if i not in seq.tolist())


def test_callback_returning_sequences_changes_the_output():
    pipe = make_pipe(train=True)
    plain = pipe("the cat", gen_length=8, steps=8, output_type="ids").sequences
    forced = unused_token(pipe, plain[0])

    def force(p, step, block, kw):
        if step == 0:  # fill block 1 (canvas positions 6..9) before it is decoded
            seq = kw["sequences"].clone()
            seq[:, 6:] = forced
            return {"sequences": seq}
        return None

    seen = []
    out = pipe("the cat", gen_length=8, steps=8, output_type="ids",
               callback_on_step_end=lambda p, s, b, kw: seen.append(kw["sequences"].clone()) or force(p, s, b, kw))
    assert (out.sequences[0, 6:] == forced).all()
    assert (seen[1][0, 6:] == forced).all()  # the next step already decodes the returned canvas
    assert out.nfe == 8  # the schedule still runs its forwards; block 1 has nothing left to commit
    with pytest.raises(ValueError, match="callback_on_step_end returned sequences"):
        pipe("the cat", gen_length=8, steps=8, callback_on_step_end=lambda p, s, b, kw: {"sequences": kw["sequences"][:, :3]})


class ForceLast(PipelineCallback):
    """Writes `token` at the last canvas position after every step."""

    tensor_inputs = ["sequences", "transfer"]
    token = None

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        assert set(callback_kwargs) == {"sequences", "transfer"}  # its own tensor_inputs, not the argument's
        seq = callback_kwargs["sequences"].clone()
        seq[:, -1] = self.token
        callback_kwargs["sequences"] = seq
        return callback_kwargs


def test_pipeline_callback_objects_are_accepted():
    pipe = make_pipe(train=True)
    plain = pipe("the cat", gen_length=8, steps=8, output_type="ids").sequences
    ForceLast.token = forced = unused_token(pipe, plain[0])
    out = pipe("the cat", gen_length=8, steps=8, output_type="ids", callback_on_step_end=ForceLast(),
               callback_on_step_end_tensor_inputs=["x0"])
    assert out.sequences[0, -1] == forced
    both = pipe("the cat", gen_length=8, steps=8, output_type="ids",
                callback_on_step_end=MultiPipelineCallbacks([ForceLast(), ForceLast()]))
    assert both.sequences[0, -1] == forced
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe("the cat", gen_length=8, callback_on_step_end_tensor_inputs=["logits"])

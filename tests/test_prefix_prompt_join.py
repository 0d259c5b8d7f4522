"""The prompt after an adapter prefix: joined to it with no padding between (decoding and training alike)."""

import numpy as np
import pytest
import torch

from latent import DiffusionTransformer
from latent.scheduler import MaskedDiffusionScheduler
from modalities.audio import AudioAdapter
from modalities.data import speech
from pipelines.base import encode_prompts, join_prompt
from pipelines.spoken_qa import SpokenQAPipeline

SR = 16000
INSTRUCTIONS = [None, "table: anna red four. bob blue two.", "table: cid green one."]


def tone(seconds, freq=330.0, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from latent.data.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    lines = ["transcribe: answer:"] + [f"{e.instruction} {e.transcript} answer: {e.answer}"
                                       for e in speech.make_split("train", 120)]
    (d / "t.txt").write_text("\n".join(lines))
    tok = train_tokenizer(str(d / "t.txt"), d / "tok", vocab_size=330, min_frequency=1)
    torch.manual_seed(0)
    model = DiffusionTransformer(vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=4,
                                 mask_token_id=tok.mask_token_id, max_position_embeddings=128,
                                 attention_layout="prefix").eval()
    adapter = AudioAdapter(hidden_size=32, encoder_dim=32, encoder_layers=1, encoder_heads=2, n_mels=16,
                           acoustic_queries=2, acoustic_heads=2, max_seconds=2.0).eval()
    p = SpokenQAPipeline(adapter, model, tok, MaskedDiffusionScheduler(block_length=4, threshold=0.9),
                         gen_length=4, transcribe_length=8)
    p.set_progress_bar_config(disable=True)
    return p


def test_join_prompt_against_rows_put_together_by_hand():
    torch.manual_seed(0)
    embed = torch.nn.Embedding(11, 4)
    prefix = torch.randn(3, 5, 4)
    pmask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]]).bool()
    ids = torch.tensor([[0, 0, 3, 4], [0, 5, 6, 7], [8, 9, 10, 1]])
    amask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]])
    embeds, mask = join_prompt(embed, prefix, pmask, ids, amask)
    assert embeds.shape == (3, 9, 4) and mask.dtype == torch.long
    for b in range(3):
        want = torch.cat([prefix[b][pmask[b]], embed(ids[b][amask[b].bool()])])
        n = len(want)
        assert torch.allclose(embeds[b, 9 - n :], want) and not embeds[b, : 9 - n].any()
        assert mask[b].tolist() == [0] * (9 - n) + [1] * n


def first_step_confidence(pipe, clips, instructions):
    seen = []

    def keep(p, step, block, kw):
        if step == 0:
            seen.append(kw["confidence"].clone())

    pipe(audio=clips, instruction=instructions, callback_on_step_end=keep,
         callback_on_step_end_tensor_inputs=["confidence"], cache="none")
    return seen[0]


def test_a_clip_reads_the_same_beside_longer_prompts(pipe):
    """A row's probabilities do not depend on how long the other rows' prompts are; with the prompt kept apart
    from the prefix (its padding between them) they do."""
    clips = [tone(0.5, seed=1), tone(1.2, 500, seed=2), tone(0.8, 420, seed=3)]
    batch = first_step_confidence(pipe, clips, INSTRUCTIONS)
    for i, clip in enumerate(clips):
        alone = first_step_confidence(pipe, [clip], [INSTRUCTIONS[i]])
        assert torch.allclose(batch[i], alone[0], atol=1e-5), i
    # the layout this replaces: [prefix | left-padded prompt], a gap in the shorter prompts' rows
    prefix, pmask = pipe.encode_prefix(pipe.audio_adapter, pipe.audio_adapter.preprocess(clips))
    ids, amask = pipe.encode_prompt([pipe.prompt_text("answer", s) for s in INSTRUCTIONS])
    canvas = torch.cat([ids, torch.full((3, 4), pipe.tokenizer.mask_token_id)], 1)
    gap = pipe.model(canvas, prefix_embeds=prefix, attention_mask=torch.cat([pmask, amask, torch.ones(3, 4).long()], 1))
    probs = gap.logits[0, -4:].softmax(-1).max(-1).values
    assert not torch.allclose(probs, batch[0], atol=1e-3)


def test_training_loss_uses_the_decoding_layout(pipe):
    """The loss of a batch whose rows have prompts of different lengths is the mean of the rows' losses alone
    (each row's loss is normalised by its own target length), so no row sees another's padding."""
    from pipelines.tasks.spoken_qa import sequence_loss

    tok, a = pipe.tokenizer, pipe.audio_adapter
    clips = [tone(0.5, seed=4), tone(1.0, 600, seed=5), tone(0.7, 380, seed=6)]
    targets = torch.tensor([[5, 6, tok.eos_token_id, tok.eos_token_id]] * 3)
    t = torch.tensor([0.3, 0.6, 0.9])
    g = torch.Generator().manual_seed(0)
    prompts = [pipe.prompt_text("answer", s) for s in INSTRUCTIONS]
    ids, amask = encode_prompts(tok, prompts)
    noise = torch.rand(3, ids.shape[1] + 4, generator=g)
    both = sequence_loss(pipe.model, a, a.preprocess(clips), ids, amask, targets, tok.mask_token_id, t=t,
                         noise=noise).sft.loss
    alone = []
    for i in range(3):
        ids_i, mask_i = encode_prompts(tok, [prompts[i]])
        noise_i = torch.cat([torch.zeros(1, ids_i.shape[1]), noise[i : i + 1, ids.shape[1] :]], 1)
        alone.append(sequence_loss(pipe.model, a, a.preprocess(clips[i]), ids_i, mask_i, targets[i : i + 1],
                                   tok.mask_token_id, t=t[i : i + 1], noise=noise_i).sft.loss)
    assert torch.allclose(both, torch.stack(alone).mean(), atol=1e-5)

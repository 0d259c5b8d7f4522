"""The offline English corpus, the BPE tokenizer and the packed streaming datasets."""

import json

import pytest
import torch

from latent.data.corpus import build_corpus, missing_sources
from latent.data.stream import LineReader, PackedTextStream, SFTStream, load_sequences
from latent.data.tokenizer import load_tokenizer, train_tokenizer

pytestmark = pytest.mark.skipif(
    bool(missing_sources()), reason=f"corpus packages missing: {missing_sources()} (.ci/run installs them)"
)


def small_corpus(tmp_path_factory):
    """Built once per session (build_corpus reuses a folder built with the same arguments)."""
    out = tmp_path_factory.getbasetemp() / "english-300"
    build_corpus(out, max_docs=300, progress=False)
    return out


def small_tokenizer(tmp_path_factory):
    corpus = small_corpus(tmp_path_factory)
    out = tmp_path_factory.getbasetemp() / "tok-384"
    if not (out / "tokenizer.json").exists():
        train_tokenizer([corpus / "train.jsonl"], out, vocab_size=384)
    return load_tokenizer(out)


def test_corpus_is_deterministic_split_and_mixed(tmp_path_factory, tmp_path):
    a = small_corpus(tmp_path_factory)
    meta_b = build_corpus(tmp_path / "b", max_docs=300, progress=False)
    meta_a = json.loads((a / "meta.json").read_text())
    assert meta_a["files"] == meta_b["files"]  # same rows and sha256
    train = [json.loads(x) for x in (a / "train.jsonl").read_text().splitlines()]
    valid = [json.loads(x) for x in (a / "valid.jsonl").read_text().splitlines()]
    assert {d["source"] for d in train} == {"wordnet", "fortunes", "gcide"}
    assert not {d["text"] for d in train} & {d["text"] for d in valid}
    assert len(valid) > 0 and len(train) > 20 * len(valid) / 2
    gcide = [d["text"] for d in train if d["source"] == "gcide"]
    assert not any("[1913 Webster]" in t or "{" in t for t in gcide)
    pairs = [json.loads(x) for x in (a / "sft_train.jsonl").read_text().splitlines()]
    assert pairs and all(p["prompt"].startswith("What does") and p["answer"] for p in pairs)


def test_tokenizer_special_tokens_roundtrip_and_determinism(tmp_path_factory, tmp_path):
    tok = small_tokenizer(tmp_path_factory)
    assert len(tok) == 384
    assert {tok.pad_token, tok.eos_token, tok.mask_token} == {"<|pad|>", "<|eos|>", "<|mask|>"}
    text = "A quarter of the city, after the conquest."
    assert tok.decode(tok(text)["input_ids"]) == text
    # same corpus, same settings -> same tokenizer.json; loading the file alone works too
    corpus = small_corpus(tmp_path_factory)
    train_tokenizer([corpus / "train.jsonl"], tmp_path / "again", vocab_size=384)
    base = tmp_path_factory.getbasetemp() / "tok-384"
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    file_tok = load_tokenizer(base / "tokenizer.json")
    assert file_tok.mask_token_id == tok.mask_token_id and file_tok(text)["input_ids"] == tok(text)["input_ids"]
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nope")


def test_packing_matches_documents_plus_eos(tmp_path_factory, tmp_path):
    tok = small_tokenizer(tmp_path_factory)
    docs = ["first document here", "second one", "", "third document is a bit longer than the others"]
    f = tmp_path / "d.txt"
    f.write_text("\n".join(docs) + "\n")
    flat = []
    for d in docs:
        if d:
            flat += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = 5
    stream = PackedTextStream([f], tok, n, chunk_lines=2)
    got = stream.next_sequences(len(flat) // n)
    assert got.view(-1).tolist() == flat[: (len(flat) // n) * n]
    # looping: the next sequences continue into the second epoch
    assert stream.next_sequences(3).shape == (3, n) and stream.reader.epoch >= 1


def test_stream_state_resumes_exactly(tmp_path_factory):
    tok = small_tokenizer(tmp_path_factory)
    files = [small_corpus(tmp_path_factory) / "train.jsonl"]
    a = PackedTextStream(files, tok, 32, chunk_lines=7)
    a.next_sequences(5)
    state = a.state_dict()
    want = a.next_sequences(9)
    b = PackedTextStream(files, tok, 32, chunk_lines=7)
    b.load_state_dict(state)
    assert torch.equal(b.next_sequences(9), want)
    # SFT rows: prompt + answer + EOS padding, prompt lengths, exact resume
    sft = [small_corpus(tmp_path_factory) / "sft_train.jsonl"]
    s = SFTStream(sft, tok, 48)
    ids, plens = s.next_batch(4)
    assert ids.shape == (4, 48) and bool((plens > 0).all())
    first = json.loads((small_corpus(tmp_path_factory) / "sft_train.jsonl").read_text().splitlines()[0])
    p = tok(first["prompt"] + "\n", add_special_tokens=False)["input_ids"]
    a = tok(first["answer"], add_special_tokens=False)["input_ids"]
    want = (p + a + [tok.eos_token_id] * 48)[:48]  # answer padded with EOS to the full length
    assert ids[0].tolist() == want and int(plens[0]) == len(p)
    st = s.state_dict()
    nxt = s.next_batch(3)
    s2 = SFTStream(sft, tok, 48)
    s2.load_state_dict(st)
    again = s2.next_batch(3)
    assert torch.equal(again[0], nxt[0]) and torch.equal(again[1], nxt[1])


def test_bad_data_errors(tmp_path_factory, tmp_path):
    tok = small_tokenizer(tmp_path_factory)
    with pytest.raises(FileNotFoundError, match="not found"):
        PackedTextStream([tmp_path / "missing.jsonl"], tok, 8)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        PackedTextStream([empty], tok, 8).next_sequences(1)
    with pytest.raises(ValueError, match="empty"):
        LineReader([empty]).next_line()
    short = tmp_path / "short.txt"
    short.write_text("hi\n")
    with pytest.raises(ValueError, match="fewer than"):
        load_sequences([short], tok, 64, 4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="'text' field"):
        PackedTextStream([bad], tok, 8).next_sequences(1)
    with pytest.raises(ValueError, match=r"\.txt or \.jsonl"):
        PackedTextStream([_touch(tmp_path / "x.csv")], tok, 8)


def _touch(p):
    p.write_text("a\n")
    return p

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_config():
    """A backbone small enough that a forward takes milliseconds on one CPU core."""
    return dict(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
        mask_token_id=63, max_position_embeddings=128, block_size=4,
    )


@pytest.fixture(scope="session")
def caption_tokenizer(tmp_path_factory):
    """A byte-level BPE trained on the scene captions (ASCII: any other character is spelled in byte tokens)."""
    from latent.data.tokenizer import train_tokenizer
    from modalities.data.scenes import make_split

    d = tmp_path_factory.mktemp("tok")
    (d / "caps.txt").write_text("\n".join(s.caption for s in make_split("train", 200)))
    return train_tokenizer(str(d / "caps.txt"), d / "tok", vocab_size=400, min_frequency=1)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, above all on a shared, busy CPU (use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The offline English corpus (300 documents) and its 320-token byte-level BPE in ``tok-320``."""
    from latent.data.corpus import build_corpus
    from latent.data.tokenizer import train_tokenizer

    out = tmp_path_factory.getbasetemp() / "english-300"
    build_corpus(out, max_docs=300, progress=False)
    tok = out / "tok-320"
    if not (tok / "tokenizer.json").exists():
        train_tokenizer([out / "train.jsonl"], tok, vocab_size=320)
    return out

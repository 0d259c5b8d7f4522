"""Tokenizers: train a byte-level BPE on a local corpus with HF ``tokenizers``, or load any local HF one.

The trained tokenizer has three special tokens -- ``<|pad|>``, ``<|eos|>`` and ``<|mask|>`` (the
absorbing state of masked diffusion) -- and is saved as ``tokenizer.json`` plus the
``tokenizer_config.json`` of a ``PreTrainedTokenizerFast``, so ``AutoTokenizer.from_pretrained(dir)``
and pipelines load it. Any local HF tokenizer folder works instead; missing mask/pad/eos tokens are
added (the model's vocabulary is ``len(tokenizer)``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from latent.data.stream import check_files, iter_documents

__all__ = ["SPECIAL_TOKENS", "train_tokenizer", "load_tokenizer", "ensure_special_tokens"]

SPECIAL_TOKENS = {"pad_token": "<|pad|>", "eos_token": "<|eos|>", "mask_token": "<|mask|>"}


def ensure_special_tokens(tok):
    """Add pad/eos/mask tokens a tokenizer lacks (pad falls back to eos when eos exists)."""
    added = {}
    if tok.eos_token is None:
        added["eos_token"] = SPECIAL_TOKENS["eos_token"]
    if tok.mask_token is None:
        added["mask_token"] = SPECIAL_TOKENS["mask_token"]
    if added:
        tok.add_special_tokens(added)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def train_tokenizer(files, out_dir, vocab_size: int = 4096, text_key: str = "text",
                    max_chars: int | None = 20_000_000, min_frequency: int = 2, progress: bool = False):
    """Train a byte-level BPE on the documents of ``files`` (at most ``max_chars`` characters) and save
    it in ``out_dir``. Returns the ``PreTrainedTokenizerFast``. Deterministic for the same input."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = check_files(files, "tokenizer training")
    specials = list(SPECIAL_TOKENS.values())
    if vocab_size < 256 + len(specials) + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE (needs > 259)")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    docs = iter_documents(files, text_key=text_key, max_chars=max_chars)
    tk.train_from_iterator(docs, trainer=trainer)
    if tk.get_vocab_size() == len(specials) + 256:
        raise ValueError(f"the tokenizer corpus {', '.join(map(str, files))} is empty")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, **SPECIAL_TOKENS)
    tok.save_pretrained(str(out))
    (out / "training_args.json").write_text(
        json.dumps({"files": [str(f) for f in files], "vocab_size": vocab_size, "max_chars": max_chars,
                    "min_frequency": min_frequency, "text_key": text_key}, indent=2)
    )
    return tok


def load_tokenizer(path):
    """Load ``tokenizer.json`` (a file) or a local HF tokenizer folder, never from the hub."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(os.fspath(path))
    if p.is_file():
        if p.suffix != ".json":
            raise ValueError(f"{p} is not a tokenizer.json file or a tokenizer folder")
        tok = PreTrainedTokenizerFast(tokenizer_file=str(p))
        vocab = tok.get_vocab()
        for attr, text in SPECIAL_TOKENS.items():
            if text in vocab:
                setattr(tok, attr, text)
    elif p.is_dir():
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    else:
        raise FileNotFoundError(f"tokenizer not found: {p} (give a tokenizer.json file or a tokenizer folder)")
    return ensure_special_tokens(tok)

"""Streaming text datasets over local files, packed into fixed-length sequences, with exact resume.

Files are ``.txt`` (every non-empty line is a document) or ``.jsonl`` (every line a JSON object whose
``text_key`` field is a document). Documents are tokenized in chunks, each followed by EOS, and the
token stream is cut into sequences of ``seq_len`` tokens (packing: a document may span sequences).
The stream loops over the files (epochs) in order; a shuffled corpus (as written by
:mod:`latent.data.corpus`) needs no run-time shuffling.

``state_dict()`` holds the epoch, the file, the byte offset of the next unread line and the leftover
tokens of the last chunk, so a stream restored with ``load_state_dict`` yields exactly the sequences
the original would have yielded next.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

__all__ = ["LineReader", "PackedTextStream", "SFTStream", "load_sequences", "iter_documents", "check_files"]

SUFFIXES = (".txt", ".jsonl", ".json")


def check_files(files, what: str = "data") -> list[Path]:
    """Resolve a list of files (or one path) and fail clearly when one is missing or of unknown type."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    files = [Path(f) for f in (files or [])]
    if not files:
        raise ValueError(f"no {what} files were given")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{what} file(s) not found: {', '.join(missing)}")
    bad = [str(f) for f in files if f.suffix not in SUFFIXES]
    if bad:
        raise ValueError(f"{what} files must be .txt or .jsonl, got: {', '.join(bad)}")
    return files


class LineReader:
    """Reads non-empty lines of several files in order, looping forever, positioned by byte offsets."""

    def __init__(self, files, loop: bool = True, what: str = "data"):
        self.files = check_files(files, what)
        self.loop = loop
        self.what = what
        self.epoch, self.file_index, self.offset = 0, 0, 0
        self._fh = None
        self._lines_this_pass = 0

    def _open(self):
        if self._fh is None:
            self._fh = open(self.files[self.file_index], "rb")
            self._fh.seek(self.offset)
        return self._fh

    def close(self):
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def next_line(self) -> tuple[str, Path, int] | None:
        """The next non-empty line (decoded, stripped), its file and byte offset; None when a
        non-looping reader is exhausted. Raises ValueError when a full pass finds no line at all."""
        while True:
            fh = self._open()
            start = fh.tell()
            raw = fh.readline()
            if raw:
                self.offset = fh.tell()
                text = raw.decode("utf-8", errors="replace").strip()
                if text:
                    self._lines_this_pass += 1
                    return text, self.files[self.file_index], start
                continue
            # end of this file
            self.close()
            self.file_index += 1
            self.offset = 0
            if self.file_index == len(self.files):
                if self._lines_this_pass == 0:
                    raise ValueError(
                        f"the {self.what} corpus is empty: no non-empty line in {', '.join(map(str, self.files))}"
                    )
                if not self.loop:
                    self.file_index -= 1
                    self.offset = self.files[self.file_index].stat().st_size
                    return None
                self.file_index = 0
                self.epoch += 1
                self._lines_this_pass = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "file_index": self.file_index, "offset": self.offset,
                "files": [str(f) for f in self.files]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["files"]) != len(self.files):
            raise ValueError(
                f"the checkpoint's data position is for {len(state['files'])} file(s), this run has {len(self.files)}"
            )
        self.close()
        self.epoch, self.file_index, self.offset = state["epoch"], state["file_index"], state["offset"]
        self._lines_this_pass = 1  # the saved position was reached by reading lines


def _text_of(line: str, path: Path, offset: int, text_key: str) -> str:
    if path.suffix == ".txt":
        return line
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} at byte {offset}: not a JSON line ({err})") from None
    if not isinstance(obj, dict) or text_key not in obj:
        raise ValueError(f"{path} at byte {offset}: a JSON object with a {text_key!r} field was expected")
    return str(obj[text_key])


def iter_documents(files, text_key: str = "text", max_chars: int | None = None):
    """Yield the documents of the files once, in order (for tokenizer training)."""
    reader = LineReader(files, loop=False)
    total = 0
    while (item := reader.next_line()) is not None:
        doc = _text_of(*item, text_key)
        yield doc
        total += len(doc)
        if max_chars is not None and total >= max_chars:
            break
    reader.close()


class PackedTextStream:
    """Packed fixed-length token sequences from local text files. See the module docstring."""

    def __init__(self, files, tokenizer, seq_len: int, text_key: str = "text", add_eos: bool = True,
                 loop: bool = True, chunk_lines: int = 256, what: str = "training"):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.reader = LineReader(files, loop=loop, what=what)
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.text_key = text_key
        self.eos = tokenizer.eos_token_id if add_eos else None
        if add_eos and self.eos is None:
            raise ValueError("the tokenizer has no eos_token; set one or use add_eos=False")
        self.chunk_lines = chunk_lines
        self.buffer: list[int] = []
        self._pos = 0  # consumed prefix of buffer

    def _fill(self) -> bool:
        texts = []
        while len(texts) < self.chunk_lines:
            item = self.reader.next_line()
            if item is None:
                break
            texts.append(_text_of(*item, self.text_key))
        if not texts:
            return False
        for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]:
            self.buffer.extend(ids)
            if self.eos is not None:
                self.buffer.append(self.eos)
        return True

    def next_sequences(self, n: int) -> torch.Tensor:
        """``[n, seq_len]`` int64. A non-looping stream may return fewer rows at its end."""
        need = n * self.seq_len
        while len(self.buffer) - self._pos < need:
            if not self._fill():
                break
        k = min(n, (len(self.buffer) - self._pos) // self.seq_len)
        out = torch.tensor(self.buffer[self._pos : self._pos + k * self.seq_len], dtype=torch.long)
        self._pos += k * self.seq_len
        if self._pos > 1 << 16:
            self.buffer = self.buffer[self._pos :]
            self._pos = 0
        return out.view(k, self.seq_len)

    def state_dict(self) -> dict:
        return {"reader": self.reader.state_dict(), "buffer": torch.tensor(self.buffer[self._pos :], dtype=torch.long)}

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state["reader"])
        self.buffer = [int(x) for x in state["buffer"].tolist()]
        self._pos = 0

    def close(self):
        self.reader.close()


def load_sequences(files, tokenizer, seq_len: int, max_sequences: int, text_key: str = "text",
                   what: str = "validation") -> torch.Tensor:
    """The first ``max_sequences`` packed sequences of the files (a fixed evaluation set)."""
    stream = PackedTextStream(files, tokenizer, seq_len, text_key=text_key, loop=False, what=what)
    seqs = stream.next_sequences(max_sequences)
    stream.close()
    if len(seqs) == 0:
        raise ValueError(f"the {what} corpus holds fewer than seq_len={seq_len} tokens; nothing to evaluate on")
    return seqs


class SFTStream:
    """Prompt/answer pairs from ``.jsonl`` files, one example per row (no packing).

    Row = ``tokens(prompt + separator) + tokens(answer) + EOS``, truncated to ``seq_len`` (the answer
    is cut, an example whose prompt fills the row is skipped) and padded with EOS to ``seq_len``, as in
    LLaDA's SFT, so the model learns to end answers. Returns ids ``[n, seq_len]`` and the prompt
    lengths ``[n]``; state is the reader's position.
    """

    def __init__(self, files, tokenizer, seq_len: int, prompt_key: str = "prompt", answer_key: str = "answer",
                 separator: str = "\n", loop: bool = True, what: str = "training"):
        self.reader = LineReader(files, loop=loop, what=what)
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.prompt_key, self.answer_key, self.separator = prompt_key, answer_key, separator
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise ValueError("SFT needs a tokenizer with an eos_token to pad answers")

    def _example(self, line: str, path: Path, offset: int):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} at byte {offset}: not a JSON line ({err})") from None
        for key in (self.prompt_key, self.answer_key):
            if not isinstance(obj, dict) or key not in obj:
                raise ValueError(f"{path} at byte {offset}: a JSON object with a {key!r} field was expected")
        p = self.tokenizer(str(obj[self.prompt_key]) + self.separator, add_special_tokens=False)["input_ids"]
        a = self.tokenizer(str(obj[self.answer_key]), add_special_tokens=False)["input_ids"] + [self.eos]
        if len(p) >= self.seq_len:
            return None
        ids = (p + a)[: self.seq_len]
        ids += [self.eos] * (self.seq_len - len(ids))
        return ids, len(p)

    def next_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, plens = [], []
        while len(rows) < n:
            item = self.reader.next_line()
            if item is None:
                break
            ex = self._example(*item)
            if ex is not None:
                rows.append(ex[0])
                plens.append(ex[1])
        return (torch.tensor(rows, dtype=torch.long).view(-1, self.seq_len), torch.tensor(plens, dtype=torch.long))

    def state_dict(self) -> dict:
        return {"reader": self.reader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state["reader"])

    def close(self):
        self.reader.close()

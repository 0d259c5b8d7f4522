"""A real English corpus that installs offline, from three Debian packages.

- ``wordnet-base``: WordNet 3.0 synsets -- ``word (pos): gloss; "example sentence"``.
- ``fortunes``: quotations and short prose from fortune(6), one document per fortune.
- ``dict-gcide``: the GNU Collaborative International Dictionary of English (Webster 1913), one
  document per entry, with pronunciation marks, cross-reference braces and source tags removed.

``build_corpus(out_dir)`` writes ``train.jsonl`` and ``valid.jsonl`` (one ``{"text", "source"}``
object per line) plus ``sft_train.jsonl`` / ``sft_valid.jsonl`` (``{"prompt", "answer"}`` pairs made
from WordNet: "What does "X" mean?" -> its gloss) and ``meta.json``. The split is by a hash of each
document's text, so it does not depend on the order of sources or on ``max_docs``; the training file
is then shuffled with a fixed seed. Same packages, same arguments -> byte-identical files.

Command line::

    python -m latent.data.corpus --out data/english            # full corpus (~55 MB of text)
    python -m latent.data.corpus --out /tmp/c --max-docs 500   # a small one for tests

Install the sources with ``apt-get install -y wordnet-base fortunes dict-gcide``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path

WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
GCIDE_DICT = Path("/usr/share/dictd/gcide.dict.dz")
GCIDE_INDEX = Path("/usr/share/dictd/gcide.index")

SOURCES = ("wordnet", "fortunes", "gcide")
APT_PACKAGES = {"wordnet": "wordnet-base", "fortunes": "fortunes", "gcide": "dict-gcide"}
_POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
# fortune files that are pictures rather than prose
_FORTUNE_SKIP = {"art", "ascii-art"}

__all__ = ["build_corpus", "missing_sources", "iter_wordnet", "iter_fortunes", "iter_gcide", "APT_PACKAGES"]


class CorpusSourceError(FileNotFoundError):
    pass


def missing_sources(sources=SOURCES) -> list[str]:
    """Debian packages (names) whose files are missing for the given sources."""
    need = {
        "wordnet": [WORDNET_DIR / "data.noun"],
        "fortunes": [FORTUNES_DIR],
        "gcide": [GCIDE_DICT, GCIDE_INDEX],
    }
    return [APT_PACKAGES[s] for s in sources if not all(p.exists() for p in need[s])]


# ---------------------------------------------------------------------------------------- WordNet
def _wordnet_synsets(root: Path = WORDNET_DIR) -> Iterator[tuple[str, list[str], str]]:
    """(pos, words, gloss) for every synset in data.{noun,verb,adj,adv}."""
    for pos in ("noun", "verb", "adj", "adv"):
        with open(root / f"data.{pos}", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:
                    continue  # licence header
                head, gloss = line.split("|", 1)
                fields = head.split()
                n_words = int(fields[3], 16)
                words = [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in fields[4 : 4 + 2 * n_words : 2]]
                yield _POS[pos], words, " ".join(gloss.split())


def iter_wordnet(root: Path = WORDNET_DIR) -> Iterator[str]:
    for pos, words, gloss in _wordnet_synsets(root):
        yield f"{', '.join(words)} ({pos}): {gloss}"


def iter_wordnet_pairs(root: Path = WORDNET_DIR) -> Iterator[dict]:
    """Prompt/answer pairs for SFT: the question names the first word, the answer is the definition
    (the gloss up to its first quoted example)."""
    for pos, words, gloss in _wordnet_synsets(root):
        definition = gloss.split('; "')[0].strip().rstrip(";")
        if definition:
            yield {"prompt": f'What does "{words[0]}" ({pos}) mean?', "answer": definition + "."}


# ---------------------------------------------------------------------------------------- fortunes
def iter_fortunes(root: Path = FORTUNES_DIR) -> Iterator[str]:
    for path in sorted(root.iterdir()):
        if path.is_symlink() or not path.is_file() or path.suffix in (".dat", ".u8") or path.name in _FORTUNE_SKIP:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for chunk in re.split(r"^%\s*$", text, flags=re.M):
            lines = [" ".join(line.split()) for line in chunk.strip("\n").splitlines()]
            doc = "\n".join(line for line in lines if line)
            if len(doc) >= 20:
                yield doc


# ---------------------------------------------------------------------------------------- GCIDE
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64.index(c)
    return n


_TAG_LINE = re.compile(r"^\s*\[[^\]]*\]\s*$")
_TAG_INLINE = re.compile(r"\[(?:1913 Webster|PJC|AS|WordNet 1\.5|RHD|Century Dict\.|Webster 1913 Suppl\.)[^\]]*\]")
_PRON = re.compile(r"\\[^\\\n]*\\,?")
# "(koun`t[~e]r*w[=a]t")": a respelled pronunciation right after the headword
_RESPELL = re.compile(r"^([^\n(]*?)\s*\((?=[^)\n]*[*\"`\[])[^)\n]*\),?")
# GCIDE's ASCII escapes for accented letters: [=a], [a^], ['e], [~e], [.a], ["o], [^o], [oo^] ...
_ACCENT = re.compile(r"\[[=~'`\".,^-]?([a-zA-Z]{1,2})\^?\]")
_NAMED = {"[ae]": "ae", "[oe]": "oe", "[AE]": "AE", "[OE]": "OE", "[imac]": "i", "[aum]": "a", "[eth]": "th",
          "[thorn]": "th", "[ng]": "ng", "[deg]": " degrees", "[root]": "", "[add]": "", "[asl]": "", "[th]": "th"}


def _clean_gcide(entry: str) -> str:
    paras, cur = [], []
    for line in entry.splitlines():
        if _TAG_LINE.match(line):
            continue
        if not line.strip():
            if cur:
                paras.append(" ".join(cur))
                cur = []
            continue
        cur.append(line.strip())
    if cur:
        paras.append(" ".join(cur))
    text = "\n".join(paras)
    text = _TAG_INLINE.sub("", text)
    text = _PRON.sub("", text, count=1)  # the pronunciation right after the headword
    text = _RESPELL.sub(r"\1", text, count=1)
    for code, plain in _NAMED.items():
        text = text.replace(code, plain)
    text = _ACCENT.sub(r"\1", text)
    text = text.replace("{", "").replace("}", "")
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" ([,.;:])", r"\1", text)
    return text.strip()


def iter_gcide(dict_path: Path = GCIDE_DICT, index_path: Path = GCIDE_INDEX, max_docs: int | None = None,
               seed: int = 0) -> Iterator[str]:
    spans = {}
    with open(index_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
                continue
            off, length = _b64(parts[1]), _b64(parts[2])
            spans.setdefault(off, length)
    order = sorted(spans.items())
    if max_docs is not None and max_docs < len(order):
        order = sorted(random.Random(seed).sample(order, max_docs))
    with gzip.open(dict_path, "rb") as f:  # dictzip is gzip-compatible
        data = f.read()
    for off, length in order:
        doc = _clean_gcide(data[off : off + length].decode("utf-8", errors="replace"))
        if len(doc) >= 20:
            yield doc


# ---------------------------------------------------------------------------------------- build
def _is_valid(text: str, valid_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")
    return (h % 1_000_000) < valid_fraction * 1_000_000


def _sample(items: list, max_docs: int | None, seed: int) -> list:
    if max_docs is None or max_docs >= len(items):
        return items
    idx = sorted(random.Random(seed).sample(range(len(items)), max_docs))
    return [items[i] for i in idx]


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    tmp = path.with_suffix(path.suffix + ".tmp")
    h = hashlib.sha256()
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            line = json.dumps(r, ensure_ascii=False) + "\n"
            f.write(line)
            h.update(line.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return h.hexdigest()


def build_corpus(
    out_dir: str | os.PathLike,
    sources=SOURCES,
    max_docs: int | None = None,
    valid_fraction: float = 0.02,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Build (or reuse) the corpus in ``out_dir``; returns its ``meta.json`` content.

    ``max_docs`` caps the documents taken from each source (a deterministic sample), for quick builds.
    An existing corpus built with the same arguments is reused unless ``overwrite``.
    """
    out = Path(out_dir)
    args = {"sources": list(sources), "max_docs": max_docs, "valid_fraction": valid_fraction, "seed": seed}
    meta_path = out / "meta.json"
    if meta_path.exists() and not overwrite:
        meta = json.loads(meta_path.read_text())
        if meta.get("args") == args and all((out / n).exists() for n in meta["files"]):
            return meta
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown corpus sources {unknown}; choose from {list(SOURCES)}")
    missing = missing_sources(sources)
    if missing:
        raise CorpusSourceError(
            f"the corpus sources are not installed: {', '.join(missing)}. "
            f"Install them with: apt-get install -y {' '.join(missing)}"
        )
    from tqdm.auto import tqdm

    docs: list[dict] = []
    pairs: list[dict] = []
    counts = {}
    bar = tqdm(sources, desc="corpus", disable=not progress)
    for src in bar:
        bar.set_postfix_str(src)
        if src == "wordnet":
            texts = _sample(list(iter_wordnet()), max_docs, seed)
            pairs = _sample(list(iter_wordnet_pairs()), max_docs, seed + 1)
        elif src == "fortunes":
            texts = _sample(list(dict.fromkeys(iter_fortunes())), max_docs, seed)
        else:
            texts = list(iter_gcide(max_docs=max_docs, seed=seed))
        counts[src] = len(texts)
        docs.extend({"text": t, "source": src} for t in texts)
    train = [d for d in docs if not _is_valid(d["text"], valid_fraction)]
    valid = [d for d in docs if _is_valid(d["text"], valid_fraction)]
    random.Random(seed).shuffle(train)
    random.Random(seed + 1).shuffle(valid)
    sft_train = [p for p in pairs if not _is_valid(p["prompt"] + p["answer"], valid_fraction)]
    sft_valid = [p for p in pairs if _is_valid(p["prompt"] + p["answer"], valid_fraction)]
    random.Random(seed + 2).shuffle(sft_train)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "train.jsonl": train,
        "valid.jsonl": valid,
        "sft_train.jsonl": sft_train,
        "sft_valid.jsonl": sft_valid,
    }
    digests = {name: _write_jsonl(out / name, rows) for name, rows in files.items()}
    meta = {
        "args": args,
        "documents": counts,
        "files": {name: {"rows": len(rows), "sha256": digests[name]} for name, rows in files.items()},
        "characters": {"train": sum(len(d["text"]) for d in train), "valid": sum(len(d["text"]) for d in valid)},
    }
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, meta_path)
    return meta


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/english")
    ap.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    ap.add_argument("--max-docs", type=int, default=None, help="cap per source (deterministic sample)")
    ap.add_argument("--valid-fraction", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    meta = build_corpus(a.out, a.sources, a.max_docs, a.valid_fraction, a.seed, a.overwrite)
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()

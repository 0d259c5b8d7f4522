"""Spoken questions with verifiable answers, synthesised offline with espeak-ng, for the audio adapter.

Every example is a spoken question (its transcript is the speech-recognition target of stage 1) and a
short answer (the target of stage 2), sometimes with a text instruction that the answer depends on:

- arithmetic: "what is seven plus five" -> "twelve" (plus, minus, times; results 0..20);
- counting:   "how many cats in dog cat bird cat" -> "two";
- table:      instruction "table: anna red four. ben blue two. cleo green nine." (generated per example),
              spoken "what colour is ben" -> "blue", "what number has cleo" -> "nine".

Voices: espeak-ng English voices and variants, each clip at a random rate and pitch with white noise at a
random SNR. `HELD_OUT_VOICES` never appear in the training split: the `test_heldout` split uses only them,
`test_seen` uses the training voices on new questions. The training voice set is "six" (`TRAIN_VOICES`,
the default), "wide" (`VOICE_SETS["wide"]`: 6 accents x 12 variants, none of them held out) or
"wide_foreign" / "wide_foreign_half" (those and, for a quarter / half of the clips, other languages' voices
reading the English text), which only changes each clip's voice. Everything is a pure function of (split, index,
seed), and the build is reproducible byte for byte (espeak-ng is deterministic; the noise comes from a
seeded generator):

    python -m modalities.data.speech --out data/speech --train 2400 --test 200

writes <out>/<split>/<index>.flac (16-bit, espeak's 22.05 kHz) and <out>/<split>.jsonl with path,
transcript, instruction, answer, kind, voice, rate, pitch and snr_db.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "NUMBERS", "TRAIN_VOICES", "HELD_OUT_VOICES", "DEV_VOICES", "DEV_ACCENT_VOICES", "VOICE_SETS", "SPLITS",
    "split_voices", "Example", "make_example", "make_split",
    "espeak_available", "synthesize", "build_split", "build_dataset", "read_split", "add_noise",
    "render",
]

NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
           "sixteen seventeen eighteen nineteen twenty").split()
ANIMALS = ("cat", "dog", "bird", "fish", "cow")
NAMES = ("anna", "ben", "cleo", "dan", "eva", "finn")
COLOURS = ("red", "blue", "green", "black", "white", "pink")
KINDS = ("arithmetic", "counting", "table")

# (espeak-ng voice with variant, label); the held-out ones are different accents AND different variants.
TRAIN_VOICES = ("en-us", "en-us+f3", "en-gb", "en-gb-x-rp+m3", "en-029+m2", "en-gb-x-gbclan+f2")
HELD_OUT_VOICES = ("en-gb-scotland+m4", "en-gb-x-gbcwmd+f4")
# "wide": every training accent (plus New York) with every variant but the held-out ones (m4, f4): 72 voices
# where "six" has 6, so the encoder hears many speakers; the held-out accents and variants stay unheard.
_WIDE_ACCENTS = ("en-us", "en-gb", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-us-nyc")
_WIDE_VARIANTS = ("", "+m1", "+m2", "+m3", "+m5", "+m6", "+m7", "+f1", "+f2", "+f3", "+f5", "+klatt")
# "wide_foreign": "wide" plus other languages' voices reading the English text by their own letter-to-sound
# rules (German "what" is "vat", Swedish "vhat", Polish "fxat"), a quarter of the clips: pronunciations the
# English accents never give, so the encoder learns to hear a word through variation in its sounds. The
# Celtic languages of Britain and Ireland are left out: they are the nearest kin of the held-out accents.
_FOREIGN_LANGUAGES = ("de", "nl", "sv", "da", "nb", "es", "it", "pt", "pl", "cs", "fi", "hu")
_FOREIGN_VARIANTS = ("+m1", "+f2")
VOICE_SETS = {"six": TRAIN_VOICES, "wide": tuple(a + v for a in _WIDE_ACCENTS for v in _WIDE_VARIANTS)}
VOICE_SETS["wide_foreign"] = VOICE_SETS["wide"] + tuple(a + v for a in _FOREIGN_LANGUAGES for v in _FOREIGN_VARIANTS)
# "wide_foreign_half": twice the languages, three variants each: half of the clips
_MORE_FOREIGN_LANGUAGES = ("af", "ca", "eo", "et", "hr", "id", "lt", "lv", "ro", "sk", "sl", "tr")
VOICE_SETS["wide_foreign_half"] = VOICE_SETS["wide"] + tuple(
    a + v for a in _FOREIGN_LANGUAGES + _MORE_FOREIGN_LANGUAGES for v in (*_FOREIGN_VARIANTS, "+m3"))
# "dev_unseen": trained accents with the held-out variants (m4, f4), for tuning decoding knobs on voices no
# training set has, without touching the held-out test voices (their accents are never trained on either)
DEV_VOICES = ("en-us+m4", "en-gb+f4", "en-029+m4", "en-gb-x-rp+f4", "en-us-nyc+f4", "en-gb-x-gbclan+m4")
# "dev_accents": the held-out accents spoken by other variants than the test's (variants the wide set trains
# with): where dev_unseen is too easy to rank decoding knobs (trained accents), this one has the test's shift,
# the accent, with none of the test voices
DEV_ACCENT_VOICES = ("en-gb-scotland+m1", "en-gb-scotland+f2", "en-gb-scotland+m5", "en-gb-x-gbcwmd+m2",
                     "en-gb-x-gbcwmd+f1", "en-gb-x-gbcwmd+m6")
# "text": questions for training the backbone on text only (never synthesised; its voices are unused)
SPLITS = {"train": TRAIN_VOICES, "test_seen": TRAIN_VOICES, "test_heldout": HELD_OUT_VOICES, "text": TRAIN_VOICES,
          "dev_unseen": DEV_VOICES, "dev_accents": DEV_ACCENT_VOICES}


def split_voices(split: str, voices: str = "six") -> tuple[str, ...]:
    """The voices a split draws from: the held-out test and dev splits always their own, the others the voice
    set's."""
    if voices not in VOICE_SETS:
        raise ValueError(f"voices must be one of {sorted(VOICE_SETS)}, got {voices!r}.")
    if split in ("test_heldout", "dev_unseen", "dev_accents"):
        return SPLITS[split]
    return VOICE_SETS[voices]
_SPLIT_SEED = {"train": 0, "test_seen": 1_000_003, "test_heldout": 2_000_003, "text": 3_000_017,
               "dev_unseen": 4_000_037, "dev_accents": 5_000_011}
RATE_RANGE = (130, 200)  # words per minute (espeak -s)
PITCH_RANGE = (25, 75)  # espeak -p, 0..99
SNR_RANGE = (10.0, 30.0)  # dB of white noise


@dataclass
class Example:
    transcript: str  # what is spoken
    answer: str
    instruction: str  # "" when the question stands alone
    kind: str
    voice: str
    rate: int
    pitch: int
    snr_db: float
    seed: int  # of the noise


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    op = rng.choice(("plus", "minus", "times"))
    if op == "plus":
        a = rng.randint(0, 10)
        b = rng.randint(0, 10)
        r = a + b
    elif op == "minus":
        a = rng.randint(0, 20)
        b = rng.randint(0, a)
        r = a - b
    else:
        a = rng.randint(0, 4)
        b = rng.randint(0, 5)
        r = a * b
    return f"what is {NUMBERS[a]} {op} {NUMBERS[b]}", NUMBERS[r]


def _counting(rng: random.Random) -> tuple[str, str]:
    target = rng.choice(ANIMALS)
    n = rng.randint(3, 5)
    k = rng.randint(0, min(3, n))
    others = [a for a in ANIMALS if a != target]
    items = [target] * k + [rng.choice(others) for _ in range(n - k)]
    rng.shuffle(items)
    return f"how many {target}s in {' '.join(items)}", NUMBERS[k]


def _table(rng: random.Random) -> tuple[str, str, str]:
    names = rng.sample(NAMES, 3)
    colours = rng.sample(COLOURS, 3)
    numbers = rng.sample(range(1, 10), 3)
    instruction = "table: " + " ".join(f"{n} {c} {NUMBERS[k]}." for n, c, k in zip(names, colours, numbers, strict=True))
    i = rng.randrange(3)
    if rng.random() < 0.5:
        return f"what colour is {names[i]}", colours[i], instruction
    return f"what number has {names[i]}", NUMBERS[numbers[i]], instruction


def make_example(split: str, index: int, seed: int = 0, voices: str = "six") -> Example:
    """The `index`-th example of a split (a pure function of split, index, seed and voice set; only the
    voice differs between voice sets)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}.")
    rng = random.Random(f"{seed}-{_SPLIT_SEED[split]}-{index}")
    kind = KINDS[index % len(KINDS)]
    instruction = ""
    if kind == "arithmetic":
        transcript, answer = _arithmetic(rng)
    elif kind == "counting":
        transcript, answer = _counting(rng)
    else:
        transcript, answer, instruction = _table(rng)
    return Example(
        transcript=transcript, answer=answer, instruction=instruction, kind=kind, voice=_voice(rng, split, index, seed, voices),
        rate=rng.randint(*RATE_RANGE), pitch=rng.randint(*PITCH_RANGE), snr_db=round(rng.uniform(*SNR_RANGE), 2),
        seed=rng.randrange(2**31),
    )


def _voice(rng: random.Random, split: str, index: int, seed: int, voices: str) -> str:
    """The example's voice. The example's own generator draws from the six-voice set whatever `voices` is,
    so every other field stays the same; another set replaces that draw by one from its own generator."""
    pool = split_voices(split, voices)
    six = rng.choice(SPLITS[split])
    if pool is SPLITS[split]:
        return six
    return random.Random(f"voice-{seed}-{_SPLIT_SEED[split]}-{index}").choice(pool)


def make_split(split: str, n: int, seed: int = 0, voices: str = "six") -> list[Example]:
    return [make_example(split, i, seed, voices) for i in range(n)]


# ---- synthesis ------------------------------------------------------------------------------------------
def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def synthesize(text: str, voice: str = "en-us", rate: int = 160, pitch: int = 50) -> tuple[np.ndarray, int]:
    """espeak-ng speech -> (float32 samples in [-1, 1], sampling rate). Needs `espeak-ng` on the PATH
    (Debian/Ubuntu: apt-get install espeak-ng)."""
    import io

    import soundfile as sf

    if not espeak_available():
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng); it synthesises the speech data.")
    proc = subprocess.run(
        ["espeak-ng", "--stdout", "-v", voice, "-s", str(rate), "-p", str(pitch), text],
        capture_output=True, check=False,
    )
    if proc.returncode != 0 or not proc.stdout:
        raise RuntimeError(f"espeak-ng failed for voice {voice!r}: {proc.stderr.decode(errors='replace').strip()}")
    # espeak writes a streaming WAV header (unknown length); soundfile reads it as far as the data goes
    data, sr = sf.read(io.BytesIO(proc.stdout), dtype="float32")
    return data, int(sr)


def add_noise(x: np.ndarray, snr_db: float, seed: int) -> np.ndarray:
    """White Gaussian noise at `snr_db` relative to the clip's mean power (seeded), clipped to [-1, 1]."""
    rng = np.random.default_rng(seed)
    power = float(np.mean(x.astype(np.float64) ** 2)) or 1e-8
    noise = rng.standard_normal(x.shape) * np.sqrt(power / 10 ** (snr_db / 10))
    return np.clip(x + noise, -1.0, 1.0).astype(np.float32)


def render(ex: Example) -> tuple[np.ndarray, int]:
    x, sr = synthesize(ex.transcript, ex.voice, ex.rate, ex.pitch)
    return add_noise(x, ex.snr_db, ex.seed), sr


def build_split(out: str | os.PathLike, split: str, n: int, seed: int = 0, workers: int = 2,
                progress: bool = True, voices: str = "six") -> Path:
    """Synthesise `n` examples of `split` into <out>/<split>/ and write <out>/<split>.jsonl; existing
    complete builds (same n, seed and voice set) are kept, and a complete build with other settings is
    refused (FileExistsError) rather than overwritten. Returns the index path."""
    import soundfile as sf
    from tqdm.auto import tqdm

    out = Path(out)
    index = out / f"{split}.jsonl"
    stamp = out / f".{split}.built"
    key = json.dumps({"n": n, "seed": seed} | ({} if voices == "six" else {"voices": voices}))
    if index.exists() and stamp.exists():
        if stamp.read_text() == key:
            return index
        raise FileExistsError(f"{out} already holds a complete {split!r} split built with {stamp.read_text()}; "
                              f"building it with {key} would overwrite its clips. Use another folder, or delete "
                              f"{out / split} and {index} first.")
    (out / split).mkdir(parents=True, exist_ok=True)
    examples = make_split(split, n, seed, voices)

    def one(i: int) -> dict:
        ex = examples[i]
        rel = f"{split}/{i:06d}.flac"
        x, sr = render(ex)
        sf.write(out / rel, x, sr, subtype="PCM_16", format="FLAC")
        return {"path": rel, **asdict(ex), "seconds": round(len(x) / sr, 3)}

    with ThreadPoolExecutor(max(1, workers)) as pool:
        rows = list(tqdm(pool.map(one, range(n)), total=n, desc=f"synthesising {split}", unit="clip",
                         disable=not progress))
    tmp = index.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, index)
    stamp.write_text(key)
    return index


def build_dataset(out: str | os.PathLike, n_train: int = 2400, n_test: int = 200, seed: int = 0,
                  workers: int = 2, progress: bool = True, voices: str = "six", n_dev: int = 0) -> dict[str, Path]:
    """All three splits (and the two dev splits, `dev_unseen` and `dev_accents`, when n_dev > 0); `voices` (a
    name in :data:`VOICE_SETS`) is the training and seen-test voice set (the held-out and dev splits are the
    same for both)."""
    dev = {"dev_unseen": n_dev, "dev_accents": n_dev} if n_dev else {}
    sizes = {"train": n_train, "test_seen": n_test, "test_heldout": n_test} | dev
    return {s: build_split(out, s, k, seed, workers, progress, voices) for s, k in sizes.items()}


def read_split(index: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """Rows of a split index, with `path` made absolute."""
    index = Path(index)
    rows = []
    with open(index, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                r["path"] = str(index.parent / r["path"]) if not os.path.isabs(r["path"]) else r["path"]
                rows.append(r)
                if limit and len(rows) >= limit:
                    break
    if not rows:
        raise ValueError(f"{index} lists no examples.")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Synthesise the spoken-question data set with espeak-ng.")
    ap.add_argument("--out", default="data/speech")
    ap.add_argument("--train", type=int, default=2400)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--dev", type=int, default=0, help="clips of each dev split, dev_unseen and dev_accents (tuning on unheard voices)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--voices", default="six", choices=sorted(VOICE_SETS), help="training voice set")
    a = ap.parse_args(argv)
    for split, path in build_dataset(a.out, a.train, a.test, a.seed, a.workers, voices=a.voices, n_dev=a.dev).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()

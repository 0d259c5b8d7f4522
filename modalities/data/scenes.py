"""Generated compositional captioning set: rendered scenes of shapes with one caption each.

A scene holds `count` copies of one object kind (colour, shape, size) placed in one region of the
canvas; its caption names every attribute, e.g. "two small red circles on the left". A fixed set of
(colour, shape) pairs never appears in training (`HELD_OUT`): the `heldout` split asks the model to
compose attributes it has only seen apart. Everything is a pure function of the seed.

    python -m modalities.data.scenes --out data/scenes --train 4000 --test 400
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

__all__ = [
    "COLOURS", "SHAPES", "SIZES", "COUNTS", "POSITIONS", "HELD_OUT", "Scene", "render_scene", "sample_scene",
    "make_split", "write_split", "parse_caption",
]

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 30), "purple": (140, 60, 180), "orange": (245, 130, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": (0.13, 0.17), "large": (0.20, 0.24)}  # object side as a fraction of the image side
COUNTS = {1: "one", 2: "two", 3: "three"}
POSITIONS = {  # region of the canvas (x0, y0, x1, y1) in [0, 1]
    "on the left": (0.0, 0.0, 0.5, 1.0), "on the right": (0.5, 0.0, 1.0, 1.0),
    "at the top": (0.0, 0.0, 1.0, 0.5), "at the bottom": (0.0, 0.5, 1.0, 1.0),
}
# Combinations never shown in training; each colour and shape still appears with other partners.
HELD_OUT = (("red", "triangle"), ("green", "square"), ("blue", "diamond"), ("yellow", "circle"),
            ("purple", "square"), ("orange", "triangle"))
SPLITS = ("train", "test", "heldout")


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str
    count: int
    position: str
    seed: int

    @property
    def caption(self) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        return f"{COUNTS[self.count]} {self.size} {self.colour} {noun} {self.position}"

    def attributes(self) -> dict:
        return {"count": COUNTS[self.count], "size": self.size, "colour": self.colour, "shape": self.shape,
                "position": self.position}


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r * 1.25), (cx + r * 1.25, cy), (cx, cy + r * 1.25), (cx - r * 1.25, cy)]
    if shape == "triangle":
        return [(cx + r * 1.2 * math.cos(a), cy + r * 1.2 * math.sin(a)) for a in
                (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    raise ValueError(shape)


def render_scene(scene: Scene, size: int = 64, supersample: int = 3) -> Image.Image:
    """Draw the scene (anti-aliased by supersampling); jitter comes from `scene.seed`."""
    rng = random.Random(scene.seed)
    big = size * supersample
    bg = tuple(int(v) for v in (rng.randint(225, 255), rng.randint(225, 255), rng.randint(225, 255)))
    im = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(im)
    x0, y0, x1, y1 = POSITIONS[scene.position]
    lo, hi = SIZES[scene.size]
    placed: list[tuple[float, float, float]] = []
    colour = COLOURS[scene.colour]
    for _ in range(scene.count):
        for _attempt in range(200):
            r = rng.uniform(lo, hi) * big / 2
            margin = r * 1.3
            cx = rng.uniform(x0 * big + margin, x1 * big - margin) if (x1 - x0) * big > 2 * margin else (x0 + x1) * big / 2
            cy = rng.uniform(y0 * big + margin, y1 * big - margin) if (y1 - y0) * big > 2 * margin else (y0 + y1) * big / 2
            if all(math.hypot(cx - px, cy - py) > (r + pr) * 1.15 for px, py, pr in placed):
                break
        placed.append((cx, cy, r))
        jitter = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in colour)
        if scene.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=jitter)
        else:
            draw.polygon(_polygon(scene.shape, cx, cy, r), fill=jitter)
    return im.resize((size, size), Image.LANCZOS)


def sample_scene(rng: random.Random, split: str, seed: int) -> Scene:
    """A random scene of a split: `heldout` uses only HELD_OUT colour/shape pairs, the others never do."""
    held = set(HELD_OUT)
    while True:
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        if ((colour, shape) in held) == (split == "heldout"):
            break
    return Scene(colour, shape, rng.choice(sorted(SIZES)), rng.choice(sorted(COUNTS)),
                 rng.choice(sorted(POSITIONS)), seed)


def make_split(split: str, n: int, seed: int = 0) -> list[Scene]:
    """`n` scenes of `split` ("train", "test": new renders of training combinations, "heldout")."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    offset = {"train": 0, "test": 1_000_003, "heldout": 2_000_003}[split]
    rng = random.Random(seed * 7_919 + offset)
    return [sample_scene(rng, split, seed * 10_000_019 + offset + i) for i in range(n)]


def write_split(scenes: list[Scene], out_dir: str | os.PathLike, name: str, size: int = 64,
                progress: bool = False) -> str:
    """Render scenes as PNGs under out_dir/name/ and write out_dir/name.jsonl (path, caption, attributes)."""
    out_dir = os.fspath(out_dir)
    img_dir = os.path.join(out_dir, name)
    os.makedirs(img_dir, exist_ok=True)
    rows = []
    it = scenes
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(scenes, desc=f"rendering {name}", unit="img")
    for i, sc in enumerate(it):
        path = os.path.join(img_dir, f"{i:06d}.png")
        render_scene(sc, size).save(path)
        rows.append({"path": os.path.relpath(path, out_dir), "caption": sc.caption, "attributes": sc.attributes(),
                     "scene": asdict(sc)})
    index = os.path.join(out_dir, f"{name}.jsonl")
    with open(index, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return index


# ---- evaluation -----------------------------------------------------------------------------------
_COUNT_WORDS = {"one": "one", "a": "one", "an": "one", "two": "two", "three": "three"}


def parse_caption(text: str) -> dict:
    """Attributes a caption states (None where it states none)."""
    words = re.findall(r"[a-z]+", text.lower())
    out: dict = {"count": None, "size": None, "colour": None, "shape": None, "position": None}
    for w in words:
        if out["count"] is None and w in _COUNT_WORDS:
            out["count"] = _COUNT_WORDS[w]
        if out["size"] is None and w in SIZES:
            out["size"] = w
        if out["colour"] is None and w in COLOURS:
            out["colour"] = w
        stem = w[:-1] if w.endswith("s") and w[:-1] in SHAPES else w
        if out["shape"] is None and stem in SHAPES:
            out["shape"] = stem
    joined = " ".join(words)
    for phrase in POSITIONS:
        if phrase in joined:
            out["position"] = phrase
            break
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--test", type=int, default=400)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    for split, n in (("train", a.train), ("test", a.test), ("heldout", a.test)):
        print(write_split(make_split(split, n, a.seed), a.out, split, a.size, progress=True))


if __name__ == "__main__":
    main()

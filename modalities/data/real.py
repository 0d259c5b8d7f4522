"""Real images with human-written captions that install offline, split deterministically.

- Tux Paint stamps (`apt-get install tuxpaint-stamps-default`): each PNG has a .txt beside it whose
  first line is an English description ("A badger."). SVG-only stamps are skipped (no SVG renderer).
- Noto Color Emoji (`apt-get install fonts-noto-color-emoji`): every emoji the font draws, rendered by
  Pillow in colour, captioned with its Unicode name ("grinning face").

Items go to train or test by a hash of the caption, so identical captions never straddle the split and
the split does not depend on what else is installed. Images are written as square RGB PNGs (transparent
pixels on white).

    python -m modalities.data.real --out data/real --size 96
"""

from __future__ import annotations

import argparse
import json
import os
import unicodedata
import zlib
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

__all__ = ["TUXPAINT_DIR", "EMOJI_FONT", "tuxpaint_items", "emoji_items", "split_of", "build_real_splits",
           "clean_caption"]

TUXPAINT_DIR = Path("/usr/share/tuxpaint/stamps")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_RANGES = ((0x1F300, 0x1FB00), (0x2600, 0x27C0))
APT_HINT = "apt-get update && apt-get install -y tuxpaint-stamps-default fonts-noto-color-emoji"


def clean_caption(text: str) -> str:
    """One lowercase line without the final full stop: "A badger." -> "a badger"."""
    text = " ".join(text.strip().split()).lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def split_of(caption: str, test_percent: int = 20) -> str:
    return "test" if zlib.crc32(caption.encode()) % 100 < test_percent else "train"


def tuxpaint_items(root: Path = TUXPAINT_DIR) -> list[dict]:
    """(id, source image path, caption) for every PNG stamp with an English description."""
    if not root.is_dir():
        raise FileNotFoundError(f"Tux Paint stamps are not installed ({root} is missing); run: {APT_HINT}")
    items = []
    for png in sorted(root.rglob("*.png")):
        txt = png.with_suffix(".txt")
        if not txt.is_file():
            continue
        first = txt.read_text(encoding="utf-8", errors="replace").splitlines()
        caption = clean_caption(first[0]) if first else ""
        if caption and "=" not in caption:
            items.append({"id": "tuxpaint/" + str(png.relative_to(root).with_suffix("")), "source": str(png),
                          "caption": caption})
    return items


def _emoji_font(path: Path = EMOJI_FONT):
    if not path.is_file():
        raise FileNotFoundError(f"Noto Color Emoji is not installed ({path} is missing); run: {APT_HINT}")
    return ImageFont.truetype(str(path), 109)  # the one size the colour bitmaps come in


def _draw_emoji(ch: str, font) -> Image.Image:
    im = Image.new("RGBA", (136, 128), (0, 0, 0, 0))
    ImageDraw.Draw(im).text((0, 0), ch, font=font, embedded_color=True)
    return im


def emoji_items(path: Path = EMOJI_FONT) -> list[dict]:
    """Every single-codepoint emoji the font draws, captioned by its Unicode name."""
    font = _emoji_font(path)
    items = []
    for lo, hi in EMOJI_RANGES:
        for cp in range(lo, hi):
            ch = chr(cp)
            name = unicodedata.name(ch, "")
            if not name or _draw_emoji(ch, font).getbbox() is None:
                continue
            items.append({"id": f"emoji/{cp:05X}", "char": ch, "caption": clean_caption(name)})
    return items


def _square(im: Image.Image, size: int) -> Image.Image:
    """Crop to content, pad to a square on white, resize to size x size RGB."""
    im = im.convert("RGBA")
    box = im.getbbox()
    if box:
        im = im.crop(box)
    side = max(im.size)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(im, ((side - im.size[0]) // 2, (side - im.size[1]) // 2))
    return canvas.convert("RGB").resize((size, size), Image.LANCZOS)


def build_real_splits(out_dir: str | os.PathLike, size: int = 96, sources=("tuxpaint", "emoji"),
                      test_percent: int = 20, progress: bool = False) -> dict[str, str]:
    """Write out_dir/images/*.png and out_dir/{train,test}.jsonl; returns the two index paths."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    items = []
    if "tuxpaint" in sources:
        items += tuxpaint_items()
    font = None
    if "emoji" in sources:
        items += emoji_items()
        font = _emoji_font()
    if not items:
        raise ValueError(f"no images found for sources {sources}; run: {APT_HINT}")
    if progress:
        from tqdm.auto import tqdm

        items_iter = tqdm(items, desc="writing real images", unit="img")
    else:
        items_iter = items
    rows = {"train": [], "test": []}
    for it in items_iter:
        name = it["id"].replace("/", "__") + ".png"
        dest = out / "images" / name
        if not dest.exists():
            src = _draw_emoji(it["char"], font) if "char" in it else Image.open(it["source"])
            _square(src, size).save(dest)
        rows[split_of(it["caption"], test_percent)].append(
            {"path": f"images/{name}", "caption": it["caption"], "source": it["id"].split("/")[0]}
        )
    paths = {}
    for split, rs in rows.items():
        paths[split] = str(out / f"{split}.jsonl")
        with open(paths[split], "w") as f:
            for r in rs:
                f.write(json.dumps(r) + "\n")
    return paths


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Build train/test splits of Tux Paint stamps and emoji.")
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--sources", default="tuxpaint,emoji")
    ap.add_argument("--test-percent", type=int, default=20)
    a = ap.parse_args(argv)
    paths = build_real_splits(a.out, a.size, tuple(a.sources.split(",")), a.test_percent, progress=True)
    for split, p in paths.items():
        print(split, sum(1 for _ in open(p)), p)


if __name__ == "__main__":
    main()

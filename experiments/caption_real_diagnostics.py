"""What is learnable at all on the real-image captioning split (Tux Paint stamps + Noto emoji, split by
caption hash, so no test caption is ever a training caption).

    python experiments/caption_real_diagnostics.py
    python experiments/caption_real_diagnostics.py --pipeline runs/caption_real_v2_experiment/pipeline

Reports the split sizes, how many test-caption words (all, content words, last words) occur in the training
captions, and BLEU-4 / CIDEr on the test split of caption-free baselines: the most frequent training
caption for every image, the nearest training image's caption by downscaled pixels (and by a trained
captioner's pooled trunk feature with ``--pipeline``), the training caption nearest to the test caption by
the frozen sentence encoder the v2 recipe aligns with (a text-side oracle), and the oracle: for each test image the training
caption with the best CIDEr, an upper bound of any method that only retrieves training captions. CIDEr is
the mean of per-image scores whose IDF comes from the references alone, so a table of every training
caption scored against every test image gives the exact CIDEr of any retrieval. Results go to
experiments/results/caption_real_diagnostics.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modalities.data.metrics import caption_scores, tokenize  # noqa: E402
from modalities.vision import ImagePreprocessor  # noqa: E402

# Words that carry no content for the coverage count (articles, prepositions, conjunctions).
STOPWORDS = frozenset("a an the of with and in on at to for from by as or is are its it his her their our this "
                      "that".split())


def read_split(data_dir: str, split: str) -> list[dict]:
    with open(os.path.join(data_dir, f"{split}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def coverage(train_caps: list[str], test_caps: list[str]) -> dict:
    """Shares of test words (tokens and distinct words) that occur anywhere in the training captions."""
    train_words = {w for c in train_caps for w in tokenize(c).split()}
    train_last = {tokenize(c).split()[-1] for c in train_caps if tokenize(c)}
    tokens = [w for c in test_caps for w in tokenize(c).split()]
    content = [w for w in tokens if w not in STOPWORDS]
    last = [tokenize(c).split()[-1] for c in test_caps if tokenize(c)]

    def share(ws, pool):
        return sum(w in pool for w in ws) / max(1, len(ws))

    return {
        "test_word_tokens_in_train": share(tokens, train_words),
        "test_word_types_in_train": share(sorted(set(tokens)), train_words),
        "test_content_tokens_in_train": share(content, train_words),
        "test_content_types_in_train": share(sorted(set(content)), train_words),
        "test_last_words_in_train_vocab": share(last, train_words),
        "test_last_words_that_end_a_train_caption": share(last, train_last),
        "test_captions_all_words_in_train": sum(all(w in train_words for w in tokenize(c).split())
                                                for c in test_caps) / len(test_caps),
        "train_vocabulary": len(train_words),
    }


def cider_table(candidates: list[str], references: list[str]) -> np.ndarray:
    """[len(candidates), len(references)] per-image CIDEr-D of each candidate as the prediction for every image
    (pycocoevalcap's scorer; the IDF is the references', the same for every candidate)."""
    from pycocoevalcap.cider.cider import Cider

    gts = {i: [tokenize(r)] for i, r in enumerate(references)}
    scorer = Cider()
    out = np.zeros((len(candidates), len(references)))
    for k, c in enumerate(candidates):
        _, per_image = scorer.compute_score(gts, {i: [tokenize(c) or "<empty>"] for i in range(len(references))})
        out[k] = per_image
    return out


def pixel_features(paths: list[str], side: int) -> torch.Tensor:
    """Images downscaled to side x side (area average), centred and L2-normalised, flattened."""
    pre = ImagePreprocessor(input_size=(side, side), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear")
    x = torch.stack([pre.one(p) for p in paths]).flatten(1)
    x = x - x.mean(1, keepdim=True)
    return torch.nn.functional.normalize(x, dim=1)


@torch.no_grad()
def trunk_features(pipeline_dir: str, paths: list[str], batch_size: int = 64) -> torch.Tensor:
    """A trained captioner's trunk feature map, averaged over positions and L2-normalised."""
    from pipelines.captioning import CaptioningPipeline

    adapter = CaptioningPipeline.from_pretrained(pipeline_dir).vision_adapter.eval()
    feats = []
    for lo in range(0, len(paths), batch_size):
        f, _ = adapter.features(adapter.preprocess(paths[lo : lo + batch_size]))
        feats.append(f.float().mean(1))
    return torch.nn.functional.normalize(torch.cat(feats), dim=1)


def retrieval(name: str, preds: list[str], refs: list[str], table: np.ndarray, index: dict[str, int]) -> dict:
    scores = caption_scores(preds, refs)
    exact = float(np.mean([table[index[p], i] for i, p in enumerate(preds)]))
    examples = [{"prediction": p, "reference": r} for p, r in list(zip(preds, refs, strict=True))[:8]]
    return {"method": name, **scores, "cider_from_table": exact, "examples": examples}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="data/real")
    ap.add_argument("--pipeline", default=None, help="a trained captioner: nearest neighbour by its trunk feature")
    ap.add_argument("--out", default="experiments/results/caption_real_diagnostics.json")
    a = ap.parse_args(argv)
    if not os.path.exists(os.path.join(a.data_dir, "test.jsonl")):
        from modalities.data.real import build_real_splits

        build_real_splits(a.data_dir, progress=True)
    train, test = read_split(a.data_dir, "train"), read_split(a.data_dir, "test")
    train_caps, test_caps = [r["caption"] for r in train], [r["caption"] for r in test]
    report: dict = {
        "sizes": {
            split: {"images": len(rows), "distinct_captions": len({r["caption"] for r in rows}),
                    **dict(collections.Counter(r["source"] for r in rows))}
            for split, rows in (("train", train), ("test", test))
        },
        "coverage": coverage(train_caps, test_caps),
        "baselines": [],
    }
    distinct = sorted(set(train_caps))
    index = {c: k for k, c in enumerate(distinct)}
    table = cider_table(distinct, test_caps)

    top = collections.Counter(train_caps).most_common(1)[0][0]
    report["baselines"].append(retrieval(f"most frequent training caption ({top!r})", [top] * len(test), test_caps,
                                         table, index))
    best_const = distinct[int(table.mean(1).argmax())]
    report["baselines"].append(retrieval(f"best single training caption for every image ({best_const!r}, "
                                         "chosen on the test split)", [best_const] * len(test), test_caps,
                                         table, index))

    train_paths = [os.path.join(a.data_dir, r["path"]) for r in train]
    test_paths = [os.path.join(a.data_dir, r["path"]) for r in test]
    feature_sets = {f"{s}x{s} pixels": (pixel_features(train_paths, s), pixel_features(test_paths, s)) for s in (8, 16)}
    if a.pipeline:
        feature_sets[f"trunk feature of {a.pipeline}"] = (trunk_features(a.pipeline, train_paths),
                                                          trunk_features(a.pipeline, test_paths))
    for fname, (ftr, fte) in feature_sets.items():
        nearest = (fte @ ftr.T).argmax(1).tolist()
        report["baselines"].append(retrieval(f"nearest training image by {fname} (cosine)",
                                             [train_caps[j] for j in nearest], test_caps, table, index))

    # How well the frozen sentence encoder's neighbours stand in for an unseen caption (what aligning the image
    # prefix with it can reach at best): the training caption nearest to the test caption itself.
    from pipelines.tasks.caption_align import sentence_embeddings

    near = (sentence_embeddings(test_caps) @ sentence_embeddings(distinct).T).argmax(1).tolist()
    report["baselines"].append(retrieval("text oracle: training caption nearest to the test caption by "
                                         "all-MiniLM-L6-v2", [distinct[k] for k in near], test_caps, table, index))
    oracle = [distinct[k] for k in table.argmax(0)]
    report["baselines"].append(retrieval("oracle: best training caption per test image (upper bound of retrieval)",
                                         oracle, test_caps, table, index))
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps({"sizes": report["sizes"], "coverage": report["coverage"]}, indent=1))
    for b in report["baselines"]:
        print(f"{b['bleu4']:.4f} {b['cider']:.4f}  {b['method']}")
    print(f"wrote {a.out}")
    return report


if __name__ == "__main__":
    main()

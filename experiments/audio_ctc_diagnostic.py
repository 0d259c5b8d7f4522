"""Where spoken QA loses the words: the word error rate of the speech encoder's own CTC head (greedy, no
backbone) beside the ASR pipeline's (encoder -> CTC-pooled semantic slots -> frozen backbone), on the
same clips. A low CTC WER with a high pipeline WER puts the loss in the semantic adapter / backbone
reading, not in the encoder. Also the cascade's answer accuracy: the frozen backbone of the spoken-QA stage
given the CTC transcript as text where the audio would be (next to the true-transcript ceiling), and the same
cascade run by the pipeline itself (`SpokenQAPipeline(..., read="ctc_text")`). Per voice, the encoder's
greedy WER and its commonest word substitutions (reference -> heard), which say what an unheard accent does
to the words (`--splits dev_accents ...` reads the dev splits too).

    python experiments/audio_ctc_diagnostic.py --run runs/audio_spoken_qa --test 200
Writes experiments/results/audio_ctc_diagnostic.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def word_errors(rows: list[dict], hyps: list[str], top: int = 12) -> dict:
    """Greedy WER per voice and the commonest substitutions ("ref -> hyp", from jiwer's alignment)."""
    import jiwer

    by_voice, subs = {}, Counter()
    for r, h in zip(rows, hyps, strict=True):
        by_voice.setdefault(r.get("voice", "?"), []).append((r["transcript"], h or "<empty>"))
    out = jiwer.process_words([r["transcript"] for r in rows], [h or "<empty>" for h in hyps])
    for ref, hyp, chunks in zip(out.references, out.hypotheses, out.alignments, strict=True):
        for c in chunks:
            if c.type == "substitute":
                subs.update(f"{x} -> {y}" for x, y in zip(ref[c.ref_start_idx:c.ref_end_idx],
                                                         hyp[c.hyp_start_idx:c.hyp_end_idx], strict=True))
    return {"wer_by_voice": {v: {"clips": len(p), "wer": jiwer.wer([x for x, _ in p], [y for _, y in p])}
                             for v, p in sorted(by_voice.items())},
            "substitutions": dict(subs.most_common(top))}


def main(argv=None) -> int:
    import jiwer

    from modalities.data.metrics import answer_accuracy, normalize_text
    from modalities.data.speech import read_split
    from pipelines.spoken_qa import SpokenQAPipeline

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/audio_spoken_qa")
    ap.add_argument("--data", default="data/speech")
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--splits", nargs="+", default=["test_seen", "test_heldout"],
                    help="splits for the CTC WER (the cascade always reads the two test splits)")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "audio_ctc_diagnostic.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    result = {"command": "python " + " ".join(sys.argv), "stages": {}}
    for stage in ("encoder", "asr"):
        pipe = SpokenQAPipeline.from_pretrained(str(Path(a.run) / "pipelines" / stage))
        pipe.set_progress_bar_config(disable=True)
        adapter, tok = pipe.audio_adapter.eval(), pipe.tokenizer
        for split in a.splits:
            rows = read_split(Path(a.data) / f"{split}.jsonl", limit=a.test)
            refs, hyps = [], []
            for lo in range(0, len(rows), 50):
                chunk = rows[lo : lo + 50]
                with torch.no_grad():
                    batch = adapter.preprocess([r["path"] for r in chunk])
                    hyps += [tok.decode(ids, skip_special_tokens=True).strip() for ids in adapter.ctc_best_path(batch)]
                refs += [r["transcript"] for r in chunk]
            wer = jiwer.wer(refs, [h if h else "<empty>" for h in hyps])
            result["stages"].setdefault(stage, {})[split] = {
                "ctc_greedy_wer": wer, "clips": len(rows),
                "examples": [dict(ref=r, ctc=h) for r, h in list(zip(refs, hyps, strict=True))[:4]],
                **word_errors(rows, hyps)}
            print(f"{stage:8s} {split:13s} CTC greedy WER {wer:.3f}", flush=True)
    from experiments.audio_spoken_qa import answer_report, text_answers, text_oracle

    pipe = SpokenQAPipeline.from_pretrained(str(Path(a.run) / "pipelines" / "sqa"))
    pipe.set_progress_bar_config(disable=True)
    for split in ("test_seen", "test_heldout"):
        rows = read_split(Path(a.data) / f"{split}.jsonl", limit=a.test)
        ctc_rows = []
        for lo in range(0, len(rows), 50):
            chunk = rows[lo : lo + 50]
            with torch.no_grad():
                batch = pipe.audio_adapter.preprocess([r["path"] for r in chunk])
                ids = pipe.audio_adapter.eval().ctc_best_path(batch)
            ctc_rows += [{**r, "transcript": pipe.tokenizer.decode(x, skip_special_tokens=True).strip()}
                         for r, x in zip(chunk, ids, strict=True)]
        # the same cascade through the pipeline; block_length as text_oracle decodes
        preds = pipe(audio=[r["path"] for r in rows], instruction=[r.get("instruction") for r in rows],
                     read="ctc_text", block_length=pipe.config.gen_length, batch_size=50).texts
        true_preds = text_answers(pipe, rows)
        right = [[normalize_text(r["answer"]) == normalize_text(p) for r, p in zip(rows, ps, strict=True)]
                 for ps in (preds, true_preds)]
        result.setdefault("cascade", {})[split] = {
            "ctc_transcript_as_text": text_oracle(pipe, ctc_rows),
            "pipeline_read_ctc_text": {"accuracy": answer_accuracy([r["answer"] for r in rows], preds)},
            "true_transcript_as_text": answer_report(rows, true_preds),
            # answers the true transcript gets and the pipeline's cascade misses (and the reverse), by kind
            "lost_to_the_transcript": dict(Counter(r["kind"] for r, c, t in zip(rows, *right, strict=True)
                                                   if t and not c)),
            "gained_over_the_transcript": dict(Counter(r["kind"] for r, c, t in zip(rows, *right, strict=True)
                                                       if c and not t))}
        c = result["cascade"][split]
        print(f"cascade {split:13s} accuracy {c['ctc_transcript_as_text']['accuracy']:.3f} "
              f"(pipeline read='ctc_text' {c['pipeline_read_ctc_text']['accuracy']:.3f}, "
              f"true transcript {c['true_transcript_as_text']['accuracy']:.3f})", flush=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print("wrote", a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

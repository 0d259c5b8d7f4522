"""Spoken QA, end to end: the recipe through the one trainer (it synthesises the espeak-ng data on first use and
trains every stage, resumably), then the stage pipelines measured on the test splits.

    python experiments/audio_spoken_qa.py                        # training (resumable) + evaluation
    python experiments/audio_spoken_qa.py --eval-only --test 100 # evaluate an existing run
    python experiments/audio_spoken_qa.py --overrides stages.3.steps=500   # recipe overrides (as for train.py)

Reports, on the training voices (test_seen: new questions) and on voices never trained on (test_heldout):
- stage 1: word error rate of the ASR pipeline (speech -> transcript, backbone frozen);
- stage 2: answer accuracy of the spoken-QA pipeline, overall and per question kind;
- the text oracle: the same frozen backbone given the TRUE transcript as text (the ceiling of stage 2);
- with a CTC head, the same through the cascade (`read="ctc_text"`: the pipeline's saved transcript decoder,
  greedy without one; the transcript read as text), and through the audio prefix with its slots on that decoder's
  transcript (`read="aligned_prefix"`);
- with --also, the audio-prefix reading of other pipeline folders (other runs, other prefix parts);
- decoding cost: one token per step (LLaDA schedule, steps = gen_length) vs threshold decoding (0.9), as model
  forwards and wall-clock latency per answer (median of single-clip calls) and per clip in batches.
Writes experiments/results/audio_spoken_qa.json. CPU-sized: the figures are small-scale.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def text_answers(pipe, rows, batch_size=50) -> list[str]:
    """Each clip's answer from the backbone alone, with the true transcript as text where the audio would be."""
    from pipelines.spoken_qa import text_after_audio

    preds = []
    tok = pipe.tokenizer
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo : lo + batch_size]
        prompts = [text_after_audio(pipe.prompt_text("answer", r.get("instruction")), r["transcript"],
                                    pipe.config.spaced_text) for r in chunk]
        ids, mask = pipe.encode_prompt(prompts)
        sampler = pipe.scheduler.sampler(pipe.model, gen_length=pipe.config.gen_length,
                                         block_length=pipe.config.gen_length, eos_early_stop=True,
                                         mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id)
        out = sampler(pipe.model, ids, mask)
        preds += pipe.decode(out.sequences[:, ids.shape[1] :])
    return preds


def answer_report(rows, preds) -> dict:
    """Answer accuracy of `preds` against the rows' answers, overall and per question kind."""
    from modalities.data.metrics import answer_accuracy

    kinds = sorted({r["kind"] for r in rows})
    by_kind = {k: answer_accuracy([r["answer"] for r in rows if r["kind"] == k],
                                  [p for r, p in zip(rows, preds, strict=True) if r["kind"] == k]) for k in kinds}
    return {"accuracy": answer_accuracy([r["answer"] for r in rows], preds), "accuracy_by_kind": by_kind}


def text_oracle(pipe, rows, batch_size=50) -> dict:
    """Answer accuracy of the backbone alone, with the true transcript as text where the audio would be."""
    return answer_report(rows, text_answers(pipe, rows, batch_size))


def stage_folder(run: Path, cfg, name: str) -> Path:
    """Where the trainer exported a stage: <run>/pipelines/<stage>, or <run>/pipeline for a one-stage recipe."""
    return run / "pipeline" if len(cfg.stages) == 1 else run / "pipelines" / name


def train_record(run: Path) -> tuple[int, float]:
    """Steps trained (result.json) and the seconds of the last run that logged (train.csv)."""
    import csv

    step = json.loads((run / "result.json").read_text())["step"]
    with open(run / "train.csv") as f:
        rows = list(csv.DictReader(f))
    return int(step), float(rows[-1]["elapsed_s"]) if rows else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "audio_spoken_qa.yaml"))
    ap.add_argument("--overrides", nargs="*", default=[])
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--test", type=int, default=200, help="clips per test split to evaluate")
    ap.add_argument("--latency-clips", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "audio_spoken_qa.json"))
    ap.add_argument("--also", nargs="*", default=[], metavar="NAME=FOLDER[:PARTS]",
                    help="more pipeline folders whose audio-prefix reading is measured (WER and accuracy, threshold "
                         "0.9), e.g. other runs' stages; PARTS (e.g. semantic or acoustic,semantic) sets the prefix")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    import pipelines.tasks  # noqa: F401 - registers the built-in tasks
    from latent.training.config import load_config
    from latent.training.trainer import train
    from pipelines.spoken_qa import SpokenQAPipeline
    from pipelines.tasks.spoken_qa import evaluate_spoken_qa, load_rows

    cfg = load_config(a.config, a.overrides)
    run = Path(cfg.run.output_dir)
    if not a.eval_only:
        train(cfg)
    stages = {st.name: stage_folder(run, cfg, st.name) for st in cfg.stages}
    splits = {s: load_rows(cfg, s)[: a.test] for s in ("test_seen", "test_heldout")}
    steps, seconds = train_record(run)
    report = {
        "command": " ".join(["python", "experiments/audio_spoken_qa.py", *(argv if argv is not None else sys.argv[1:])]),
        "config": a.config, "overrides": a.overrides, "train_steps": steps,
        "train_seconds": round(seconds, 1), "threads": a.threads, "machine": platform.processor() or "cpu",
        "test_clips_per_split": a.test,
    }
    decodings = {  # the audio prefix read by the backbone, and (with a CTC head) the cascade through the transcript
        "threshold_0.9": {"threshold": 0.9, "read": "prefix"},
        "one_token_per_step": {"steps": None, "threshold": None, "commit": "schedule", "read": "prefix"},
        "ctc_text_threshold_0.9": {"threshold": 0.9, "read": "ctc_text"},
        "aligned_prefix_threshold_0.9": {"threshold": 0.9, "read": "aligned_prefix"},
    }

    def run_eval(pipe, task, rows, latency):
        res = {}
        for name, kw in decodings.items():
            if kw["read"] != "prefix" and pipe.audio_adapter.config.semantic_pooling != "ctc":
                continue
            kw = dict(kw)
            if name == "one_token_per_step":
                kw["steps"] = pipe.config.gen_length if task == "answer" else pipe.config.transcribe_length
                kw.pop("threshold")
            t = time.perf_counter()
            res[name] = evaluate_spoken_qa(pipe, rows, task, latency_clips=latency, **kw)
            res[name]["eval_seconds"] = round(time.perf_counter() - t, 1)
        return res

    asr_name = next((s.name for s in cfg.stages if "transcribe" in s.tasks), None)
    sqa_name = next((s.name for s in reversed(cfg.stages) if "answer" in s.tasks), None)
    if asr_name and (stages[asr_name] / "model_index.json").exists():
        pipe = SpokenQAPipeline.from_pretrained(stages[asr_name])
        report["stage1_asr"] = {s: run_eval(pipe, "transcribe", rows, a.latency_clips if s == "test_seen" else 0)
                                for s, rows in splits.items()}
    if sqa_name and (stages[sqa_name] / "model_index.json").exists():
        pipe = SpokenQAPipeline.from_pretrained(stages[sqa_name])
        report["stage2_answer"] = {s: run_eval(pipe, "answer", rows, a.latency_clips if s == "test_seen" else 0)
                                   for s, rows in splits.items()}
        report["text_oracle"] = {s: text_oracle(pipe, rows) for s, rows in splits.items()}
    for spec in a.also:
        name, _, folder = spec.partition("=")
        folder, _, parts = folder.partition(":")
        pipe = SpokenQAPipeline.from_pretrained(folder)
        if parts:
            pipe.audio_adapter.set_prefix_parts(parts.split(","))
        report.setdefault("also", {})[name] = {"folder": folder, "parts": list(pipe.audio_adapter.config.prefix_parts),
                                              **{s: {task: evaluate_spoken_qa(pipe, rows, task, threshold=0.9,
                                                                              read="prefix")
                                                     for task in ("transcribe", "answer")}
                                                 for s, rows in splits.items()}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(summary(report))
    return 0


def summary(r: dict) -> str:
    lines = [f"train steps {r['train_steps']} in {r['train_seconds']} s; {r['test_clips_per_split']} clips per split"]
    for key, metric in (("stage1_asr", "wer"), ("stage2_answer", "accuracy")):
        for split, res in r.get(key, {}).items():
            for dec, v in res.items():
                extra = f" latency {v['latency_median_s'] * 1000:.0f} ms ({v['forwards_per_clip_single']:.1f} fwd)" \
                    if "latency_median_s" in v else ""
                lines.append(f"{key:14s} {split:13s} {dec:22s} {metric} {v[metric]:.3f}  batched "
                             f"{v['seconds_per_clip_batched'] * 1000:.1f} ms/clip, {v['forwards_per_batch']:.1f} "
                             f"fwd/batch{extra}")
    for split, v in r.get("text_oracle", {}).items():
        lines.append(f"text_oracle    {split:13s} accuracy {v['accuracy']:.3f} {v['accuracy_by_kind']}")
    for name, v in r.get("also", {}).items():
        for split in ("test_seen", "test_heldout"):
            lines.append(f"{name} [{','.join(v['parts'])}] {split}: wer {v[split]['transcribe']['wer']:.3f} "
                         f"accuracy {v[split]['answer']['accuracy']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

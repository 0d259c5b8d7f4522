"""Batch captioning engines side by side: images/s of the local runner and of Ray actors, same images.

    python benchmarks/caption_engines.py                      # 2,000 rendered scenes, 2 Ray workers
    python benchmarks/caption_engines.py --model runs/x/pipeline --images 5000 --workers 4

The captioner is the quickstart recipe (configs/caption_quickstart.yaml) trained for `--train-minutes`
(kept in `--work` and reused), unless `--model` names a pipeline folder. The images are rendered scenes
(modalities.data.scenes), two of them corrupt files so both engines write error records. Each engine
captions all of them into its own fresh output; the Ray output is checked equal, record for record and in
order, to the local one (timings aside). Reported: captioning images/s (the job's own figure: loading,
decoding and writing, after the model is loaded), start-up seconds (model load; for Ray also starting the
instance and its replicas), and the machine's load average around each run, since the machine may be shared.
Writes experiments/results/caption_engines.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipelines.batch import describe_captioner, open_captioner, run_captioning  # noqa: E402

TIMINGS = ("seconds", "load_seconds")


def quickstart_pipeline(work: str, minutes: float) -> str:
    folder = os.path.join(work, "quickstart", "pipeline")
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        import pipelines.tasks  # noqa: F401 - registers the built-in tasks
        from latent.training.config import load_config
        from latent.training.trainer import train

        recipe = os.path.join(ROOT, "configs", "caption_quickstart.yaml")
        train(load_config(recipe, [f"run.output_dir={os.path.join(work, 'quickstart')}",
                                   f"trainer.time_limit_minutes={minutes}", "trainer.threads=1"]))
    return folder


def scene_images(work: str, n: int) -> str:
    from modalities.data.scenes import make_split, write_split

    folder = os.path.join(work, "images")
    if not os.path.isdir(folder) or len(os.listdir(folder)) != n:
        shutil.rmtree(folder, ignore_errors=True)
        write_split(make_split("test", n - 2), work, "images")
        for name in ("corrupt.png", "not_an_image.jpg"):
            with open(os.path.join(folder, name), "wb") as f:
                f.write(b"\x89PNG\r\n\x1a\n cut short")
    return folder


def records(path: str) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in json.loads(x).items() if k not in TIMINGS} for x in f]


def timed_job(make_engine, model: str, images: str, out: str, batch_size: int, num_workers: int) -> dict:
    for leftover in (out, out + ".manifest.json"):
        if os.path.exists(leftover):
            os.unlink(leftover)
    load_before = os.getloadavg()
    t = time.perf_counter()
    captioner, engine = make_engine()
    started = time.perf_counter() - t
    try:
        s = run_captioning(captioner, images, out, batch_size=batch_size, num_workers=num_workers, progress=False,
                           engine=engine, producer=describe_captioner(captioner, {}, model=model))
    finally:
        if engine is not None:
            engine.close()
    return {"images_per_second": round(s.images_per_second, 2), "captioning_seconds": round(s.seconds, 2),
            "startup_seconds": round(started, 2), "captioned": s.succeeded, "errors": s.failed,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2, help="Ray replicas (one CPU and one torch thread each)")
    ap.add_argument("--local-threads", type=int, default=1,
                    help="torch threads of the local runner's decoder (1: fastest on a shared machine)")
    ap.add_argument("--num-workers", type=int, default=2, help="the local runner's loading processes")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--model", default=None, help="a CaptioningPipeline folder (default: train the quickstart)")
    ap.add_argument("--train-minutes", type=float, default=2.0)
    ap.add_argument("--work", default=os.path.join(ROOT, "runs", "caption_engines"))
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "caption_engines.json"))
    a = ap.parse_args(argv)

    os.makedirs(a.work, exist_ok=True)
    model = a.model or quickstart_pipeline(a.work, a.train_minutes)
    images = scene_images(a.work, a.images)
    runs = {}

    def local():
        return open_captioner(model, "cpu", None, a.local_threads), None

    def ray():
        from pipelines.batch_ray import RayCaptioners

        return None, RayCaptioners(functools.partial(open_captioner, model, "cpu", None, 1), workers=a.workers)

    for name, make in (("local", local), (f"ray_{a.workers}_workers", ray)):
        print(f"== {name}", flush=True)
        runs[name] = timed_job(make, model, images, os.path.join(a.work, f"{name}.jsonl"), a.batch_size,
                               a.num_workers)
        print(json.dumps(runs[name]), flush=True)
    outputs = [records(os.path.join(a.work, f"{name}.jsonl")) for name in runs]
    result = {
        "what": "mmdlm caption: local runner vs Ray actors on the same images (benchmarks/caption_engines.py)",
        "command": "python " + " ".join(["benchmarks/caption_engines.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": os.path.relpath(model, ROOT) if a.model is None else a.model,
        "trained_minutes": None if a.model else a.train_minutes,
        "images": a.images, "batch_size": a.batch_size,
        "local": {"decoder_threads": a.local_threads, "loader_processes": a.num_workers},
        "ray": {"workers": a.workers, "threads_per_worker": 1},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "note": "shared by other jobs: see the load averages of each run"},
        "runs": runs,
        "ray_output_equals_local": all(o == outputs[0] for o in outputs[1:]),
        "ray_speedup": round(runs[f"ray_{a.workers}_workers"]["images_per_second"] / runs["local"]["images_per_second"], 3),
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps({k: result[k] for k in ("ray_output_equals_local", "ray_speedup")}))
    return result


if __name__ == "__main__":
    main()

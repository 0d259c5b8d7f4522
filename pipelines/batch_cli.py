"""`mmdlm caption`: the command line of the batch captioning job (pipelines.batch), on either engine.

    mmdlm caption --model DIR --images FOLDER --out captions.jsonl                  # this process decodes
    mmdlm caption --model DIR --images FOLDER --out captions.jsonl --engine ray --workers 4

`--engine local` (the default) decodes in this process while `--num-workers` processes load images;
`--engine ray` runs `--workers` model replicas as Ray actors (pipelines.batch_ray) on a local Ray instance
or the cluster at `--ray-address`. Both write the same records in the same order, under the same lock and
manifest, so a job begun with one engine resumes with the other.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from pipelines.batch import (
    BatchJobError,
    OutputLock,
    check_writable,
    describe_captioner,
    dist_shard,
    folder_hash,
    list_images,
    merge_shards,
    open_captioner,
    output_file,
    parse_shard,
    repair_output,
    run_captioning,
)

__all__ = ["configure", "run", "main"]


SHARDING_HELP = (
    "Sharding: with --shard i/n (or under torchrun) a process captions only its share of the images into "
    "OUT.shards/shard-0000i-of-0000n.jsonl and leaves OUT untouched; when a shard finishes it marks its file "
    "done, and the shard that finishes last merges every shard file into OUT (lines already in OUT are kept, "
    "no image twice, input order). Until then the other shards print that they wait. A stopped shard resumes "
    "when rerun with the same arguments. With --no-merge, merge by hand with --merge-only --shard 0/n "
    "--out OUT once all n shards are done. "
    "Safety: one job at a time writes OUT (a second is refused, naming the first); OUT.manifest.json says "
    "which model and settings made the records, and a resume with others is refused unless --redo or "
    "--overwrite is given; --repair --out OUT keeps one record per image."
)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def configure(p: argparse.ArgumentParser) -> None:
    p.epilog = SHARDING_HELP
    p.add_argument("--model", help="CaptioningPipeline folder, or package.module:factory (needed unless --merge-only)")
    p.add_argument("--images", help="folder (recursive), glob pattern, or .txt list of paths (needed unless --merge-only)")
    p.add_argument("--out", required=True, help="JSONL output; appended to, so a re-run resumes")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader processes loading images")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--dtype", default=None, choices=[None, "float32", "float16", "bfloat16"])
    p.add_argument("--shard", default=None,
                   help="i/n: caption only shard i of n into OUT.shards/ (default: RANK/WORLD_SIZE); see below")
    p.add_argument("--no-merge", action="store_true", help="leave OUT untouched even when this shard finishes last")
    p.add_argument("--merge-only", action="store_true",
                   help="merge the finished shard files of --shard ?/n into OUT and exit (1 if some are unfinished)")
    p.add_argument("--retry-errors", action="store_true", help="caption again images recorded as errors")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true",
                       help="start OUT anew with these settings: its earlier records are dropped now")
    again.add_argument("--redo", action="store_true",
                       help="caption every image again into OUT.redo, which replaces OUT once complete")
    p.add_argument("--repair", action="store_true",
                   help="rewrite OUT with one record per image (atomically); alone, needs only --out")
    p.add_argument("--prompt", default=None)
    p.add_argument("--gen-length", type=int, default=None)
    p.add_argument("--block-length", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threshold", type=_finite_float, default=None, help="threshold decoding (default: the pipeline's)")
    p.add_argument("--temperature", type=_finite_float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads of the decoding process (default: torch's)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process decodes, --num-workers processes load; ray: --workers model replicas "
                   "as Ray actors load and decode, this process writes OUT (same records, same order)")
    p.add_argument("--ray-address", default=None,
                   help="with --engine ray: the cluster to join, e.g. auto or 10.0.0.1:6379 (default: start a local one)")
    p.add_argument("--workers", type=int, default=None, help="with --engine ray: model replicas (default 2)")
    p.add_argument("--gpus-per-worker", type=_finite_float, default=None,
                   help="with --engine ray: GPUs each replica reserves (default 0; then use --device cuda)")


def run(args: argparse.Namespace) -> int:
    if args.merge_only:
        shard = parse_shard(args.shard) if args.shard else dist_shard()
        if shard is None:
            raise BatchJobError("--merge-only needs --shard i/n (any i) to know n.")
        return 0 if merge_shards(args.out, shard[1], replace=args.overwrite or args.redo) else 1
    if args.repair:
        repair_output(args.out)
        if args.model is None and args.images is None:
            return 0
    if args.model is None or args.images is None:
        raise BatchJobError("--model and --images are needed (only --merge-only and --repair run without them).")
    ray_only = [name for name, v in (("--ray-address", args.ray_address), ("--workers", args.workers),
                                     ("--gpus-per-worker", args.gpus_per_worker)) if v is not None]
    if args.engine != "ray" and ray_only:
        raise BatchJobError(f"{', '.join(ray_only)}: options of --engine ray; add --engine ray or leave them out.")
    # Check everything cheap, and take the output, before loading the model.
    check_writable(args.out)
    list_images(args.images)
    shard = parse_shard(args.shard) if args.shard else dist_shard()
    target = output_file(args.out, shard)
    check_writable(target)
    with OutputLock(target) as lock, ThreadPoolExecutor(1) as pool:
        # The model folder is hashed while it loads (hashlib runs outside the GIL): a large model costs no extra wait.
        model_hash = pool.submit(folder_hash, args.model) if os.path.isdir(args.model) else None
        load = functools.partial(open_captioner, args.model, args.device, args.dtype, args.threads)
        if args.engine == "ray":
            from pipelines.batch_ray import RayCaptioners  # imports Ray: only when asked for

            engine = RayCaptioners(load, workers=2 if args.workers is None else args.workers,
                                   address=args.ray_address, gpus_per_worker=args.gpus_per_worker or 0)
            captioner, accepts_seed = None, engine.accepts_seed
        else:
            engine, captioner = None, load()
            accepts_seed = getattr(captioner, "accepts_seed", False)
        gen = {k: getattr(args, k) for k in ("prompt", "gen_length", "block_length", "steps", "threshold", "temperature")}
        gen = {k: v for k, v in gen.items() if v is not None}
        if args.seed is not None and accepts_seed:
            gen["seed"] = args.seed
        try:
            run_captioning(
                captioner, args.images, args.out, batch_size=args.batch_size, num_workers=args.num_workers,
                shard=shard, merge=not args.no_merge, retry_errors=args.retry_errors, progress=not args.no_progress,
                caption_kwargs=gen, overwrite=args.overwrite, redo=args.redo, lock=lock, engine=engine,
                producer=describe_captioner(captioner, gen, args.dtype, args.model, model_hash and model_hash.result()),
            )
        finally:
            if engine is not None:
                engine.close()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mmdlm caption", description=__doc__.split("\n\n")[0])
    configure(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except BatchJobError as err:
        print(f"mmdlm caption: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

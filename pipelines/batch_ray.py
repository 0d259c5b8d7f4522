"""Batch captioning on Ray: `mmdlm caption --engine ray --workers N [--ray-address ADDR] ...`.

The job is `pipelines.batch.run_captioning` with another engine: the lock, the manifest, resuming,
sharding, error records and the output format are the local runner's. Only who captions changes:

- N Ray actors each hold a replica of the captioner (loaded by the actor, from `--model`, or sent once
  through Ray's object store by the Python API) and turn a batch of (index, path) pairs into its records:
  the actor reads and preprocesses the images (`batch.load_batch`) and decodes them (`batch.caption_batch`),
  so a bad image is the same error record as in the local runner.
- The driver cuts the pending images into the local runner's batches (`batch.batches_of`), keeps at most
  2N batches outstanding (each new one goes to the actor with the fewest running), and writes finished
  batches in submission order: the output's lines come in the local runner's order, and the driver alone writes
  the output (append and flush per batch), so a killed job resumes like a local one.
- Plain actors rather than Ray Data: the order is exact, nothing but `ray` is needed, and memory is
  bounded by the 2N outstanding batches (the records of batches waiting on a slower one included).

`ray` is imported only here, and only when a Ray engine is made.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from pipelines.batch import (
    BatchJobError,
    Summary,
    batches_of,
    caption_batch,
    describe_captioner,
    load_batch,
    run_captioning,
)

__all__ = ["RayCaptioners", "run_captioning_ray"]

IN_FLIGHT_PER_WORKER = 2  # one batch decoding, one queued: an actor never waits on the driver


def import_ray():
    try:
        import ray
    except ImportError as err:
        raise BatchJobError(
            f"--engine ray needs Ray, which is not installed here ({err}); install it with "
            "pip install 'mmdlm[ray]' (or pip install ray), or use --engine local."
        ) from err
    return ray


class CaptionWorker:
    """What one actor runs: a captioner replica that captions batches of (index, path) pairs."""

    def __init__(self, captioner_or_factory):
        source = captioner_or_factory
        self.captioner = source if hasattr(source, "caption") else source()

    def info(self) -> dict:
        return {"pid": os.getpid(), "accepts_seed": bool(getattr(self.captioner, "accepts_seed", False))}

    def describe(self, caption_kwargs: dict) -> dict:
        return describe_captioner(self.captioner, caption_kwargs)

    def caption(self, items: list[tuple[int, str]], caption_kwargs: dict) -> list[dict]:
        return caption_batch(self.captioner, load_batch(self.captioner.preprocessor, items), caption_kwargs)


class RayCaptioners:
    """`workers` captioner replicas as Ray actors: an engine for `run_captioning(..., engine=...)`.

    `captioner`: a captioner (pickled once into Ray's object store; each actor gets a copy), or a
    picklable function with no arguments that makes one in each actor (the command line passes
    `batch.open_captioner` with --model). `address`: a running cluster to join ("auto", "host:port",
    "ray://host:10001"); by default a local Ray instance is started, and stopped again by `close()`.
    An already initialised Ray (`ray.init` called by the program) is used as it is."""

    def __init__(self, captioner: Any, workers: int = 2, address: str | None = None, cpus_per_worker: float = 1,
                 gpus_per_worker: float = 0, log: Callable[[str], Any] | None = None):
        log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise BatchJobError(f"--workers must be an int >= 1 (model replicas as Ray actors), got {workers!r}.")
        if cpus_per_worker < 0 or gpus_per_worker < 0:
            raise BatchJobError("the CPUs and --gpus-per-worker each Ray worker reserves must be >= 0.")
        ray = import_ray()
        self.ray, self.workers = ray, workers
        self.started = not ray.is_initialized()
        if self.started:
            # A local instance gets room for every replica, even beyond this machine's cores.
            local = {} if address else {"num_cpus": max(os.cpu_count() or 1, int(workers * cpus_per_worker + 0.999))}
            ray.init(address=address, include_dashboard=False, log_to_driver=True, configure_logging=False, **local)
        elif address:
            log(f"Ray is already initialised in this process; --ray-address {address} is not used.")
        need = {"CPU": workers * cpus_per_worker, "GPU": workers * gpus_per_worker}
        have = ray.cluster_resources()
        short = [f"{need[k]:g} {k}s (the cluster has {have.get(k, 0):g})" for k in need
                 if need[k] > have.get(k, 0)]
        if short:
            self.close()
            raise BatchJobError(
                f"--workers {workers} replicas need {' and '.join(short)}; lower --workers or --gpus-per-worker, "
                "or give a larger cluster with --ray-address."
            )
        source = captioner if callable(captioner) and not hasattr(captioner, "caption") else ray.put(captioner)
        # Batches are pure functions of their images: a replica lost with its node is restarted and its
        # batches run again, so nothing is written twice or lost.
        actor = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=2,
                           max_task_retries=2)(CaptionWorker)
        self.actors = [actor.remote(source) for _ in range(workers)]
        try:
            self.infos = ray.get([a.info.remote() for a in self.actors])  # each replica is loaded
        except Exception:
            self.close()
            raise
        log(f"Ray engine: {workers} captioner replicas ready (pids {', '.join(str(i['pid']) for i in self.infos)}).")

    @property
    def accepts_seed(self) -> bool:
        return self.infos[0]["accepts_seed"]

    def describe(self, caption_kwargs: dict | None = None) -> dict:
        """`describe_captioner` of the replicas' captioner (run in an actor: the model is there)."""
        return self.ray.get(self.actors[0].describe.remote(dict(caption_kwargs or {})))

    def __call__(self, pending: list[tuple[int, str]], batch_size: int, caption_kwargs: dict) -> Iterator[list[dict]]:
        ray, batches = self.ray, batches_of(pending, batch_size)
        window = IN_FLIGHT_PER_WORKER * len(self.actors)
        running: dict = {}  # object ref -> (batch number, actor number)
        finished: dict[int, list[dict]] = {}
        load = [0] * len(self.actors)
        submitted = written = 0
        try:
            while written < len(batches):
                while submitted < len(batches) and submitted - written < window:
                    a = min(range(len(load)), key=load.__getitem__)
                    ref = self.actors[a].caption.remote(batches[submitted], caption_kwargs)
                    running[ref] = (submitted, a)
                    load[a] += 1
                    submitted += 1
                if written in finished:
                    yield finished.pop(written)
                    written += 1
                    continue
                ready, _ = ray.wait(list(running), num_returns=1)
                for ref in ready:
                    k, a = running.pop(ref)
                    load[a] -= 1
                    finished[k] = ray.get(ref)
        finally:
            for ref in running:  # a stopped job: queued batches are not run
                try:
                    ray.cancel(ref)
                except Exception:  # noqa: BLE001 - already finished, or its actor is gone
                    pass

    def close(self) -> None:
        for a in getattr(self, "actors", []):
            self.ray.kill(a)
        self.actors = []
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
            self.started = False

    def __enter__(self) -> RayCaptioners:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_captioning_ray(captioner: Any, images, out: str | os.PathLike, workers: int = 2,
                       address: str | None = None, caption_kwargs: dict | None = None,
                       producer: dict | None = None, gpus_per_worker: float = 0,
                       log: Callable[[str], Any] | None = None, **job) -> Summary:
    """`run_captioning` with `workers` Ray actors captioning (see `RayCaptioners` for `captioner` and
    `address`); `job` takes run_captioning's other arguments (batch_size, shard, redo, ...). A captioner
    object is described as the local runner describes it, so a job begun by either engine resumes in the other."""
    with RayCaptioners(captioner, workers, address, gpus_per_worker=gpus_per_worker, log=log) as engine:
        if producer is None:
            producer = (describe_captioner(captioner, caption_kwargs) if hasattr(captioner, "caption")
                        else engine.describe(caption_kwargs))
        return run_captioning(None, images, out, caption_kwargs=caption_kwargs, producer=producer, engine=engine,
                              log=log, **job)


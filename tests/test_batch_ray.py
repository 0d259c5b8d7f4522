"""The Ray engine of the batch captioning job: the local runner's records, in its order, and its resume.

One local Ray instance (2 CPUs) and one pool of 2 actors serve the module (starting actors is the slow
part); each actor loads its replica as the command line's actors do (`batch.open_captioner`). The
captioner is test_batch's mean-colour fake, slowed on one image so that batches finish out of order
and the driver must put them back in order.
"""

import functools
import json
import os
import shutil
import sys
import time

import pytest
from test_batch import ROOT, TESTS, FakeCaptioner, key, lines, make_images, quiet

from pipelines.batch import describe_captioner, manifest_path, open_captioner, run_captioning
from pipelines.cli import main as cli_main

TIMINGS = ("seconds", "load_seconds")


class UnevenCaptioner(FakeCaptioner):
    """The fake captioner, but a batch holding the black image (img000) takes 0.6 s more: it comes back last."""

    def __init__(self):
        super().__init__(light=True)

    def caption(self, pixels, **kw):
        caps = super().caption(pixels, **kw)
        if "colour 0 0 0" in caps:
            time.sleep(0.6)
        return caps


def make_uneven(device=None):
    return UnevenCaptioner()


def without_timings(recs):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in recs]


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[dev]' installs it)")
    old = os.environ.get("PYTHONPATH")
    # the actors import test_batch (the fake captioner's module) and the project
    os.environ["PYTHONPATH"] = os.pathsep.join([TESTS, ROOT, *([old] if old else [])])
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def engine(ray_instance):
    from pipelines.batch_ray import RayCaptioners

    with RayCaptioners(functools.partial(open_captioner, "test_batch_ray:make_uneven"), workers=2, log=quiet()) as pool:
        yield pool


def ray_job(engine, images, out, **kw):
    return run_captioning(None, images, out, engine=engine, producer=describe_captioner(UnevenCaptioner()),
                          progress=False, **{"log": quiet(), **kw})


def test_ray_records_equal_the_local_runners_in_its_order(engine, tmp_path):
    d = make_images(tmp_path / "imgs", 21, bad={6, 13})
    (tmp_path / "imgs" / "fake.jpg").write_text("not a jpeg")
    local = run_captioning(UnevenCaptioner(), d, tmp_path / "local.jsonl", batch_size=3, num_workers=0,
                           progress=False, log=quiet())
    got = ray_job(engine, d, tmp_path / "ray.jsonl", batch_size=3)
    want, recs = lines(tmp_path / "local.jsonl"), lines(tmp_path / "ray.jsonl")
    assert len(recs) == 22 and without_timings(recs) == without_timings(want)  # same records, same order
    assert [sorted(r) for r in recs] == [sorted(r) for r in want] and all(r[t] >= 0 for r in recs if "caption" in r
                                                                          for t in TIMINGS)
    errors = [r for r in recs if "error" in r]
    assert len(errors) == 3 and errors == [r for r in want if "error" in r]  # bad images: the same error records
    assert (got.succeeded, got.failed, got.new) == (local.succeeded, local.failed, local.new) == (19, 3, 22)
    manifests = [json.loads(open(manifest_path(str(tmp_path / f))).read()) for f in ("local.jsonl", "ray.jsonl")]
    assert manifests[0]["fingerprint"] == manifests[1]["fingerprint"]
    assert not os.path.exists(str(tmp_path / "ray.jsonl") + ".lock")


def test_a_stopped_job_resumes_on_ray_and_equals_the_full_output(engine, tmp_path):
    d = make_images(tmp_path / "imgs", 17, bad={9})
    full = tmp_path / "full.jsonl"
    run_captioning(UnevenCaptioner(), d, full, batch_size=2, num_workers=0, progress=False, log=quiet())
    out = tmp_path / "o.jsonl"
    data = full.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(data[:5]) + data[5][:20])  # 5 records and a torn line, as a kill leaves it
    shutil.copy(manifest_path(str(full)), manifest_path(str(out)))
    logs = []
    s = ray_job(engine, d, out, batch_size=2, log=logs.append)
    assert s.new == 12 and any("5 already in" in m and "12 to caption" in m for m in logs)
    assert without_timings(lines(out)) == without_timings(lines(full))
    assert lines(out)[:5] == [json.loads(x) for x in data[:5]]  # the records already there are kept as they were
    again = ray_job(engine, d, out, batch_size=2)  # complete: nothing to do
    assert again.new == 0 and [key(r) for r in lines(out)] == [key(r) for r in lines(full)]


def test_the_command_line_runs_the_ray_engine(engine, tmp_path, capsys, monkeypatch):
    import pipelines.batch_ray as batch_ray

    d = make_images(tmp_path / "imgs", 9, bad={2})
    base = ["caption", "--model", "test_batch:make_fake", "--images", str(d), "--batch-size", "2", "--no-progress"]
    # more replicas than the instance holds: refused before an actor waits forever for a CPU
    assert cli_main([*base, "--out", str(tmp_path / "big.jsonl"), "--engine", "ray", "--workers", "5"]) == 2
    assert "--workers 5 replicas need 5 CPUs (the cluster has 2)" in capsys.readouterr().err
    made = []

    class SharedPool:  # the module's actors stand in for the ones the command would start
        accepts_seed = engine.accepts_seed

        def __init__(self, load, **options):
            made.append((load, options))

        def __call__(self, *args):
            return engine(*args)

        def close(self):
            pass

    monkeypatch.setattr(batch_ray, "RayCaptioners", SharedPool)
    assert cli_main([*base, "--out", str(tmp_path / "local.jsonl"), "--num-workers", "0"]) == 0
    assert cli_main([*base, "--out", str(tmp_path / "ray.jsonl"), "--engine", "ray", "--workers", "2"]) == 0
    assert "8 captioned, 1 failed, 9 in total" in capsys.readouterr().err
    (load, options), = made
    assert load.func is open_captioner and load.args == ("test_batch:make_fake", None, None, None)
    assert options == {"workers": 2, "address": None, "gpus_per_worker": 0}
    assert without_timings(lines(tmp_path / "ray.jsonl")) == without_timings(lines(tmp_path / "local.jsonl"))
    manifests = [json.loads(open(manifest_path(str(tmp_path / f))).read()) for f in ("local.jsonl", "ray.jsonl")]
    assert manifests[1]["producer"]["model"] == {"factory": "test_batch:make_fake"}
    assert manifests[0]["fingerprint"] == manifests[1]["fingerprint"]  # the engine does not choose the captions
    # the replicas describe their captioner as the local runner does: their records resume each other's
    assert engine.describe({"steps": 4}) == describe_captioner(UnevenCaptioner(), {"steps": 4})


def test_ray_options_and_a_missing_ray_are_clear_errors(tmp_path, capsys, monkeypatch):
    d = make_images(tmp_path / "imgs", 1)
    base = ["caption", "--model", "test_batch:make_fake", "--images", str(d), "--out", str(tmp_path / "o.jsonl")]
    assert cli_main([*base, "--workers", "2"]) == 2
    assert "--workers: options of --engine ray" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    assert cli_main([*base, "--engine", "ray"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--engine ray needs Ray" in err and "pip install 'mmdlm[ray]'" in err and "--engine local" in err
    assert not os.path.exists(str(tmp_path / "o.jsonl") + ".lock")


def test_a_replica_is_a_captioner_sent_or_one_it_makes(tmp_path):
    from pipelines.batch_ray import CaptionWorker

    d = make_images(tmp_path / "imgs", 5, bad={3})
    run_captioning(UnevenCaptioner(), d, tmp_path / "local.jsonl", batch_size=5, num_workers=0, progress=False,
                   log=quiet())
    items = [(i, os.path.join(d, f"img{i:03d}.png")) for i in range(5)]
    sent, made = CaptionWorker(UnevenCaptioner()), CaptionWorker(functools.partial(make_uneven))
    want = without_timings(lines(tmp_path / "local.jsonl"))
    assert without_timings(sent.caption(items, {})) == without_timings(made.caption(items, {})) == want

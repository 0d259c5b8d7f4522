"""Batch captioning job: resume after SIGKILL, error lines, sharding union, torchrun ranks, bad input.

The runner is tested with a cheap fake captioner (mean colour of each image) so the tests are fast;
test_captioning.py runs the real pipeline through the same command.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.batch import (
    BatchJobError,
    OutputLock,
    OutputLocked,
    describe_captioner,
    folder_hash,
    list_images,
    manifest_path,
    merge_shards,
    read_done,
    read_records,
    run_captioning,
    shard_of,
    shard_path,
)
from pipelines.cli import main as cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


def light_preprocessor(path):
    """Path -> float [3, 8, 8] with PIL only (subprocesses skip importing timm: they start faster)."""
    with Image.open(path) as im:
        im = im.convert("RGB").resize((8, 8))
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)


class FakeCaptioner:
    """Captions an image by its mean colour; `delay` seconds per batch make a run long enough to kill."""

    def __init__(self, delay: float = 0.0, device=None, light: bool = False):
        if light:
            self.preprocessor = light_preprocessor
        else:
            from modalities.vision import ImagePreprocessor

            self.preprocessor = ImagePreprocessor(input_size=(8, 8), mean=(0, 0, 0), std=(1, 1, 1))
        self.delay = delay

    def caption(self, pixels, **kw):
        time.sleep(self.delay)
        means = (pixels.mean((2, 3)) * 255).round().int().tolist()
        return [f"colour {r} {g} {b}" for r, g, b in means]


def make_fake(device=None):
    return FakeCaptioner(delay=float(os.environ.get("FAKE_DELAY", "0")), light=True)


def make_other(device=None):
    """Another model, as far as the job can tell."""
    return FakeCaptioner(light=True)


def make_images(folder, n, bad=()):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        path = os.path.join(folder, f"img{i:03d}.png")
        if i in bad:
            with open(path, "wb") as f:
                f.write(b"\x89PNG\r\n\x1a\n truncated")
        else:
            Image.new("RGB", (12 + i % 5, 10), (i * 7 % 256, i * 13 % 256, i * 29 % 256)).save(path)
    return folder


def lines(path):
    with open(path) as f:
        return [json.loads(x) for x in f]


def key(rec):
    return rec["path"], rec.get("caption"), rec.get("error")


def test_listing_and_bad_inputs(tmp_path):
    d = make_images(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "notes.txt").write_text("x")
    assert [os.path.basename(p) for p in list_images(d)] == ["img000.png", "img001.png", "img002.png"]
    assert len(list_images(str(tmp_path / "imgs" / "*.png"))) == 3
    lst = tmp_path / "list.txt"
    lst.write_text("# two images\nimgs/img002.png\n\nimgs/img000.png\nimgs/img002.png\n")
    assert [os.path.basename(p) for p in list_images(str(lst))] == ["img002.png", "img000.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(BatchJobError, match="folder with no images"):
        list_images(str(tmp_path / "empty"))
    with pytest.raises(BatchJobError, match="matches no files"):
        list_images(str(tmp_path / "nothing*.png"))
    with pytest.raises(BatchJobError, match="names no images"):
        list_images([])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(BatchJobError, match="names no images"):
        list_images(str(tmp_path / "empty.txt"))


def test_unwritable_output_keeps_what_was_written(tmp_path):
    d = make_images(tmp_path / "imgs", 2)
    with pytest.raises(BatchJobError, match="is a folder"):
        run_captioning(FakeCaptioner(), d, tmp_path, progress=False, log=lambda s: None)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(BatchJobError, match="cannot write --out"):
        run_captioning(FakeCaptioner(), d, blocker / "sub" / "out.jsonl", progress=False, log=lambda s: None)
    out = tmp_path / "out.jsonl"
    out.write_text('{"path": "earlier.png", "caption": "kept"}\n')
    with pytest.raises(BatchJobError, match="--batch-size"):
        run_captioning(FakeCaptioner(), d, out, batch_size=0, progress=False, log=lambda s: None)
    # records that no manifest names were made by someone else: refused, and left as they were
    with pytest.raises(BatchJobError, match="no out.jsonl.manifest.json saying what produced them"):
        run_captioning(FakeCaptioner(), d, out, num_workers=0, progress=False, log=lambda s: None)
    assert lines(out) == [{"path": "earlier.png", "caption": "kept"}]


def test_errors_are_lines_and_the_job_goes_on(tmp_path):
    d = make_images(tmp_path / "imgs", 6, bad={1})
    (tmp_path / "imgs" / "tiny.png").parent.mkdir(exist_ok=True)
    Image.new("RGB", (1, 1)).save(tmp_path / "imgs" / "tiny.png")
    (tmp_path / "imgs" / "fake.jpg").write_text("not a jpeg")
    logs = []
    s = run_captioning(FakeCaptioner(), d, tmp_path / "o.jsonl", batch_size=3, num_workers=0, progress=False,
                       log=logs.append)
    recs = {os.path.basename(r["path"]): r for r in lines(tmp_path / "o.jsonl")}
    assert len(recs) == 8 and s.succeeded == 5 and s.failed == 3
    assert "not a readable image" in recs["img001.png"]["error"]
    assert "1x1" in recs["tiny.png"]["error"] and "fake.jpg" in recs["fake.jpg"]["error"]
    assert recs["img000.png"]["caption"] == "colour 0 0 0" and recs["img000.png"]["seconds"] >= 0
    assert "5 captioned, 3 failed" in logs[-1]
    # a re-run does nothing; --retry-errors redoes only the errors (they fail again, one line each)
    s2 = run_captioning(FakeCaptioner(), d, tmp_path / "o.jsonl", num_workers=0, progress=False, log=logs.append)
    assert s2.new == 0 and len(lines(tmp_path / "o.jsonl")) == 8
    s3 = run_captioning(FakeCaptioner(), d, tmp_path / "o.jsonl", num_workers=0, retry_errors=True, progress=False,
                        log=logs.append)
    assert s3.new == 3 and len(lines(tmp_path / "o.jsonl")) == 8 and s3.failed == 3


def test_torn_last_line_is_redone(tmp_path):
    d = make_images(tmp_path / "imgs", 5)
    out = tmp_path / "o.jsonl"
    run_captioning(FakeCaptioner(), d, out, num_workers=0, progress=False, log=lambda s: None)
    full = lines(out)
    data = out.read_bytes()
    cut = data.rfind(b"\n", 0, len(data) - 1)
    out.write_bytes(data[: cut + 10])  # last line half written, as after a kill mid-write
    s = run_captioning(FakeCaptioner(), d, out, num_workers=0, progress=False, log=lambda s: None)
    assert s.new == 1 and [key(r) for r in lines(out)] == [key(r) for r in full]


def test_shards_union_equals_unsharded_output(tmp_path):
    d = make_images(tmp_path / "imgs", 23, bad={4})
    run_captioning(FakeCaptioner(), d, tmp_path / "all.jsonl", batch_size=4, num_workers=0, progress=False,
                   log=lambda s: None)
    out = tmp_path / "sharded.jsonl"
    merged = []
    for i in (2, 0, 1):
        s = run_captioning(FakeCaptioner(), d, out, batch_size=4, num_workers=0, shard=f"{i}/3", progress=False,
                           log=lambda s: None)
        merged.append(s.merged)
    assert merged == [False, False, True]  # the last shard to finish merges
    shard_sets = [{key(r) for r in lines(shard_path(str(out), (i, 3)))} for i in range(3)]
    assert sum(map(len, shard_sets)) == 23 and set.union(*shard_sets) == {key(r) for r in lines(tmp_path / "all.jsonl")}
    assert [key(r) for r in lines(out)] == [key(r) for r in lines(tmp_path / "all.jsonl")]  # same order too
    assert all(shard_of(r["path"], 3) == i for i in range(3) for r in lines(shard_path(str(out), (i, 3))))
    assert merge_shards(str(out), 3, log=lambda s: None)  # merging again is idempotent
    assert len(lines(out)) == 23
    with pytest.raises(BatchJobError, match="0 <= i < n"):
        run_captioning(FakeCaptioner(), d, out, shard="3/3", progress=False)


def test_waiting_shards_say_how_the_merge_works(tmp_path, capsys):
    d = make_images(tmp_path / "imgs", 9)
    out = tmp_path / "o.jsonl"
    logs = []
    first = run_captioning(FakeCaptioner(), d, out, num_workers=0, shard="0/2", progress=False, log=logs.append)
    assert not first.merged and out.read_text() == ""
    wait = " ".join(next(m for m in logs if "not finished" in m).split())
    assert "finishes last merges them all into" in wait and f"--merge-only --shard 0/2 --out {out}" in wait
    logs.clear()
    run_captioning(FakeCaptioner(), d, out, num_workers=0, shard="1/2", merge=False, progress=False, log=logs.append)
    assert out.read_text() == "" and any("--no-merge" in m and "--merge-only" in m for m in logs)
    # the merge by hand needs neither --model nor --images
    assert cli_main(["caption", "--merge-only", "--shard", "0/2", "--out", str(out)]) == 0
    assert len(lines(out)) == 9
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli_main(["caption", "--help"])
    helptext = " ".join(capsys.readouterr().out.split())
    assert "the shard that finishes last merges every shard file into OUT" in helptext
    assert "--merge-only --shard 0/n --out OUT" in helptext
    assert cli_main(["caption", "--out", str(out), "--images", str(d)]) == 2
    assert "--model and --images are needed" in capsys.readouterr().err


def _cli(*args, env=None, **kw):
    e = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, ROOT]), OMP_NUM_THREADS="1", **(env or {}))
    return [sys.executable, "-m", "pipelines.cli", "caption", "--model", "test_batch:make_fake", *args], e


def test_resume_after_sigkill(tmp_path):
    d = make_images(tmp_path / "imgs", 40, bad={7})
    out = tmp_path / "o.jsonl"
    cmd, env = _cli("--images", str(d), "--out", str(out), "--batch-size", "2", "--num-workers", "1",
                    "--no-progress", env={"FAKE_DELAY": "0.05"})
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 30
    while time.time() < deadline and (not out.exists() or len(out.read_bytes().splitlines()) < 8):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = len(read_done(str(out), repair=False)[0])
    assert 8 <= first < 40, first
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    recs = lines(out)
    paths = [r["path"] for r in recs]
    assert len(paths) == len(set(paths)) == 40  # nothing lost, nothing twice
    assert sum("error" in r for r in recs) == 1 and "39 captioned, 1 failed" in done.stderr
    assert f"{first} already in" in done.stderr or f"{first + 1} already in" in done.stderr


def test_torchrun_ranks_take_their_shards_and_merge(tmp_path):
    d = make_images(tmp_path / "imgs", 17)
    run_captioning(FakeCaptioner(), d, tmp_path / "all.jsonl", num_workers=0, progress=False, log=lambda s: None)
    out = tmp_path / "o.jsonl"
    cmd, env = _cli("--images", str(d), "--out", str(out), "--batch-size", "4", "--num-workers", "0",
                    "--no-progress", "--device", "cpu")
    run_cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "0",
               "-m", *cmd[2:]]
    res = subprocess.run(run_cmd, env=env, capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr[-3000:]
    assert os.path.exists(shard_path(str(out), (0, 2))) and os.path.exists(shard_path(str(out), (1, 2)))
    assert [key(r) for r in lines(out)] == [key(r) for r in lines(tmp_path / "all.jsonl")]


def test_cli_dispatcher(capsys):
    assert cli_main([]) == 0 and "caption" in capsys.readouterr().out
    assert cli_main(["nope"]) == 2 and "unknown subcommand 'nope'" in capsys.readouterr().err


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = cli_main(["caption", "--model", "test_batch:make_fake", "--images", str(tmp_path / "empty"),
                   "--out", str(tmp_path / "o.jsonl")])
    assert rc == 2 and "folder with no images" in capsys.readouterr().err


def test_images_from_arrays_are_not_paths():
    # the preprocessor used by workers also takes in-memory images (used by the pipeline)
    from modalities.vision import ImagePreprocessor

    pre = ImagePreprocessor(input_size=(8, 8))
    assert pre(np.zeros((10, 10, 3), np.uint8)).shape == (1, 3, 8, 8)
    assert pre(torch.zeros(2, 3, 10, 10)).shape == (2, 3, 8, 8)


# ---- one writer, known producers, one record per image --------------------------------------------
def quiet(logs=None):
    return logs.append if logs is not None else (lambda s: None)


def test_a_second_job_on_one_output_is_refused_naming_the_first(tmp_path):
    d = make_images(tmp_path / "imgs", 30)
    out = tmp_path / "o.jsonl"
    cmd, env = _cli("--images", str(d), "--out", str(out), "--batch-size", "2", "--num-workers", "0",
                    "--no-progress", env={"FAKE_DELAY": "0.4"})  # 6 s of work: the two overlap
    jobs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]  # started together
    results = [(job.wait(timeout=120), job.stderr.read()) for job in jobs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    refused = next(err for rc, err in results if rc == 2)
    winner = next(job for job, (rc, _) in zip(jobs, results, strict=True) if rc == 0)
    assert "is being written by another job" in refused and f"pid {winner.pid} on host" in refused
    assert "started 20" in refused and "test_batch:make_fake" in refused
    paths = [r["path"] for r in lines(out)]
    assert len(paths) == len(set(paths)) == 30 and not os.path.exists(str(out) + ".lock")
    # in one process too: a held lock refuses the job before anything is read or written
    with OutputLock(str(out)):
        with pytest.raises(OutputLocked, match=f"pid {os.getpid()} on host"):
            run_captioning(FakeCaptioner(), d, out, num_workers=0, progress=False, log=quiet())


def test_the_lock_of_a_dead_job_is_taken_over(tmp_path):
    d = make_images(tmp_path / "imgs", 3)
    out = tmp_path / "o.jsonl"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "o.jsonl.lock").write_text(json.dumps({"pid": dead.pid, "host": "h", "started": "then"}))
    logs = []
    s = run_captioning(FakeCaptioner(), d, out, num_workers=0, progress=False, log=logs.append)
    assert s.succeeded == 3 and any(f"left by pid {dead.pid}" in m and "no longer running" in m for m in logs)


def test_resuming_with_other_settings_is_refused_unless_asked(tmp_path, capsys):
    d = make_images(tmp_path / "imgs", 6)
    out = tmp_path / "o.jsonl"
    base = ["caption", "--images", str(d), "--out", str(out), "--num-workers", "0", "--no-progress"]
    assert cli_main([*base, "--model", "test_batch:make_fake", "--gen-length", "8"]) == 0
    before = out.read_text()
    manifest = json.loads(open(manifest_path(str(out))).read())
    assert manifest["producer"]["decoding"] == {"gen_length": 8} and manifest["producer"]["mmdlm"]
    capsys.readouterr()
    for change, named in ((["--model", "test_batch:make_fake", "--gen-length", "16"], "decoding.gen_length: 8"),
                          (["--model", "test_batch:make_other", "--gen-length", "8"], "model.factory")):
        assert cli_main([*base, *change]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert "produced with other settings" in err and named in err and "--redo" in err and "--overwrite" in err
        assert out.read_text() == before  # nothing was mixed in
    # --redo: every image again; the old file stays whole until the new one is complete
    class Stops(FakeCaptioner):
        calls = 0

        def caption(self, pixels, **kw):  # the second batch never comes back
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("stopped")
            return super().caption(pixels, **kw)

    redo = dict(producer=describe_captioner(None, {"gen_length": 16}, model="test_batch:make_fake"), redo=True,
                num_workers=0, batch_size=2, progress=False, log=quiet())
    with pytest.raises(RuntimeError, match="stopped"):
        run_captioning(Stops(), d, out, **redo)
    assert out.read_text() == before
    logs = []
    s = run_captioning(FakeCaptioner(), d, out, **{**redo, "log": logs.append})  # a stopped redo resumes
    assert s.new == 4 and any("2 already in" in m for m in logs) and not os.path.exists(str(out) + ".redo")
    assert json.loads(open(manifest_path(str(out))).read())["producer"]["decoding"] == {"gen_length": 16}
    assert cli_main([*base, "--model", "test_batch:make_fake", "--gen-length", "16"]) == 0  # resumes now
    assert "6 already in" in capsys.readouterr().err
    # --overwrite: a new file at once
    assert cli_main([*base, "--model", "test_batch:make_other", "--overwrite"]) == 0
    assert len(lines(out)) == 6 and json.loads(open(manifest_path(str(out))).read())["producer"]["model"] == {
        "factory": "test_batch:make_other"}


def test_a_model_folder_is_known_by_its_content(tmp_path):
    (tmp_path / "a" / "model").mkdir(parents=True)
    (tmp_path / "a" / "model" / "w.bin").write_bytes(b"\0" * 100)
    (tmp_path / "a" / "model_index.json").write_text("{}")
    import shutil

    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "model" / "w.bin").write_bytes(b"\0" * 99 + b"\1")
    assert folder_hash(str(tmp_path / "a")) == folder_hash(str(tmp_path / "copy")) != folder_hash(str(tmp_path / "b"))
    d = make_images(tmp_path / "imgs", 2)
    out = tmp_path / "o.jsonl"
    for folder, ok in (("a", True), ("copy", True), ("b", False)):  # a copy is the same model, elsewhere
        job = dict(producer=describe_captioner(None, {}, model=str(tmp_path / folder)), num_workers=0,
                   progress=False, log=quiet())
        if ok:
            run_captioning(FakeCaptioner(), d, out, **job)
        else:
            with pytest.raises(BatchJobError, match="model.folder_sha256"):
                run_captioning(FakeCaptioner(), d, out, **job)


def test_duplicates_are_reported_and_repaired(tmp_path, capsys):
    d = make_images(tmp_path / "imgs", 5)
    out = tmp_path / "o.jsonl"
    run_captioning(FakeCaptioner(), d, out, num_workers=0, progress=False, log=quiet())
    once = lines(out)
    out.write_text(out.read_text() * 2 + "not json\n")  # as two writers of an older version left it
    logs = []
    s = run_captioning(FakeCaptioner(), d, out, num_workers=0, progress=False, log=logs.append)
    warning = next(m for m in logs if "duplicate records" in m)
    assert "5 duplicate records: 5 images were written more than once" in warning and "--repair" in warning
    assert s.new == 0 and s.succeeded == 5 and len(read_records(str(out)).duplicates) == 5
    assert cli_main(["caption", "--repair", "--out", str(out)]) == 0
    assert "5 duplicate records and 1 malformed lines removed" in capsys.readouterr().err
    assert [key(r) for r in lines(out)] == [key(r) for r in once]
    logs.clear()
    run_captioning(FakeCaptioner(), d, out, num_workers=0, progress=False, log=logs.append)  # still resumable
    assert not any("duplicate records" in m for m in logs) and any("5 already in" in m for m in logs)


def test_nan_settings_are_refused_on_the_command_line(tmp_path, capsys):
    d = make_images(tmp_path / "imgs", 1)
    with pytest.raises(SystemExit):
        cli_main(["caption", "--model", "test_batch:make_fake", "--images", str(d), "--out", str(tmp_path / "o"),
                  "--temperature", "nan"])
    assert "must be a finite number" in capsys.readouterr().err

"""Checks every task's recipe passes through the one trainer (imported by the test modules).

- :func:`check_exact_resume`: 2N steps straight log the same losses as a run killed with SIGKILL in the
  middle of writing checkpoint N + 1, then rerun: it resumes from the newest complete checkpoint (N) and
  trains N more.
- :func:`run_torchrun`: the recipe under ``torchrun`` with two gloo processes.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs train.py in a child whose checkpoint writer SIGKILLs the process while it writes the `state` file of
# checkpoint `kill_step` (after the weights and RNG files, before COMPLETE): a kill during a checkpoint write.
_KILLER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import latent.training.checkpoint as ck
_write = ck.write_state
def write_state(folder, name, obj):
    if name == "state" and obj.get("step") == {kill_step}:
        (folder / "state.json").write_text('{{"truncated": ')
        os.kill(os.getpid(), signal.SIGKILL)
    return _write(folder, name, obj)
ck.write_state = write_state
import train
train.main({argv!r})
"""


def logged_losses(run_dir) -> list[tuple[int, float]]:
    with open(Path(run_dir) / "train.csv") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")


def run_train(recipe, overrides, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    """``python train.py recipe overrides...`` in a child process."""
    cmd = [sys.executable, str(REPO / "train.py"), str(recipe), *overrides]
    return subprocess.run(cmd, cwd=cwd or REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def run_killed_during_checkpoint(recipe, overrides, kill_step: int, cwd=None, timeout=600):
    code = _KILLER.format(repo=str(REPO), kill_step=int(kill_step), argv=[str(recipe), *overrides])
    return subprocess.run([sys.executable, "-c", code], cwd=cwd or REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def check_exact_resume(recipe, overrides: list[str], tmp_path: Path, n: int, rel: float = 0.0) -> list:
    """Straight 2N steps log the same losses as a run SIGKILLed while it writes checkpoint N + 1 and then rerun
    (it resumes from checkpoint N, the newest complete one, and trains N more). ``overrides`` must make the recipe small and set its total to 2N steps; ``trainer.log_every=1`` and
    ``trainer.save_every=1`` are added here. Returns the straight run's losses."""
    common = [*overrides, "trainer.log_every=1", "trainer.save_every=1", "trainer.progress=false",
              "trainer.tensorboard=false", "trainer.plot=false"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = run_train(recipe, [*common, f"run.output_dir={straight}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = run_killed_during_checkpoint(recipe, [*common, f"run.output_dir={killed}"], kill_step=n + 1)
    assert proc.returncode == -9, f"the child was not killed: rc={proc.returncode}\n{proc.stderr[-3000:]}"
    ckpts = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert f".tmp-step_{n + 1:08d}" in ckpts and f"step_{n:08d}" in ckpts, ckpts
    proc = run_train(recipe, [*common, f"run.output_dir={killed}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resumed from {killed / 'checkpoints' / f'step_{n:08d}'}" in proc.stdout + proc.stderr
    want = logged_losses(straight)
    assert [s for s, _ in want] == list(range(1, 2 * n + 1))
    got = logged_losses(killed)
    assert [s for s, _ in got] == [s for s, _ in want]
    for (_, a), (_, b) in zip(want, got, strict=True):
        assert abs(a - b) <= rel * abs(a), (want, got)
    return want


def run_torchrun(recipe, overrides, nproc: int = 2, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", str(nproc), str(REPO / "train.py"), str(recipe),
           *overrides]
    return subprocess.run(cmd, cwd=cwd or REPO, env=_env(), capture_output=True, text=True, timeout=timeout)

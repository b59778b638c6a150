"""Fatal errors stop `python -m lladav_jax.train` cleanly (subprocesses on the demo's runlocal preset): too many
bad samples, a non-finite loss, an exception in the loop. Each exits non-zero with one `error:` message (the
reason, what to change, the step a re-run resumes from), no tracebacks from Orbax's threads, and the
checkpoint in flight committed, never left as `*.orbax-checkpoint-tmp`; such a directory left by a kill is
ignored and removed by the next run."""
import json
import os
import shutil
import subprocess

import pytest

from lladav_jax.data.demo_data import ensure_demo_data
from tests.train_helpers import PYTHON, REPO, subprocess_env

TMP = ".orbax-checkpoint-tmp"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("errors")
  ensure_demo_data(str(tmp / "demo"))
  return tmp, subprocess_env()


def _train(env, workdir, *overrides, demo_root=None, entry=("-m", "lladav_jax.train")):
  tmp, e = env
  args = [PYTHON, *entry, f"--config={REPO}/configs/finetune.py:demo,runlocal", f"--workdir={workdir}",
          f"--config.data.demo_root={demo_root or tmp / 'demo'}", "--config.log.progress=False",
          "--config.log.tensorboard=False", *(f"--config.{o}" for o in overrides)]
  return subprocess.run(args, cwd=REPO, env=e, capture_output=True, text=True, timeout=900)


def _checkpoints(workdir):
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def _one_error(r, rc):
  """The run's one `error:` message (asserting the exit status and that no thread printed a traceback)."""
  assert r.returncode == rc, (r.returncode, r.stderr[-4000:])
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, r.stderr[-4000:]
  assert "cannot schedule new futures" not in r.stderr and "Exception in thread" not in r.stderr, r.stderr[-4000:]
  return r.stderr[r.stderr.index("error:"):]


def test_too_many_bad_samples(env, tmp_path):
  tmp, _ = env
  bad = tmp_path / "bad_demo"
  shutil.copytree(tmp / "demo", bad)
  (d,) = [p for p in bad.iterdir() if (p / "DONE").exists()]
  for i, rec in enumerate(json.loads((d / "train.json").read_text())):
    if i % 3 == 0:  # a third of the images corrupt: the skip limit trips after the first save (step 4)
      ims = rec["image"] if isinstance(rec["image"], list) else [rec["image"]]
      (d / ims[0]).write_bytes(b"not an image")
  w = tmp_path / "w"
  r = _train(env, w, "data.skip_check_min_samples=50", demo_root=bad)
  msg = _one_error(r, 4)
  assert "Traceback" not in r.stderr, r.stderr[-4000:]
  assert "corrupt_image" in msg and "train.json#" in msg and "raise data.max_skip_fraction" in msg, msg
  assert "after 4 steps" in msg and f"checkpoint is step 4 in {w}" in msg, msg
  assert _checkpoints(w) == ["4"]  # the save in flight was committed


@pytest.mark.slow  # a third trainer subprocess; the CI budget (bad data and an exception stay in the default run)
def test_non_finite_loss(env, tmp_path):
  w = tmp_path / "w"
  r = _train(env, w, "optim.lr=1e30", "checkpoint.every_steps=1")  # a save in flight at every step
  msg = _one_error(r, 3)
  assert "Traceback" not in r.stderr, r.stderr[-4000:]
  assert "non-finite loss or gradient at step" in msg and "Lower optim.lr" in msg, msg
  bad = int(msg.split("at step ")[1].split()[0])
  steps = _checkpoints(w)
  assert not [s for s in steps if TMP in s], steps
  # every committed checkpoint precedes the non-finite step; the message names the last one
  assert steps and max(int(s) for s in steps) < bad and f"checkpoint is step {max(int(s) for s in steps)}" in msg


INJECT = """
from absl import app
from lladav_jax import train
from lladav_jax.training import trainer

real, calls = trainer.to_global, []

def failing(*args, **kwargs):
  calls.append(1)
  if len(calls) == 6:
    raise RuntimeError("injected failure in step 6")
  return real(*args, **kwargs)

trainer.to_global = failing
app.run(train.main)
"""


def test_exception_in_the_step_then_a_leftover_tmp_dir_is_ignored(env, tmp_path):
  script = tmp_path / "inject.py"
  script.write_text(INJECT)
  w = tmp_path / "w"
  r = _train(env, w, entry=(str(script),))
  msg = _one_error(r, 1)
  # an unexpected error shows where it happened: the main thread's traceback, once, then the message
  assert r.stderr.count("Traceback") == 1 and "in failing" in r.stderr, r.stderr[-4000:]
  assert "RuntimeError: injected failure in step 6" in msg and "after 5 steps" in msg, msg
  assert _checkpoints(w) == ["4"]

  # a kill during a save leaves a temporary step directory: the next run resumes from the committed one
  leftover = w / "checkpoints" / f"8{TMP}"
  (leftover / "state").mkdir(parents=True)
  (leftover / "state" / "partial").write_bytes(b"\0" * 64)
  r = _train(env, w, "train.num_steps=8")
  assert r.returncode == 0, r.stderr[-4000:]
  assert "malloc keeps freed memory" in r.stderr  # training/host_memory on a CPU run
  assert "at step 4" in r.stderr and f"removing the unfinished {leftover}" in r.stderr, r.stderr[-4000:]
  assert _checkpoints(w) == ["4", "8"]

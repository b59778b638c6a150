"""The real entry point in subprocesses: kill -9 mid-run, SIGTERM (preemption), resume; the
resumed run's losses equal an uninterrupted run's exactly (metrics.jsonl)."""
import os
import signal
import subprocess
import time

import pytest

from lladav_jax.training.metrics import read_metrics
from tests.train_helpers import PYTHON, REPO, subprocess_env

STEPS, EVERY = 48, 8


def _args(workdir, demo_root, *extra):
  return [PYTHON, "-m", "lladav_jax.train", "--config=configs/finetune.py:demo,runlocal", f"--workdir={workdir}",
          f"--config.data.demo_root={demo_root}", f"--config.train.num_steps={STEPS}",
          f"--config.checkpoint.every_steps={EVERY}", "--config.log.progress=False", "--config.log.tensorboard=False",
          *extra]


def _committed_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _last_logged(workdir):
  p = os.path.join(workdir, "metrics.jsonl")
  return max(read_metrics(p), default=0) if os.path.exists(p) else 0


def _run_until(args, env, workdir, sig, min_ckpt, timeout=300):
  """Starts a run; sends `sig` once a checkpoint >= min_ckpt is on disk and 2 more steps were logged."""
  p = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  t0 = time.time()
  while p.poll() is None and time.time() - t0 < timeout:
    ck = _committed_steps(workdir)
    if ck and ck[-1] >= min_ckpt and _last_logged(workdir) >= ck[-1] + 2:
      p.send_signal(sig)
      break
    time.sleep(0.01)
  out, _ = p.communicate(timeout=timeout)
  return p.returncode, out


def test_kill_and_sigterm_resume_exactly(tmp_path):
  env = subprocess_env(tmp_path / "jax_cache")
  demo = tmp_path / "demo"
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  r = subprocess.run(_args(a, demo), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout + r.stderr
  want = read_metrics(os.path.join(a, "metrics.jsonl"))
  assert sorted(want) == list(range(1, STEPS + 1))

  rc, out = _run_until(_args(b, demo), env, b, signal.SIGKILL, min_ckpt=EVERY)
  assert rc == -signal.SIGKILL, f"the run ended before it could be killed (rc={rc}):\n{out}"
  killed_at = _committed_steps(b)[-1]
  assert killed_at < STEPS

  rc, out = _run_until(_args(b, demo), env, b, signal.SIGTERM, min_ckpt=killed_at + EVERY)
  assert rc == 0, out
  assert f"at step {killed_at}" in out  # resumed from the checkpoint the kill left
  termed_at = _committed_steps(b)[-1]
  assert killed_at < termed_at < STEPS and termed_at % EVERY != 0 or "SIGTERM" in out, out
  assert "SIGTERM" in out, out

  r = subprocess.run(_args(b, demo), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout + r.stderr
  got = read_metrics(os.path.join(b, "metrics.jsonl"))
  assert sorted(got) == list(range(1, STEPS + 1))
  for s in range(1, STEPS + 1):
    assert got[s]["loss"] == want[s]["loss"], (s, got[s]["loss"], want[s]["loss"])
    assert got[s]["grad_norm"] == want[s]["grad_norm"], s

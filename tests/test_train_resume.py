"""The real entry point in subprocesses: kill -9 mid-run, SIGTERM (preemption), resume; the
resumed run's losses equal an uninterrupted run's exactly (metrics.jsonl)."""
import os
import signal
import subprocess
import time

import pytest

from lladav_jax.inference import SamplingParams
from lladav_jax.training.metrics import read_metrics
from tests.train_helpers import PYTHON, REPO, subprocess_env

STEPS, EVERY = 48, 8


def _args(workdir, demo_root, *extra):
  return [PYTHON, "-m", "lladav_jax.train", f"--config={REPO}/configs/finetune.py:demo,runlocal", f"--workdir={workdir}",
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


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """One uninterrupted demo run (tiny model): (tmp dir, env, {step: metrics row})."""
  tmp = tmp_path_factory.mktemp("resume")
  env = subprocess_env()
  # a relative --workdir, as in the README (orbax itself needs absolute paths)
  r = subprocess.run(_args("a", tmp / "demo"), cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout + r.stderr
  want = read_metrics(os.path.join(tmp, "a", "metrics.jsonl"))
  assert sorted(want) == list(range(1, STEPS + 1))
  return tmp, env, want


def test_demo_steps_lower_the_loss(uninterrupted):
  _, _, m = uninterrupted
  first = sum(m[s]["loss"] for s in range(1, 13)) / 12
  last = sum(m[s]["loss"] for s in range(STEPS - 11, STEPS + 1)) / 12
  assert last < 0.8 * first, (first, last)
  assert all(m[s]["grad_norm"] > 0 and m[s]["masked_tokens"] > 0 for s in m)


def test_kill_and_sigterm_resume_exactly(uninterrupted):
  tmp_path, env, want = uninterrupted
  demo = tmp_path / "demo"
  b = str(tmp_path / "b")

  rc, out = _run_until(_args(b, demo), env, b, signal.SIGKILL, min_ckpt=EVERY)
  assert rc == -signal.SIGKILL, f"the run ended before it could be killed (rc={rc}):\n{out}"
  killed_at = _committed_steps(b)[-1]
  assert killed_at < STEPS

  rc, out = _run_until(_args(b, demo), env, b, signal.SIGTERM, min_ckpt=killed_at + EVERY)
  assert rc == 0, out
  assert f"at step {killed_at}" in out  # resumed from the checkpoint the kill left
  termed_at = _committed_steps(b)[-1]
  assert killed_at < termed_at < STEPS, (killed_at, termed_at)
  assert "SIGTERM" in out, out

  r = subprocess.run(_args(b, demo), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout + r.stderr
  got = read_metrics(os.path.join(b, "metrics.jsonl"))
  assert sorted(got) == list(range(1, STEPS + 1))
  for s in range(1, STEPS + 1):
    assert got[s]["loss"] == want[s]["loss"], (s, got[s]["loss"], want[s]["loss"])
    assert got[s]["grad_norm"] == want[s]["grad_norm"], s


def test_finished_run_exports_a_loadable_model(uninterrupted, monkeypatch):
  """<workdir>/model holds the final parameters (equal to the last training checkpoint's) with the
  tokenizer, and LLaDAV.from_pretrained answers with it (given a relative path, as in the README)."""
  import numpy as np
  import orbax.checkpoint as ocp
  from lladav_jax import LLaDAV, weights

  tmp, _, _ = uninterrupted
  monkeypatch.chdir(tmp)
  model = LLaDAV.from_pretrained("a/model")
  # the image settings it was trained on (the demo's own eval path: several images padded + newline)
  from lladav_jax.data.demo_data import demo_image_config
  assert model.image_cfg == demo_image_config(model.cfg.vision.patch_size)
  got = weights.flat_params(model.state)
  ckpt = ocp.PyTreeCheckpointer().restore(str(tmp / "a" / "checkpoints" / str(STEPS) / "state"))
  want = {**weights.flat_params(ckpt["params"]), **weights.flat_params(ckpt.get("frozen") or {})}
  assert sorted(got) == sorted(want)
  for k in got:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
  out = model.generate(["How many shapes are there?"], images=[[_scene(tmp / "demo")]],
                       params=SamplingParams(gen_length=8))
  assert out[0].nfe >= 1 and len(out[0].token_ids) <= 8


def _scene(demo_root):
  from PIL import Image
  (d,) = [p for p in demo_root.iterdir() if (p / "DONE").exists()]
  return Image.open(next((d / "images" / "test").iterdir())).convert("RGB")


def test_a_finished_run_run_again_says_so_and_recomputes_nothing(uninterrupted):
  """The README's command run a second time: it restores, says the run is finished (with the model and the
  final evals it wrote) and exits 0 without compiling a step, training, exporting or evaluating again."""
  tmp, env, want = uninterrupted
  a = tmp / "a"
  before = {p: os.path.getmtime(p) for p in [a / "metrics.jsonl", a / "model"] + sorted((a / "eval").glob("*"))}
  r = subprocess.run(_args("a", tmp / "demo"), cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout + r.stderr
  out = r.stdout + r.stderr
  assert f"already finished at step {STEPS} of {STEPS}" in out, out
  assert "compiled the train step" not in out.lower() and "final eval:" not in out
  assert {p: os.path.getmtime(p) for p in before} == before
  assert read_metrics(os.path.join(a, "metrics.jsonl")) == want

"""Two JAX processes on this machine (CPU collectives over gloo) train and checkpoint together
through the real entry point, then resume together."""
import json
import os
import socket
import subprocess

import pytest

from lladav_jax.training.metrics import read_metrics
from tests.train_helpers import PYTHON, REPO, subprocess_env


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, steps, env):
  port = _free_port()
  procs = []
  for i in range(2):
    args = [PYTHON, "-m", "lladav_jax.train", "--config=configs/finetune.py:finetune,runlocal", f"--workdir={workdir}",
            f"--config.train.num_steps={steps}", "--config.checkpoint.every_steps=3", "--config.log.progress=False",
            "--config.train.global_batch_size=4",  # one sample a device of the 4-device mesh
            "--config.log.tensorboard=False", f"--config.distributed.coordinator_address=localhost:{port}",
            "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"]
    procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=400)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outs.append(out)
  return [p.returncode for p in procs], outs


@pytest.mark.slow  # ~100 s: four process launches; single-process kill/resume is in the default suite
def test_two_processes_train_checkpoint_and_resume(tmp_path):
  env = subprocess_env(tmp_path / "jax_cache", devices=2)  # 2 processes x 2 CPU devices = a 4-device mesh
  wd = str(tmp_path / "run")
  rcs, outs = _launch(wd, 6, env)
  if any(rc != 0 for rc in rcs) and any("gloo" in o.lower() and "not" in o.lower() for o in outs):
    pytest.skip("CPU collectives (gloo) are unavailable in this jaxlib:\n" + outs[0][-2000:])
  assert rcs == [0, 0], "\n\n".join(o[-4000:] for o in outs)
  ck = os.path.join(wd, "checkpoints")
  assert sorted(int(n) for n in os.listdir(ck) if n.isdigit()) == [3, 6]
  files = sorted(f for f in os.listdir(os.path.join(ck, "6", "data_iter")) if f.startswith("process_"))
  assert files == ["process_0-of-2.json", "process_1-of-2.json"], files
  states = [json.load(open(os.path.join(ck, "6", "data_iter", f))) for f in files]
  assert all(s["index"] == 6 for s in states)  # each process consumed its own 6 local batches
  m = read_metrics(os.path.join(wd, "metrics.jsonl"))
  assert sorted(m) == list(range(1, 7)) and all(r["loss"] > 0 for r in m.values())

  rcs, outs = _launch(wd, 8, env)
  assert rcs == [0, 0], "\n\n".join(o[-4000:] for o in outs)
  assert all("at step 6" in o for o in outs), outs[0][-3000:]
  assert sorted(read_metrics(os.path.join(wd, "metrics.jsonl"))) == list(range(1, 9))

"""Two JAX processes on this machine (CPU collectives over gloo) train and checkpoint together
through the real entry point, then resume together."""
import json
import os
import socket
import subprocess

import pytest

from lladav_jax.data.demo_data import ensure_demo_data
from lladav_jax.training.metrics import read_metrics
from tests.train_helpers import PYTHON, REPO, subprocess_env


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _skip_without_gloo(rcs, outs):
  said = [o.lower() for o in outs]
  if any(rc != 0 for rc in rcs) and any("gloo" in o and any(w in o for w in ("not available", "unavailable",
                                                                                "not supported", "unimplemented"))
                                        for o in said):
    pytest.skip("CPU collectives (gloo) are unavailable in this jaxlib:\n" + outs[0][-2000:])


def _launch(workdir, steps, env, preset="finetune", per_process=((), ())):
  port = _free_port()
  procs = []
  for i in range(2):
    args = [PYTHON, "-m", "lladav_jax.train", f"--config=configs/finetune.py:{preset},runlocal", f"--workdir={workdir}",
            f"--config.train.num_steps={steps}", "--config.checkpoint.every_steps=3", "--config.log.progress=False",
            "--config.train.global_batch_size=4",  # one sample a device of the 4-device mesh
            "--config.log.tensorboard=False", f"--config.distributed.coordinator_address=localhost:{port}",
            "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
            *(f"--config.{o}" for o in per_process[i])]
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
  env = subprocess_env(devices=2)  # 2 processes x 2 CPU devices = a 4-device mesh
  wd = str(tmp_path / "run")
  rcs, outs = _launch(wd, 6, env)
  _skip_without_gloo(rcs, outs)
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


@pytest.mark.slow  # ~60 s: two process launches; the single-process bad-data stop is in the default suite
def test_one_process_out_of_good_data_stops_every_process(tmp_path):
  """Process 1 trips the skip limit; process 0 (whose limit is never reached) would otherwise wait in the next
  collective for ever: both exit 4, process 0 naming process 1."""
  demo = tmp_path / "demo"
  ensure_demo_data(str(demo))
  (d,) = [p for p in demo.iterdir() if (p / "DONE").exists()]
  for i, rec in enumerate(json.loads((d / "train.json").read_text())):
    if i % 3 == 0:
      ims = rec["image"] if isinstance(rec["image"], list) else [rec["image"]]
      (d / ims[0]).write_bytes(b"not an image")
  env = subprocess_env(devices=2)
  common = (f"data.demo_root={demo}", "data.skip_check_min_samples=4")
  rcs, outs = _launch(str(tmp_path / "run"), 6, env, preset="demo",
                      per_process=(common + ("data.max_skip_fraction=1.0",), common + ("data.max_skip_fraction=0.01",)))
  _skip_without_gloo(rcs, outs)
  assert rcs == [4, 4], "\n\n".join(o[-3000:] for o in outs)
  assert "process 1 stopped on too many bad samples" in outs[0], outs[0][-3000:]
  assert "corrupt_image" in outs[1], outs[1][-3000:]

"""The launch scripts' dry-run modes print the commands they would run, with the arguments intact."""
import os
import subprocess

from tests.train_helpers import REPO

ARGS = ["--config=configs/finetune.py:stage2_si", "--workdir=/shared/runs/si", "--config.data.path=/d/a b.json"]


def _run(script, *args, rc=0):
  env = dict(os.environ, DRY_RUN="1")
  r = subprocess.run(["bash", os.path.join(REPO, "launch", script), *args], env=env, capture_output=True, text=True,
                     timeout=60)
  assert r.returncode == rc, r.stdout + r.stderr
  return r.stdout


def test_slurm_dry_run_prints_one_srun_of_the_trainer():
  out = _run("slurm_gpu.sbatch", *ARGS)
  line = [l for l in out.splitlines() if l.startswith("srun")]
  assert len(line) == 1, out
  assert "-m lladav_jax.train --config=configs/finetune.py:stage2_si --workdir=/shared/runs/si" in line[0]
  assert r"--config.data.path=/d/a\ b.json" in line[0]  # quoted, so the path with a space survives


def test_tpu_pod_dry_run_targets_every_worker():
  out = _run("tpu_pod.sh", "my-tpu", "us-east5-a", "my-project", "--", *ARGS)
  cmds = out.strip().splitlines()
  assert all(c.startswith("gcloud compute tpus tpu-vm") and "--worker=all" in c for c in cmds), out
  assert any(" scp " in c for c in cmds)  # the checkout is copied first
  train = [c for c in cmds if "lladav_jax.train" in c]
  assert len(train) == 1 and "--project my-project" in train[0] and "stage2_si" in train[0], out
  assert _run("tpu_pod.sh", rc=2).startswith("# Train on every worker")  # no arguments: its usage

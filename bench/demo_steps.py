"""The README's demo command for a few steps: steps/s, minor page faults, user/kernel CPU time, peak RSS.

    python bench/demo_steps.py                        # 100 steps of the demo preset, this checkout
    python bench/demo_steps.py --before /work/main    # the same run from another checkout first (back to back)

Each run is `python -m lladav_jax.train --config=configs/finetune.py:demo,train.num_steps=N` (no final eval, no
model export) in a subprocess; the figures are that subprocess's rusage, steps/s the median over the steps after
the tenth (metrics.jsonl step_time). On a shared machine compare runs of one invocation only.

Notes:
- Allocator: the demo's train step allocates its 213 MiB of temporaries on XLA's worker threads every step. With
  glibc's default malloc they were mapped and unmapped each time: 54k minor faults and ~150 ms of kernel time a
  step, a quarter of its CPU time; with training/host_memory.py's settings, 0 faults a step.
- Learning, the v6 set (one shape of any size and place, eight colours, light noisy backgrounds; 300 test questions;
  this 2-core VM). The question kinds answer differently:
  - tower at its random init, frozen (the v4 preset's recipe): 52.7%; colours 80%, shapes 46%.
  - tower trained through the diffusion loss alone, 800 steps at 1e-3: 58% (shapes 37%, chance); at 3e-3 its colour
    features collapse (30% on colours by step 300). 1200 steps, a 2-layer LLM and a 4-layer tower: 73.7%, shapes 66%.
  - every question about a picture asked in one multi-turn record: 23% (the answers ignore the question).
  - with direct labels the same tower separates the shapes (a colour and a shape head on its mean-pooled output:
    96% of held-out shapes after 800 steps of 32), so the tower can: the diffusion loss is too weak a signal for it.
  - SigLIP's sigmoid loss on the training pictures' captions first (training/vision_pretrain.py), the tower then
    frozen: 400 steps of 128 -> 88.2% caption retrieval, 90.7% test exact match after 800 steps; 700 steps -> 99.5%,
    95.0% after 800 steps (92.7% by step 200), 93.3% after 600. The preset's recipe, at 600 steps (the README
    command, install included, in 6m26s; 800 steps add about a minute). Pre-trained on the training JSON's answers
    as captions instead ("red", "circle", "red circle"; the two-picture records skipped): 87.0%.
  - The two-picture questions ("the shape in the first image") stay at chance with the pre-trained tower: 50% frozen,
    37% trained on at 1e-4, 54% with 25% of the questions of that kind. The tower trained from its random init
    through the diffusion loss learnt them (90%, 30 questions) while failing the shapes. Its projected patch
    tokens differ more from each other (mean cosine 0.55 within a picture; 0.83 after pre-training, whose
    mean-pooled objective spreads each picture's content over every patch).
- 28 px patches (2 x 2 a picture) separated the shapes less: 75% with direct labels, where 14 px reached 87-96%.
- Scenes of 1-4 shapes, where a question must first find its shape (v4 set): the model stayed at the answer prior
  after 800 steps, and answered "Where is the shape?" 52-100% right after 1200 steps depending on the run; hence one
  shape a scene (data/demo_data.py).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(repo: str, steps: int, demo_root: str) -> dict:
  from lladav_jax.training.metrics import read_metrics
  with tempfile.TemporaryDirectory() as work:
    args = [sys.executable, "-m", "lladav_jax.train",
            f"--config=configs/finetune.py:demo,train.num_steps={steps},eval.at_end=False,checkpoint.export_model=False",
            f"--workdir={work}", f"--config.data.demo_root={demo_root}", "--config.log.progress=False",
            "--config.log.tensorboard=False"]
    env = dict(os.environ, PYTHONPATH=repo)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode:
      raise SystemExit(f"{repo}: the run failed:\n{r.stderr[-3000:]}")
    m = read_metrics(os.path.join(work, "metrics.jsonl"))
  times = [m[s]["step_time"] for s in sorted(m) if s > 10]
  return {"last loss": m[max(m)]["loss"], "steps/s": 1 / statistics.median(times), "minor faults": after.ru_minflt - before.ru_minflt,
          "user s": after.ru_utime - before.ru_utime, "sys s": after.ru_stime - before.ru_stime, "wall s": wall,
          "max RSS MiB": after.ru_maxrss / 1024}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--steps", type=int, default=100)
  ap.add_argument("--before", default="", help="another checkout, run first")
  ap.add_argument("--demo_root", default="~/.cache/lladav_jax/demo")
  a = ap.parse_args()
  root = os.path.expanduser(a.demo_root)
  runs = ([("before", a.before)] if a.before else []) + [("this checkout", HERE)]
  for name, repo in runs:
    res = run(os.path.abspath(repo), a.steps, root)
    print(f"{name} ({repo}), {a.steps} steps: last loss {res.pop('last loss')!r}, " + ", ".join(
        f"{k} {v:.2f}" if isinstance(v, float) and v < 100 else f"{k} {v:.0f}" for k, v in res.items()), flush=True)


if __name__ == "__main__":
  main()

"""Host memory of the JSON training source: what counting the records costs, what Grain pickles into
each worker, and what a spawned worker holds, on a synthetic LLaVA JSON (300k records ~ 337 MB, as
llava_v1_5_mix665k's first half).

    python bench/data_memory.py [--records 300000] [--before DIR]

--before DIR: also measure another checkout (e.g. `git archive c7ec6ab~1 | tar -x -C /tmp/before`,
the code before data/json_index.py) and print both. Each measurement runs in a fresh subprocess with a
fresh index cache, so "count (cold)" includes building the index and "count (warm)" reads it back
(what the trainer's second `make_source` after run_config's count costs).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the a image shows man woman dog cat street car red blue green large small left right top bottom "
         "standing sitting holding wearing near next to behind front of building tree sky water table "
         "what where how many is are there describe detail color").split()


def write_llava_json(path: str, n: int, seed: int = 0) -> int:
  """n LLaVA conversation records (~1.1 kB each: 1-3 rounds of question and answer)."""
  rng = random.Random(seed)
  words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))
  with open(path, "w") as f:
    f.write("[")
    for i in range(n):
      conv = [{"from": "human", "value": "<image>\n" + words(12) + "?"}, {"from": "gpt", "value": words(80) + "."}]
      for _ in range(rng.randint(0, 2)):
        conv += [{"from": "human", "value": words(10) + "?"}, {"from": "gpt", "value": words(58) + "."}]
      f.write(("," if i else "") + json.dumps({"id": f"{i:012d}", "image": f"coco/train2017/{i:012d}.jpg",
                                              "conversations": conv}))
    f.write("]")
  return os.path.getsize(path)


def _kib(field: str) -> int:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _worker(blob_path: str, q) -> None:
  """A Grain worker's share: receive the pickled source, unpickle it, read 200 records at random."""
  import gc
  rss0, hwm0 = _kib("VmRSS"), _kib("VmHWM")
  with open(blob_path, "rb") as f:
    src = pickle.loads(f.read())
  gc.collect()
  rng = random.Random(0)
  for _ in range(200):
    json.loads(src[rng.randrange(len(src))][1])
  q.put(((_kib("VmRSS") - rss0) / 2**20, (_kib("VmHWM") - hwm0) / 2**20))


def measure(path: str) -> dict:
  """In this process (a fresh subprocess per checkout): the figures for `path`."""
  import multiprocessing as mp

  import cloudpickle
  from lladav_jax.data import pipeline
  from ml_collections import ConfigDict

  cfg = ConfigDict({"path": path})
  rss0 = _kib("VmRSS")
  t = time.perf_counter()
  n = len(pipeline.make_source(cfg))  # run_config's count
  cold = time.perf_counter() - t
  count_gib = (_kib("VmHWM") - rss0) / 2**20
  t = time.perf_counter()
  src = pipeline.make_source(cfg)  # the trainer's source
  warm = time.perf_counter() - t
  blob = cloudpickle.dumps(src)
  with tempfile.NamedTemporaryFile(suffix=".pkl") as f:
    f.write(blob)
    f.flush()
    ctx = mp.get_context("spawn")  # as Grain starts its workers
    q = ctx.Queue()
    p = ctx.Process(target=_worker, args=(f.name, q))
    p.start()
    worker, worker_peak = q.get()
    p.join()
  return {"records": n, "count_cold_s": cold, "count_warm_s": warm, "count_peak_gib": count_gib,
          "pickled_kib": len(blob) / 2**10, "worker_gib": worker, "worker_peak_gib": worker_peak}


def run(tree: str, path: str) -> dict:
  env = dict(os.environ, PYTHONPATH=tree, LLADAV_JAX_INDEX_DIR=tempfile.mkdtemp(prefix="bench_index_"))
  out = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", path], env=env, check=True,
                       capture_output=True, text=True, cwd=tree)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--records", type=int, default=300_000)
  ap.add_argument("--before", default="", help="another checkout to measure too (the old source)")
  ap.add_argument("--data", default="", help="the JSON file (default: generated in the temp folder)")
  ap.add_argument("--measure", default="", help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.measure:
    print(json.dumps(measure(a.measure)))
    return
  path = a.data or os.path.join(tempfile.gettempdir(), f"llava_synthetic_{a.records}.json")
  if not os.path.exists(path):
    t = time.perf_counter()
    write_llava_json(path, a.records)
    print(f"wrote {path} in {time.perf_counter() - t:.1f}s")
  print(f"{path}: {os.path.getsize(path) / 1e6:.0f} MB")
  trees = ([("before", os.path.abspath(a.before))] if a.before else []) + [("this tree", ROOT)]
  rows = [(name, run(tree, path)) for name, tree in trees]
  head = ["source", "records", "count cold s", "count warm s", "count peak GiB", "pickled KiB", "worker +GiB",
          "worker peak +GiB"]
  keys = ["records", "count_cold_s", "count_warm_s", "count_peak_gib", "pickled_kib", "worker_gib", "worker_peak_gib"]
  fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
  print("count: run_config's len(make_source) (cold: a fresh index cache) and the trainer's second make_source "
        "(warm); peak: the counting process's peak RSS growth. worker: a spawned process's RSS growth after "
        "receiving and unpickling the source and reading 200 records (peak: while unpickling).")
  table = [head] + [[name] + [fmt(r[k]) for k in keys] for name, r in rows]
  widths = [max(len(row[i]) for row in table) for i in range(len(head))]
  for row in table:
    print("  ".join(c.rjust(w) for c, w in zip(row, widths)))


if __name__ == "__main__":
  main()

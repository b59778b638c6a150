"""Peak host memory of the checkpoint converter against the checkpoint size.

Writes a random bf16 LLaDA-V-shaped safetensors checkpoint of a few hundred MB (LLM hidden 1024, 12
layers, vocab 32000, a small SigLIP tower; several shard files + index), then runs, each in a fresh
subprocess, `hf-to-orbax`, `orbax-to-hf` and (for reference) `weights.load_state` onto the CPU, and
reports each one's peak RSS next to a baseline process that only imports the same modules.

    PYTHONPATH=. python bench/convert_memory.py [--workdir DIR] [--keep] [--shards 4] [--layers 12]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import ml_dtypes
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from lladav_jax import weights  # noqa: E402
from lladav_jax.model import abstract_model  # noqa: E402
from lladav_jax.config import LLMConfig, ModelConfig, VisionConfig  # noqa: E402

CFG = ModelConfig(
    llm=LLMConfig(vocab_size=32000, hidden_size=1024, num_layers=12, num_heads=16, num_kv_heads=16, head_dim=64,
                  intermediate_size=2816, rope_theta=10000.0, max_position_embeddings=4096),
    vision=VisionConfig(hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4, patch_size=14,
                        image_size=224),
    mask_token_id=31999, dtype="float32", param_dtype="float32")

HF_CONFIG = dict(
    architectures=["LlavaLLaDAModelLM"], model_type="llava_llada", vocab_size=32000, hidden_size=1024,
    num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=16, head_dim=64, intermediate_size=2816,
    rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=4096, mask_token_id=31999, mm_hidden_size=256,
    vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=5, num_attention_heads=4,
                       patch_size=14, image_size=224, layer_norm_eps=1e-6), torch_dtype="bfloat16")

CHILD = r"""
import json, os, resource, sys, threading, time
sys.path.insert(0, {repo!r})
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np, orbax.checkpoint
from lladav_jax import convert, sharding, weights

def rss():
    out = {{}}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "RssAnon", "RssFile")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out

peak = {{"VmRSS": 0, "RssAnon": 0}}
stop = False
def poll():
    while not stop:
        r = rss()
        for k in peak:
            peak[k] = max(peak[k], r[k])
        time.sleep(0.002)

before = rss()
th = threading.Thread(target=poll, daemon=True); th.start()
t = time.time()
what, src, dst = sys.argv[1:4]
if what == "hf-to-orbax":
    convert.hf_to_orbax(src, dst)
elif what == "orbax-to-hf":
    convert.orbax_to_hf(src, dst, shard_size="100MB")
elif what == "load_state":
    cfg = weights.load_model_config(src, param_dtype="bfloat16")
    state = weights.load_state(src, cfg, sharding.make_mesh(devices=jax.devices()[:1]))
    jax.block_until_ready(jax.tree.leaves(state))
secs = time.time() - t
stop = True; th.join()
print(json.dumps(dict(maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, seconds=secs,
                      before=before["VmRSS"], peak=peak["VmRSS"], peak_anon=peak["RssAnon"],
                      before_anon=before["RssAnon"])))
"""


def write_checkpoint(path: str, shards: int, seed: int = 0) -> dict:
  """Random bf16 tensors (LLaDA-V names, extras included), streamed shard by shard."""
  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  rng = np.random.default_rng(seed)
  shapes = dict(weights.expected_hf_shapes(CFG))
  v = weights.VISION_PREFIX
  shapes[v + "post_layernorm.weight"] = shapes[v + "post_layernorm.bias"] = (256,)
  names = list(shapes)
  total = sum(2 * math.prod(s) for s in shapes.values())
  per, cur, k, weight_map, part = total / shards, 0, 0, {}, {}

  def flush():
    nonlocal part, k
    fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
    save_file(part, os.path.join(path, fname), metadata={"format": "pt"})
    weight_map.update({n: fname for n in part})
    part, k = {}, k + 1

  for n in names:
    part[n] = (0.02 * rng.standard_normal(shapes[n], dtype=np.float32)).astype(ml_dtypes.bfloat16)
    cur += part[n].nbytes
    if cur >= per * (k + 1) and k < shards - 1:
      flush()
  flush()
  if k != shards:  # fewer parts than asked: rename to the true count
    for old in sorted(set(weight_map.values())):
      new = old.replace(f"-of-{shards:05d}", f"-of-{k:05d}")
      os.rename(os.path.join(path, old), os.path.join(path, new))
      weight_map = {n: (new if f == old else f) for n, f in weight_map.items()}
  with open(os.path.join(path, weights.INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(HF_CONFIG, f)
  largest = max(2 * math.prod(s) for s in shapes.values())
  _, abstract = abstract_model(CFG)
  stacked = max(2 * math.prod(x.shape) for x in weights.flat_params(abstract).values())
  return dict(bytes=total, tensors=len(names), files=k, largest_tensor=largest, largest_param_bf16=stacked)


def run_child(*args) -> dict:
  out = subprocess.run([sys.executable, "-c", CHILD.format(repo=REPO), *args], capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(out.stderr[-3000:])
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", default=None)
  ap.add_argument("--keep", action="store_true")
  ap.add_argument("--shards", type=int, default=4)
  ap.add_argument("--layers", type=int, default=12, help="LLM layers (12: about 430 MB)")
  args = ap.parse_args()
  global CFG
  CFG = CFG.replace(llm=dataclasses.replace(CFG.llm, num_layers=args.layers))
  HF_CONFIG["num_hidden_layers"] = args.layers
  work = args.workdir or tempfile.mkdtemp(prefix="lladav_convert_bench-")
  mb = lambda b: f"{b / 2**20:8.1f} MiB"
  try:
    info = write_checkpoint(os.path.join(work, "hf"), args.shards)
    print(f"checkpoint: {mb(info['bytes'])} bf16 in {info['files']} files, {info['tensors']} tensors; "
          f"largest tensor {mb(info['largest_tensor'])}, largest stacked parameter {mb(info['largest_param_bf16'])}")
    rows = [("hf-to-orbax", os.path.join(work, "hf"), os.path.join(work, "orbax")),
            ("orbax-to-hf", os.path.join(work, "orbax"), os.path.join(work, "hf2")),
            ("load_state (bf16, CPU)", os.path.join(work, "hf"), "")]
    print("peak RSS growth while the call runs, over the process's RSS just before it (after imports):")
    for what, src, dst in rows:
      r = run_child(what.split()[0], src, dst)
      grow, anon = r["peak"] - r["before"], r["peak_anon"] - r["before_anon"]
      print(f"  {what:<24} +{mb(grow)} total (+{mb(anon)} anonymous) = {grow / info['bytes']:.2f}x the "
            f"checkpoint; {r['seconds']:.1f} s; process ru_maxrss {mb(r['maxrss'])}")
    print("(load_state keeps the loaded bf16 state itself in host memory: on CPU the devices are the host)")
  finally:
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()

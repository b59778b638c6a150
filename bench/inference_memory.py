"""Bytes of the inference parameter tree: float32 copies of a bf16 checkpoint (what `LLaDAV.from_pretrained`
kept before) against the checkpoint's own bf16.

The 8B tree comes from the abstract model (nothing allocated), per group. With `--load`, a random bf16 checkpoint
of `config.mid` is written and loaded both ways, and the bytes of the arrays actually placed are added (and,
on an accelerator, the device's bytes in use).

    PYTHONPATH=. python bench/inference_memory.py [--load]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lladav_jax import config, weights  # noqa: E402
from lladav_jax.model import abstract_model  # noqa: E402

GIB = 2 ** 30


def tree_bytes(cfg) -> dict[str, int]:
  """{group: bytes} of the parameter tree of `cfg`, from the abstract model."""
  out: dict[str, int] = {}
  for k, v in weights.flat_params(abstract_model(cfg)[1]).items():
    g = k.split(".")[0]
    out[g] = out.get(g, 0) + math.prod(v.shape) * np.dtype(v.dtype).itemsize
  return out


def print_8b():
  cfg = config.llada_v_8b()
  before, after = tree_bytes(cfg.replace(param_dtype="float32")), tree_bytes(cfg.replace(param_dtype="bfloat16"))
  print("8B parameter tree (abstract)      float32 (before)   bfloat16 (after)")
  for g in before:
    print(f"  {g:<30} {before[g] / GIB:>12.3f} GiB {after[g] / GIB:>12.3f} GiB")
  b, a = sum(before.values()), sum(after.values())
  print(f"  {'total':<30} {b / GIB:>12.3f} GiB {a / GIB:>12.3f} GiB   ({b:,} B -> {a:,} B)")


def write_bf16_checkpoint(path: str, cfg) -> None:
  import ml_dtypes
  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  rng = np.random.default_rng(0)
  t = {n: (0.02 * rng.standard_normal(s, dtype=np.float32)).astype(ml_dtypes.bfloat16)
       for n, s in weights.expected_hf_shapes(cfg).items()}
  save_file(t, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  llm, v = cfg.llm, cfg.vision
  hf = dict(vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, num_hidden_layers=llm.num_layers,
            num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads, head_dim=llm.head_dim,
            intermediate_size=llm.intermediate_size, rope_theta=llm.rope_theta, mask_token_id=cfg.mask_token_id,
            mm_hidden_size=v.hidden_size, torch_dtype="bfloat16",
            vision_config=dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                               num_hidden_layers=v.num_layers + 1, num_attention_heads=v.num_heads,
                               patch_size=v.patch_size, image_size=v.image_size))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f)


def print_load():
  import jax
  from lladav_jax import LLaDAV
  cfg = config.mid()
  with tempfile.TemporaryDirectory() as d:
    write_bf16_checkpoint(d, cfg)
    print(f"config.mid bf16 checkpoint, loaded on {jax.devices()[0].device_kind}")
    for label, kw in (("float32 params (before)", dict(param_dtype="float32")), ("checkpoint dtype (after)", {})):
      model = LLaDAV.from_pretrained(d, **kw)
      placed = sum(x.nbytes for x in jax.tree.leaves(model.state))
      stats = jax.devices()[0].memory_stats() or {}
      in_use = f", device bytes in use {stats['bytes_in_use'] / 2**20:.1f} MiB" if "bytes_in_use" in stats else ""
      print(f"  {label:<26} {model.cfg.param_dtype:<9} placed {placed / 2**20:8.1f} MiB{in_use}")
      del model


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--load", action="store_true", help="also load a random bf16 config.mid checkpoint both ways")
  args = p.parse_args()
  print_8b()
  if args.load:
    print_load()


if __name__ == "__main__":
  main()

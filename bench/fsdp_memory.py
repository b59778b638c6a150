r"""Per-device memory and FLOPs of the compiled train step on fake CPU meshes (AOT only: nothing runs).

    python bench/fsdp_memory.py                                   # the 8B stage-2 table: 8/64/256 devices x 2048/8192 tokens
    python bench/fsdp_memory.py --preset tiny --devices 8,32 --tokens 1536 --tiles 1
    python bench/fsdp_memory.py --devices 64 --tokens 2048,8192,16384 --tiles 0 --attention dense,blockwise
                                                                  # the attention table of docs/ATTENTION.md

Each (devices, tokens) point compiles in its own subprocess with that many host-platform devices and
pure FSDP (fsdp = devices), one sample a device (the stage-2 recipe's per-device batch), `--tiles`
384 px tiles a sample, the stage presets' model settings (bf16 compute, f32 master weights, remat
`minimal`). Prints compiled.memory_analysis() (arguments = the sharded state and batch, temporaries)
and compiled.cost_analysis() FLOPs per device. With FSDP dividing the work, temporaries and FLOPs per
device stay flat as devices (and the global batch with them) grow.

The compiles use `step.ANALYSIS_ONLY` (LLVM's optimisations off): the same HLO and memory stats at about
40% less compile time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one(preset: str, devices: int, tokens: int, tiles: int, remat: str, chunk: int, attention: str) -> dict:
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, REPO)
  from lladav_jax import config, sharding
  from lladav_jax import batch as batch_lib
  from lladav_jax.training import loss as loss_lib, optimizer, state as st, step as stp

  cfg = config.get(preset)
  if preset == "llada_v_8b":
    cfg = cfg.replace(remat_policy=remat)
  cfg = cfg.replace(attention_impl=attention)
  mesh = sharding.make_mesh(1, devices, 1)
  optim = optimizer.OptimConfig(lr=1e-5)  # the HF Trainer AdamW of every stage
  setup = st.make_setup(cfg, mesh, optim, total_steps=1000)
  b = devices
  shapes = batch_lib.shapes(b, tokens, tiles, cfg.vision.image_size)
  compiled, mem = stp.compile_train_step(setup, loss_lib.LossConfig(logits_chunk=chunk), accum=1,
                                         batch_shapes=shapes, analysis_only=True)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"devices": devices, "tokens": tokens, "attention": attention, "global_batch": b, "tiles": tiles,
          "arguments_gib": mem["argument_size_in_bytes"] / 2 ** 30, "temporaries_gib": mem["temp_size_in_bytes"] / 2 ** 30,
          "tflop_per_device": float(cost.get("flops", 0.0)) / 1e12}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="llada_v_8b")
  p.add_argument("--devices", default="8,64,256")
  p.add_argument("--tokens", default="2048,8192")
  p.add_argument("--tiles", type=int, default=16)
  p.add_argument("--remat", default="minimal")
  p.add_argument("--chunk", type=int, default=1024, help="LM-head chunk (positions)")
  p.add_argument("--attention", default="dense", help="attention_impl(s), comma-separated (one row each)")
  p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.one:
    print(json.dumps(one(a.preset, int(a.devices), int(a.tokens), a.tiles, a.remat, a.chunk, a.attention)))
    return
  print(f"{a.preset}, pure FSDP, 1 sample a device, {a.tiles} tiles a sample, remat {a.remat}")
  print("| devices | global batch | tokens | attention | arguments GiB/device | temporaries GiB/device | TFLOP/device |")
  print("|---|---|---|---|---|---|---|")
  for tokens in a.tokens.split(","):
    for devices in a.devices.split(","):
      for attention in a.attention.split(","):
        r = subprocess.run([sys.executable, __file__, "--one", "--preset", a.preset, "--devices", devices, "--tokens",
                            tokens, "--tiles", str(a.tiles), "--remat", a.remat, "--chunk", str(a.chunk),
                            "--attention", attention], capture_output=True, text=True)
        if r.returncode:
          print(f"| {devices} | - | {tokens} | {attention} | failed: {r.stderr.strip().splitlines()[-1][:200]} | | |",
                flush=True)
          continue
        d = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"| {d['devices']} | {d['global_batch']} | {d['tokens']} | {attention} | {d['arguments_gib']:.2f} | "
              f"{d['temporaries_gib']:.2f} | {d['tflop_per_device']:.1f} |", flush=True)


if __name__ == "__main__":
  main()

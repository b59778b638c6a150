"""The memory plan of a training config: the real train step compiled ahead of time on a fake mesh, nothing run.

    python -m lladav_jax.train --config=configs/finetune.py:stage2_si --dry_run
    python -m lladav_jax.train --config=configs/finetune.py:stage2_si --dry_run --dry_run_meshes=fsdp:1,64,1

`train.py --dry_run` starts one subprocess per mesh (`--dry_run_meshes`, default: 8, 64 and 256 devices, pure
FSDP and FSDP + 2-way TP), each with that many host-platform devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N) and XLA's buffer-assignment dump. In the child
(`--dry_run_mesh=PRESET:DATA,FSDP,TENSOR`), `plan_one` compiles the step the trainer would compile for the
config's largest batch shape and reports per device:

    parameters   the sharded trainable + frozen parameters (from the state's shardings, exact)
    optimizer    the sharded optimizer state (exact)
    batch        the micro-batch inputs (exact)
    temporaries  compiled.memory_analysis().temp_size (activations, gradients, collectives' buffers ...)
    saved        the activations the remat policy keeps for the backward pass (analytic: the layer inputs and the
                 tagged tensors at the compute dtype; part of the temporaries)
    largest      the largest temporary buffers, with the JAX op that makes them (buffer assignment + HLO metadata)

The plan keeps the preset's model, optimizer, sequence length and tile budget; it swaps the data for
shapes (no files read), a missing stage checkpoint for the released model's shape (`llada_v_8b`: every stage
trains that shape), and sets the accumulation so that each device holds one row a micro-batch (the original's
per-device batch of 1: accum = global batch / batch shards). Numbers are the CPU compiler's: an upper bound
for an accelerator (docs/MEMORY.md).
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from typing import Sequence

import jax
import numpy as np

from lladav_jax import batch as batch_lib
from lladav_jax import sharding as shd
from lladav_jax.config import REMAT_POLICIES
from lladav_jax.training import run_config, state as state_lib, step as step_lib

# 8, 64 and 256 devices, pure FSDP and FSDP + 2-way TP (256-way FSDP needs the factored axis: the tower's 1152)
DEFAULT_MESHES = ("fsdp_tp:1,8,1", "fsdp_tp:1,4,2", "fsdp_tp:1,64,1", "fsdp_tp:1,32,2", "fsdp:1,128,2",
                  "fsdp_tp:1,128,2")
GIB = 2 ** 30


def parse_mesh(spec: str) -> tuple[str, tuple[int, int, int]]:
  """"fsdp_tp:1,64,1" -> ("fsdp_tp", (1, 64, 1))."""
  preset, _, sizes = spec.partition(":")
  shape = tuple(int(x) for x in sizes.split(","))
  if preset not in shd.PRESETS or len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"--dry_run_meshes: {spec!r} is not PRESET:DATA,FSDP,TENSOR with PRESET in {sorted(shd.PRESETS)}")
  return preset, shape


def dry_run_config(cfg, preset: str, shape: Sequence[int]):
  """A copy of the command-line ConfigDict that compiles without files: data as shapes, the mesh given, one row
  a device a micro-batch. Returns (config, notes)."""
  c = cfg.copy_and_resolve_references()
  notes = []
  if c.model.preset == "checkpoint" and not os.path.exists(os.path.join(c.init.checkpoint, "lladav_config.json")) \
      and not os.path.exists(os.path.join(c.init.checkpoint, "config.json")):
    notes.append(f"init.checkpoint={c.init.checkpoint!r} not here: the model is llada_v_8b (every stage's shape)")
    c.model.preset = "llada_v_8b"
  c.init.checkpoint = ""
  if c.data.kind == "llava":
    c.data.kind = "synthetic"  # shapes only: the plan reads no records
    c.data.synthetic_tiles = 1
    if c.data.packing:  # the step is the same program packed or not: rows of seq_len tokens, tile_budget tiles
      c.data.packing = False
      notes.append(f"data.packing: planned as the full rows it packs ({c.data.seq_len} tokens, "
                   f"{c.data.tile_budget} tiles a row)")
  if int(c.train.num_steps) <= 0:
    c.train.num_steps = 1000
  c.eval.tasks = ()
  c.mesh.preset = preset
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = (int(x) for x in shape)
  rows = math.prod(shape) if preset != "fsdp_tp" else shape[0] * shape[1]
  gb = int(c.train.global_batch_size)
  if gb % rows == 0:
    c.train.grad_accum_steps = gb // rows
  else:
    notes.append(f"global batch {gb} is not a multiple of the {rows} batch shards: one micro-batch of {rows} rows")
    c.train.global_batch_size, c.train.grad_accum_steps = rows, 1
  return c, notes


def _shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total


_VALUE = re.compile(r"^ value: <\d+ (\S+) @\d+> \(size=(\d+),offset=\d+\): (\S+)")
_FROM = re.compile(r"^ from instruction: %(\S+) = .*?op_name=\"([^\"]*)\"")


def largest_buffers(dump_dir: str, top: int = 10):
  """[(bytes, shape, op_name)] of the largest distinct temporary values in XLA's buffer-assignment dump of the
  train step (op_name from the HLO metadata; a fusion's own name where the compiler kept none)."""
  files = sorted(glob.glob(os.path.join(dump_dir, "*train_step*after_optimizations-buffer-assignment.txt")))
  if not files:
    return [], 0
  text = open(files[-1]).read().splitlines()
  values, in_temp = {}, False
  for line in text:
    if line.startswith("allocation "):
      in_temp = "parameter" not in line and "constant" not in line
    m = _VALUE.match(line)
    if m and in_temp:
      values[m.group(1)] = (int(m.group(2)), m.group(3).split("{")[0])
  ops = {}
  vfile = files[-1].replace("buffer-assignment.txt", "buffer-assignment-values.txt")
  if os.path.exists(vfile):
    for line in open(vfile):
      m = _FROM.match(line)
      if m:
        ops[m.group(1)] = m.group(2)
  seen, out = set(), []
  for name, (size, shape) in sorted(values.items(), key=lambda kv: -kv[1][0]):
    op = ops.get(name, name)
    key = (shape, op)
    if key in seen:  # one value per (shape, op): the loop bodies' copies of a buffer count once
      continue
    seen.add(key)
    out.append((size, shape, _short(op)))
    if len(out) == top:
      break
  return out


def saved_activation_bytes(cfg, rows: int, length: int, tiles: int, tensor: int) -> int | None:
  """Bytes a device keeps for the backward pass under the remat policy (config.REMAT_POLICIES): each layer's
  input (the scan carry) plus the tensors the policy names that the backward reads, at the compute dtype, for
  `rows` rows of `length` tokens and `tiles` tiles each (heads / mlp split over `tensor`). None without remat
  (XLA keeps what it needs). A named tensor the backward never reads is not kept, whatever the policy says:
  "mlp_out" (the MLP's output; only its sum with the residual stream is used), in the LLM and the tower alike.
  The attention implementation does not change the set: blockwise's custom-VJP residuals (output, log-sum-exp)
  are not named, so under remat they are recomputed with the layer (tests/test_train_plan.py checks this set
  against the residuals JAX keeps)."""
  names = REMAT_POLICIES[cfg.remat_policy]
  if names is None:
    return None
  itemsize = np.dtype(cfg.dtype).itemsize
  m, v = cfg.llm, cfg.vision
  llm = {"qkv": (m.num_heads + 2 * m.num_kv_heads) * m.head_dim / tensor, "context": m.num_heads * m.head_dim / tensor,
         "attn_out": m.hidden_size, "mlp_wi": 2 * m.intermediate_size / tensor}
  vis = {"context": v.hidden_size / tensor}  # the tags the tower has (its "mlp_out" is never read either)
  per_token = m.hidden_size + sum(llm[n] for n in names if n in llm)
  per_patch = v.hidden_size + sum(vis[n] for n in names if n in vis)
  total = m.num_layers * rows * length * per_token + v.num_layers * rows * tiles * v.tokens_per_tile * per_patch
  return int(total * itemsize)


def _short(op: str) -> str:
  """The informative tail of an op_name (jit(train_step)/train_step/jvp(...)/while/body/...)."""
  parts = [p for p in op.split("/") if p and p not in ("jit(train_step)", "train_step", "while", "body", "closed_call")]
  return "/".join(parts[-4:])


def plan_one(cfg, preset: str, shape: Sequence[int], dump_dir: str | None = None) -> dict:
  """Compiles the config's train step on this process's (fake) devices laid out as `preset` `shape`."""
  c, notes = dry_run_config(cfg, preset, shape)
  r = run_config.resolve(c, num_devices=jax.device_count(), process_count=1)
  mesh = shd.make_mesh(*r.mesh.shape, preset=r.mesh.preset)
  setup = state_lib.make_setup(r.model, mesh, r.optim, r.train.num_steps)
  d = r.data.pipeline
  length = max(set(d.buckets) | {d.seq_len})
  need = run_config.max_image_tokens(r.image)
  if need > d.seq_len:  # resolve checks this only for real data; the plan still says it
    notes.append(f"image.aspect={r.image.aspect!r} gives up to {need} tokens for one image: more than "
                 f"data.seq_len={d.seq_len} (the trainer would refuse this config)")
  tiles = d.tile_budget
  gb, accum = r.train.global_batch_size, r.train.grad_accum_steps
  shapes = batch_lib.shapes(gb, length, tiles, r.model.vision.image_size)
  _, mem = step_lib.compile_train_step(setup, r.loss, accum=accum, batch_shapes=shapes, analysis_only=True)
  abs_batch = step_lib.abstract_batch(mesh, shapes)
  micro = _shard_bytes(abs_batch) // accum
  largest = largest_buffers(dump_dir) if dump_dir else []
  tensor = r.mesh.shape[2] if r.mesh.preset == "fsdp_tp" else 1
  rows_dev = max(1, gb // accum // (math.prod(r.mesh.shape) // tensor))
  saved = saved_activation_bytes(r.model, rows_dev, length, tiles, tensor)
  params = _shard_bytes(setup.abstract["params"]) + _shard_bytes(setup.abstract["frozen"])
  opt_b = _shard_bytes(setup.abstract["opt_state"])
  temp = mem["temp_size_in_bytes"] if mem else 0
  return {"preset": preset, "mesh": list(shape), "devices": math.prod(shape), "global_batch": gb, "accum": accum,
          "tokens": length, "tiles": tiles, "remat": r.model.remat_policy, "lora_rank": r.model.lora.rank,
          "trainable": list(r.optim.trainable),
          "parameters": params, "optimizer": opt_b, "batch": _shard_bytes(abs_batch), "micro_batch": micro,
          "temporaries": temp, "saved_activations": saved, "peak": (mem or {}).get("peak_estimate_bytes", 0),
          "largest": largest, "notes": notes}


def run_plans(argv: Sequence[str], meshes: Sequence[str], *, timeout: int = 3600) -> list[dict]:
  """Re-runs this command line (`argv`, its --dry_run flags removed) once per mesh in a subprocess with that
  many fake host devices; returns each child's plan (or {"mesh": spec, "error": ...})."""
  base = [a for a in argv if not a.startswith(("--dry_run", "--nodry_run"))]
  out = []
  for spec in meshes:
    preset, shape = parse_mesh(spec)
    n = math.prod(shape)
    with tempfile.TemporaryDirectory(prefix="lladav_plan_") as dump:
      # no persistent compilation cache: a hit compiles nothing, so writes no dump (the dump flags are not in its key)
      env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_ENABLE_COMPILATION_CACHE="false",
                 XLA_FLAGS=f"--xla_force_host_platform_device_count={n} --xla_dump_to={dump} "
                           "--xla_dump_hlo_module_re=.*train_step.*")
      cmd = [sys.executable, "-m", "lladav_jax.train", *base, f"--dry_run_mesh={spec}", f"--dry_run_dump={dump}"]
      p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode or not lines:
      err = (p.stderr.strip().splitlines() or ["no output"])[-1]
      out.append({"mesh": spec, "error": err[:300]})
    else:
      out.append(json.loads(lines[-1]))
  return out


DEVICE_GIB = (16, 24, 40, 80, 95)  # TPU v5e / L4 / A100-40G / A100-80G and H100 / TPU v5p: device memory in GiB


def _gib(b: float) -> str:
  v = b / GIB
  return f"{v:.2f}" if v >= 0.1 or v == 0 else f"{v:.2g}"


def table(plans: Sequence[dict], device_gib: Sequence[float] = DEVICE_GIB) -> str:
  """The plans as a Markdown table (GiB per device; small models in significant digits) + each one's largest
  buffers; a column per device memory says whether the peak fits it."""
  fits = " | ".join(f"fits {g:g} GiB" for g in device_gib)
  rows = ["| mesh | devices | batch x accum | tokens, tiles | remat | parameters | optimizer | batch | temporaries "
          f"(saved activations) | peak | {fits} |", "|---" * (10 + len(device_gib)) + "|"]
  detail = []
  for p in plans:
    if "error" in p:
      rows.append(f"| {p['mesh']} | failed: {p['error']} |" + " |" * (8 + len(device_gib)))
      continue
    saved = "-" if p["saved_activations"] is None else _gib(p["saved_activations"])
    mesh = f"{p['preset']} {'x'.join(map(str, p['mesh']))}"
    verdicts = " | ".join("yes" if p["peak"] <= g * GIB else "no" for g in device_gib)
    rows.append(f"| {mesh} | {p['devices']} | {p['global_batch'] // p['accum']} x {p['accum']} | {p['tokens']}, "
                f"{p['tiles']} | {p['remat']} | {_gib(p['parameters'])} | {_gib(p['optimizer'])} | {_gib(p['batch'])} | "
                f"{_gib(p['temporaries'])} ({saved}) | {_gib(p['peak'])} | {verdicts} |")
    if p["largest"]:
      detail.append(f"{mesh}: " + "; ".join(f"{s / GIB:.2f} GiB {shape} ({op})" for s, shape, op in p["largest"][:5]))
    for n in p.get("notes", ()):
      detail.append(f"{mesh}: note: {n}")
  return "\n".join(rows + [""] + detail)

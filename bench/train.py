r"""Train-step throughput on this machine: config.mid() widened to d=1536 (~0.35B parameters) on
synthetic batches.

    python bench/train.py                       # the tuned CPU setting
    python bench/train.py --width 512           # config.mid itself (64M parameters)
    python bench/train.py --sweep               # the variants tried (batch/seq, scan, remat, chunk, precision)
    python bench/train.py --batch 8 --seq 512 --no-scan --remat minimal --steps 5

Prints, per setting: step time, tokens/s (all B x L positions, and the useful ones: segment > 0; the
synthetic rows end in 0-10% padding; `bench/packing.py` measures what packing does to that fraction on real
length mixes), achieved model FLOP/s (training/flops.py: 6*N*tokens for
matmul weights + full bidirectional attention + the vision tower per tile), next to the FLOP/s of
a plain jitted 2048^3 float32 matmul measured in the same process (best of N, before and after),
and their ratio; and the same two per second of the process's CPU time (best step, best matmul), the
figure to compare on a machine shared with other jobs (wall time also counts their time slices). Parameters are random host arrays (the model's init is not compiled).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lladav_jax import config as model_config, sharding  # noqa: E402
from lladav_jax.model.common import random_like  # noqa: E402
from lladav_jax.training import flops as flops_lib, loss as loss_lib, optimizer, state as st, step as stp  # noqa: E402
from lladav_jax.training import synthetic  # noqa: E402


@dataclasses.dataclass
class Setting:
  batch: int = 4
  seq: int = 1024
  tiles: int = 1
  scan: bool = True
  remat: str = "none"
  chunk: int = 0
  dtype: str = "float32"
  precision: str = "default"  # jax_default_matmul_precision
  accum: int = 1
  width: int = 1536  # LLM hidden size (config.mid: 512; other widths: heads of 128, MLP 3x)
  layers: int = 8  # LLM layers (config.mid's)
  vocab: int = 32000  # config.mid's; 126464 is the released model's
  attention: str = "auto"  # model.attention_impl

  def label(self):
    return (f"d={self.width} layers={self.layers} V={self.vocab} B={self.batch} L={self.seq} tiles={self.tiles} "
            f"scan={int(self.scan)} remat={self.remat} chunk={self.chunk} {self.dtype} prec={self.precision} "
            f"accum={self.accum} attention={self.attention}")


def model_cfg(s: Setting):
  cfg = model_config.mid(vocab_size=s.vocab, mask_token_id=s.vocab - 1, dtype=s.dtype, scan_layers=s.scan,
                         remat_policy=s.remat, attention_impl=s.attention)
  llm = dataclasses.replace(cfg.llm, num_layers=s.layers)
  if s.width != cfg.llm.hidden_size:
    llm = dataclasses.replace(llm, hidden_size=s.width, num_heads=s.width // 128, num_kv_heads=s.width // 128,
                              head_dim=128, intermediate_size=3 * s.width)
  return cfg.replace(llm=llm)


def run(s: Setting, steps: int, warmup: int = 1):
  cfg = model_cfg(s)
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  ocfg = optimizer.OptimConfig(lr=1e-4)  # the HF Trainer AdamW of every stage
  setup = st.make_setup(cfg, mesh, ocfg, total_steps=1000)
  # CPU: random host arrays (the init's compile would cost more than the run); accelerators: the model's init
  host = random_like(st.full_params(setup.abstract)) if jax.default_backend() == "cpu" else None
  state = st.init_state(setup, seed=0, params=host)
  batch = synthetic.make_batch(np.random.default_rng(0), batch=s.batch, seq_len=s.seq, vocab_size=cfg.llm.vocab_size,
                               mask_token_id=cfg.mask_token_id, tiles=s.tiles, image_size=cfg.vision.image_size,
                               patch_size=cfg.vision.patch_size)
  shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), batch)
  with jax.default_matmul_precision(s.precision):
    t = time.perf_counter()
    compiled, mem = stp.compile_train_step(setup, loss_lib.LossConfig(logits_chunk=s.chunk),
                                           accum=s.accum, batch_shapes=shapes)
    compile_s = time.perf_counter() - t
  gb = jax.tree.map(lambda v: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)), batch)
  for _ in range(warmup):
    state, m = compiled(state, gb)
  jax.block_until_ready(m)
  times, cpu = [], []
  for _ in range(steps):
    t, c = time.perf_counter(), time.process_time()
    state, m = compiled(state, gb)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  fl = flops_lib.step_flops(cfg, batch=s.batch, seq_len=s.seq, tiles=s.tiles)["total"]
  best, med = min(times), float(np.median(times))
  useful = int((np.asarray(batch.inputs.segments) > 0).sum())
  return {"setting": s.label(), "compile_s": compile_s, "step_s_best": best, "step_s_median": med,
          "tokens_per_s": s.batch * s.seq / med, "useful_tokens_per_s": useful / med, "flops_per_step": fl, "flops_per_s": fl / med,
          "flops_per_s_best": fl / best, "flops_per_cpu_s": fl / min(cpu), "loss": float(m["loss"]),
          "peak_mem_mib": (mem or {}).get("peak_estimate_bytes", 0) / 2 ** 20}


SWEEP = [
    Setting(width=512, batch=2, seq=256),
    Setting(width=512, batch=4, seq=1024),
    Setting(width=512, batch=4, seq=1024, chunk=256),
    Setting(width=512, batch=4, seq=1024, scan=False),
    Setting(width=512, batch=4, seq=1024, precision="highest"),
    Setting(width=512, batch=4, seq=1024, dtype="bfloat16"),
    Setting(width=512, batch=8, seq=1024),
    Setting(width=512, batch=32, seq=256),
    Setting(width=512, batch=16, seq=512, remat="minimal"),
    Setting(width=1024, batch=8, seq=512, remat="minimal"),
    Setting(width=1536, batch=4, seq=512, remat="minimal"),
    Setting(width=1536, batch=4, seq=512),
]
# Measured on the 2-core dev box (ratio to the matmul's FLOP/s): d=512: B=8 L=1024 32%, B=32 L=256
# 35%, B=16 L=512 remat=minimal 39%; d=1024 B=8 L=512 minimal 55%; d=1536 B=4 L=512 minimal 59%,
# no remat 62% and 55% in two runs (the model at 109-114 GFLOP/s, the matmul reference itself at
# 164-197 GFLOP/s from run to run on this VM), B=8 67%. At d=512 the model's largest matmul
# ([8192, 512] x [512, 1536]) reaches only ~65% of the 2048^3 one and XLA-CPU attention runs at
# ~31 GFLOP/s (the softmax's exp over [B, N, L, L]); wider layers make the matmuls efficient and
# attention a smaller share.
# Issue 19, under load (load average 6 to 18): a fused custom-VJP loss head (no recomputed head matmul) and a
# lax.cond non-finite guard measured 70% vs 71% of the matmul per CPU-second (~2% fewer CPU-seconds at best,
# within the noise); both were left out (the lax.cond costs 0.63 GiB of temporaries in the 8B 64-way plan: the
# updated state is no longer written in place). Remat stays "none": the step's 10 GiB peak fits this machine,
# and a remat policy would recompute the forward (FLOPs the model count leaves out).
# One NVIDIA H200 (jax 0.11.2; `bash bench/gpu.sh`): d=4096 (LLaDA-8B's layer, MLP 3x), 8 layers, vocabulary
# 126464, B=4 L=2048, bf16 compute, float32 parameters and AdamW, chunk 2048, cuDNN attention: 0.264 s a step,
# 447 TFLOP/s, 66% of a random 8192^3 bf16 matmul (669-673 TFLOP/s), MFU 45.2% of 989 (two runs: 44.7%, 45.2%);
# peak 64.6 GiB. Unmeasured estimate of the gap to the matmul's 189 ms: the LM head's recompute under the
# loss's jax.checkpoint (2 of its 6 passes, ~8.5 TFLOP: ~13 ms), AdamW and the non-finite guard over 2.8B
# float32 parameters (~80 GB of traffic: ~20 ms), norms / RoPE / SiLU and the float32 CE. 16 layers with 4
# micro-batches of 8192 tokens ran out of memory (119 GiB wanted: no remat, the accumulated gradient).
BEST = Setting(width=1536, batch=4, seq=512, remat="none")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sweep", action="store_true")
  p.add_argument("--steps", type=int, default=3)
  for f in dataclasses.fields(Setting):
    if f.type == "bool" or isinstance(f.default, bool):
      p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None)
    else:
      p.add_argument(f"--{f.name}", type=type(f.default), default=None)
  a = p.parse_args()
  over = {f.name: getattr(a, f.name) for f in dataclasses.fields(Setting) if getattr(a, f.name) is not None}
  settings = SWEEP if a.sweep else [dataclasses.replace(BEST, **over)]
  dev = jax.devices()[0]
  print(f"jax {jax.__version__}, {dev.device_kind}, {os.cpu_count()} CPUs", flush=True)
  # the reference: a 2048^3 float32 matmul on a CPU; a 8192^3 bfloat16 one (the MFU's dtype) on an accelerator
  cpu = jax.default_backend() == "cpu"
  ref_n, ref_dtype = (2048, "float32") if cpu else (8192, "bfloat16")
  mm0 = flops_lib.measure_matmul_flops(ref_n, ref_dtype)
  mc0 = flops_lib.measure_matmul_flops(ref_n, ref_dtype, clock=time.process_time) if cpu else None
  peak = flops_lib.peak_flops(dev.device_kind)
  print(f"plain {ref_n}^3 {ref_dtype} matmul: {mm0 / 1e9:.1f} GFLOP/s (best of 5)"
        + (f", {mc0 / 1e9:.1f} GFLOP per CPU-second" if cpu else "")
        + (f"; the device's bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak and not cpu else ""), flush=True)
  rows = []
  for s in settings:
    try:
      r = run(s, a.steps)
    except Exception as e:  # one setting that fails to compile or run (memory) does not end the sweep
      print(f"{s.label()}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
      continue
    ref = max(mm0, flops_lib.measure_matmul_flops(ref_n, ref_dtype))
    r["matmul_flops_per_s"] = ref
    r["ratio"] = r["flops_per_s"] / ref
    n_params = flops_lib.count_params(model_cfg(s))["total"]
    line = (f"{r['setting']} ({n_params / 1e6:.0f}M parameters): step {r['step_s_median']:.3f}s "
            f"(best {r['step_s_best']:.3f}s, compile {r['compile_s']:.0f}s), "
            f"{r['tokens_per_s']:.0f} tokens/s ({r['useful_tokens_per_s']:.0f} useful), "
            f"{r['flops_per_s'] / 1e9:.1f} GFLOP/s model (best step {r['flops_per_s_best'] / 1e9:.1f}), "
            f"matmul {ref / 1e9:.1f} GFLOP/s, ratio {r['ratio']:.0%}, peak mem {r['peak_mem_mib']:.0f} MiB")
    if cpu:
      mc = max(mc0, flops_lib.measure_matmul_flops(ref_n, ref_dtype, clock=time.process_time))
      r["cpu_ratio"] = r["flops_per_cpu_s"] / mc
      line += (f"; per CPU-second (best step vs best matmul): {r['flops_per_cpu_s'] / 1e9:.1f} vs {mc / 1e9:.1f} "
               f"GFLOP, ratio {r['cpu_ratio']:.0%}")
    elif peak:
      r["mfu"] = r["flops_per_s"] / peak
      line += f"; MFU {r['mfu']:.1%} of {peak / 1e12:.0f} TFLOP/s (best step {r['flops_per_s_best'] / peak:.1%})"
    print(line, flush=True)
  return rows


if __name__ == "__main__":
  main()

r"""Train-step throughput on this machine: config.mid() widened to d=1536 (~0.35B parameters) on
synthetic batches.

    python bench/train.py                       # the tuned CPU setting
    python bench/train.py --width 512           # config.mid itself (64M parameters)
    python bench/train.py --sweep               # the variants tried (batch/seq, scan, remat, chunk, precision)
    python bench/train.py --batch 8 --seq 512 --no-scan --remat minimal --steps 5
    python bench/train.py --breakdown           # also the forward loss, loss + gradients alone (CPU-seconds)

Prints, per setting: step time, tokens/s (all B x L positions, and the useful ones: segment > 0; the
synthetic rows end in 0-10% padding; `bench/packing.py` measures what packing does to that fraction on real
length mixes), achieved model FLOP/s (training/flops.py: 6*N*tokens for
matmul weights + full bidirectional attention + the vision tower per tile), next to the FLOP/s of
a plain jitted 2048^3 float32 matmul measured in the same process (best of N, before and after),
and their ratio; and the same two per second of the process's CPU time (best step, best matmul), the
figure to compare on a machine shared with other jobs (wall time also counts their time slices). On a CPU the
parameters are random host arrays (the model's init is not compiled); on an accelerator, the model's init.
On a CPU the allocator matters (XLA:CPU mallocs the step's temporaries every step, and glibc maps and unmaps the
large ones, faulting their pages in again): the bench reruns itself under tcmalloc when it is installed (Debian's
libtcmalloc-minimal4; `--allocator glibc` keeps glibc's), which made the default step 8-10% faster.
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lladav_jax import config as model_config, sharding  # noqa: E402
from lladav_jax.model.common import random_like  # noqa: E402
from lladav_jax.training import flops as flops_lib, loss as loss_lib, optimizer, state as st, step as stp  # noqa: E402
from lladav_jax.training import host_memory, synthetic  # noqa: E402

import op_times  # noqa: E402  (bench/op_times.py: sys.path[0] is this file's folder)


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


def prepare(s: Setting):
  """The setting's model config, train setup (one device, the HF Trainer AdamW of every stage), initial state
  and synthetic host batch."""
  cfg = model_cfg(s)
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  setup = st.make_setup(cfg, mesh, optimizer.OptimConfig(lr=1e-4), total_steps=1000)
  # CPU: random host arrays (the init's compile would cost more than the run); accelerators: the model's init
  host = random_like(st.full_params(setup.abstract)) if jax.default_backend() == "cpu" else None
  state = st.init_state(setup, seed=0, params=host)
  batch = synthetic.make_batch(np.random.default_rng(0), batch=s.batch, seq_len=s.seq, vocab_size=cfg.llm.vocab_size,
                               mask_token_id=cfg.mask_token_id, tiles=s.tiles, image_size=cfg.vision.image_size,
                               patch_size=cfg.vision.patch_size)
  return cfg, setup, state, batch


def run(s: Setting, steps: int, warmup: int = 1, trace: str | None = None, hlo: str | None = None):
  cfg, setup, state, batch = prepare(s)
  mesh = setup.mesh
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
  if hlo:  # the optimized program, to read what a profile's op names are
    with gzip.open(hlo, "wt") as f:
      f.write(compiled.as_text())
  if trace:  # two more steps under the profiler, then where their time went
    with jax.profiler.trace(trace):
      for _ in range(2):
        state, m = compiled(state, gb)
      jax.block_until_ready(m)
    print(op_times.summarise(trace, steps=2, top=60), flush=True)
  fl = flops_lib.step_flops(cfg, batch=s.batch, seq_len=s.seq, tiles=s.tiles)["total"]
  best, med = min(times), float(np.median(times))
  useful = int((np.asarray(batch.inputs.segments) > 0).sum())
  return {"setting": s.label(), "compile_s": compile_s, "step_s_best": best, "step_s_median": med,
          "tokens_per_s": s.batch * s.seq / med, "useful_tokens_per_s": useful / med, "flops_per_step": fl, "flops_per_s": fl / med,
          "flops_per_s_best": fl / best, "flops_per_cpu_s": fl / min(cpu), "loss": float(m["loss"]),
          "peak_mem_mib": (mem or {}).get("peak_estimate_bytes", 0) / 2 ** 20}


def breakdown(s: Setting, repeats: int = 2):
  """CPU-seconds (best of `repeats`) of the step's parts for setting `s`, each jitted on its own: the forward loss
  (the step's own loss and gradient function with only the loss kept: XLA drops the backward), and loss +
  gradients (the step without the optimizer). The optimizer's share is the full step's CPU time minus the second."""
  _, setup, state, batch = prepare(s)
  loss_and_grad = stp.make_loss_and_grad(setup, loss_lib.LossConfig(logits_chunk=s.chunk), accum=1)
  parts = (("forward", lambda st_, b: loss_and_grad(st_, b)[0]), ("loss_and_grad", lambda st_, b: loss_and_grad(st_, b)[::2]))
  out = {}
  with jax.default_matmul_precision(s.precision):
    for name, fn in parts:
      f = jax.jit(fn)
      jax.block_until_ready(f(state, batch))
      best = float("inf")
      for _ in range(repeats):
        c = time.process_time()
        jax.block_until_ready(f(state, batch))
        best = min(best, time.process_time() - c)
      out[name] = best
  return out


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
# Issue "train step >= 80% of the matmul" (2026-11-26, load average 5-7 from another job's tests; CPU-second figures,
# best of 2-5): the default setting measured 61% and 65% per CPU-second in two runs (46.0 vs 75.1 and 48.9 vs 75.0
# GFLOP), B=8 64% (48.4 vs 75.4, peak 14.1 GiB, 165 s a step). `--breakdown` of the 65% run: step 78.0 CPU-s = forward
# loss 22.1 (57.6 GFLOP per CPU-s, ~77% of the matmul) + backward 52.5 (48.5, ~65%) + optimizer and guard 3.4 (no
# FLOPs counted). Pieces alone (fwd + bwd, per CPU-s, matmul 60-75 the same minutes): a 2-layer stack's forward ~99%
# of the matmul; the SwiGLU MLP alone 66 GFLOP (its dW matmuls run as Eigen dots fed by a transposed silu-backward
# fusion, yet at full rate); the attention sub-block (q/k/v/o + RoPE + dense core) 59; the dense core alone 28-39 (its
# [48 x 512 x 128 x 512] batched matmuls and softmax passes; ~0.5-0.7 CPU-s a layer against 0.31 at the matmul rate);
# the LM head + CE (checkpointed) 62.5: the optimized step HLO holds 3 head matmuls, not 4 (XLA merges the forward
# logits with the checkpoint's recompute, which is why a fused custom-VJP head gained nothing); the [2048, 1536] x
# [1536, 4608] shapes NN 58-60, NT 61, TN 67-74; a 2-layer stack fwd + bwd 48-58. The pieces add up to ~64 CPU-s a
# step; the whole step's backward takes ~12 CPU-s more than its pieces alone, and repeating one 2-layer stack
# measurement gave 13.6 to 16.5 CPU-s (scan and unrolled alike), so that gap is not pinned to one op (profiler thunk
# times overlap: XLA runs the Eigen dots asynchronously next to other thunks). Tried and left out: the dense core with
# the softmax normalised after the value matmul (equal CPU time with [B, N, T, S] scores, 20% slower grouped as [B, K,
# G, T, S]); XLA_FLAGS --xla_cpu_experimental_ynn_fusion_type=-reduce (no change) and
# --xla_cpu_enable_concurrency_optimized_scheduler=false (2-layer stack 15.3 and 16.7 CPU-s vs 16.4 and 16.5: noise);
# the optimizer: AdamW over the 350M parameters costs 1.8 CPU-s unguarded and 3.3-3.8 with the jnp.where non-finite
# guard (the guard keeps m/v and the parameter update in separate fusions that each re-read g, m and v, plus 75 copies
# of the old moments); an ordering trick that removes the copies (the moments' select made to depend on the new
# parameters' norm) left the time unchanged (3.3-3.5), so the guard's cost is the extra passes, which only a one-pass
# fused AdamW would remove. The 80% goal is not met on this shared machine: the forward is at ~77%, the backward's
# ~65% is what bounds the step, and run-to-run spread is +-5 points of the ratio.
# Quiet machine (load 0.6), 2026-11-26, the default setting: 88.1 GFLOP/s against a 149.3 GFLOP/s matmul (59%); per
# CPU-second 47.7 vs 84.3 (57%): this VM's matmul ran faster than in earlier runs (~70), the step did not follow.
# One NVIDIA H200 (jax 0.11.2; `bash bench/gpu.sh`): d=4096 (LLaDA-8B's layer, MLP 3x), 8 layers, vocabulary
# 126464, B=4 L=2048, bf16 compute, float32 parameters and AdamW, chunk 2048, cuDNN attention: 0.264 s a step,
# 447 TFLOP/s, 66% of a random 8192^3 bf16 matmul (669-673 TFLOP/s), MFU 45.2% of 989 (two runs: 44.7%, 45.2%);
# peak 64.6 GiB. Unmeasured estimate of the gap to the matmul's 189 ms: the LM head's recompute under the
# loss's jax.checkpoint (2 of its 6 passes, ~8.5 TFLOP: ~13 ms), AdamW and the non-finite guard over 2.8B
# float32 parameters (~80 GB of traffic: ~20 ms), norms / RoPE / SiLU and the float32 CE. 16 layers with 4
# micro-batches of 8192 tokens ran out of memory (119 GiB wanted: no remat, the accumulated gradient).
# 2026-11-26 (second session, perf + the XLA profiler, 2 layers of the default setting): the ynn dot kernel takes 50% of
# the cycles, XLA's own fused loops 31%, the kernel 8% (clearing faulted pages: ~710k minor faults, 2.8 GB, a step with
# glibc's defaults, which map and unmap the step's large temporaries; ~660k with host_memory's settings, whose 2 GiB
# trim threshold returns them too), Eigen's GEMM packing 4%. The largest single loop is the SwiGLU backward fused with
# a transpose of its [2048, 4608] output for the weight-gradient dot (copy_bitcast_fusion, ~0.3 s a layer, ~5% of the
# step); the isolated MLP compiles without it. Per CPU-second the 2-layer step (host_memory's settings) reaches 74% of
# the matmul, 28 CPU-s a step; disabling ynn dot fusions
# (--xla_cpu_experimental_ynn_fusion_type=) left it at 28 CPU-s. training/host_memory.py's malloc settings (one arena,
# no mmap) removed the faults after two steps with trimming off too, but at 8 layers (a 10 GiB program) the one heap
# fragmented past this machine's 24 GB (killed for memory, with trimming on or off): the bench keeps glibc's defaults.
# 2026-11-26 (third session), the released model's layer width (`--width 4096 --layers 2`: heads 32 x 128, MLP 12288,
# 720M parameters, peak 16.2 GiB): 83.1 GFLOP/s against a 170.5 GFLOP/s matmul, 49% by wall time, 51% per CPU-second
# (45.3 vs 88.1): a wider layer does not raise the ratio. Its profile (one step, 81.5 s): XLA's thunks account for
# 88 of the two threads' 163 s; dots 67 s; the SwiGLU backward's transposing loops (copy_bitcast_fusion) 10 s, 12%;
# selects, slices and in-place updates of the scan ~7 s. The forward MLP's gate and up dots run one on each thread
# at ~60 GFLOP/s each (two such dots alone in one program: 143 GFLOP/s together, ~1.2x faster); a [4096, 2048] x
# [2048, 12288] transposed-operand dot (the weight gradients' shape) runs at 75 GFLOP/s alone, against 123 for the
# plain orientation. So on this CPU the step is bound by XLA's dot kernels at the step's shapes and orientations
# and by the transposing loops, not by FLOP-free work the model could drop. Tried and left out: a custom-VJP SwiGLU
# whose backward leaves the transposing fusion (an optimization barrier on its two cotangents): 27.39 vs 27.86
# CPU-s a step (2 layers, d=1536), within the noise.
# 2026-11-26 (fourth session), one NVIDIA H100 80GB HBM3 (jax 0.11.2, `bash bench/gpu.sh`, the H200's setting above): 0.286 s
# a step, 41.7% MFU, 58% of a 716 TFLOP/s bf16 matmul, peak 64.2 GiB. The profile (`--trace`, bench/op_times.py, CUDA
# graphs off): cuBLAS 165 ms of 286 at ~680 TFLOP/s (the plain matmul's rate), of which the LM head's logits
# recomputed under the loss's jax.checkpoint 11 ms; cuDNN attention 29 ms (its flash backward at ~250 TFLOP/s: the
# segment mask goes in as a bias); XLA fusions 91 ms, of which AdamW + the guard + the parameter norm ~31 ms (one
# pass a parameter at ~2.9 TB/s: 2.8B float32 parameters, 28 bytes each; at 64-way FSDP a device updates 1/64 of
# them), and zeroing / slicing the scan's stacked residuals ~12 ms. Changes: the loss takes each chunk's head
# gradients in its forward scan (loss._ce_sums): 0.265 s, 45.0%, 62.1 GiB; remat `minimal_with_context` (every
# matmul's output kept, the elementwise work recomputed): 0.256 s, 46.6% (best step 47.2%), 48.4 GiB, now the
# bench's setting. Tried and left out: no scan (0.295 s), the Triton attention kernel (`--attention pallas_gpu`,
# 0.281 s), XLA's Triton GEMMs off (0.298 s), 4 micro-batches of 4096 tokens (0.643 s for 16384 tokens: the
# accumulation carry's passes cost more than the optimizer's amortisation saves). What is left to the 55% goal: the
# optimizer (~11% of the step here, ~0 at 64-way FSDP), attention's kernel, the remaining elementwise passes.
# CPU (quiet, load ~1): the default setting 42.8 -> 39.9 s best step with the head change (63% -> 59% per CPU-second:
# the matmul reference ran 74 -> 84 GFLOP per CPU-second between the runs), and 38.4 s with minimal_with_context (64%,
# peak 10.3 -> 7.9 GiB).
# 2026-11-26 (fifth session), another 2-core VM: an AVX-512 / AMX Xeon whose plain matmul runs at 265-330 GFLOP/s
# (2-2.5x the earlier VMs'), so the FLOP-free work weighs more. The profile (2 layers) showed XLA:CPU's fast (ynn)
# dots at full rate (~155-160 GFLOP/s each when two run side by side, ~300-320 alone); what lost time: (1) every
# weight gradient contracts the token axes, which lead both operands, and XLA:CPU ran that orientation as an Eigen
# dot fed by a transposing copy of the larger cotangent; (2) that copy, fused with the recompute of its input from a
# scan's stacked residuals (dynamic slices), ran ~5x slower than a plain transpose (131 vs 27 ms for [2048, 4608]
# in isolation); (3) the non-finite guard's jnp.where over the new and old optimizer state; (4) an argmax pass over
# the [2048, V] logits for the accuracy metric; (5) glibc malloc's page faults (sys time ~15% of the CPU time).
# Changes: every projection through common.dense (a custom VJP: on CPU the weight gradient takes the input, or for
# the MLP's wide down-projection input the cotangent and the result, transposed first, so that it is a plain ynn
# matmul; the SwiGLU MLP's forward + backward 116 -> 145 GFLOP per CPU-second); optimizer.adamw with the skip
# inside its one pass; the metric from the label logit against logsumexp's max. The default setting, best of 3
# steps (median step; ratio by wall time / per CPU-second):
#   glibc malloc:   24.03 s (53% / 54%) -> 19.16 s (67% / 62%), peak 7.7 -> 6.9 GiB
#   tcmalloc (LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4, Debian libtcmalloc-minimal4, which
#   keeps the freed temporaries: about half the page faults and kernel time): 22.00 s (60% / 62%) -> 17.70 s
#   (72% / 74%). 2 layers: 75% / 78% in the best run. Unrolled layers (--no-scan): 17.2 s with tcmalloc (70% /
#   76%), within the noise of the scan, 2.2 GiB more. The run-to-run spread on this VM is +-5 points (the matmul
#   reference itself 265-331 GFLOP/s). Still short of 80%: what remains is the dense attention core (its batched
#   dots at 40-230 GFLOP/s and the softmax passes), the input transposes (~20-50 ms each, 4 a layer), AdamW's
#   passes over 350M parameters, and the kernel time of faulting in the step's temporaries. Of these changes, the
#   wide input's (common.dense transposing the cotangent and the result, not the input recomputed from the scan's
#   residuals): 2-4% off a step of `--layers 2` in three paired runs.
# 2026-11-26 (sixth session, the same AMX VM): the VM drifted during the session: the same B=4 step took 15.3 to
#   17.9 s, and the reference matmul's best of 5 ran at 265-341 GFLOP/s (sustained for 20 s: 292-309, median 310-315),
#   so every comparison below alternates the variants in one process (tcmalloc, 8 layers, B=4, best of 2 rounds):
#   - weight gradients as plain token-contracting dots (XLA's Eigen kernel) instead of `dense`'s transposed operands:
#     17.22 vs 16.15 s, slower, although alone, in a scan of 8 layers, that dot beat transpose + matmul (96 vs 139 ms);
#   - the transposes inside a lax.cond (a fusion boundary: alone an in-loop transpose went from 15.6 to 4.3 ms): 16.16
#     vs 16.10 s, no change;
#   - a dense attention with a custom VJP (the backward from the saved log-sum-exp, scores recomputed keys-first, the
#     output and lse named "context"): 15.78 vs 16.19 s while the sum divided the value product; that broke
#     test_lora's bit-exact base-vs-adapter loss on a 2x2x2 mesh (1 ulp: the two programs partition differently), and
#     normalised first it measured 15.86 vs 15.82 s: reverted;
#   - blockwise attention (one 512 block): 16.97 vs 16.41 s; XLA flags --xla_cpu_experimental_enable_tiling_propagation,
#     --xla_cpu_use_onednn, --xla_cpu_use_fusion_emitters=false: within the noise.
#   Adopted: B=8 (per row 1.5-3% faster than B=4 in two paired rounds) and tcmalloc by default. The default, tcmalloc:
#   31.2 s a step, 244 GFLOP/s, 77% of the matmul by wall time and per CPU-second (124.6 vs 161.0); `--allocator
#   glibc`: 35.0 s, 69% / 73%. The 8-layer B=4 profile: XLA's thunks are 81% ynn dots (at the matmul's rate); the
#   rest is the loops that transpose the scan's stacked residuals through dynamic slices (~4 s of the two threads'
#   ~29), AdamW (~1 s), and for ~40% of the step only one thunk runs.
# 2026-11-26 (seventh session, the same AMX VM, which slowed during the session: the old code's step went from 30.0 to
#   35.5 s). What the transposing loops cost, measured by making them free (reshapes, wrong values): B=4 15.78 ->
#   14.72 s. Why they were slow: XLA:CPU emits a transpose fused with anything (the recompute of a layer's input from
#   the scan's stacked residuals, the weight gradient's dynamic-update-slice into the stacked gradient, RoPE) as a
#   loop over the output elements, reading the input a row (a page) apart: 24-26 ms for [4096, 1536] float32 against
#   4.4 ms for the same transpose alone; optimization barriers and a platform `cond` do not keep XLA from fusing it.
#   XLA_FLAGS --xla_cpu_experimental_ynn_fusion_type=+eltwise (YNNPACK's tiled transposes: 3.8 ms alone) left the step
#   unchanged (30.06 vs 29.96 s; it also merges dots with their elementwise neighbours into fusions at half the
#   rate) and individual_dot,eltwise was slower (16.41 vs 15.29 s at B=4). Changes:
#   - common.dense's transposes of 2^20 elements or more are built 32 rows at a time in a fori_loop on one device
#     (a loop XLA keeps, so nothing is fused into it; 6 ms for [4096, 1536]; blocks of 8-64 rows measured 6-10 ms);
#   - attention.dense computes the scores with the heads moved ahead of the positions (copies of their own behind
#     optimization barriers) instead of jax.nn.dot_product_attention from [B, T, N, H], for which XLA:CPU laid out
#     the keys as [B, N, H, S] and the probabilities transposed: one layer's attention forward + backward at B=8
#     went from 463 to 306-318 ms.
#   In one process, alternating (B=8, best of 2 rounds): before 35.54 s (109.6 GFLOP per CPU-second), the attention
#   layout alone 32.77 s (118.1), both 31.04 s (124.5): 12.7% off the step. The default setting, tcmalloc, ratio by
#   wall / per CPU-second in three runs: 82% / 85% (30.5 s, matmul 305), 79% / 81% (32.0 s, matmul 302), 82% / 84%
#   (29.8 s, matmul 312); B=4 78% / 78%; `--allocator glibc` 80% / 77%. What is left: elementwise passes (the SwiGLU backward, AdamW, the
#   scan's slices; ~3.7 of the ~32 thread-seconds a B=4 step) and the attention's batched dots at 90-230 GFLOP/s.
BEST = Setting(width=1536, batch=8, seq=512, remat="minimal_with_context")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sweep", action="store_true")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--breakdown", action="store_true", help="also time the forward loss and loss + gradients alone")
  p.add_argument("--trace", default=None, help="a directory: profile two more steps there and print where the time went")
  p.add_argument("--hlo", default=None, help="a .txt.gz file: the compiled step's optimized HLO")
  p.add_argument("--allocator", choices=("tcmalloc", "glibc"), default="tcmalloc",
                 help="on a CPU, rerun under tcmalloc when it is installed (the default) or keep glibc's malloc")
  for f in dataclasses.fields(Setting):
    if f.type == "bool" or isinstance(f.default, bool):
      p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None)
    else:
      p.add_argument(f"--{f.name}", type=type(f.default), default=None)
  a = p.parse_args()
  if a.allocator == "tcmalloc":
    host_memory.rerun_with_tcmalloc([sys.executable] + sys.argv)  # returns only when it cannot or did
  over = {f.name: getattr(a, f.name) for f in dataclasses.fields(Setting) if getattr(a, f.name) is not None}
  settings = SWEEP if a.sweep else [dataclasses.replace(BEST, **over)]
  dev = jax.devices()[0]
  preload = os.environ.get("LD_PRELOAD")
  print(f"jax {jax.__version__}, {dev.device_kind}, {os.cpu_count()} CPUs, "
        f"{'LD_PRELOAD=' + preload if preload else 'the default malloc'}", flush=True)
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
      r = run(s, a.steps, trace=a.trace, hlo=a.hlo)
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
    if a.breakdown and cpu:
      fl = r["flops_per_step"]
      step_cpu = fl / r["flops_per_cpu_s"]
      b = breakdown(s)
      fwd, lg = b["forward"], b["loss_and_grad"]
      r["breakdown_cpu_s"] = {"forward": fwd, "backward": lg - fwd, "optimizer": step_cpu - lg, "step": step_cpu}
      print(f"  CPU-seconds: step {step_cpu:.1f} = forward {fwd:.1f} ({fl / 3 / fwd / 1e9:.1f} GFLOP per CPU-second on "
            f"1/3 of the FLOPs) + backward {lg - fwd:.1f} ({2 * fl / 3 / (lg - fwd) / 1e9:.1f} on 2/3) + optimizer and "
            f"guard {step_cpu - lg:.1f} (step minus loss + gradients; separate runs, noisy)", flush=True)
    rows.append(r)
  return rows


if __name__ == "__main__":
  main()

"""Where a traced program's time goes: the kernels of a `jax.profiler.trace` directory grouped by XLA op.

    python bench/op_times.py DIR [--steps N] [--top 30]

On a GPU: device kernel time per step by HLO op (fusions, cuBLAS / cuDNN custom calls), with the op's
longest-running kernel and a category (matmul, attention, fusion, copy); inside CUDA graphs ops are named by
kernel, so trace with XLA_FLAGS=--xla_gpu_enable_command_buffer= for the op names of the optimized HLO. On a CPU: XLA thunk time on the runtime's threads (on CPU,
set XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true before the process starts). A CPU runs thunks side by side on
its threads, so there the durations overlap (they add up to more than the step, and an op run beside another
looks slower than alone), and its dots are `ynn_fusion`s, counted as fusions. `bench/train.py --trace DIR` writes
the trace of its timed steps and prints this table.
"""
from __future__ import annotations

import argparse
import collections
import glob
import re


def category(op: str, kernel: str) -> str:
  """matmul / attention / copy / reduction fusion / other fusion, from the op's name first (a cuBLAS or cuDNN
  custom call launches a memset ahead of its kernel), then its kernel's."""
  k, o = kernel.lower(), op.lower()
  if any(s in o for s in ("dot_product_attention", "fmha", "flash", "mha")) or "fmha" in k or "flash" in k:
    return "attention"
  if any(s in o for s in ("custom-call", "cublas", "gemm", "triton_gemm")) or o.startswith("dot") \
      or any(s in k for s in ("gemm", "xmma", "nvjet", "cutlass")):
    return "matmul"
  if o.startswith("copy") or "memcpy" in k:
    return "copy"
  if "reduce" in o or "reduction" in k:
    return "reduction fusion"
  return "other fusion"


def summarise(trace_dir: str, steps: int = 1, top: int = 30) -> str:
  from jax._src.lib import _profile_data  # the xplane reader JAX ships

  files = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
  if not files:
    raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
  pd = _profile_data.ProfileData.from_file(files[-1])
  gpu = [p for p in pd.planes if p.name.startswith("/device:GPU")]
  per_op, count, per_kernel = collections.Counter(), collections.Counter(), collections.defaultdict(collections.Counter)
  if gpu:
    lines = [ln for p in gpu[:1] for ln in p.lines if "stream" in ln.name.lower()]
  else:
    lines = [ln for p in pd.planes if p.name == "/host:CPU" for ln in p.lines
             if "XLAEigen" in ln.name or "PjRtCpuClient" in ln.name]
  for ln in lines:
    for ev in ln.events:
      stats = dict(ev.stats)
      op = str(stats.get("hlo_op", "")) or (ev.name if gpu else "")
      if op.startswith("command_buffer"):  # a CUDA graph of many ops: name its kernels instead
        op = ev.name
      if not op or op.startswith("ThunkExecutor") or op.startswith("while"):
        continue
      per_op[op] += ev.duration_ns
      count[op] += 1
      per_kernel[op][ev.name] += ev.duration_ns
  kernel_of = {op: ks.most_common(1)[0][0] for op, ks in per_kernel.items()}  # its longest-running kernel
  total = sum(per_op.values())
  if not total:
    return f"no kernel events in {files[-1]}"
  by_cat = collections.Counter()
  for op, ns in per_op.items():
    by_cat[category(op, kernel_of[op])] += ns
  ms = lambda ns: ns / 1e6 / steps
  out = [f"{'device' if gpu else 'thunk'} time {ms(total):.2f} ms a step over {len(per_op)} ops "
         f"({steps} step{'s' * (steps > 1)} traced)"]
  out += [f"  {c:17s} {ms(ns):9.2f} ms {ns / total:6.1%}" for c, ns in by_cat.most_common()]
  out.append(f"  top {top} ops: ms a step, share, launches a step, category, kernel")
  for op, ns in per_op.most_common(top):
    kern = re.sub(r"\s+", " ", kernel_of[op])[:90]
    out.append(f"  {ms(ns):9.3f} {ns / total:6.1%} {count[op] / steps:6.0f}  {category(op, kernel_of[op]):16s} "
               f"{op[:48]:48s} {kern}")
  return "\n".join(out)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("dir")
  p.add_argument("--steps", type=int, default=1)
  p.add_argument("--top", type=int, default=30)
  a = p.parse_args()
  print(summarise(a.dir, a.steps, a.top))


if __name__ == "__main__":
  main()

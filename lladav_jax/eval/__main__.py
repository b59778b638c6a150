"""CLI: python -m lladav_jax.eval --checkpoint DIR --task NAME --data PATH [options]."""
from __future__ import annotations

import argparse
import os
import sys

import jax

from lladav_jax.api import LLaDAV
from lladav_jax.config import DTYPES
from lladav_jax.eval import run as R
from lladav_jax.eval.plots import plot_sweep
from lladav_jax.eval.readers import read_samples
from lladav_jax.eval.tasks import TASKS, get_task


EXIT_STATUS = """Exit status: 0 evaluated (the results JSON written); 1 an error while loading or evaluating (its
traceback); 2 a usage error (argparse: a missing or unknown argument, a checkpoint, data file or image folder that
does not exist, a bad --sweep)."""


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m lladav_jax.eval", description=__doc__, epilog=EXIT_STATUS)
  p.add_argument("--checkpoint", required=True, help="LLaDA-V checkpoint dir (HF or converted Orbax)")
  p.add_argument("--task", required=True, choices=sorted(TASKS))
  p.add_argument("--data", required=True, help="benchmark file: .tsv (VLMEvalKit) or .jsonl/.json (LLaVA format too)")
  p.add_argument("--image_folder", default=None,
                 help="relative image paths are read under this folder, as training's data.image_folder "
                      "(default: the data file's folder)")
  p.add_argument("--limit", type=int, default=None, help="use the first N rows of the file")
  p.add_argument("--batch_size", type=int, default=1)
  p.add_argument("--gen_length", type=int, default=None, help="default: the task's (original) setting")
  p.add_argument("--block_length", type=int, default=None)
  p.add_argument("--steps", type=int, default=None)
  p.add_argument("--threshold", type=float, default=None, help="Fast-dLLM parallel-decoding threshold")
  p.add_argument("--cache", default=None, help="sampler cache mode passed to LLaDAV.generate (none = off)")
  p.add_argument("--temperature", type=float, default=None)
  p.add_argument("--seed", type=int, default=None)
  p.add_argument("--dtype", default=None, choices=DTYPES,
                 help="parameter and compute dtype (default: the task's, float16 as the original evaluates; "
                      "the demo task: the checkpoint's own)")
  p.add_argument("--sweep", default=None, help="e.g. steps=4,8,16 or threshold=0.9,0.7")
  p.add_argument("--output", default=None, help="results JSON (default runs/eval/<task>.json)")
  return p


def _load_model(args, task):
  dtype = args.dtype or task.dtype
  return LLaDAV.from_pretrained(args.checkpoint, **({"dtype": dtype} if dtype else {}))


def main(argv=None, generate_fn=None, process_index: int | None = None, process_count: int | None = None) -> dict | None:
  """Runs the CLI. `generate_fn` (tests) replaces the real model; the process topology then
  defaults to a single process."""
  parser = build_parser()
  args = parser.parse_args(argv)
  task = get_task(args.task)
  if not os.path.isfile(args.data):
    parser.error(f"--data {args.data!r}: no such file")
  if args.image_folder and not os.path.isdir(args.image_folder):
    parser.error(f"--image_folder {args.image_folder!r}: no such directory")
  if args.sweep:
    try:
      sweep = R.parse_sweep(args.sweep)
    except ValueError as e:
      parser.error(str(e))
  if generate_fn is None:
    if not os.path.isdir(args.checkpoint):
      parser.error(f"--checkpoint {args.checkpoint!r}: no such directory")
    print(f"loading the model from {args.checkpoint}", file=sys.stderr, flush=True)
    generate_fn = _load_model(args, task).generate
    process_index, process_count = jax.process_index(), jax.process_count()
  process_index, process_count = process_index or 0, process_count or 1
  output = args.output or os.path.join("runs", "eval", f"{task.name}.json")
  shard_dir = os.path.splitext(output)[0] + ".shards"

  rr = read_samples(args.data, task, limit=args.limit, shard_index=process_index, shard_count=process_count,
                    image_folder=args.image_folder)
  overrides = {"gen_length": args.gen_length, "block_length": args.block_length, "steps": args.steps,
               "threshold": args.threshold, "cache": args.cache, "temperature": args.temperature, "seed": args.seed}
  # on a terminal a bar over the samples; in a log a line every tenth of the batches
  bar = sys.stderr.isatty()
  common = dict(batch_size=args.batch_size, process_index=process_index, process_count=process_count,
                presharded=True, skipped=rr.skipped,
                num_batches=R.num_batches_for(rr.rows_read, process_count, args.batch_size) if process_count > 1 else None,
                log=None if bar else (lambda m: print(m, file=sys.stderr, flush=True)), progress=bar)
  print(f"{task.name}: {len(rr.samples)} samples" + (f" (process {process_index} of {process_count})"
                                                     if process_count > 1 else "")
        + f", batches of {args.batch_size}; the first batch compiles", file=sys.stderr, flush=True)
  if args.sweep:
    param, values = sweep
    results = R.run_sweep(task, rr.samples, generate_fn, param, values, base_overrides=overrides,
                          shard_dir=shard_dir, **common)
  else:
    results = R.evaluate(task, rr.samples, generate_fn, overrides=overrides, shard_dir=shard_dir, **common)
  if results is None:  # not process 0
    return None
  results.update(checkpoint=args.checkpoint, data=os.path.abspath(args.data), limit=args.limit)
  if args.sweep:
    results["plot"] = plot_sweep(results, os.path.splitext(output)[0] + "_sweep.png")
  R.write_results(results, output)
  print(R.format_summary(results))
  print(f"results: {output}" + (f"\nplot: {results['plot']}" if args.sweep else ""))
  return results


if __name__ == "__main__":
  main()

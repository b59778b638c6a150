"""Running a task: batches through an injected generate function, scoring, sharding across JAX
processes, results JSON, parameter sweeps.

`generate_fn(prompts, images, params)` has LLaDAV.generate's signature (a `SamplingParams`) and returns one
object per prompt with `.text` and `.nfe` (dicts with those keys, or plain strings, also work).
Injecting it keeps this module free of the model, so tests drive it with a fake.

Multi-host: process p takes samples p, p+P, ... and every process makes the same number of
generate calls with full batches (padding with repeats whose outputs are dropped), because a model
sharded over hosts needs all processes in every call. Each process writes
`<shard_dir>/process_XXXXX.jsonl`; process 0 waits for all of them (shared filesystem) and merges.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable, Sequence

from lladav_jax.eval import answers as ans
from lladav_jax.eval.readers import ImageDecodeError, load_images, read_samples
from lladav_jax.eval.sample import EvalSample
from lladav_jax.eval.tasks import Task, get_task
from lladav_jax.inference import SamplingParams

GenerateFn = Callable[..., Sequence[Any]]
# Meta fields copied into each prediction record (aggregation reads them: MME pairs, MMBench rotations).
_RECORD_META = ("category", "l2_category", "pair_id", "index", "type", "question_type")
SWEEP_TYPES = {"steps": int, "gen_length": int, "block_length": int, "threshold": float,
               "temperature": float, "cfg_scale": float, "cache": str, "remasking": str, "seed": int}


# ------------------------------------------------------------------------------ generation settings

def resolve_params(task: Task, overrides: dict | None = None) -> SamplingParams:
  """The task's SamplingParams with every non-None override (a field of SamplingParams; cache "none" /
  "off" / "" is no cache). "<|eot_id|>" is not added here: it always stops, added once by
  inference.text.stop_list after the task's stop strings."""
  over = {k: v for k, v in (overrides or {}).items() if v is not None}
  if isinstance(over.get("cache"), str) and over["cache"].lower() in ("", "none", "off"):
    over["cache"] = None
  return dataclasses.replace(task.sampling_params(), **over).validate()


def params_record(params: SamplingParams) -> dict:
  """The settings a results file records: every user-facing field (not the model's token ids)."""
  skip = ("mask_id", "banned_ids", "eot_id")
  return {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.name not in skip}


def _out_fields(out) -> tuple[str, int | None, int | None]:
  if isinstance(out, str):
    return out, None, None
  if isinstance(out, dict):
    ids = out.get("token_ids")
    return out.get("text", ""), out.get("nfe"), len(ids) if ids is not None else None
  ids = getattr(out, "token_ids", None)
  return getattr(out, "text", ""), getattr(out, "nfe", None), len(ids) if ids is not None else None


# ------------------------------------------------------------------------------ evaluation

def _batches(items: list, batch_size: int, pad_to_full: bool, num_batches: int | None) -> list[tuple[list, int]]:
  """(batch, n_real) pairs. Padding repeats the last real item; its outputs are dropped."""
  out = [(items[i:i + batch_size], len(items[i:i + batch_size])) for i in range(0, len(items), batch_size)]
  if num_batches is not None and num_batches > len(out):
    filler = items[-1:] or [EvalSample(id="__pad__", prompt_text="", images=[], answers=[""])]
    out += [(filler * batch_size, 0)] * (num_batches - len(out))
  if pad_to_full:
    out = [(b + [b[-1]] * (batch_size - len(b)), n) for b, n in out]
  return out


def _batch_images(batch: list, n_real: int, skipped: list) -> tuple[list, set]:
  """The batch's images decoded (readers keep them encoded, so only one batch is ever decoded). Rows
  whose image fails to decode (a truncated file whose header was fine) are returned in `bad`; the real
  ones are added to `skipped`."""
  images, bad, done = [], set(), {}
  for j, s in enumerate(batch):
    if id(s) not in done:  # padding repeats a row
      try:
        done[id(s)] = load_images(s.images)
      except ImageDecodeError as e:
        done[id(s)] = e
        if j < n_real:
          skipped.append({"id": s.id, "row": None, "reason": f"image decoding failed: {e}"})
    images.append(done[id(s)])
    if isinstance(images[-1], ImageDecodeError):
      bad.add(j)
  return images, bad


def evaluate(task: Task | str, samples: Sequence[EvalSample], generate_fn: GenerateFn, *,
             overrides: dict | None = None, batch_size: int = 1, process_index: int = 0,
             process_count: int = 1, presharded: bool = False, num_batches: int | None = None,
             shard_dir: str | None = None, skipped: Sequence[dict] = (), merge_timeout_s: float = 3600.0,
             log: Callable[[str], None] | None = None, progress: bool = False) -> dict | None:
  """Generate, score and aggregate. Returns the results dict (on process 0; None elsewhere).

  samples: all samples (each process keeps its stride) or, with presharded=True, this process's.
  num_batches: with several processes, the generate-call count every process must make.
  skipped: rows the reader could not use; they are reported, never scored as 0 silently (so are rows
    whose image fails to decode here: images are decoded a batch at a time, readers keep them encoded).
  log: called with a line every tenth of the batches. progress: a tqdm bar on stderr over this process's
    samples (the callers decide: the CLI on a terminal, the trainer with its own bar's setting).
  """
  task = get_task(task) if isinstance(task, str) else task
  params = resolve_params(task, overrides)
  mine = list(samples) if presharded or process_count == 1 else list(samples)[process_index::process_count]
  records, gen_seconds, skipped = [], 0.0, list(skipped)
  batches = _batches(mine, batch_size, pad_to_full=process_count > 1, num_batches=num_batches)
  local = 0
  bar = _samples_bar(sum(n for _, n in batches), f"eval {task.name}") if progress else None
  for bi, (batch, n_real) in enumerate(batches):
    prompts = [task.model_prompt(s) for s in batch]
    images, bad = _batch_images(batch, n_real, skipped)
    good = next((j for j in range(len(batch)) if j not in bad), None)
    for j in bad:  # the call keeps its size (every process makes the same calls); the output is dropped
      prompts[j], images[j] = (prompts[good], images[good]) if good is not None else ("", [])
    t0 = time.perf_counter()
    outs = list(generate_fn(prompts, images, params))
    del images  # this batch's pixels go before the next batch is decoded
    dt = time.perf_counter() - t0
    gen_seconds += dt
    if len(outs) != len(batch):
      raise RuntimeError(f"generate_fn returned {len(outs)} outputs for {len(batch)} prompts")
    for j, (s, prompt, out) in enumerate(list(zip(batch, prompts, outs))[:n_real]):
      if j in bad:
        continue
      raw, nfe, n_tok = _out_fields(out)
      pred = ans.postprocess_output(raw)  # stops act on token ids in the sampler, as the original's; no text cut
      rec = {"id": s.id, "prompt": prompt, "raw_output": raw, "prediction": pred, "answers": s.answers,
             "nfe": nfe, "num_tokens": n_tok, "seconds": dt / max(1, len(batch)),
             "_order": (local, process_index)}
      rec.update(task.score(s, pred))
      rec.update({k: s.meta[k] for k in _RECORD_META if k in s.meta})
      records.append(rec)
      local += 1
    if bar is not None:
      bar.update(n_real)
    if log and (bi + 1) % max(1, len(batches) // 10) == 0:
      log(f"[{task.name}] process {process_index}: batch {bi + 1}/{len(batches)}")
  if bar is not None:
    bar.close()
  if process_count > 1:
    if shard_dir is None:
      raise ValueError("shard_dir is required when process_count > 1")
    write_shard(shard_dir, process_index, records, skipped, gen_seconds)
    if process_index != 0:
      return None
    records, skipped, gen_seconds = merge_shards(shard_dir, process_count, merge_timeout_s)
  records.sort(key=lambda r: tuple(r["_order"]))
  for r in records:
    r.pop("_order", None)
  return build_results(task, records, skipped, params, batch_size, process_count, gen_seconds)


def _samples_bar(total: int, desc: str):
  """The progress of an eval: samples generated and scored, of `total` (this process's)."""
  from tqdm import tqdm
  return tqdm(total=total, desc=desc, unit="sample", file=sys.stderr, dynamic_ncols=True, mininterval=1.0,
              leave=False)


def build_results(task: Task, records: list[dict], skipped: list[dict], params: SamplingParams, batch_size: int,
                  process_count: int, gen_seconds: float) -> dict:
  n = len(records)
  nfes = [r["nfe"] for r in records if r.get("nfe") is not None]
  return {
      "task": task.name,
      "primary_metric": task.metric,
      "config": {**params_record(params), "batch_size": batch_size, "process_count": process_count, "think": task.think},
      "metrics": task.aggregate(records),
      "num_samples": n,
      "num_skipped": len(skipped),
      "skipped": skipped,
      "nfe": {"mean": sum(nfes) / len(nfes) if nfes else None, "total": sum(nfes) if nfes else None},
      "seconds": {"generate_total": gen_seconds, "per_sample": gen_seconds / n if n else None},
      "predictions": records,
  }


# ------------------------------------------------------------------------------ shards

def _shard_path(shard_dir: str, p: int) -> str:
  return os.path.join(shard_dir, f"process_{p:05d}.jsonl")


def write_shard(shard_dir: str, process_index: int, records: list[dict], skipped: list[dict], seconds: float) -> None:
  os.makedirs(shard_dir, exist_ok=True)
  path = _shard_path(shard_dir, process_index)
  with open(path + ".tmp", "w") as f:
    f.write(json.dumps({"_header": {"seconds": seconds, "skipped": skipped}}) + "\n")
    for r in records:
      f.write(json.dumps(r, default=str) + "\n")
  os.replace(path + ".tmp", path)  # atomic: a reader never sees half a shard
  with open(path + ".done", "w") as f:
    f.write("ok\n")


def merge_shards(shard_dir: str, process_count: int, timeout_s: float = 3600.0, poll_s: float = 1.0):
  deadline = time.time() + timeout_s
  missing = list(range(process_count))
  while True:
    missing = [p for p in missing if not os.path.exists(_shard_path(shard_dir, p) + ".done")]
    if not missing:
      break
    if time.time() > deadline:
      raise TimeoutError(f"eval shards of processes {missing} did not appear in {shard_dir} "
                         f"within {timeout_s:.0f}s (is the output dir on a shared filesystem?)")
    time.sleep(poll_s)
  records, skipped, seconds = [], [], 0.0
  for p in range(process_count):
    with open(_shard_path(shard_dir, p)) as f:
      for line in f:
        row = json.loads(line)
        if "_header" in row:
          skipped += row["_header"]["skipped"]
          seconds += row["_header"]["seconds"]
        else:
          records.append(row)
  return records, skipped, seconds


# ------------------------------------------------------------------------------ sweeps

def parse_sweep(spec: str) -> tuple[str, list]:
  """"steps=4,8,16" -> ("steps", [4, 8, 16])."""
  if "=" not in spec:
    raise ValueError(f"--sweep must look like 'steps=4,8,16', got {spec!r}")
  name, vals = spec.split("=", 1)
  name = name.strip()
  if name not in SWEEP_TYPES:
    raise ValueError(f"cannot sweep {name!r}; sweepable: {', '.join(SWEEP_TYPES)}")
  cast = SWEEP_TYPES[name]
  values = [cast(v.strip()) for v in vals.split(",") if v.strip()]
  if not values:
    raise ValueError(f"--sweep {spec!r} has no values")
  return name, values


def run_sweep(task: Task, samples: Sequence[EvalSample], generate_fn: GenerateFn, param: str, values: Sequence,
              base_overrides: dict | None = None, shard_dir: str | None = None, **evaluate_kwargs) -> dict | None:
  """One evaluate() per value of `param`; returns {"sweep": {...}, "runs": [results, ...]}."""
  runs = []
  for v in values:
    over = {**(base_overrides or {}), param: v}
    sd = os.path.join(shard_dir, f"{param}={v}") if shard_dir else None
    res = evaluate(task, samples, generate_fn, overrides=over, shard_dir=sd, **evaluate_kwargs)
    if res is not None:
      res["sweep_value"] = v
      runs.append(res)
  if not runs:
    return None
  return {"task": task.name, "primary_metric": task.metric, "sweep": {"param": param, "values": list(values)},
          "runs": runs}


def sweep_table(sweep: dict) -> list[dict]:
  """Per-run summary rows: value, metric, mean NFE, seconds per sample."""
  m = sweep["primary_metric"]
  return [{"value": r["sweep_value"], m: r["metrics"].get(m), "nfe": r["nfe"]["mean"],
           "seconds_per_sample": r["seconds"]["per_sample"]} for r in sweep["runs"]]


# ------------------------------------------------------------------------------ output

def write_results(results: dict, path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(results, f, indent=1, default=str)
  os.replace(path + ".tmp", path)


def _fmt(v) -> str:
  if v is None:
    return "-"
  return f"{v:.2f}" if isinstance(v, float) else str(v)


def format_summary(results: dict) -> str:
  """A small fixed-width table: one row per run (one, or one per sweep value)."""
  runs = results["runs"] if "runs" in results else [results]
  head = ["task", "setting", "n", results["primary_metric"], "NFE", "s/sample", "skipped", "unparsed"]
  rows = []
  for r in runs:
    setting = f"{results['sweep']['param']}={r['sweep_value']}" if "sweep" in results else \
        f"{r['config']['gen_length']}/{r['config']['block_length']}/{r['config']['steps']}"
    rows.append([r["task"], setting, str(r["num_samples"]), _fmt(r["metrics"].get(r["primary_metric"])),
                 _fmt(r["nfe"]["mean"]), _fmt(r["seconds"]["per_sample"]), str(r["num_skipped"]),
                 str(r["metrics"].get("num_unparsed", 0))])
  widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
  line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
  return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


# ------------------------------------------------------------------------------ during training

def evaluate_during_training(model_or_generate_fn, task_names: Sequence[str], data_paths, limit: int | None = 64,
                             batch_size: int = 8, gen_overrides: dict | None = None,
                             results_path: str | None = None, image_folder: str | None = None,
                             progress: bool = False) -> dict[str, float]:
  """Small evals for the trainer's logs: {"eval/<task>/<metric>": value, ...}.

  Every process runs the same samples (no sharding), so a model sharded over hosts sees identical
  calls everywhere and no gathering is needed. `data_paths`: {task: path} or a list aligned with
  `task_names`. Task-default generation settings unless `gen_overrides`; relative image paths under
  `image_folder` (default: each data file's folder). With `results_path` (a
  format string with `{task}`) each task's full results, predictions included, are written there. `progress`:
  a bar over each task's samples (evaluate's).
  """
  fn = model_or_generate_fn.generate if hasattr(model_or_generate_fn, "generate") else model_or_generate_fn
  paths = data_paths if isinstance(data_paths, dict) else dict(zip(task_names, data_paths))
  logs: dict[str, float] = {}
  for name in task_names:
    task = get_task(name)
    rr = read_samples(paths[name], task, limit=limit, image_folder=image_folder)
    res = evaluate(task, rr.samples, fn, overrides=gen_overrides, batch_size=batch_size, skipped=rr.skipped,
                   progress=progress)
    for k, v in res["metrics"].items():
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        logs[f"eval/{name}/{k}"] = float(v)
    if res["nfe"]["mean"] is not None:
      logs[f"eval/{name}/nfe"] = float(res["nfe"]["mean"])
    if res["seconds"]["per_sample"] is not None:
      logs[f"eval/{name}/seconds_per_sample"] = float(res["seconds"]["per_sample"])
    logs[f"eval/{name}/num_skipped"] = float(res["num_skipped"])
    if results_path:
      write_results(res, results_path.format(task=name))
  return logs


def num_batches_for(rows_read: int, process_count: int, batch_size: int) -> int:
  """Generate calls every process must make so the largest shard fits."""
  return math.ceil(math.ceil(rows_read / process_count) / batch_size) if rows_read else 1

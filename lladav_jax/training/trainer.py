"""The training loop behind `python -m lladav_jax.train`, on a resolved `settings.RunConfig`.

    mesh -> data iterator (this process's shard)
      -> restore the latest checkpoint of the workdir (state + iterator) or init (random / converted)
      -> AOT-compile the step, log its memory -> loop: batch -> global arrays -> step -> metrics
      -> checkpoints every N steps, at the end, on SIGTERM; evals every M steps

Metrics of step s are fetched after step s+1 is dispatched (the host prepares the next batch while
the device computes). Before every save all earlier steps' metrics are checked, so a checkpoint
never follows a non-finite step.

A fatal error (too many bad samples: DataError; a non-finite loss or gradient; any exception in the
loop; Ctrl-C) finishes or removes the checkpoint in flight and raises `TrainingStopped`: one message
with the reason, what to change and the step re-running the command resumes from, and the exit status.
"""
from __future__ import annotations

import logging
import os
import signal
import time

import jax
import numpy as np
from flax import nnx

from lladav_jax import batch as batch_lib
from lladav_jax import sharding as shd
from lladav_jax import weights
from lladav_jax.api import LLaDAV
from lladav_jax.data import pipeline
from lladav_jax.data.records import DataError
from lladav_jax.eval import evaluate_during_training
from lladav_jax.training import checkpointing, flops as flops_lib, metrics as metrics_lib
from lladav_jax.training import state as state_lib, step as step_lib, synthetic
from lladav_jax.training.settings import DistributedConfig, RunConfig

log = logging.getLogger(__name__)

# exit statuses of `python -m lladav_jax.train` (ConfigError: 2)
EXIT_FAILED, EXIT_NONFINITE, EXIT_DATA, EXIT_INTERRUPTED = 1, 3, 4, 130


class NonFiniteError(RuntimeError):
  pass


class TrainingStopped(RuntimeError):
  """A fatal error stopped the run. str(): the reason, what to change, where the run resumes.
  `unexpected`: not one of the errors above (a bug or a device failure: its traceback is worth printing)."""

  def __init__(self, message: str, exit_code: int, unexpected: bool):
    super().__init__(message)
    self.exit_code = exit_code
    self.unexpected = unexpected


def stopped(e: BaseException, step: int | None, last_checkpoint: int | None, workdir: str) -> TrainingStopped:
  """The one message for a run stopped by `e` at `step` (the number of steps done)."""
  if last_checkpoint is not None:
    resume = f"the last checkpoint is step {last_checkpoint} in {workdir}: re-running the same command resumes from it"
  else:
    resume = "no checkpoint was written"
  where = "before the first step" if step is None else f"after {step} steps"
  if isinstance(e, DataError):
    return TrainingStopped(f"{e}\nTraining stopped {where}; {resume}.", EXIT_DATA, False)
  if isinstance(e, NonFiniteError):
    return TrainingStopped(f"{e}. Lower optim.lr (or raise optim.warmup_ratio, lower optim.clip_norm), or look for "
                           f"bad samples in that batch.\nTraining stopped; {resume}.", EXIT_NONFINITE, False)
  if isinstance(e, KeyboardInterrupt):
    return TrainingStopped(f"interrupted {where}; {resume}.", EXIT_INTERRUPTED, False)
  return TrainingStopped(f"training failed {where}: {type(e).__name__}: {e}\n{resume[0].upper()}{resume[1:]}.",
                         EXIT_FAILED, True)


# ----------------------------------------------------------------------------- distributed

def maybe_initialize_distributed(d: DistributedConfig) -> None:
  """jax.distributed.initialize() when this is one of several processes: explicit coordinator in
  the config, or auto-detected clusters (SLURM with >1 task, multi-host TPU, JAX_COORDINATOR_ADDRESS)."""
  if jax.distributed.is_initialized():
    return
  if d.coordinator_address:
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                               process_id=d.process_id)
    return
  env = os.environ
  multi = (int(env.get("SLURM_NTASKS", "1") or 1) > 1 or env.get("JAX_COORDINATOR_ADDRESS")
           or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
           or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1)
  if multi:
    jax.distributed.initialize()


# ----------------------------------------------------------------------------- data

def build_data_iterator(r: RunConfig, *, per_process: int):
  pi, pc = jax.process_index(), jax.process_count()
  d = r.data
  if d.kind == "synthetic":
    mc = r.model
    return synthetic.SyntheticIterator(
        seed=r.seed, process_index=pi, batch=per_process, seq_len=d.pipeline.seq_len,
        vocab_size=mc.llm.vocab_size, mask_token_id=mc.mask_token_id, tiles=d.synthetic_tiles,
        image_size=mc.vision.image_size, patch_size=mc.vision.patch_size, answer_frac=d.synthetic_answer_frac)
  return pipeline.build_train_iterator(d.pipeline, r.tokenizer, r.image, batch_size_per_process=per_process,
                                       process_index=pi, process_count=pc, seed=r.seed)


def batch_lengths(r: RunConfig) -> list[int]:
  d = r.data.pipeline
  if r.data.kind == "synthetic":
    return [d.seq_len]
  return sorted(set(d.buckets) | {d.seq_len})


def global_shapes(host: batch_lib.TrainBatch, process_count: int) -> batch_lib.TrainBatch:
  """The global batch's shapes: every process contributes its rows."""
  return jax.tree.map(lambda v: jax.ShapeDtypeStruct((v.shape[0] * process_count,) + v.shape[1:], v.dtype), host)


def to_global(host: batch_lib.TrainBatch, mesh, process_count: int) -> batch_lib.TrainBatch:
  return jax.tree.map(lambda v, g: jax.make_array_from_process_local_data(shd.batch_sharding(mesh, v.ndim), v, g.shape),
                      host, global_shapes(host, process_count))


# ----------------------------------------------------------------------------- preemption

class StopSignal:
  """SIGTERM (preemption) -> save at the next step boundary and exit. With several processes the
  coordination service's preemption sync point makes every process stop at the same step."""

  def __init__(self):
    self.flag = False
    self._prev = None
    try:
      self._prev = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      pass

  def _handle(self, signum, frame):
    self.flag = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      try:
        from jax.experimental import multihost_utils
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except Exception:  # no preemption service: fall back to the local flag (may desync processes)
        return self.flag
    return self.flag

  def restore(self):
    if self._prev is not None:
      signal.signal(signal.SIGTERM, self._prev)


# ----------------------------------------------------------------------------- evaluation

def lladav_model(setup, r: RunConfig, state):
  """The model for evals, on `r.eval_image` (several images: the original's eval path, pad_flat, by default)."""
  return LLaDAV(r.model, setup.graphdef, nnx.State(state_lib.full_params(state)), tokenizer=r.tokenizer,
                image_cfg=r.eval_image, mesh=setup.mesh)


def run_evals(setup, r: RunConfig, state, *, step: int = 0, workdir: str | None = None) -> dict:
  """The configured eval tasks on the current parameters (lladav_jax.eval, the sampler through
  LLaDAV.generate). Returns {"eval/<task>/<metric>": value}; process 0 writes each task's full
  results (predictions included) to <workdir>/eval/<task>_step<N>.json."""
  e = r.eval
  if not e.tasks:
    return {}
  path = os.path.join(workdir, "eval", f"{{task}}_step{step}.json") if workdir and jax.process_index() == 0 else None
  return evaluate_during_training(lladav_model(setup, r, state), list(e.tasks), dict(e.data), limit=e.limit or None,
                                  batch_size=e.batch_size, gen_overrides=e.gen_overrides, results_path=path)


# ----------------------------------------------------------------------------- main loop

class _Where:
  """What an error handler needs from the loop: the steps done and the open checkpointer."""
  step: int | None = None
  ckpt: checkpointing.Checkpointer | None = None


def train(r: RunConfig, workdir: str) -> dict:
  """Runs (or resumes) training in `workdir` (jax.distributed already initialised, `r` resolved
  against its devices). Returns the last logged metrics (process 0). Raises TrainingStopped."""
  workdir = os.path.abspath(workdir)  # orbax refuses relative checkpoint paths
  at = _Where()
  try:
    return _train(r, workdir, at)
  except BaseException as e:  # KeyboardInterrupt included: the checkpoint in flight is settled either way
    if isinstance(e, SystemExit):
      raise
    last = at.ckpt.abort() if at.ckpt is not None else checkpointing.latest_committed(
        checkpointing.checkpoint_dir(workdir))
    raise stopped(e, at.step, last, workdir) from e


class _DataFailed:
  """What `next_batch` hands on in place of a batch when this process's data iterator raised (several
  processes): the others learn of it in `host_shapes_agreed` and all stop at the same step."""

  def __init__(self, error: BaseException):
    self.error = error


def next_batch(data_iter, process_count: int):
  if process_count == 1:
    return next(data_iter)
  try:
    return next(data_iter)
  except Exception as e:  # raised alone, it would leave the other processes waiting in the next collective
    return _DataFailed(e)


def host_shapes_agreed(host, process_count: int) -> tuple[int, int]:
  """The length and tile bucket every process pads its rows to (the largest), exchanged with one flag a
  process: where one process's data failed, every process raises (a DataError where it was one: the same
  exit status everywhere)."""
  from jax.experimental import multihost_utils
  failed = isinstance(host, _DataFailed)
  kind = 0 if not failed else 1 if isinstance(host.error, DataError) else 2
  mine = [0, 0] if failed else [host.inputs.length, host.inputs.tiles]
  got = np.asarray(multihost_utils.process_allgather(np.array(mine + [kind], np.int32))).reshape(process_count, 3)
  if failed:
    raise host.error
  bad = np.nonzero(got[:, 2])[0]
  if bad.size:
    k = int(bad[0])
    if got[k, 2] == 1:
      raise DataError(f"process {k} stopped on too many bad samples (its log names them); every process stops")
    raise RuntimeError(f"the data iterator of process {k} failed (its log has the error); every process stops")
  l_need, t_need = np.max(got[:, :2], axis=0)
  return int(l_need), int(t_need)


def _train(r: RunConfig, workdir: str, at: _Where) -> dict:
  pi, pc = jax.process_index(), jax.process_count()
  is_main = pi == 0
  mesh = shd.make_mesh(*r.mesh.shape, preset=r.mesh.preset)
  gb, accum, total = r.train.global_batch_size, r.train.grad_accum_steps, r.train.num_steps
  per_process = gb // pc
  setup = state_lib.make_setup(r.model, mesh, r.optim, total)
  data_iter = build_data_iterator(r, per_process=per_process)

  os.makedirs(workdir, exist_ok=True)
  ckpt = None
  c = r.checkpoint
  if c.enabled:
    ckpt = at.ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir), every_steps=c.every_steps,
                                                keep=c.keep, async_save=c.async_save)
  latest = ckpt.latest_step() if ckpt else None
  t0 = time.perf_counter()
  if latest is not None:
    saved, data_iter = ckpt.restore(latest, state_lib.checkpoint_abstract(setup), data_iter)
    state = state_lib.from_checkpoint(setup, saved, seed=r.seed, init_checkpoint=r.init_checkpoint)
    start = int(jax.device_get(state["step"]))
    log.info("resumed from %s at step %d", ckpt.directory, start)
  else:
    state = state_lib.init_state(setup, seed=r.seed, init_checkpoint=r.init_checkpoint)
    start = 0
  at.step = start
  n_tr, n_fr = state_lib.num_params(state["params"]), state_lib.num_params(state["frozen"])
  log.info("model: %.2fM parameters (%.2fM trainable: %s; %.2fM frozen), state ready in %.1fs",
           (n_tr + n_fr) / 1e6, n_tr / 1e6, ",".join(setup.trainable), n_fr / 1e6, time.perf_counter() - t0)

  # ---- ahead-of-time compile for the largest bucket (length x tiles); the others compile on first use
  lengths = batch_lengths(r)
  tiles = r.data.synthetic_tiles if r.data.kind == "synthetic" else r.data.pipeline.tile_budget
  shapes = batch_lib.shapes(gb, lengths[-1], tiles, r.model.vision.image_size)
  compiled = {}

  def get_compiled(shp):
    key = tuple((v.shape, v.dtype) for v in jax.tree.leaves(shp))
    if key not in compiled:
      tc = time.perf_counter()
      compiled[key], mem = step_lib.compile_train_step(setup, r.loss, accum=accum, batch_shapes=shp)
      log.info("compiled the train step for tokens %s in %.1fs", shp.inputs.tokens.shape, time.perf_counter() - tc)
      if mem:
        log.info("per-device memory (compiled.memory_analysis): arguments %.1f MiB, outputs %.1f MiB, aliased %.1f MiB, "
                 "temporaries %.1f MiB, peak estimate %.1f MiB", *(mem[k] / 2 ** 20 for k in (
                     "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                     "peak_estimate_bytes")))
    return compiled[key]

  get_compiled(shapes)

  # ---- throughput accounting
  n_dev = jax.device_count()
  kind = jax.devices()[0].device_kind
  peak = r.peak_flops_per_device or flops_lib.peak_flops(kind)
  if not peak and jax.devices()[0].platform == "cpu":
    peak = flops_lib.measure_matmul_flops() / max(1, jax.local_device_count())
    log.info("CPU peak FLOP/s per device taken as a measured float32 matmul: %.1f GFLOP/s", peak / 1e9)

  lg = r.log
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main, tensorboard=lg.tensorboard, resume_step=latest)
  progress = metrics_lib.Progress(total, start, enabled=is_main and lg.progress)
  stop = StopSignal()
  pending: list[tuple[int, dict, dict]] = []  # (step, device metrics, static info)
  last: dict = {}
  good_step = latest if latest is not None else 0
  t_last = time.perf_counter()

  def flush():
    nonlocal t_last, last
    for stp, m, info in pending:
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      now = time.perf_counter()
      dt, t_last = now - t_last, now
      if m["finite"] < 1:
        pending.clear()
        raise NonFiniteError(f"non-finite loss or gradient at step {stp} (loss={m['loss']}, grad_norm={m['grad_norm']}); "
                             "the update was not applied")
      fl = info["flops"]
      m.update(step_time=dt, tokens_per_s_per_device=info["tokens"] / dt / n_dev,
               valid_tokens_per_s_per_device=m["valid_tokens"] / dt / n_dev,
               tflops_per_device=fl / dt / n_dev / 1e12)
      if peak:
        m["mfu"] = fl / dt / n_dev / peak
      m.pop("finite")
      if stp % max(1, lg.every_steps) == 0 or stp == total:
        writer.write(stp, m)
      progress.update(1, loss=m["loss"], lr=m["lr"])
      last = {"step": stp, **m}
    pending.clear()

  step = start
  exit_reason = "done"
  profiling = False
  try:
    while step < total:
      if lg.profile_start_step == step + 1 and is_main:
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
        profiling = True
      host = next_batch(data_iter, pc)
      if pc > 1:  # every process's rows go into one global array: the largest length and tile bucket
        l_need, t_need = host_shapes_agreed(host, pc)
        host = batch_lib.pad_length(host, l_need, r.image.tokens_per_tile)
        host = batch_lib.pad_tiles(host, t_need, r.image.tokens_per_tile)
      batch = to_global(host, mesh, pc)
      fn = get_compiled(global_shapes(host, pc))
      with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
        state, m = fn(state, batch)
      step = at.step = step + 1
      b, l = batch.inputs.tokens.shape
      # attention counted per segment (packing, padding) from this process's host rows; with several
      # processes these stand for the others' (an estimate: no extra collective a step)
      pairs = pc * flops_lib.attention_pairs(host.inputs.segments)
      info = {"tokens": b * l, "flops": flops_lib.step_flops(r.model, batch=b, seq_len=l, tiles=batch.inputs.tiles,
                                                             trainable=setup.trainable, attention_pairs=pairs)["total"]}
      flush()  # the previous step's metrics (this step is already dispatched)
      pending.append((step, m, info))
      if profiling and step >= lg.profile_start_step + lg.profile_num_steps - 1:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        profiling = False
      want_eval = r.eval.every_steps > 0 and step % r.eval.every_steps == 0 and step < total
      want_save = ckpt is not None and step % max(1, c.every_steps) == 0
      preempted = stop.reached(step)
      if want_save or want_eval or preempted:
        flush()  # every step up to here is finite before anything is saved
      if want_save or (preempted and ckpt is not None):
        ckpt.save(step, state_lib.checkpoint_tree(setup, state), data_iter, force=preempted)
        good_step = step
      if want_eval:
        evals = run_evals(setup, r, state, step=step, workdir=workdir)
        writer.write(step, evals)
        progress.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in evals.items()))
      if preempted:
        exit_reason = "preempted"
        log.warning("SIGTERM: saved step %d and stopping", step)
        break
    flush()
    if ckpt is not None and exit_reason == "done" and good_step != step:
      ckpt.save(step, state_lib.checkpoint_tree(setup, state), data_iter, force=True)
      good_step = step
    progress.close()
    if ckpt is not None:
      ckpt.wait()
    if exit_reason == "done" and c.export_model:
      out = weights.save_model(os.path.join(workdir, "model"), r.model, state_lib.full_params(state), r.tokenizer_dir,
                               image_cfg=r.eval_image)
      if is_main:
        log.info("model written to %s (python -m lladav_jax.eval --checkpoint %s ...)", out, out)

    if exit_reason == "done" and r.eval.at_end and r.eval.tasks:
      te = time.perf_counter()
      evals = run_evals(setup, r, state, step=step, workdir=workdir)
      writer.write(step, evals)
      if is_main:
        for k, v in evals.items():
          print(f"final eval {k}: {v:.4g}", flush=True)
        if "eval/demo/exact_match" in evals:
          print(f"demo test exact-match: {evals['eval/demo/exact_match']:.1f}% "
                f"(eval {time.perf_counter() - te:.0f}s, total {time.perf_counter() - t0:.0f}s)", flush=True)
      last.update(evals)
    if ckpt is not None:
      ckpt.close()
      at.ckpt = None
  finally:
    stop.restore()
    if profiling:
      jax.profiler.stop_trace()
    progress.close()
    writer.close()
  return last

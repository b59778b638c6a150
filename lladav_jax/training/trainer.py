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

import json
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
from lladav_jax.training import state as state_lib, step as step_lib, synthetic, vision_pretrain
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
  results (predictions included) to <workdir>/eval/<task>_step<N>.json. A bar over each task's samples
  where the training bar is shown (process 0, log.progress)."""
  e = r.eval
  if not e.tasks:
    return {}
  main = jax.process_index() == 0
  path = os.path.join(workdir, "eval", f"{{task}}_step{step}.json") if workdir and main else None
  return evaluate_during_training(lladav_model(setup, r, state), list(e.tasks), dict(e.data), limit=e.limit or None,
                                  batch_size=e.batch_size, gen_overrides=e.gen_overrides, results_path=path,
                                  image_folder=e.image_folder or None, progress=main and r.log.progress)


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


# Final-eval metrics that are printed once more as a headline, with the eval's and the whole run's wall time:
# metric -> label.
HEADLINES = {"eval/demo/exact_match": "demo test exact-match"}


def largest_batch_shapes(r: RunConfig) -> batch_lib.TrainBatch:
  """The global batch of the largest length bucket and tile budget: compiled before the first step."""
  tiles = r.data.synthetic_tiles if r.data.kind == "synthetic" else r.data.pipeline.tile_budget
  return batch_lib.shapes(r.train.global_batch_size, batch_lengths(r)[-1], tiles, r.model.vision.image_size)


def peak_flops_per_device(r: RunConfig) -> float:
  """r.peak_flops_per_device, else the device kind's table entry; on CPU a measured matmul (0: unknown, no MFU)."""
  peak = r.peak_flops_per_device or flops_lib.peak_flops(jax.devices()[0].device_kind)
  if not peak and jax.devices()[0].platform == "cpu":
    peak = flops_lib.measure_matmul_flops() / max(1, jax.local_device_count())
    log.info("CPU peak FLOP/s per device taken as a measured float32 matmul: %.1f GFLOP/s", peak / 1e9)
  return peak


def print_final_evals(evals: dict, *, eval_start: float, run_start: float) -> None:
  for k, v in evals.items():
    print(f"final eval {k}: {v:.4g}", flush=True)
  for k, label in HEADLINES.items():
    if k in evals:
      print(f"{label}: {evals[k]:.1f}% (eval {time.perf_counter() - eval_start:.0f}s, "
            f"total {time.perf_counter() - run_start:.0f}s)", flush=True)


class CompiledSteps:
  """The train step compiled once per global batch shape (length bucket x tile bucket), each compile logged."""

  def __init__(self, setup, r: RunConfig):
    self.setup, self.loss, self.accum = setup, r.loss, r.train.grad_accum_steps
    self._fns = {}

  def __call__(self, shapes: batch_lib.TrainBatch):
    key = tuple((v.shape, v.dtype) for v in jax.tree.leaves(shapes))
    if key not in self._fns:
      log.info("compiling the train step for tokens %s", shapes.inputs.tokens.shape)
      tc = time.perf_counter()
      self._fns[key], mem = step_lib.compile_train_step(self.setup, self.loss, accum=self.accum, batch_shapes=shapes)
      log.info("compiled the train step for tokens %s in %.1fs", shapes.inputs.tokens.shape, time.perf_counter() - tc)
      if mem:
        log.info("per-device memory (compiled.memory_analysis): arguments %.1f MiB, outputs %.1f MiB, "
                 "aliased %.1f MiB, temporaries %.1f MiB, peak estimate %.1f MiB", *(mem[k] / 2 ** 20 for k in (
                     "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                     "peak_estimate_bytes")))
    return self._fns[key]


class StepMetrics:
  """The metrics of dispatched steps, fetched once the next step is dispatched (`flush`): each gets its step time
  and throughput, is written every log.every_steps and at the end, and a non-finite one raises NonFiniteError."""

  def __init__(self, writer: metrics_lib.MetricWriter, progress: metrics_lib.Progress, *, total: int,
               every_steps: int, peak: float):
    self.writer, self.progress = writer, progress
    self.total, self.every_steps = total, max(1, every_steps)
    self.n_dev, self.peak = jax.device_count(), peak
    self.pending: list[tuple[int, dict, dict]] = []  # (step, device metrics, static info)
    self.last: dict = {}  # the last step's row
    self.t_last = time.perf_counter()

  def add(self, step: int, m: dict, info: dict):
    self.pending.append((step, m, info))

  def flush(self):
    for stp, m, info in self.pending:
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      now = time.perf_counter()
      dt, self.t_last = now - self.t_last, now
      if m["finite"] < 1:
        self.pending.clear()
        raise NonFiniteError(f"non-finite loss or gradient at step {stp} (loss={m['loss']}, "
                             f"grad_norm={m['grad_norm']}); the update was not applied")
      fl, n_dev = info["flops"], self.n_dev
      m.update(step_time=dt, tokens_per_s_per_device=info["tokens"] / dt / n_dev,
               valid_tokens_per_s_per_device=m["valid_tokens"] / dt / n_dev,
               tflops_per_device=fl / dt / n_dev / 1e12)
      if self.peak:
        m["mfu"] = fl / dt / n_dev / self.peak
      m.pop("finite")
      if stp % self.every_steps == 0 or stp == self.total:
        self.writer.write(stp, m)
      self.progress.update(1, loss=m["loss"], lr=m["lr"])
      self.last = {"step": stp, **m}
    self.pending.clear()


class Training:
  """One run, its stages as methods that `_train` calls in order. `step`: the steps done; `good_step`: the last
  step checkpointed (or restored)."""

  def __init__(self, r: RunConfig, workdir: str, at: _Where):
    self.r, self.workdir, self.at = r, workdir, at
    self.pc = jax.process_count()
    self.is_main = jax.process_index() == 0
    self.total = r.train.num_steps
    self.mesh = shd.make_mesh(*r.mesh.shape, preset=r.mesh.preset)
    self.setup = state_lib.make_setup(r.model, self.mesh, r.optim, self.total)
    self.data_iter = build_data_iterator(r, per_process=r.train.global_batch_size // self.pc)
    os.makedirs(workdir, exist_ok=True)
    c = r.checkpoint
    self.ckpt = None
    if c.enabled:
      self.ckpt = at.ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir), every_steps=c.every_steps,
                                                       keep=c.keep, async_save=c.async_save)
    self.compiled = CompiledSteps(self.setup, r)
    self.preempted = False
    self.profiling = False

  def restore_or_init(self):
    """The workdir's latest checkpoint (state and data iterator), else a new state (random or converted weights)."""
    r, setup, ckpt = self.r, self.setup, self.ckpt
    self.latest = ckpt.latest_step() if ckpt else None
    self.t0 = time.perf_counter()
    if self.latest is not None:
      log.info("restoring step %d from %s", self.latest, ckpt.directory)
      saved, self.data_iter = ckpt.restore(self.latest, state_lib.checkpoint_abstract(setup), self.data_iter)
      self.state = state_lib.from_checkpoint(setup, saved, seed=r.seed, init_checkpoint=r.init_checkpoint)
      self.step = int(jax.device_get(self.state["step"]))
      log.info("resumed from %s at step %d", ckpt.directory, self.step)
    else:
      log.info("initialising the train state: %s", f"weights from {r.init_checkpoint}" if r.init_checkpoint
               else f"random weights (seed {r.seed})")
      params = self.pretrained_vision() if r.vision_pretrain.steps else None
      self.state = state_lib.init_state(setup, seed=r.seed, init_checkpoint=r.init_checkpoint, params=params)
      self.step = 0
    self.at.step = self.step
    self.good_step = self.latest if self.latest is not None else 0
    n_tr, n_fr = state_lib.num_params(self.state["params"]), state_lib.num_params(self.state["frozen"])
    log.info("model: %.2fM parameters (%.2fM trainable: %s; %.2fM frozen), state ready in %.1fs",
             (n_tr + n_fr) / 1e6, n_tr / 1e6, ",".join(setup.trainable), n_fr / 1e6, time.perf_counter() - self.t0)

  def pretrained_vision(self) -> dict:
    """The starting parameters with the vision tower pre-trained (vision_pretrain.*): a fresh run's, before
    step 0 (a resumed run restores the tower with the rest). Deterministic in the seed, so a run killed during
    it starts it over and gets the same tower."""
    r = self.r
    p = r.vision_pretrain
    params = state_lib.initial_params(self.setup, seed=r.seed, init_checkpoint=r.init_checkpoint)
    folder = p.image_folder or os.path.dirname(os.path.abspath(p.data))
    log.info("vision pre-training: reading the image-caption pairs of %s", p.data)
    pairs = vision_pretrain.load_pairs(p.data, folder, r.tokenizer, r.image,
                                       max_pixels=r.data.pipeline.max_image_pixels)
    log.info("vision pre-training: %d steps of %d pairs (SigLIP's sigmoid loss, %d pictures, %d captions)",
             p.steps, p.batch_size, len(pairs.caption_id), len(pairs.captions))
    params["vision"], report = vision_pretrain.pretrain(params["vision"], r.model, r.tokenizer.vocab_size, pairs, p,
                                                        seed=r.seed, progress=self.is_main and r.log.progress)
    held = (f", caption retrieval {100 * report['held_out_retrieval']:.1f}% on {report['held_out']} held-out pictures"
            if "held_out_retrieval" in report else "")
    log.info("vision pre-training done in %.1fs: loss %.4g%s", report["seconds"], report["loss"], held)
    return params

  def finished_before(self) -> bool:
    """True (and says so) when the workdir holds this run finished: the last step checkpointed, and what
    `finish` makes (the exported model, the final evals) already written; re-running it recomputes nothing."""
    r, step = self.r, self.step
    if step < self.total or self.latest != step:
      return False
    model = [os.path.join(self.workdir, "model")] if r.checkpoint.export_model else []
    evals = [os.path.join(self.workdir, "eval", f"{t}_step{step}.json") for t in r.eval.tasks] if r.eval.at_end else []
    made = model + evals
    if not all(os.path.exists(p) for p in made):
      return False
    if self.is_main:
      log.info("already finished at step %d of %d: %s (a larger train.num_steps trains on, a new --workdir starts "
               "over)", step, self.total, ", ".join(made) or self.workdir)
      for p in evals:
        with open(p) as fh:
          res = json.load(fh)
        print(f"final eval {res['task']} {res['primary_metric']}: {res['metrics'][res['primary_metric']]:.4g} "
              f"(from {p})", flush=True)
    if self.ckpt is not None:
      self.ckpt.close()
      self.at.ckpt = None
    return True

  def open_outputs(self):
    """The metrics writer, the progress bar and the SIGTERM handler (the step clock starts here)."""
    lg = self.r.log
    peak = peak_flops_per_device(self.r)
    self.writer = metrics_lib.MetricWriter(self.workdir, enabled=self.is_main, tensorboard=lg.tensorboard,
                                           resume_step=self.latest)
    self.progress = metrics_lib.Progress(self.total, self.step, enabled=self.is_main and lg.progress)
    self.stop = StopSignal()
    self.metrics = StepMetrics(self.writer, self.progress, total=self.total, every_steps=lg.every_steps, peak=peak)

  def next_global_batch(self):
    """(this process's host rows, the global batch); with several processes every process pads its rows to the
    largest length and tile bucket of any."""
    host = next_batch(self.data_iter, self.pc)
    if self.pc > 1:
      tpt = self.r.image.tokens_per_tile
      l_need, t_need = host_shapes_agreed(host, self.pc)
      host = batch_lib.pad_tiles(batch_lib.pad_length(host, l_need, tpt), t_need, tpt)
    return host, to_global(host, self.mesh, self.pc)

  def train_one_step(self):
    """Dispatches the next step; the metrics of the one before are fetched while it runs."""
    lg = self.r.log
    if lg.profile_start_step == self.step + 1 and self.is_main:
      jax.profiler.start_trace(os.path.join(self.workdir, "profile"))
      self.profiling = True
    host, batch = self.next_global_batch()
    fn = self.compiled(global_shapes(host, self.pc))
    with jax.profiler.StepTraceAnnotation("train", step_num=self.step + 1):
      self.state, m = fn(self.state, batch)
    self.step = self.at.step = self.step + 1
    b, l = batch.inputs.tokens.shape
    # attention counted per segment (packing, padding) from this process's host rows; with several
    # processes these stand for the others' (an estimate: no extra collective a step)
    pairs = self.pc * flops_lib.attention_pairs(host.inputs.segments)
    flops = flops_lib.step_flops(self.r.model, batch=b, seq_len=l, tiles=batch.inputs.tiles,
                                 trainable=self.setup.trainable, attention_pairs=pairs)["total"]
    info = {"tokens": b * l, "flops": flops}
    self.metrics.flush()  # the previous step's metrics (this step is already dispatched)
    self.metrics.add(self.step, m, info)
    if self.profiling and self.step >= lg.profile_start_step + lg.profile_num_steps - 1:
      jax.block_until_ready(self.state)
      jax.profiler.stop_trace()
      self.profiling = False

  def at_step_boundary(self) -> bool:
    """The checkpoint, eval and SIGTERM due after this step; True: preempted (saved), stop."""
    r, step = self.r, self.step
    want_eval = r.eval.every_steps > 0 and step % r.eval.every_steps == 0 and step < self.total
    want_save = self.ckpt is not None and step % max(1, r.checkpoint.every_steps) == 0
    self.preempted = self.stop.reached(step)
    if want_save or want_eval or self.preempted:
      self.metrics.flush()  # every step up to here is finite before anything is saved
    if want_save or (self.preempted and self.ckpt is not None):
      self.save(force=self.preempted)
    if want_eval:
      evals = run_evals(self.setup, r, self.state, step=step, workdir=self.workdir)
      self.writer.write(step, evals)
      self.progress.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in evals.items()))
    if self.preempted:
      log.warning("SIGTERM: saved step %d and stopping", step)
    return self.preempted

  def save(self, force: bool):
    self.ckpt.save(self.step, state_lib.checkpoint_tree(self.setup, self.state), self.data_iter, force=force)
    self.good_step = self.step

  def finish(self):
    """The last metrics and checkpoint; when not preempted, the exported model and the final evals."""
    r, done = self.r, not self.preempted
    self.metrics.flush()
    if self.ckpt is not None and done and self.good_step != self.step:
      self.save(force=True)
    self.progress.close()
    if self.ckpt is not None:
      self.ckpt.wait()
    if done and r.checkpoint.export_model:
      if self.is_main:
        log.info("writing the model to %s", os.path.join(self.workdir, "model"))
      out = weights.save_model(os.path.join(self.workdir, "model"), r.model, state_lib.full_params(self.state),
                               r.tokenizer_dir, image_cfg=r.eval_image)
      if self.is_main:
        log.info("model written to %s (python -m lladav_jax.eval --checkpoint %s ...)", out, out)
    if done and r.eval.at_end and r.eval.tasks:
      if self.is_main:
        log.info("final eval: %s, %s samples each with the sampler (the eval section's settings)",
                 ", ".join(r.eval.tasks), r.eval.limit or "all")
      te = time.perf_counter()
      evals = run_evals(self.setup, r, self.state, step=self.step, workdir=self.workdir)
      self.writer.write(self.step, evals)
      if self.is_main:
        print_final_evals(evals, eval_start=te, run_start=self.t0)
      self.metrics.last.update(evals)
    if self.ckpt is not None:
      self.ckpt.close()
      self.at.ckpt = None

  def close_outputs(self):
    self.stop.restore()
    if self.profiling:
      jax.profiler.stop_trace()
    self.progress.close()
    self.writer.close()


def _train(r: RunConfig, workdir: str, at: _Where) -> dict:
  """restore or init -> compile -> loop {step, then checkpoint / eval / SIGTERM} -> finish; the last metrics."""
  t = Training(r, workdir, at)  # mesh, state setup, this process's data iterator, checkpointer
  t.restore_or_init()
  if t.finished_before():
    return {}
  t.compiled(largest_batch_shapes(r))  # ahead of time; the other buckets compile on first use
  t.open_outputs()
  try:
    while t.step < t.total:
      t.train_one_step()
      if t.at_step_boundary():
        break
    t.finish()
  finally:
    t.close_outputs()
  return t.metrics.last

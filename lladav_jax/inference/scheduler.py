"""The engine loop of a server: one thread owns the engines and the device; request handlers (asyncio)
hand it prepared jobs and read typed events back (`Prefix`, `Denoise`, `Done`, `Failed`).

Requests of the same compiled shape (engine config, prompt bucket, answer bucket) share an engine
(`runner.EngineRunner`); every tick each engine with running rows advances `steps_per_tick` steps,
then the thread reads every row back: a finished row goes to its job and frees its row, a running one
reports the prefix of its answer that is final (committed, and past any stop that could still start
there). Between ticks waiting jobs take free rows (at most `max_rows` running in all) and abandoned
ones leave theirs. A row's tokens do not depend on its neighbours or on when it joined (the engine's
guarantee), so an answer equals `LLaDAV.generate`'s for the same request.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
from typing import Any, Callable, Union

import numpy as np

from lladav_jax.inference.engine import EngineConfig, EngineShapes, Request
from lladav_jax.inference.model import InferenceModel
from lladav_jax.inference.runner import EngineRunner, RowResult
from lladav_jax.inference.text import answer_ids

log = logging.getLogger("lladav_jax.serve")


@dataclasses.dataclass(frozen=True)
class Prefix:
  """More of the answer is final: committed, and past any stop that could still start there."""
  ids: list  # the final answer prefix (every id so far, not only the new ones)


@dataclasses.dataclass(frozen=True)
class Denoise:
  """Every step of a job that asked for it: the whole answer region as it stands."""
  response: np.ndarray  # int32 [G] (mask_id where not committed)
  commit_step: np.ndarray  # int32 [G]
  steps: int
  stop: int


@dataclasses.dataclass(frozen=True)
class Done:
  result: RowResult


@dataclasses.dataclass(frozen=True)
class Failed:
  message: str


Event = Union[Prefix, Denoise, Done, Failed]


@dataclasses.dataclass
class Job:
  """One answer (one choice of a request): its engine request and where its events go."""
  request: Request
  cfg: EngineConfig
  shapes: EngineShapes  # the engine it runs in (rows filled in by the scheduler)
  gen_length: int
  stop_len: int  # the longest of its stop sequences (a prefix this close to the front may still become a stop)
  mask_id: int
  denoise: bool  # report every step's answer positions
  emit: Callable[[Event], None]  # thread-safe
  cancelled: bool = False
  final: int = 0  # answer positions already reported final
  nfe: int = 0  # forward evaluations so far

  @property
  def key(self):
    return self.cfg, self.shapes


def asyncio_emitter(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, tag: Any) -> Callable[[Event], None]:
  """An `emit` that puts (tag, event) on an asyncio queue from the scheduler thread (nothing once the loop
  is closed: the request is gone)."""
  def emit(ev):
    try:
      loop.call_soon_threadsafe(queue.put_nowait, (tag, ev))
    except RuntimeError:
      pass
  return emit


class Scheduler:
  """Continuous batching over engines of `max_rows` rows; `max_queue` jobs wait at most."""

  def __init__(self, model: InferenceModel, *, max_rows: int, max_queue: int, steps_per_tick: int = 1,
               on_tokens: Callable[[int, int], None] = lambda tokens, nfe: None):
    self.model, self.max_rows, self.max_queue, self.steps_per_tick = model, max_rows, max_queue, steps_per_tick
    self.on_tokens = on_tokens  # metrics: (answer tokens, forward evaluations) of each job that ends
    self.waiting: collections.deque[Job] = collections.deque()
    self.running: dict[tuple, Job] = {}  # (engine key, row) -> job
    self.runners: dict[tuple, EngineRunner] = {}
    self.cv = threading.Condition()
    self.admitting = 0  # jobs taken from the queue, not yet in a row
    self.stopping = False
    self.thread = threading.Thread(target=self._loop, name="lladav-engine", daemon=True)

  # ------------------------------------------------------------ called from the HTTP side
  def start(self):
    self.thread.start()

  def submit(self, jobs: list[Job]) -> bool:
    """Queues `jobs` (all or none); False when the queue has no room for them."""
    with self.cv:
      if len(self.waiting) + len(jobs) > self.max_queue:
        return False
      self.waiting.extend(jobs)
      self.cv.notify()
    return True

  def cancel(self, job: Job):
    """The job's client left: it leaves the queue or frees its row at the next tick."""
    with self.cv:
      job.cancelled = True
      self.cv.notify()

  @property
  def queue_depth(self) -> int:
    return len(self.waiting)

  @property
  def busy_rows(self) -> int:
    return len(self.running)

  @property
  def idle(self) -> bool:
    with self.cv:
      return not (self.waiting or self.running or self.admitting)

  def stop(self):
    with self.cv:
      self.stopping = True
      self.cv.notify()
    self.thread.join()

  # ------------------------------------------------------------ the engine thread
  def _loop(self):
    while not self.stopping or self.waiting or self.running:
      try:
        self._tick()
      except Exception as e:  # a bug here must not stop the server: the running answers fail, it goes on
        log.exception("engine loop failed")
        with self.cv:
          jobs, self.running, self.runners, self.admitting = list(self.running.values()), {}, {}, 0
        for job in jobs:
          job.emit(Failed(f"{type(e).__name__}: {e}"))

  def _tick(self):
    with self.cv:
      while not (self.waiting or self.running or self.stopping):
        self.cv.wait()
      admit = []
      while self.waiting and len(self.running) + len(admit) < self.max_rows:
        job = self.waiting.popleft()
        if not job.cancelled:
          admit.append(job)
      self.admitting = len(admit)
      dropped = [(k, j) for k, j in self.running.items() if j.cancelled]
    for (key, row), job in dropped:
      self.runners[key].release(row, running=True)
      del self.running[key, row]
      self.on_tokens(0, job.nfe)
    for job in admit:
      self._insert(job)
      with self.cv:
        self.admitting -= 1
    for key in list(self.runners):
      runner = self.runners[key]
      if runner.busy:
        self._advance(key, runner)
      if not runner.busy:  # an idle engine's state (its cache) is not kept; its compiled code is
        del self.runners[key]

  def _insert(self, job: Job):
    try:
      runner = self.runners.get(job.key)
      if runner is None:
        runner = self.runners[job.key] = EngineRunner(self.model, job.cfg, job.shapes)
      row = runner.insert(job.request)
    except Exception as e:  # a request the engine refuses ends alone; the server goes on
      log.exception("insert failed")
      job.emit(Failed(f"{type(e).__name__}: {e}"))
      return
    self.running[job.key, row] = job

  def _advance(self, key, runner: EngineRunner):
    try:
      got = runner.advance(self.steps_per_tick)
    except Exception as e:
      log.exception("advance failed")
      for (k, row), job in list(self.running.items()):
        if k == key:
          del self.running[k, row]
          job.emit(Failed(f"{type(e).__name__}: {e}"))
      del self.runners[key]
      return
    for (k, row), job in list(self.running.items()):
      if k != key:
        continue
      job.nfe = int(got.nfe[row])
      response, stop = got.response[row][:job.gen_length], int(got.stop[row])
      if job.denoise:
        job.emit(Denoise(response, got.commit_step[row][:job.gen_length], int(got.steps[row]), stop))
      if got.done[row]:
        del self.running[k, row]
        runner.release(row)
        result = got.row(row)
        self.on_tokens(len(answer_ids(result.response, result.stop, job.gen_length)), job.nfe)
        job.emit(Done(result))
        continue
      masked = np.flatnonzero(response == job.mask_id)
      committed = int(masked[0]) if masked.size else job.gen_length
      final = min(stop, committed - (job.stop_len - 1))
      if final > job.final:
        job.final = final
        job.emit(Prefix(response[:final].tolist()))

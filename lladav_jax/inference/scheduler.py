"""The engine loop of a server: one thread owns the engine and the device; request handlers (asyncio)
hand it prepared jobs and read typed events back (`Prefix`, `Denoise`, `Done`, `Failed`).

One engine (`runner.EngineRunner`) of lanes fixed at launch serves every request: a job names its lane
(prompt and answer buckets); every tick the engine advances `steps_per_tick` steps of each lane with a
running row (one program a lane, all dispatched before any is read), then the thread reads every row back:
a finished row goes to its job and frees its row, a running one reports the prefix of its answer that is
final (committed, and past any stop that could still start there). Between ticks waiting jobs take free rows
(at most `max_rows` running in all) and abandoned ones leave theirs. Before the first tick the thread
compiles every program a job can need (`EngineRunner.warm_up`), so that no request compiles. A row's tokens
do not depend on its neighbours or on when it joined (the engine's guarantee), so an answer equals
`LLaDAV.generate`'s for the same request.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Union

import numpy as np

from lladav_jax.inference.engine import Request
from lladav_jax.inference.features import TileFeatures
from lladav_jax.inference.model import InferenceModel
from lladav_jax.inference.runner import EngineRunner, Lane, RowResult
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
  lane: int  # the engine lane it runs in
  gen_length: int
  stop_len: int  # the longest of its stop sequences (a prefix this close to the front may still become a stop)
  mask_id: int
  denoise: bool  # report every step's answer positions
  emit: Callable[[Event], None]  # thread-safe
  cancelled: bool = False
  final: int = 0  # answer positions already reported final
  nfe: int = 0  # forward evaluations so far


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
  """Continuous batching over one engine of `lanes` (each of at least `max_rows` rows), at most `max_rows`
  answers running; `max_queue` jobs wait at most. `warm_tiles`: the tile counts warm-up compiles the
  tower for. `ready` is set once warm-up is done."""

  def __init__(self, model: InferenceModel, lanes: list[Lane], *, max_rows: int, max_queue: int,
               features: TileFeatures, warm_tiles: tuple = (), steps_per_tick: int = 1,
               on_tokens: Callable[[int, int], None] = lambda tokens, nfe: None):
    self.model, self.max_rows, self.max_queue, self.steps_per_tick = model, max_rows, max_queue, steps_per_tick
    self.lanes, self.features, self.warm_tiles = lanes, features, warm_tiles
    self.on_tokens = on_tokens  # metrics: (answer tokens, forward evaluations) of each job that ends
    self.waiting: collections.deque[Job] = collections.deque()
    self.running: dict[tuple, Job] = {}  # (lane, row) -> job
    self.runner: EngineRunner | None = None
    self.ready = threading.Event()
    self.warm_up_s = 0.0
    self.positions = [0, 0]  # useful, processed sequence positions (EngineRunner's), over every engine run
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
  def _new_runner(self):
    if self.runner is not None:  # its counts carry over
      self.positions = [self.positions[0] + self.runner.useful, self.positions[1] + self.runner.processed]
    self.runner = EngineRunner(self.model, self.lanes, self.features)

  def position_counts(self) -> tuple[int, int]:
    """(useful, processed) sequence positions so far (warm-up excluded)."""
    r = self.runner
    return (self.positions[0] + (r.useful if r else 0), self.positions[1] + (r.processed if r else 0))

  def _warm_up(self):
    t0 = time.monotonic()
    self._new_runner()
    self.runner.warm_up(self.warm_tiles)
    self._new_runner()  # the warm-up's rows and counts are not kept
    self.positions = [0, 0]
    self.warm_up_s = time.monotonic() - t0
    self.ready.set()

  def _loop(self):
    try:
      self._warm_up()
    except Exception:
      log.exception("warm-up failed")
      raise
    while not self.stopping or self.waiting or self.running:
      try:
        self._tick()
      except Exception as e:  # a bug here must not stop the server: the running answers fail, it goes on
        log.exception("engine loop failed")
        with self.cv:
          jobs, self.running, self.admitting = list(self.running.values()), {}, 0
        self._new_runner()
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
    for (lane, row), job in dropped:
      self.runner.release(row, lane, running=True)
      del self.running[lane, row]
      self.on_tokens(0, job.nfe)
    for job in admit:
      self._insert(job)
      with self.cv:
        self.admitting -= 1
    if self.running:
      self._advance()

  def _insert(self, job: Job):
    try:
      row = self.runner.insert(job.request, job.lane)
    except Exception as e:  # a request the engine refuses ends alone; the server goes on
      log.exception("insert failed")
      job.emit(Failed(f"{type(e).__name__}: {e}"))
      return
    self.running[job.lane, row] = job

  def _advance(self):
    try:
      lanes = self.runner.advance(self.steps_per_tick)
    except Exception as e:
      log.exception("advance failed")
      with self.cv:
        jobs, self.running = list(self.running.values()), {}
      self._new_runner()  # its state may be gone (donated)
      for job in jobs:
        job.emit(Failed(f"{type(e).__name__}: {e}"))
      return
    for (lane, row), job in list(self.running.items()):
      got = lanes[lane]
      job.nfe = int(got.nfe[row])
      response, stop = got.response[row][:job.gen_length], int(got.stop[row])
      if job.denoise:
        job.emit(Denoise(response, got.commit_step[row][:job.gen_length], int(got.steps[row]), stop))
      if got.done[row]:
        del self.running[lane, row]
        self.runner.release(row, lane)
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

"""The host side of one engine: which rows are free, `insert` into one, `advance` and read every row's
progress back (`EngineRunner`), and `run_engine`, which runs a list of requests through it with continuous
batching (a request takes a row as soon as one is free)."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import numpy as np

from lladav_jax.inference import engine
from lladav_jax.inference.engine import EngineConfig, EngineShapes, Request
from lladav_jax.inference.model import InferenceModel


@dataclasses.dataclass
class RowResult:
  """One row as read after an `advance` (host arrays)."""
  response: np.ndarray  # int32 [G + Ls]: the answer bucket (mask_id where not committed), then the suffix bucket
  stop: int  # answer position where the stop sequence starts (the answer bucket G if none)
  commit_step: np.ndarray  # int32 [G]: the step (0-based) that committed each position, -1 if none yet
  nfe: int  # forward evaluations (2 a step with CFG)
  steps: int  # denoising steps
  query_tokens: int  # positions run through the transformer, summed over forwards


@dataclasses.dataclass
class Progress:
  """Every row after an `advance` (host arrays [rows, ...]): the fields a host reads (small; no per-count
  gather). A row with `live` and `done` is finished: read it, then `release` it."""
  live: np.ndarray
  done: np.ndarray
  response: np.ndarray
  stop: np.ndarray
  commit_step: np.ndarray
  nfe: np.ndarray
  steps: np.ndarray
  query_tokens: np.ndarray

  def finished(self) -> list[int]:
    return [int(r) for r in np.nonzero(self.live & self.done)[0]]

  def row(self, r: int) -> RowResult:
    return RowResult(response=self.response[r], stop=int(self.stop[r]), commit_step=self.commit_step[r],
                     nfe=int(self.nfe[r]), steps=int(self.steps[r]), query_tokens=int(self.query_tokens[r]))


_READ = tuple(f.name for f in dataclasses.fields(Progress))


class EngineRunner:
  """One engine of `shapes.rows` rows. `run_engine` runs a fixed list of requests with it; the server's
  scheduler runs one with a small `max_steps`, to stream and admit between calls."""

  def __init__(self, model: InferenceModel, cfg: EngineConfig, shapes: EngineShapes):
    self.model, self.cfg, self.shapes = model, cfg, shapes
    self.free = list(range(shapes.rows))[::-1]
    with jax.set_mesh(model.mesh):  # rows sharded over (data, fsdp) like the activations
      self.state = engine.init(model.graphdef, cfg, shapes, model.state)

  @property
  def busy(self) -> int:
    return self.shapes.rows - len(self.free)

  def insert(self, req: Request) -> int:
    """Puts `req` into a free row (the vision tower runs here); returns the row."""
    row = self.free.pop()
    m = self.model
    with jax.set_mesh(m.mesh):
      self.state = engine.insert(m.graphdef, self.cfg, m.state, self.state, np.int32(row), req)
    return row

  def advance(self, max_steps: int = 1 << 30) -> Progress:
    """Runs until `max_steps` steps or a row finishes; returns every row's progress."""
    m = self.model
    with jax.set_mesh(m.mesh):
      self.state = engine.advance(m.graphdef, self.cfg, m.state, self.state, np.int32(max_steps))
      return Progress(**jax.device_get({f: getattr(self.state, f) for f in _READ}))

  def release(self, row: int, running: bool = False) -> None:
    """Frees `row`; `running`: it has not finished (its client left), so the engine stops working on it."""
    if running:
      with jax.set_mesh(self.model.mesh):
        self.state = engine.drop(self.state, np.int32(row))
    self.free.append(row)


def run_engine(model: InferenceModel, reqs: Sequence[Request], cfg: EngineConfig,
               shapes: EngineShapes) -> list[RowResult]:
  """Runs `reqs` through an engine of `shapes.rows` rows: each request goes into a free row as soon as
  one is free (continuous batching); returns each request's final row."""
  if cfg.cache == "dllm":
    for r in reqs:
      if float(r.row_params.transfer_ratio) > cfg.max_transfer_ratio:
        raise ValueError(f"transfer_ratio={float(r.row_params.transfer_ratio)} is above the engine's "
                         f"max_transfer_ratio={cfg.max_transfer_ratio}")
  out: list[Optional[RowResult]] = [None] * len(reqs)
  pending = list(range(len(reqs)))[::-1]
  runner = EngineRunner(model, cfg, shapes)
  running: dict[int, int] = {}
  while pending or running:
    while runner.free and pending:
      k = pending.pop()
      running[runner.insert(reqs[k])] = k
    got = runner.advance()
    for row in got.finished():
      out[running.pop(row)] = got.row(row)
      runner.release(row)
  return out

"""The host side of one engine: which rows of which lane are free, `insert` into one (the tiles' features
first), `advance` every lane and read every row's progress back (`EngineRunner`), and `run_engine`, which
runs a list of requests through one lane with continuous batching (a request takes a row as soon as one
is free)."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import numpy as np

from lladav_jax.inference import engine
from lladav_jax.inference.engine import EngineConfig, EngineShapes, Request
from lladav_jax.inference.features import TileFeatures
from lladav_jax.inference.model import InferenceModel
from lladav_jax.inference.params import SamplingParams
from lladav_jax.inference.prompts import bucket_tiles, prepare_inputs, requests


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


@dataclasses.dataclass(frozen=True)
class Lane:
  """One lane of an engine: its config (the longest block) and shapes (rows, prompt and answer buckets)."""
  cfg: EngineConfig
  shapes: EngineShapes

  @property
  def width(self) -> int:
    """Positions of a row's sequence: prompt, answer and suffix buckets."""
    return self.shapes.prompt_len + self.shapes.answer_len + self.shapes.suffix_len


class EngineRunner:
  """An engine of lanes (`Lane`s: each its own state and programs, advanced in turn when it has a running row).
  `run_engine` runs a fixed list of
  requests with one lane; the server's scheduler runs one with a small `max_steps`, to stream and admit
  between calls. Rows are numbered within their lane. `useful` / `processed` count sequence positions:
  those of the running rows' own prompt, answer and suffix, and those the passes ran (whole row groups
  of `forward_rows` rows, every position of the lane's buckets), summed over steps."""

  def __init__(self, model: InferenceModel, lanes: Sequence[Lane], features: Optional[TileFeatures] = None):
    self.model, self.lanes = model, tuple(lanes)
    self.features = features or TileFeatures(model)
    self.cfgs = tuple(lane.cfg for lane in self.lanes)
    self.free = [list(range(lane.shapes.rows))[::-1] for lane in self.lanes]
    self.own = [np.zeros(lane.shapes.rows, np.int64) for lane in self.lanes]  # a row's real positions
    self.steps = [np.zeros(lane.shapes.rows, np.int64) for lane in self.lanes]  # its steps at the last read
    self.useful = self.processed = 0
    with jax.set_mesh(model.mesh):  # rows sharded over (data, fsdp) like the activations
      self.states = tuple(engine.init(model.graphdef, lane.cfg, lane.shapes, model.state) for lane in self.lanes)

  @property
  def busy(self) -> int:
    return sum(lane.shapes.rows - len(free) for lane, free in zip(self.lanes, self.free))

  def insert(self, req: Request, lane: int = 0) -> int:
    """Puts `req` into a free row of `lane` (its tiles' features made or found first); returns the row."""
    shapes, m = self.lanes[lane].shapes, self.model
    req = self.features.attach(req, shapes.tiles)
    row = self.free[lane].pop()
    self.own[lane][row] = int(np.sum(np.asarray(req.prompt.segments) > 0)) + int(req.row_params.answer_len) + \
        int(req.suffix_len)
    self.steps[lane][row] = 0
    with jax.set_mesh(m.mesh):
      st = engine.insert(m.graphdef, self.cfgs[lane], m.state, self.states[lane], np.int32(row), req)
    self.states = self.states[:lane] + (st,) + self.states[lane + 1:]
    return row

  def advance(self, max_steps: int = 1 << 30) -> list[Optional[Progress]]:
    """Runs each lane with a running row until `max_steps` steps or until one of its rows finishes (every
    lane's program dispatched before any is read); returns each lane's progress (None: a lane that did not
    run)."""
    m = self.model
    busy = [k for k, lane in enumerate(self.lanes) if len(self.free[k]) < lane.shapes.rows]
    with jax.set_mesh(m.mesh):
      states = list(self.states)
      for k in busy:
        states[k] = engine.advance(m.graphdef, self.cfgs[k], m.state, states[k], np.int32(max_steps))
      self.states = tuple(states)
      read = jax.device_get([{f: getattr(self.states[k], f) for f in _READ} for k in busy])
    got: list[Optional[Progress]] = [None] * len(self.lanes)
    for k, fields in zip(busy, read):
      got[k] = prog = Progress(**fields)
      lane, own, steps = self.lanes[k], self.own[k], self.steps[k]
      moved = np.where(prog.live, prog.steps - steps, 0)
      steps[:] = np.where(prog.live, prog.steps, steps)
      g = lane.cfg.forward_rows or lane.shapes.rows
      g = g if lane.shapes.rows % g == 0 else lane.shapes.rows  # (with CFG a group may take rows of both halves)
      self.useful += int(np.sum(moved * own))
      self.processed += int(np.sum(moved.reshape(-1, g).max(axis=1))) * g * lane.width
    return got

  def blank_request(self, lane: int) -> Request:
    """A request of `lane`'s shapes (one BOS token, no image): what warm-up inserts."""
    cfg, shapes = self.lanes[lane].cfg, self.lanes[lane].shapes
    bl = cfg.max_block_length
    inp = prepare_inputs(self.model, [[0]], [[]], suffix_ids=[0] * shapes.suffix_len, seeds=[0], rows=1,
                         length=shapes.prompt_len, tiles=0, stop_shape=(shapes.stops, shapes.stop_len))
    params = SamplingParams(gen_length=bl, block_length=bl, steps=bl)
    return requests(inp, params.row_params(shapes.answer_len, bl), shapes.suffix_len)[0]

  def warm_up(self, tile_counts: Sequence[int] = ()) -> None:
    """Compiles (or reads from the compilation cache) every program a request within the lanes can need:
    the tower for the tile bucket of each of `tile_counts`, each lane's insert and drop, and advance."""
    for t in sorted({bucket_tiles(n) for n in tile_counts if n > 0}):
      s = self.model.image_cfg.image_size
      self.features.encode(np.zeros((t, s, s, 3), np.uint8))
    rows = [self.insert(self.blank_request(lane), lane) for lane in range(len(self.lanes))]
    self.advance(1)
    for lane, row in enumerate(rows):
      self.release(row, lane, running=True)

  def release(self, row: int, lane: int = 0, running: bool = False) -> None:
    """Frees `row` of `lane`; `running`: it has not finished (its client left), so the engine stops working on it."""
    if running:
      with jax.set_mesh(self.model.mesh):
        st = engine.drop(self.states[lane], np.int32(row))
      self.states = self.states[:lane] + (st,) + self.states[lane + 1:]
    self.free[lane].append(row)


def run_engine(model: InferenceModel, reqs: Sequence[Request], cfg: EngineConfig,
               shapes: EngineShapes) -> list[RowResult]:
  """Runs `reqs` through an engine of one lane of `shapes.rows` rows: each request goes into a free row as
  soon as one is free (continuous batching); returns each request's final row."""
  if cfg.cache == "dllm":
    for r in reqs:
      if float(r.row_params.transfer_ratio) > cfg.max_transfer_ratio:
        raise ValueError(f"transfer_ratio={float(r.row_params.transfer_ratio)} is above the engine's "
                         f"max_transfer_ratio={cfg.max_transfer_ratio}")
  out: list[Optional[RowResult]] = [None] * len(reqs)
  pending = list(range(len(reqs)))[::-1]
  runner = EngineRunner(model, [Lane(cfg, shapes)])
  running: dict[int, int] = {}
  while pending or running:
    while runner.free[0] and pending:
      k = pending.pop()
      running[runner.insert(reqs[k])] = k
    (got,) = runner.advance()
    for row in got.finished():
      out[running.pop(row)] = got.row(row)
      runner.release(row)
  return out

"""What the user sees: a tqdm bar with ETA, TensorBoard scalars and `metrics.jsonl` (process 0 only)."""
from __future__ import annotations

import json
import logging
import os
import sys
import time

log = logging.getLogger(__name__)


class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl` (one JSON object per step) and TensorBoard.
  On every process but 0 it does nothing."""

  def __init__(self, workdir: str, *, enabled: bool, tensorboard: bool = True, resume_step: int | None = None):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if resume_step is not None and os.path.exists(self.path):
      drop_after(self.path, resume_step)
    elif resume_step is None and os.path.exists(self.path):
      os.replace(self.path, self.path + f".{int(time.time())}.old")  # a fresh run: keep the old log aside
    self.f = open(self.path, "a")
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except Exception as e:  # tensorboardX missing or broken: keep the JSON log
        log.warning("TensorBoard disabled: %s", e)

  def write(self, step: int, scalars: dict, prefix: str = ""):
    if not self.enabled:
      return
    row = {"step": int(step), **{prefix + k: _py(v) for k, v in scalars.items()}}
    self.f.write(json.dumps(row) + "\n")
    self.f.flush()
    if self.tb is not None:
      for k, v in scalars.items():
        if isinstance(v, (int, float)):
          self.tb.add_scalar(prefix + k, v, step)

  def close(self):
    if not self.enabled:
      return
    self.f.close()
    if self.tb is not None:
      self.tb.close()


def _py(v):
  try:
    return float(v)
  except (TypeError, ValueError):
    return v


def drop_after(path: str, step: int):
  """Keeps the rows of steps <= `step` (a resumed run rewrites what follows its checkpoint)."""
  with open(path) as f:
    rows = [line for line in f if line.strip()]
  keep = []
  for line in rows:
    try:
      if json.loads(line).get("step", 0) <= step:
        keep.append(line)
    except json.JSONDecodeError:
      pass  # a line cut by a kill
  with open(path + ".tmp", "w") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)


def read_metrics(path: str) -> dict[int, dict]:
  """{step: row} of a metrics.jsonl, the last row of each step winning."""
  out = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue
        out.setdefault(row["step"], {}).update(row)
  return out


class Progress:
  """tqdm over the steps (process 0, when enabled), with the latest loss/lr as postfix."""

  def __init__(self, total: int, initial: int, enabled: bool):
    self.bar = None
    if enabled:
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                      file=sys.stderr, mininterval=1.0)

  def update(self, n: int = 1, **postfix):
    if self.bar is not None:
      if postfix:
        self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                             refresh=False)
      self.bar.update(n)

  def write(self, msg: str):
    if self.bar is not None:
      self.bar.write(msg)
    else:
      print(msg, flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()

"""Orbax checkpoints of the train state and the data iterator, restored into an abstract target.

One `ocp.CheckpointManager` under `<workdir>/checkpoints` holds, per saved step,
    state:     the train state pytree (StandardSave; sharded arrays, each process writes its shards)
    data_iter: the Grain iterator state (grain.checkpoint handler; one JSON per process)
Async saves at a fixed interval (+ forced saves at the end and on SIGTERM), the last `keep` kept.
Restores always go into the abstract sharded train state (ShapeDtypeStruct + sharding), so a
restore never materialises a full copy on one device and never guesses shapes.

A save is written to `<step>.orbax-checkpoint-tmp` and renamed when complete. After a fatal error
`abort()` finishes the save in flight (or removes it if it cannot finish); a temporary directory left
by a kill is never read (`latest_step` skips it) and is removed when the next run starts.
"""
from __future__ import annotations

import logging
import os
import shutil

import grain
import grain.checkpoint  # noqa: F401  (registers CheckpointSave/CheckpointRestore with orbax)
import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)

TMP_MARK = ".orbax-checkpoint-tmp"  # orbax's suffix of a step directory still being written


class Checkpointer:
  def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True):
    self.directory = epath.Path(directory)
    remove_unfinished(directory, "left by an earlier run that was killed")
    options = ocp.CheckpointManagerOptions(save_interval_steps=max(1, int(every_steps)), max_to_keep=keep,
                                           enable_async_checkpointing=async_save, create=True)
    self.mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data_iter"))

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def save(self, step: int, state, data_iter, *, force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data_iter=grain.checkpoint.CheckpointSave(data_iter))
    saved = self.mngr.save(step, args=args, force=force)
    if saved:
      log.info("checkpoint: saving step %d to %s (async)", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state, data_iter):
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data_iter=grain.checkpoint.CheckpointRestore(data_iter))
    out = self.mngr.restore(step, args=args)
    return out["state"], out["data_iter"]

  def wait(self):
    self.mngr.wait_until_finished()

  def close(self):
    self.mngr.wait_until_finished()
    self.mngr.close()

  def abort(self) -> int | None:
    """After a fatal error: the save in flight is finished (its step was checked finite before it was
    saved); one that cannot finish is removed. Orbax's threads are stopped here, before the interpreter
    shuts their executors down under them. Returns the last committed step."""
    try:
      self.mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001  (the run is already failing: report, never mask it)
      log.warning("checkpoint: the save in flight failed (%s: %s)", type(e).__name__, e)
    try:
      self.mngr.close()
    except Exception as e:  # noqa: BLE001
      log.warning("checkpoint: closing the manager failed (%s: %s)", type(e).__name__, e)
    remove_unfinished(str(self.directory), "by a save that did not finish")
    return latest_committed(str(self.directory))


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def latest_committed(directory: str) -> int | None:
  """The newest fully written step under `directory` (its directory renamed into place), or None."""
  steps = [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) else []
  return max(steps, default=None)


def remove_unfinished(directory: str, why: str) -> None:
  """Removes the step directories still marked temporary (process 0: the one that renames them)."""
  if jax.process_index() != 0 or not os.path.isdir(directory):
    return
  for name in sorted(os.listdir(directory)):
    if TMP_MARK in name:
      log.warning("checkpoint: removing the unfinished %s (%s)", os.path.join(directory, name), why)
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)

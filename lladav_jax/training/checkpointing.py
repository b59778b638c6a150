"""Orbax checkpoints of the train state and the data iterator, restored into an abstract target.

One `ocp.CheckpointManager` under `<workdir>/checkpoints` holds, per saved step,
    state:     the train state pytree (StandardSave; sharded arrays, each process writes its shards)
    data_iter: the Grain iterator state (grain.checkpoint handler; one JSON per process)
Async saves at a fixed interval (+ forced saves at the end and on SIGTERM), the last `keep` kept.
Restores always go into the abstract sharded train state (ShapeDtypeStruct + sharding), so a
restore never materialises a full copy on one device and never guesses shapes.
"""
from __future__ import annotations

import logging
import os

import grain
import grain.checkpoint  # noqa: F401  (registers CheckpointSave/CheckpointRestore with orbax)
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)


class Checkpointer:
  def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True):
    self.directory = epath.Path(directory)
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


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")

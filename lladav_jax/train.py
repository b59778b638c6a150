r"""Train LLaDA-V: `python -m lladav_jax.train --config=configs/finetune.py[:PRESET] --workdir=DIR`.

usage: python -m lladav_jax.train [--help] --config=FILE[:PRESET] (--workdir=DIR | --print_config | --dry_run)
                                  [--config.SECTION.FIELD=VALUE ...]

    python -m lladav_jax.train --config=configs/finetune.py --workdir=runs/demo          # the CPU demo
    python -m lladav_jax.train --config=configs/finetune.py:finetune --workdir=runs/ft \
        --config.init.checkpoint=model/LLaDA-V-orbax --config.data.path=my_data.json \
        --config.data.image_folder=my_images --config.train.global_batch_size=64
    python -m lladav_jax.train --config=configs/finetune.py:stage1 --print_config     # the resolved settings
    python -m lladav_jax.train --config=configs/finetune.py:stage2_si --dry_run       # per-device memory plan

Re-running with the same --workdir resumes from its latest checkpoint (model, optimizer, step, RNG
and data-iterator position) and continues with exactly the losses of an uninterrupted run.
Presets and every field: configs/finetune.py. Multi-host: run the same command on every host
(launch/tpu_pod.sh, launch/slurm_gpu.sbatch); jax.distributed is initialised automatically.

Exit status: 0 done (or stopped by SIGTERM after a save, or --help), 2 a bad config, 3 a non-finite loss, 4 too many
bad samples (data.max_skip_fraction), 130 Ctrl-C, 1 any other failure; each prints one `error:` message.

This is the edge: the ConfigDict is resolved here into `training.settings.RunConfig` (validated
once, every bad field named) and nothing below reads the ConfigDict.
"""
from __future__ import annotations

import json
import logging
import sys
import traceback

from lladav_jax.training import host_memory

# Before JAX starts its threads (each binds to a malloc arena on its first allocation): see host_memory.
_MALLOC_TUNED = host_memory.reuse_freed_memory()

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lladav_jax.training import plan, run_config, trainer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file[:preset].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard logs go here.")
_PRINT = flags.DEFINE_bool("print_config", False, "Resolve and validate the config, print it as JSON and exit "
                           "(no training; --workdir not needed).")
_DRY = flags.DEFINE_bool("dry_run", False, "Compile the train step ahead of time on fake meshes (one subprocess "
                         "each) and print per-device memory: parameters, optimizer, batch, temporaries, the largest "
                         "buffers (lladav_jax/training/plan.py). No data, no weights, no training.")
_DRY_MESHES = flags.DEFINE_multi_string("dry_run_meshes", list(plan.DEFAULT_MESHES),
                                        "Meshes for --dry_run, each PRESET:DATA,FSDP,TENSOR.")
_DRY_GIB = flags.DEFINE_list("dry_run_device_gib", [f"{g:g}" for g in plan.DEVICE_GIB],
                             "Device memories (GiB) the --dry_run table checks each plan's peak against.")
_DRY_MESH = flags.DEFINE_string("dry_run_mesh", None, "(internal) plan one mesh on this process's devices.")
_DRY_DUMP = flags.DEFINE_string("dry_run_dump", None, "(internal) XLA dump folder of --dry_run_mesh.")
flags.mark_flag_as_required("config")
flags.register_multi_flags_validator(
    ["workdir", "print_config", "dry_run", "dry_run_mesh"],
    lambda f: bool(f["workdir"]) or f["print_config"] or f["dry_run"] or bool(f["dry_run_mesh"]),
    message="--workdir must be set (unless --print_config or --dry_run)")


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
  for noisy in ("absl", "orbax", "jax._src", "etils"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  if _MALLOC_TUNED:
    logging.info("CPU run: malloc keeps freed memory (one arena, no mmap, no trim): XLA's per-step temporaries are "
                 "reused, not faulted in again (lladav_jax/training/host_memory.py)")
  cfg = _CONFIG.value
  try:
    if _DRY_MESH.value:  # a --dry_run child: one mesh on this process's fake devices, one JSON line
      print(json.dumps(plan.plan_one(cfg, *plan.parse_mesh(_DRY_MESH.value), dump_dir=_DRY_DUMP.value)), flush=True)
      return
    if _DRY.value:
      plans = plan.run_plans(sys.argv[1:], _DRY_MESHES.value)
      print(plan.table(plans, [float(g) for g in _DRY_GIB.value]))
      for p in plans:
        print(json.dumps(p))
      sys.exit(1 if any("error" in p for p in plans) else 0)
    if not _PRINT.value:  # before resolve: the device count of a multi-process run needs it
      trainer.maybe_initialize_distributed(run_config.distributed_config(cfg))
    run = run_config.resolve(cfg, num_devices=jax.device_count(), process_count=jax.process_count())
    if _PRINT.value:
      # JSON, one section a line
      print("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in run.to_dict().items()) + "\n}")
      return
    trainer.train(run, _WORKDIR.value)
  except run_config.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except trainer.TrainingStopped as e:  # the checkpoint in flight is already committed or removed
    if e.unexpected:  # a bug or a device failure: where it happened matters
      traceback.print_exception(e.__cause__, file=sys.stderr)
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(e.exit_code)


_HELP = {"--help": True, "-h": True, "-?": True, "--helpshort": True, "--helpfull": False}


def _parse_flags(argv):
  """absl's parser, except that help exits 0 as argparse's does (absl's help flags exit 1) and -h is one."""
  for arg in argv[1:]:
    if arg == "--":
      break
    if arg in _HELP:
      app.usage(shorthelp=_HELP[arg], writeto_stdout=True)
      print("Try --helpfull to get a list of all flags." if _HELP[arg] else "")
      sys.exit(0)
  return app.parse_flags_with_usage(argv)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)

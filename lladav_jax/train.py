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

Exit status: 0 done (or stopped by SIGTERM after a save, or --help), 1 a flag error (a required flag missing,
an unknown flag or config field, a config file or preset that does not load, a value that does not parse: absl's
status, after the usage line) or any other failure, 2 a bad config value, 3 a non-finite loss, 4 too many bad
samples (data.max_skip_fraction), 130 Ctrl-C; each prints one `error:` message.

This is the edge: the ConfigDict is resolved here into `training.settings.RunConfig` (validated
once, every bad field named) and nothing below reads the ConfigDict.
"""
from __future__ import annotations

import json
import logging
import re
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


def usage_line() -> str:
  """The usage lines of this module's docstring (the required flags without brackets)."""
  lines = __doc__.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("usage:"))
  end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith(" "))
  return "\n".join(lines[start:end])


def flag_error(message: str):
  """A command-line mistake: the usage line and one `error:` line on stderr, exit status 1 (absl's), no traceback."""
  print(usage_line(), file=sys.stderr)
  print(f"error: {message}\nTry --help for the flags and the exit statuses.", file=sys.stderr, flush=True)
  sys.exit(1)


def _message(error: Exception) -> str:
  """absl's / ml_collections' error as one line: a missing required flag as such, a validator's message without
  the flag values before it, a config file's traceback (ml_collections puts it in the message) as its last line."""
  text = str(error)
  if "Traceback (most recent call last)" in text:
    head = text.split("Error whilst parsing config file:")[0].strip()
    return f"{head} {[line.strip() for line in text.splitlines() if line.strip()][-1]}"
  out = []
  for line in (line.strip() for line in text.splitlines()):
    required = re.fullmatch(r"flag --(\w+)=None: Flag --\1 must have a value other than None\.", line)
    if required:
      line = f"--{required.group(1)} is required"
    line = re.sub(r"^flags (\w+=[^,:]*, )*\w+=[^,:]*: ", "", line)  # a multi-flag validator's values
    if line:
      out.append(line)
  return "; ".join(out)


def _override_without_field(argv, error: Exception) -> str:
  """The `--config.FIELD=VALUE` whose FIELD the (locked) config lacks, named from ml_collections' error (the
  missing name, then its did-you-mean when there is one)."""
  inner = error
  while isinstance(inner, BaseException) and inner.args:  # AttributeError(KeyError("'name'\nDid you mean ..."))
    inner = inner.args[0]
  name, *hint = str(inner).splitlines()
  name = name.strip("'\"")
  hint = f" ({' '.join(hint).strip()})" if hint else ""
  for arg in argv[1:]:
    if arg == "--":
      break
    if arg.startswith("--config.") and name in arg[len("--config."):].split("=", 1)[0].split("."):
      return f"{arg}: the config has no field {name!r}{hint}"
  return f"a --config.FIELD override: the config has no field {name!r}{hint}"


def _parse_flags(argv):
  """absl's parser, except that help exits 0 as argparse's does (absl's help flags exit 1) and -h is one, and a
  flag error, a config file that does not load or an override of a field the config lacks is one `error:` line
  after the usage line (exit status 1, absl's), not a traceback."""
  for arg in argv[1:]:
    if arg == "--":
      break
    if arg in _HELP:
      app.usage(shorthelp=_HELP[arg], writeto_stdout=True)
      print("Try --helpfull to get a list of all flags." if _HELP[arg] else "")
      sys.exit(0)
  try:
    args = flags.FLAGS(argv)
  except flags.Error as e:
    flag_error(_message(e))
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a field the (locked) config lacks
    flag_error(_override_without_field(argv, e))
  try:
    _CONFIG.value.keys()  # a config file that did not load: ml_collections defers its error to the first access
  except OSError as e:  # its last line: the reason ("[Errno 2] No such file or directory: 'x.py'")
    flag_error(f"flag --config={flags.FLAGS['config'].config_filename}: {str(e).strip().splitlines()[-1].strip()}")
  return args


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)

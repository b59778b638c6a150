"""Shared helpers for tests/test_train_*.py: small optimizer configs, batches by field, subprocess environments."""
import dataclasses
import os
import sys

import jax

from lladav_jax.training import optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def optim_cfg(trainable=optimizer.GROUPS, lr=1e-3, schedule="constant", warmup_ratio=0.0, group_lr=None):
  return optimizer.OptimConfig(trainable=tuple(trainable), lr=lr, group_lr=group_lr or {}, b1=0.9, b2=0.999,
                               eps=1e-8, weight_decay=0.0, clip_norm=1.0, warmup_ratio=warmup_ratio, schedule=schedule)


def flat(batch):
  """A TrainBatch as {field: array}: the tests compare and index batches field by field."""
  x = batch.inputs
  return {**{f.name: getattr(x, f.name) for f in dataclasses.fields(x)}, "labels": batch.labels}


def subprocess_env(devices=1):
  """Environment for running the real entry point in a subprocess (CPU; the session's compile flags and persistent
  compile cache, inherited from tests/conftest.py's environment)."""
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  # the tests' flags (tests/conftest.py: LLVM -O1), with `devices` CPU devices instead of eight
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"  # as in the tests' own process: the same programs, cache hits
  return env


def inference_env():
  """subprocess_env for the inference entry points (generate, eval, convert, serve, lmms-eval): the tests' own device
  count. LLaDAV runs on the first device whatever the count, so their programs are the ones the tests compile
  in-process and the persistent cache, whose key holds the device count, serves them."""
  return subprocess_env(devices=jax.device_count())


PYTHON = sys.executable

"""Test setup: 8 fake CPU devices (for sharding tests) before JAX initialises its backend."""
import atexit
import os
import shutil
import tempfile

# LLVM at -O1, not -O2: less compile time (most of a test's time is compiling tiny programs), and results agree
# to float32 rounding. A flag of the caller's own comes later on the line and wins.
os.environ["XLA_FLAGS"] = ("--xla_backend_optimization_level=1 " + os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# JSON record indexes of the tests' throwaway files go to a throwaway folder, not ~/.cache
os.environ.setdefault("LLADAV_JAX_INDEX_DIR", tempfile.mkdtemp(prefix="lladav_index_"))
# One persistent XLA compilation cache for the whole session: the tests compile the same tiny-model programs in
# many files, and the xdist workers and the entry points run in subprocesses (servers, CLIs) inherit this
# environment, so each program compiles once per device count. A fresh folder per session (as CI starts: empty,
# and concurrent runs never share one), removed at exit by the process that made it (pytest's main process).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lladav_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # every program: most compile in under 1 s
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"  # no size floor

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")


# `--dist loadfile` (CI) hands out the files with the most tests first, so the files of few but long tests (the
# CLIs, the servers, the sharded and compiled steps) would come last, one worker running the last of them alone.
# These, the longest files, go first, the longest first; the rest keep xdist's order.
LONG_FILES = ("test_released_checkpoint.py", "test_sampler.py", "test_lmms_cli.py", "test_train_resume.py",
              "test_sampler_accel.py", "test_fsdp_work.py", "test_attention.py", "test_serve.py",
              "test_sampler_engine.py", "test_parity_lladav.py", "test_lora.py", "test_train_step.py", "test_readme.py",
              "test_train_errors.py", "test_sampler_dllm.py", "test_sampler_cli.py", "test_train_plan.py",
              "test_serve_page.py", "test_packing.py", "test_inference_dtype.py", "test_tile_buckets.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  if config.getvalue("dist") != "loadfile":
    return None
  from xdist.scheduler import LoadFileScheduling

  class LongFilesFirst(LoadFileScheduling):
    def _assign_work_unit(self, node):
      for name in reversed(LONG_FILES):  # each to the front of the queue: the first listed ends up first
        for scope in [s for s in self.workqueue if os.path.basename(s) == name]:
          self.workqueue.move_to_end(scope, last=False)
      super()._assign_work_unit(node)

  return LongFilesFirst(config, log)

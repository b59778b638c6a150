"""training/host_memory: on the CPU backend a compiled program's temporaries are reused across calls instead of
being mapped and faulted in again every call; the allocator is left alone where the user chose one or an
accelerator may run the program; the rerun under tcmalloc (bench/train.py) reuses them too."""
import subprocess
import sys

import pytest

from lladav_jax.training import host_memory
from tests.train_helpers import REPO, subprocess_env

FAULTS = """
import os, resource, sys
from lladav_jax.training import host_memory
if sys.argv[1] == "tcmalloc":
  host_memory.rerun_with_tcmalloc(sys.orig_argv)  # replaces this process; returns once LD_PRELOAD is set
tuned = host_memory.reuse_freed_memory() if sys.argv[1] == "tuned" else False
import jax, jax.numpy as jnp

@jax.jit
def f(x):
  return jnp.tanh(x @ x.T).sum(0)  # the product: a 64 MiB temporary each call

x = jnp.ones((4096, 16), jnp.float32)
f(x).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  f(x).block_until_ready()
print(tuned, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 5, os.environ.get("LD_PRELOAD", "-"))
"""


def _faults_per_call(mode):
  """Minor faults a call and the LD_PRELOAD the script ran under (the parent's allocator choice left out)."""
  env = {k: v for k, v in subprocess_env().items() if k not in host_memory.USER_CHOICE}
  r = subprocess.run([sys.executable, "-c", FAULTS, mode], cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  tuned, faults, preload = r.stdout.split()
  assert tuned == str(mode == "tuned")
  return float(faults), preload


def test_temporaries_are_reused_not_faulted_in_again():
  (default, _), (tuned, _) = _faults_per_call("default"), _faults_per_call("tuned")
  # 64 MiB is 16384 pages of 4 KiB: glibc maps and unmaps the block every call unless told otherwise
  assert default > 8000, default
  assert tuned < 200, tuned


def test_the_allocator_is_left_alone_where_it_should_be(monkeypatch):
  for k in host_memory.USER_CHOICE:
    monkeypatch.delenv(k, raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert not host_memory.cpu_only() and not host_memory.reuse_freed_memory()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_memory.cpu_only()
  monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # the user's own malloc settings win
  assert not host_memory.reuse_freed_memory()


def test_rerun_under_tcmalloc():
  """bench/train.py's allocator: the process replaces itself under tcmalloc, which reuses the 64 MiB temporary."""
  if host_memory.tcmalloc_path() is None:
    pytest.skip("tcmalloc is not installed (Debian: libtcmalloc-minimal4; .ci/run installs it)")
  faults, preload = _faults_per_call("tcmalloc")
  assert "tcmalloc" in preload
  assert faults < 200, faults
